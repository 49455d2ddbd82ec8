"""Full-size FLUX.1 transformer: one denoising step, BF16 vs W4A16 baseline vs SVDQuant (ours), latency and weight memory.

    PYTHONPATH=. python benchmarks/flux.py [--out DIR] [--small]

Model: ``diffusers.FluxTransformer2DModel`` with the FLUX.1-dev configuration (19 double + 38 single blocks,
hidden 3072, guidance embedding), random BF16 weights, 1024x1024 inputs (4096 image + 512 text tokens, batch 1).

Variants (same model object, linears swapped in place; the per-model rules of
:mod:`quantduo.integrations.diffusers` decide which layers stay BF16 / become W4A16):

* ``bf16``: the model as built;
* ``w4a16``: every quantizable linear INT4-g64 weight-only, no low-rank branch;
* ``svdq-w4a16``: the same with the rank-32 branch (every quantizable linear, modulation included);
* ``w4a16-tinygemm``: the same INT4-g64 values through PyTorch's tinygemm kernel
  (``torch.ops.aten._weight_int4pack_mm``, the kernel of torchao's int4 weight-only layout, i.e. diffusers'
  ``TorchAoConfig("int4wo")``): a library W4A16 baseline, as the paper's NF4 one (CUDA only);
* ``svdq-int4``: SVDQuant W4A4 INT4 (rank 32), the ``exact`` execution (4-bit activations); modulation linears W4A16;
* ``svdq-int4-a16``: those weights run with 16-bit activations (execution ``a16``, as ``generate --a16``);
* ``svdq-fp8``: the same weights run by FP8 execution (execution ``fp8``: per-token fp8 activations, the whole
  weight reconstructed into fp8 per call, one ``torch._scaled_mm``), with ``enable_fusions`` (GELU and the single
  blocks' concatenation inside the activation quantization), as ``generate --fp8``; fp8 GEMMs with fast
  accumulation (the default); ``svdq-fp8-precise``: the same with float32-promoted accumulation;
* ``svdq-auto``: the same weights with the library's default execution (``auto``: on a GPU with fp8 tensor cores
  this is ``svdq-fp8``);
* ``torchao-fp8row``, ``torchao-fp8row-qkv``, ``svdq-fp8-fa8``, ``svdq-fp8-fbc``: the peer rows of issue 20 (torchao
  fp8 row-wise, with fused QKV) and ``svdq-fp8`` with FP8 attention / the first-block cache, see
  :mod:`benchmarks.flux_peers`; a variant that fails (e.g. torchao missing) prints its error and is left out.
* ``svdq-fp8-qkv``, ``svdq-auto-qkv`` (any svdq variant + ``-qkv``): the same with fused QKV projections
  (:func:`quantduo.integrations.diffusers.fuse_qkv`: one quantized GEMM for q/k/v, one for the text stream's),
  see :mod:`benchmarks.flux_peers`;
* ``svdq-auto-split`` (any svdq variant + ``-split``, before ``-qkv`` if both): the single blocks' ``proj_out`` as
  two quantized halves (attention / MLP inputs, :class:`~quantduo.svdquant.split.SplitProjOut`), what a default
  calibration (``split_proj_out``) and Nunchaku files hold;
* ``svdq-fp8-fa3fp8qk-ln16`` (any svdq variant + ``-ln16``, last): the FLUX blocks' adaLN outputs kept in 16 bits
  (``enable_fusions(..., adaln_rows=False)``) instead of going to their layers as fp8 rows;
* ``nunchaku-exact``, ``nunchaku-a16``, ``nunchaku-fp8``: a full-size Nunchaku single file (published layout) with
  random weights, loaded by the published-checkpoint reader and run by that execution; their rows add
  ``rel_err_vs_exact`` (vs the same model's reference execution, Nunchaku's arithmetic), see
  :mod:`benchmarks.flux_published`;
* ``<variant>+compile``: the same modules, the whole transformer under ``torch.compile`` (``--compile-mode``,
  default mode by default); compare with ``bf16+compile``;
* ``<variant>+rcompile``: regional compilation, each transformer block compiled in place (diffusers'
  ``compile_repeated_blocks``; quantduo's fused blocks join the model's ``_repeated_blocks``): one graph per block
  class, reused by all 57 blocks, minutes less to compile than ``+compile``, no fusion across block boundaries.

The quantized modules are built by a FAST PATH, not the calibrated SVDQuant search: rank-32 randomized SVD of
the weight + round-to-nearest INT4 of the residual, smoothing factors 1. Speed and memory do not depend on the
search (same buffers, same kernels); the output errors are a sanity check. Two are printed: vs the BF16 model's eager
output, and vs the same model computed in float32 (``float32_reference``). Compare compiled variants by the second:
torch.compile keeps elementwise intermediates in float32 where eager BF16 rounds each op, so a compiled model sits
closer to the float32 output than BF16 eager does (on the ``--small`` model the BF16 model itself, compiled, is 0.037
from its eager output and 0.003 from float32).
Timing: CUDA events around one full forward, after warm-up, median of ``--reps`` runs.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from benchmarks import flux_peers, flux_published
from benchmarks.linear import tinygemm_operands
from quantduo.integrations.cuda_graph import GraphedForward
from quantduo.integrations.diffusers import ModelRules, enable_fusions, resolved_rules
from quantduo.svdquant import SVDQuantLinear, lowrank_factors
from quantduo.svdquant.quantize import pack_residual
from quantduo.svdquant.split import SplitProjOut, parallel_proj_outs
from quantduo.formats.quantizers import pad_to_multiple
from quantduo.utils import atomic_write, relative_error

FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56],
)
SMALL = dict(FLUX_DEV, num_layers=1, num_single_layers=1, attention_head_dim=64, num_attention_heads=2,
             joint_attention_dim=128, pooled_projection_dim=64, axes_dims_rope=[8, 28, 28])
RANK = 32
COMPILE, REGIONAL = "+compile", "+rcompile"
# (execution, fast_accum) of the INT4 variants; svdq-auto is the library default (``execution="auto"``)
VARIANT_EXECUTIONS = {"svdq-auto": ("auto",), "svdq-int4": ("exact",), "svdq-int4-a16": ("a16",),
                      "svdq-fp8": ("fp8", True), "svdq-fp8-precise": ("fp8", False)}


def build_model(config: dict, device: str, cls: type[nn.Module] = FluxTransformer2DModel) -> nn.Module:
    """Random-weight ``cls(**config)`` (a diffusers transformer) in BF16 on ``device``, initialised directly in BF16
    there (a CUDA ``device`` initialises the 12 B FLUX.1 parameters in seconds instead of minutes on the CPU)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def make_inputs(model: nn.Module, img_tokens: int, txt_tokens: int, device: str) -> dict:
    """One step's inputs: latents ``[1, img, 64]``, text ``[1, txt, 4096]``, pooled ``[1, 768]``, RoPE ids."""
    g = torch.Generator(device=device).manual_seed(1)
    cfg, side = model.config, int(img_tokens ** 0.5)
    rows, cols = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    bf = dict(device=device, dtype=torch.bfloat16, generator=g)
    return dict(
        hidden_states=torch.randn(1, img_tokens, cfg.in_channels, **bf),
        encoder_hidden_states=torch.randn(1, txt_tokens, cfg.joint_attention_dim, **bf),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, **bf),
        timestep=torch.full((1,), 0.5, device=device, dtype=torch.bfloat16),
        guidance=torch.full((1,), 3.5, device=device, dtype=torch.bfloat16) if cfg.guidance_embeds else None,
        img_ids=img_ids, txt_ids=torch.zeros(txt_tokens, 3, device=device), return_dict=False,
    )


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns if p != "auto")


def fast_svdquant(linear: nn.Linear, act_format: str, rank: int) -> SVDQuantLinear:
    """SVDQuantLinear from ``linear`` by the fast path: rank-``rank`` randomized SVD + RTN INT4 residual."""
    w = pad_to_multiple(linear.weight.float(), 64)
    module = SVDQuantLinear(linear.in_features, linear.out_features, rank=rank, bias=linear.bias is not None,
                            act_format=act_format, dtype=torch.bfloat16, device=w.device)
    up, down = lowrank_factors(w, rank, "randomized") if rank else (w.new_zeros(w.shape[0], 0), w.new_zeros(w.shape[1], 0))
    pack_residual(module, w - up @ down.T)
    module.proj_down.copy_(down)
    module.proj_up.copy_(up)
    if linear.bias is not None:
        module.bias.copy_(linear.bias)
    module.refresh_derived()
    return module


class TinygemmW4A16Linear(nn.Module):
    """INT4-g64 weight-only linear through ``torch.ops.aten._weight_int4pack_mm`` (tinygemm; CUDA, bfloat16):
    input ``[..., K]`` -> ``[..., N]``. Built from a rank-0 ``SVDQuantLinear`` (same codes and scales)."""

    def __init__(self, module: SVDQuantLinear):
        super().__init__()
        packed, scales_zeros = tinygemm_operands(module)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros.to(torch.bfloat16))
        self.bias = module.bias
        self.in_features, self.out_features = module.in_features, module.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, self.in_features), self.packed, 64, self.scales_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def variant_module(name: str, linear: nn.Linear, variant: str, rules: ModelRules) -> nn.Module | None:
    """The replacement of ``linear`` in ``variant`` under the model's ``rules`` (``None``: stays BF16)."""
    if variant == "torchao":
        return flux_peers.torchao_fp8_linear(linear)
    if _matches(name, rules.skip):
        return None
    if variant == "w4a16-tinygemm":
        return TinygemmW4A16Linear(fast_svdquant(linear, "none", 0))
    if variant in ("w4a16", "svdq-w4a16"):
        return fast_svdquant(linear, "none", RANK if variant == "svdq-w4a16" else 0)
    if _matches(name, rules.weight_only):
        return fast_svdquant(linear, "none", 0)
    return fast_svdquant(linear, "int4", RANK).set_execution(*VARIANT_EXECUTIONS.get(variant, ("exact",)))


def time_forward(model: nn.Module, inputs: dict, warmup: int, reps: int,
                 host_times: list[float] | None = None) -> list[float]:
    """Milliseconds of ``reps`` forwards (CUDA events; host clock on CPU). ``host_times`` (CUDA) receives each
    forward's host time until its last launch returned: a step whose host time reaches its device time is bound
    by launches, not kernels."""
    times = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        if inputs["hidden_states"].is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(**inputs)
            host = (time.perf_counter() - t0) * 1e3
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
            if host_times is not None and i >= warmup:
                host_times.append(host)
        else:
            model(**inputs)
            elapsed = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(elapsed)
    return times


def kernel_category(name: str) -> str:
    """Which part of the step a CUDA kernel belongs to (by its name)."""
    lowered = name.lower()
    if any(k in lowered for k in ("gemm", "nvjet", "cutlass", "xmma", "scaled_mm", "f8f8")):
        return "gemm"
    if any(k in lowered for k in ("flash", "fmha", "sdpa", "attention")):
        return "attention"
    if name.startswith("triton_"):
        return "inductor-fused ops"
    if name.startswith("_") and "::" not in name:
        return "quantduo kernels"
    return "other (elementwise, norms, copies)"


def profile_forward(model: nn.Module, inputs: dict, variant: str, top: int = 40) -> dict:
    """One profiled forward: device time per kernel category and the ``top`` kernels (printed)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(**inputs)
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_category: dict[str, float] = {}
    for e in kernels:
        cat = kernel_category(e.key)
        by_category[cat] = by_category.get(cat, 0.0) + e.self_device_time_total / 1e3
    print(f"\nprofile {variant}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(by_category.items())))
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"  {e.self_device_time_total / 1e3:8.2f} ms {e.count:5d}x  {e.key[:110]}")
    return by_category


def float32_reference(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The BF16 model's output computed in float32 (its weights cast in place and back: bf16 -> float32 -> bf16 is
    exact), ``[1, img_tokens, 64]`` float32: the ground truth the BF16 execution itself departs from."""
    model.float()
    try:
        wide = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
        with torch.no_grad():
            return model(**wide)[0].float()
    finally:
        model.to(torch.bfloat16)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the float32 copy's blocks (2x the model) go back before the variants


def measure(runner, model, variant, inputs, refs, args, options) -> dict:
    """Output errors vs the BF16 eager output and vs the float32 computation (``refs``: ``"bf16"`` / ``"fp32"``)
    and timings of ``runner`` (the model or its compiled version), as a row."""
    if options.first_block_cache:
        return dict(flux_peers.cache_measurement(runner, model, inputs, args), rel_err_vs_bf16=None,
                    rel_err_vs_fp32=None, graph_median_ms=None, profile_ms={})
    t0 = time.perf_counter()
    out = runner(**inputs)[0].clone()  # reduce-overhead mode overwrites graph outputs on the next call
    first_call_s = time.perf_counter() - t0
    print(f"{variant}: first call (compile, if any) {first_call_s:.1f} s", flush=True)
    host_times: list[float] = []
    times = time_forward(runner, inputs, args.warmup, args.reps, host_times)
    graphed = time_forward(GraphedForward(runner), inputs, args.warmup, args.reps) if args.cuda_graph else []
    profile = profile_forward(runner, inputs, variant) if args.profile else {}
    return dict(first_call_s=first_call_s, median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times),
                host_median_ms=statistics.median(host_times) if host_times else None, rel_err_vs_bf16=relative_error(out, refs["bf16"]), rel_err_vs_fp32=relative_error(out, refs["fp32"]),
                profile_ms=profile,
                graph_median_ms=statistics.median(graphed) if graphed else None)


def compile_suffix(variant: str) -> tuple[str, str | None]:
    """``(variant without its compile suffix, the suffix)``; the suffix is ``+compile``, ``+rcompile`` or None."""
    for suffix in (COMPILE, REGIONAL):
        if variant.endswith(suffix):
            return variant.removesuffix(suffix), suffix
    return variant, None


def compiled_runner(model: nn.Module, suffix: str | None, mode: str):
    """What runs a step: ``model`` itself (no suffix), ``torch.compile(model)`` (``+compile``), or ``model`` with
    its repeated blocks compiled in place by diffusers (``+rcompile``; undone by :func:`uncompile_blocks`)."""
    torch._dynamo.reset()
    if suffix == COMPILE:
        return torch.compile(model, mode=mode)
    if suffix == REGIONAL:
        model.compile_repeated_blocks(mode=mode)
    return model


def uncompile_blocks(model: nn.Module) -> None:
    """Undo ``+rcompile``: every submodule compiled in place (``nn.Module.compile``) runs eagerly again."""
    for module in model.modules():
        module._compiled_call_impl = None  # what nn.Module.compile sets; torch has no public inverse


def split_variant_module(linear: nn.Linear, variant: str) -> SplitProjOut:
    """A single block's ``proj_out`` as two quantized halves (attention / MLP inputs) run by ``variant``'s
    execution, each built by :func:`fast_svdquant`."""
    halves = SplitProjOut.from_linear(linear, linear.out_features)
    return SplitProjOut(*(fast_svdquant(half, "int4", RANK).set_execution(*VARIANT_EXECUTIONS.get(variant, ("exact",)))
                          for half in (halves.out_proj, halves.mlp_fc2)))


def run_variant(model, linears, variant, inputs, refs, args, rules: ModelRules) -> dict:
    """Swap ``variant``'s modules in (fusing QKV / enabling FP8 attention or the first-block cache where the
    variant asks, :mod:`benchmarks.flux_peers`), measure, put the BF16 model back."""
    t0 = time.perf_counter()
    swapped = {}
    base, suffix = compile_suffix(variant)
    options = flux_peers.variant_options(base)
    restore_ff = {}
    try:
        with torch.no_grad():
            if options.fuse_qkv:
                model.fuse_qkv_projections()
                linears = flux_peers.model_linears(model, fused=True)
            split_names = set(parallel_proj_outs(model)) if options.split_proj_out else set()
            for name, linear in linears.items():
                module = None if options.modules == "bf16" else variant_module(name, linear, options.modules, rules)
                if module is not None and options.split_proj_out and name in split_names:
                    module = split_variant_module(linear, options.modules)
                if module is not None:
                    model.set_submodule(name, module)
                    swapped[name] = linear
            restore_ff = enable_fusions(model, adaln_rows=not options.adaln16) \
                if options.modules in VARIANT_EXECUTIONS else {}
            flux_peers.enable_features(model, options)
            build_s = time.perf_counter() - t0
            runner = compiled_runner(model, suffix, args.compile_mode)
            row = dict(variant=variant, weight_gb=flux_peers.weight_bytes(model) / 1e9, quantized_layers=len(swapped),
                       build_s=build_s, **measure(runner, model, variant, inputs, refs, args, options))
    finally:
        uncompile_blocks(model)
        flux_peers.disable_features(model, options)
        for name, ff in restore_ff.items():
            model.set_submodule(name, ff)
        for name, linear in swapped.items():
            model.set_submodule(name, linear)
        if options.fuse_qkv:
            model.unfuse_qkv_projections()
        del swapped
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return row


def run_published_variant(model, variant, inputs, refs, args) -> dict:
    """``nunchaku-<execution>[+compile]``: a random full-size Nunchaku single file loaded through the reader
    (:mod:`benchmarks.flux_published`), run by ``<execution>``; adds ``rel_err_vs_exact`` (vs the reference
    execution of the same loaded model)."""
    t0 = time.perf_counter()
    base, suffix = compile_suffix(variant)
    loaded, exact = flux_published.loaded_checkpoint(model, inputs)
    flux_published.prepare(loaded, base.removeprefix("nunchaku-"))
    build_s = time.perf_counter() - t0
    runner = compiled_runner(loaded, suffix, args.compile_mode)
    with torch.no_grad():
        row = dict(variant=variant, weight_gb=flux_peers.weight_bytes(loaded) / 1e9,
                   quantized_layers=sum(isinstance(m, SVDQuantLinear) for m in loaded.modules()), build_s=build_s,
                   **measure(runner, loaded, variant, inputs, refs, args, flux_peers.variant_options("bf16")))
        row["rel_err_vs_exact"] = relative_error(runner(**inputs)[0], exact)
    return row


def load_compile_cache(path: Path | None) -> None:
    """Load torch.compile cache artifacts saved by :func:`save_compile_cache` (nothing without a path or file)."""
    if path is not None and path.exists():
        info = torch.compiler.load_cache_artifacts(path.read_bytes())
        print(f"compile cache {path}: {path.stat().st_size / 1e6:.1f} MB, "
              f"{sum(len(v) for v in (info.artifacts.values() if info else []))} artifacts loaded", flush=True)


def save_compile_cache(path: Path | None) -> None:
    """Write the artifacts of every compile of this process so far to ``path`` (atomically)."""
    saved = torch.compiler.save_cache_artifacts() if path is not None else None
    if saved is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(saved[0]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/bench_flux")
    parser.add_argument("--small", action="store_true", help="2-block model, 64+16 tokens (smoke test, any device)")
    parser.add_argument("--variants", nargs="+",
                        default=["bf16", "w4a16", "svdq-w4a16", "svdq-int4", "svdq-int4-a16", "svdq-fp8", "svdq-auto"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also time each variant as CUDA-graph replays of the whole forward "
                        "(quantduo.integrations.cuda_graph; CUDA)")
    parser.add_argument("--compile-mode", default="default",
                        choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                        help="torch.compile mode of the +compile variants (reduce-overhead: Inductor's own CUDA graphs)")
    parser.add_argument("--profile", action="store_true", help="also print each variant's kernel-time breakdown (CUDA)")
    parser.add_argument("--compile-cache", type=Path,
                        help="file of torch.compile's cache artifacts (torch.compiler.save_cache_artifacts): loaded "
                        "before the variants where it exists, rewritten after each compiled variant; carried between "
                        "device calls it saves the minutes of a fresh machine's first compile of the step")
    flux_peers.add_arguments(parser)
    args = parser.parse_args(argv)
    load_compile_cache(args.compile_cache)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = SMALL if args.small else FLUX_DEV
    img, txt = (64, 16) if args.small else (4096, 512)
    model = build_model(config, device)
    inputs = make_inputs(model, img, txt, device)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    rules = resolved_rules(model, **inputs)
    with torch.no_grad():
        refs = dict(bf16=model(**inputs)[0].float(), fp32=float32_reference(model, inputs))
    rows = []
    for variant in args.variants:
        try:
            if variant.startswith("nunchaku-"):
                rows.append(run_published_variant(model, variant, inputs, refs, args))
            else:
                rows.append(run_variant(model, linears, variant, inputs, refs, args, rules))
            if compile_suffix(variant)[1]:
                save_compile_cache(args.compile_cache)
        except Exception as error:  # noqa: BLE001 (one failing variant, e.g. a missing wheel, must not stop the rest)
            print(f"variant {variant} failed: {type(error).__name__}: {str(error)[:400]}", flush=True)
            torch._dynamo.reset()
            continue
        print(json.dumps(rows[-1]), flush=True)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    by_name = {r["variant"]: r for r in rows}
    base, cbase = by_name.get("bf16"), by_name.get("bf16" + COMPILE)
    print(f"\ndevice: {device_name}; torch {torch.__version__}; tokens {img}+{txt}; blocks "
          f"{config['num_layers']}+{config['num_single_layers']}")
    print("| variant | weights (GB) | vs BF16 memory | step ms median [min-max] | host ms (launches) | vs BF16 "
          "| vs BF16+compile | rel. err vs BF16 | rel. err vs float32 | first call s (compile) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ratio = lambda b, r: f"{b['median_ms'] / r['median_ms']:.2f}x" if b and b["median_ms"] and r["median_ms"] else "-"  # noqa: E731
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        mem = f"{base['weight_gb'] / r['weight_gb']:.2f}x smaller" if base else "-"
        print(f"| {r['variant']} | {r['weight_gb']:.2f} | {mem} | {r['median_ms']:.1f} [{r['min_ms']:.1f}-"
              f"{r['max_ms']:.1f}] | {fmt(r.get('host_median_ms'), '.1f')} | {ratio(base, r)} | {ratio(cbase, r)} | {fmt(r['rel_err_vs_bf16'], '.3f')} "
              f"| {fmt(r['rel_err_vs_fp32'], '.3f')} | {fmt(r.get('first_call_s'), '.1f')} |")
    if args.cuda_graph:
        gbase, gcbase = (dict(median_ms=b["graph_median_ms"]) if b else None for b in (base, cbase))
        print("\nCUDA graph of the whole forward (replays):\n| variant | step ms median | vs BF16 graph "
              "| vs BF16+compile graph |\n|---|---|---|---|")
        for r in rows:
            g = dict(median_ms=r["graph_median_ms"])
            print(f"| {r['variant']} | {fmt(g['median_ms'], '.1f')} | {ratio(gbase, g)} | {ratio(gcbase, g)} |")
    published = [r for r in rows if "rel_err_vs_exact" in r]
    if published:
        print("\nPublished Nunchaku layout (random full-size file through the reader):\n| variant | step ms median "
              "| CUDA graph ms | rel. err vs exact Nunchaku semantics |\n|---|---|---|---|")
        for r in published:
            print(f"| {r['variant']} | {r['median_ms']:.1f} | {fmt(r['graph_median_ms'], '.1f')} "
                  f"| {r['rel_err_vs_exact']:.4f} |")
    cached = [r for r in rows if "steps_skipped" in r]
    if cached:
        print("\nFirst-block cache (ms per step over consecutive scheduler steps, eager launches):\n| variant | threshold "
              "| steps skipped | ms/step with cache | ms/step without | speed-up | final latents rel. err vs no cache |"
              "\n|---|---|---|---|---|---|---|")
        for r in cached:
            print(f"| {r['variant']} | {args.cache_threshold} | {r['steps_skipped']}/{r['steps']} | {r['median_ms']:.1f} "
                  f"| {r['no_cache_ms_per_step']:.1f} | {r['no_cache_ms_per_step'] / r['median_ms']:.2f}x "
                  f"| {r['rel_err_vs_no_cache']:.3f} |")
            print(f"  first-block residual change per step: {r['first_block_changes']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flux_bench.json").write_text(json.dumps(dict(device=device_name, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
