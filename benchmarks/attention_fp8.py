"""FP8 attention (quantduo.kernels.attention_fp8) vs bf16 ``F.scaled_dot_product_attention`` at the FLUX shape.

    PYTHONPATH=. python benchmarks/attention_fp8.py [--heads 24 --tokens 4608 --dim 128]

Inputs bf16 ``[1, H, S, D]``, transposed views of ``[1, S, H, D]`` buffers as diffusers' FLUX processors pass them
(random normal; keys with a shared per-channel offset as DiT keys have). Times: CUDA events via
``triton.testing.do_bench`` (median); the fp8 rows include their Q/K/V quantization, and the kernel's two parts are
also timed alone (``quantize`` = the three quantization launches, ``codes`` = the attention launch on quantized
operands). TFLOP/s counts ``4 * S^2 * D * H``. Errors: relative L2 vs float64 attention of the same bf16 inputs.

Where the ``cudnn`` package (``nvidia-cudnn-frontend``) imports, cuDNN's own FP8 attention (``sdpa_fp8``, one float32
scale per tensor for Q, K, V, P scaled by 256, output in bf16 where cuDNN supports it, else E4M3 rescaled by V's
scale) is timed beside it, as the library alternative to the Triton kernel. A variant that fails prints its error
and the script goes on. Where FlashAttention-3 imports (``flash_attn_3``, docs/fa3.md), its bf16 kernel and its fp8
kernel (:mod:`quantduo.kernels.attention_fa3`: one scale per head) are timed, the fp8 one with its quantization in
eager PyTorch, with the quantization compiled, and on codes alone; its error vs the per-head reference
(``fp8_attention_heads_reference``) is printed too. Where ``sageattention`` imports (SageAttention 1: Triton, INT8
Q/K per block with K's mean subtracted, fp16 P @ V), it is timed as the peer DiT users install.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from quantduo.formats.attention_fp8 import E4M3_MAX, P_SCALE, fp8_attention_heads_reference
from quantduo.kernels.attention_fa3 import (FA3_AVAILABLE, fa3_attention_on_codes, fa3_fp8_attention, fa3_operands,
                                           flash_attn_func)
from quantduo.kernels.attention_fp8 import attention_on_codes, fp8_attention_launch, quantize_operands
from quantduo.utils import relative_error

try:
    import cudnn
except ImportError:  # the cuDNN rows are skipped
    cudnn = None
try:
    from sageattention import sageattn
except ImportError:  # the SageAttention row is skipped
    sageattn = None

TILES = [(64, 128, 4, 3), (64, 128, 4, 4), (64, 128, 4, 2), (64, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 4)]


def make_qkv(heads: int, tokens: int, dim: int) -> tuple[torch.Tensor, ...]:
    """bf16 q, k, v ``[1, H, S, D]``, each a transposed view of a ``[1, S, H, D]`` buffer."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, tokens, heads, dim, device="cuda", generator=g) for _ in range(3))
    k = k + 2.0 * torch.randn(1, 1, 1, dim, device="cuda", generator=g)
    return tuple(t.to(torch.bfloat16).transpose(1, 2) for t in (q, k, v))


def per_tensor_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 codes of x (x's strides) with one float32 scale ``absmax / 448`` as a ``[1, 1, 1, 1]`` tensor."""
    scale = (x.abs().amax().float() * (1.0 / E4M3_MAX)).clamp(min=1e-12).reshape(1, 1, 1, 1)
    return (x.float() * (1.0 / scale)).to(torch.float8_e4m3fn), scale


class CudnnFp8Attention:
    """cuDNN's FP8 SDPA forward for q, k, v of fixed shapes and strides ``[B, H, S, D]`` (bf16 in, bf16 out):
    per-tensor E4M3 quantization of q, k, v in PyTorch, then one cuDNN graph execution whose output is bf16 where
    cuDNN allows it, else E4M3 with V's scale (``|o| <= absmax(v)``), dequantized here."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float):
        self.handle = cudnn.create_handle()
        self.out = torch.empty_like(q)
        self.bf16_out = True
        try:
            self._build(q, k, v, sm_scale, cudnn.data_type.BFLOAT16)
        except Exception as error:  # noqa: BLE001 (older cuDNN: fp8 output only)
            print(f"cudnn fp8 with bf16 output unsupported ({type(error).__name__}: {str(error)[:160]}); "
                  "using E4M3 output", flush=True)
            self.bf16_out = False
            self.out = torch.empty(q.shape, dtype=torch.float8_e4m3fn, device=q.device).as_strided(q.shape,
                                                                                                    q.stride())
            self._build(q, k, v, sm_scale, cudnn.data_type.FP8_E4M3)

    def _build(self, q, k, v, sm_scale, out_type) -> None:
        graph = cudnn.pygraph(io_data_type=cudnn.data_type.FP8_E4M3, intermediate_data_type=cudnn.data_type.FLOAT,
                              compute_data_type=cudnn.data_type.FLOAT, handle=self.handle)
        tensors = {name: graph.tensor(name=name, dim=list(t.shape), stride=list(t.stride()),
                                      data_type=cudnn.data_type.FP8_E4M3) for name, t in zip("qkv", (q, k, v))}
        scalars = {name: graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1],
                                      data_type=cudnn.data_type.FLOAT)
                   for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")}
        o, _, amax_s, amax_o = graph.sdpa_fp8(q=tensors["q"], k=tensors["k"], v=tensors["v"], **scalars,
                                               generate_stats=False, attn_scale=sm_scale, use_causal_mask=False)
        o.set_output(True).set_dim(list(q.shape)).set_stride(list(q.stride())).set_data_type(out_type)
        for amax in (amax_s, amax_o):
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(
                cudnn.data_type.FLOAT)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        self.graph, self.tensors, self.scalars, self.o, self.amax = graph, tensors, scalars, o, (amax_s, amax_o)
        self.workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device=q.device)
        self.amax_buffers = [torch.zeros(1, 1, 1, 1, device=q.device) for _ in range(2)]
        self.p_scales = (torch.full((1, 1, 1, 1), 1.0 / P_SCALE, device=q.device),
                         torch.full((1, 1, 1, 1), P_SCALE, device=q.device))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        (q8, sq), (k8, sk), (v8, sv) = per_tensor_e4m3(q), per_tensor_e4m3(k), per_tensor_e4m3(v)
        scale_o = torch.ones_like(sv) if self.bf16_out else 1.0 / sv
        pack = {self.tensors["q"]: q8, self.tensors["k"]: k8, self.tensors["v"]: v8,
                self.scalars["descale_q"]: sq, self.scalars["descale_k"]: sk, self.scalars["descale_v"]: sv,
                self.scalars["descale_s"]: self.p_scales[0], self.scalars["scale_s"]: self.p_scales[1],
                self.scalars["scale_o"]: scale_o, self.amax[0]: self.amax_buffers[0],
                self.amax[1]: self.amax_buffers[1], self.o: self.out}
        cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)
        self.graph.execute(pack, self.workspace, handle=self.handle)
        return self.out if self.bf16_out else (self.out.float() * sv).to(q.dtype)


def fa3_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> list:
    """FlashAttention-3 rows: bf16, fp8 per head (eager quantization / compiled quantization / codes only)."""
    def bshd(t):
        return t.transpose(1, 2)

    def fa3_bf16():
        out = flash_attn_func(bshd(q), bshd(k), bshd(v), softmax_scale=sm_scale)
        return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)

    quantize_compiled = torch.compile(fa3_operands)
    bounds = (2 * float(q.abs().max()), 2 * float(k.abs().max()))  # static bounds as loose as a norm bound
    operands = fa3_operands(q, k, v)
    reference = fp8_attention_heads_reference(q, k, v, sm_scale)
    print(f"fa3 fp8 vs its per-head reference: rel. err "
          f"{relative_error(fa3_fp8_attention(q, k, v, sm_scale), reference):.2e}", flush=True)
    return [("fa3 bf16", fa3_bf16),
            ("fa3 fp8 per head (eager quantization)", lambda: fa3_fp8_attention(q, k, v, sm_scale)),
            ("fa3 fp8 per head (compiled quantization)",
             lambda: fa3_attention_on_codes(quantize_compiled(q, k, v), sm_scale)),
            ("fa3 fp8: quantize only (compiled)", lambda: quantize_compiled(q, k, v)),
            ("fa3 fp8: quantize only, static q/k bounds (compiled)", lambda: quantize_compiled(q, k, v, *bounds)),
            ("fa3 fp8: codes only", lambda: fa3_attention_on_codes(operands, sm_scale))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=4608)
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args(argv)

    q, k, v = make_qkv(args.heads, args.tokens, args.dim)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    flops = 4 * args.tokens ** 2 * args.dim * args.heads
    sm_scale = args.dim ** -0.5
    rows = [("sdpa bf16", lambda: F.scaled_dot_product_attention(q, k, v))]
    rows += [(f"fp8 BM{bm} BN{bn} w{w} s{s}",
              lambda bm=bm, bn=bn, w=w, s=s: fp8_attention_launch(q, k, v, sm_scale, bm, bn, w, s))
             for bm, bn, w, s in TILES]
    operands = quantize_operands(q, k, v)
    rows += [("fp8 default tile: quantize only", lambda: quantize_operands(q, k, v)),
             ("fp8 default tile: codes only",
              lambda: attention_on_codes(operands, args.tokens, args.tokens, q.dtype, sm_scale))]
    if cudnn is not None:
        try:
            cudnn_fp8 = CudnnFp8Attention(q, k, v, sm_scale)
            rows += [("cudnn fp8 per-tensor", lambda: cudnn_fp8(q, k, v)),
                     ("cudnn fp8: quantize only", lambda: [per_tensor_e4m3(t) for t in (q, k, v)])]
        except Exception as error:  # noqa: BLE001 (cuDNN without fp8 attention here)
            print(f"cudnn fp8 failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
    if FA3_AVAILABLE:
        rows += fa3_rows(q, k, v, sm_scale)
    if sageattn is not None:
        k_sage = k.clone()  # sageattn subtracts K's mean in place
        rows.append(("sageattention 1 (INT8 QK, fp16 PV)", lambda: sageattn(q, k_sage, v, tensor_layout="HND")))
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; [1, {args.heads}, {args.tokens}, "
          f"{args.dim}] bf16")
    table = []
    for name, fn in rows:
        try:
            result = fn()
            err = relative_error(result, exact) if isinstance(result, torch.Tensor) else float("nan")
            ms = do_bench(fn, warmup=50, rep=300, return_mode="median")
            table.append((name, ms, err))
            print(f"{name}: {ms * 1e3:.1f} us, rel. err {err:.4f}", flush=True)
        except Exception as error:  # noqa: BLE001 (a tile that does not compile must not stop the others)
            print(f"{name} failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
    base = table[0][1] if table and table[0][0].startswith("sdpa") else None
    print("\n| variant | us | TFLOP/s | vs sdpa bf16 | rel. err vs float64 |\n|---|---|---|---|---|")
    for name, ms, err in table:
        speed = f"{base / ms:.2f}x" if base else "-"
        print(f"| {name} | {ms * 1e3:.1f} | {flops / ms / 1e9:.0f} | {speed} | {err:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
