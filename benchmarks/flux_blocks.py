"""One full-size FLUX.1 block compiled alone: its time and its kernels under Inductor configurations.

A whole-step compile of the FLUX transformer takes minutes on a fresh machine; a single double block and a single
single block (the FLUX.1-dev shapes: 4096 image + 512 text tokens, hidden 3072) compile in seconds, so Inductor
options that change the step's generated kernels are compared here first. The blocks run as in
``benchmarks/flux.py --variants svdq-fp8-fa3fp8+compile`` (fast-path INT4 weights, fp8 execution, the fusions, FP8
attention on FlashAttention-3 where ``flash_attn_3`` imports, else the Triton backend); each configuration
recompiles them (``torch._dynamo.reset``) and times CUDA-graph replays (median us) and one profiled call (device time
by kernel). With FlashAttention-3 the blocks are also timed with the fused Q / K path (``fuse_flux_qk=True``:
one kernel normalizes, rotates and quantizes Q / K) instead of the compiler's code for diffusers' processor.

    PYTHONPATH=. python3 benchmarks/flux_blocks.py [--inductor triton.multi_kernel=1 ...] [--out DIR]

``--inductor`` takes ``torch._inductor.config`` assignments (dotted, e.g. ``triton.multi_kernel=1``), one
configuration each, timed after the default one. Writes ``flux_blocks.json`` to DIR.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import flux  # noqa: E402
from benchmarks.linear import time_graph  # noqa: E402
from quantduo.integrations.diffusers import enable_fusions, resolved_rules  # noqa: E402
from quantduo.integrations.fp8_attention import enable_fp8_attention  # noqa: E402
from quantduo.kernels.attention_fa3 import FA3_AVAILABLE  # noqa: E402
from quantduo.utils import atomic_write  # noqa: E402

BLOCKS = {"double": "transformer_blocks.0", "single": "single_transformer_blocks.0"}


def block_inputs(model: nn.Module, inputs: dict) -> dict[str, tuple[tuple, dict]]:
    """``{kind: (args, kwargs)}`` each block of :data:`BLOCKS` receives in one forward of ``model``."""
    seen, hooks = {}, []
    for kind, name in BLOCKS.items():
        def hook(module, args, kwargs, kind=kind):
            seen.setdefault(kind, (args, kwargs))
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    return seen


def quantize_blocks(model: nn.Module, rules) -> None:
    """The fast-path INT4 fp8-execution layers of ``svdq-fp8`` in the blocks of :data:`BLOCKS` and the fusions."""
    for name, linear in list(model.named_modules()):
        if isinstance(linear, nn.Linear) and any(name.startswith(b + ".") for b in BLOCKS.values()):
            module = flux.variant_module(name, linear, "svdq-fp8", rules)
            if module is not None:
                model.set_submodule(name, module)
    enable_fusions(model)


def parse_assignment(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def measure(model: nn.Module, block: nn.Module, args: tuple, kwargs: dict, patch: dict, fuse_flux_qk: bool) -> dict:
    """Compile ``block`` under the Inductor ``patch``; graphed median us and device ms per kernel (one call).
    ``fuse_flux_qk``: FLUX's attention by the fused Q / K path of :mod:`quantduo.integrations.diffusers.flux_fa3`
    (FlashAttention-3 only), else diffusers' processor under the SDPA hook (Q / K prepared by the compiler)."""
    torch._dynamo.reset()
    enable_fp8_attention(model, backend="fa3" if FA3_AVAILABLE else "triton", fuse_flux_qk=fuse_flux_qk)
    with torch._inductor.config.patch(patch), torch.no_grad():
        compiled = torch.compile(block)
        for _ in range(3):
            compiled(*args, **kwargs)
        us = time_graph(lambda: lambda: compiled(*args, **kwargs), 1e9, reps=20)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            compiled(*args, **kwargs)
            torch.cuda.synchronize()
    kernels = sorted(((e.self_device_time_total / 1e3, e.count, e.key) for e in prof.key_averages()
                      if e.device_type == torch.autograd.DeviceType.CUDA), reverse=True)
    return dict(graph_us=us, kernels=[dict(ms=ms, count=n, name=name) for ms, n, name in kernels])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inductor", nargs="*", default=[],
                        help="torch._inductor.config assignments, one configuration each, timed after the default "
                        "one (e.g. triton.multi_kernel=1)")
    parser.add_argument("--out", default=".", help="directory of flux_blocks.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    model = flux.build_model(flux.FLUX_DEV, "cuda")
    inputs = flux.make_inputs(model, 4096, 512, "cuda")
    rules = resolved_rules(model, **inputs)
    captured = block_inputs(model, inputs)
    quantize_blocks(model, rules)
    configs = {"default": ({}, False)} | {text: (dict([parse_assignment(text)]), False) for text in args.inductor}
    if FA3_AVAILABLE:
        configs["fused FLUX Q/K"] = ({}, True)
    rows = []
    for kind, name in BLOCKS.items():
        block = model.get_submodule(name)
        for label, (patch, fuse_flux_qk) in configs.items():
            row = dict(block=kind, config=label, **measure(model, block, *captured[kind], patch, fuse_flux_qk))
            rows.append(row)
            print(f"\n{kind} block, {label}: {row['graph_us']:.1f} us graphed; kernels (ms, calls):", flush=True)
            for k in row["kernels"][:14]:
                print(f"  {k['ms']:7.3f} {k['count']:3d}x {k['name'][:150]}", flush=True)
    atomic_write(os.path.join(args.out, "flux_blocks.json"),
                 lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
