"""The Hopper W4A16 GEMM (quantduo.kernels.gemm_w4_wgmma, Gluon) vs ``w4_gemv_ref`` (exact float32 INT4 weights from
the documented packing, float32 products, the shared low-rank / bias epilogue).

Gluon has no interpreter: on the CPU the kernel is compiled for sm_90a (asynchronous ``wgmma`` with both operands in
shared memory, ``cp.async`` activations, the documented decode) and its configuration / input checks run; the
numerics run on an sm_90 GPU (``gpu`` marker).
"""
from __future__ import annotations

import multiprocessing

import pytest
import torch
import torch.nn.functional as F
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

from quantduo.formats import quantizers as qz
from quantduo.formats import reference as ref
from quantduo.kernels import gemm_w4_mma as mma
from quantduo.kernels import gemm_w4_wgmma as wg
from quantduo.kernels.act_quant import act_quant
from quantduo.utils import relative_error

hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                            reason="needs an sm_90 GPU")


def _compile_for_hopper(dtype: str, **constexprs):
    """The kernel compiled for sm_90a with FLUX-shape specializations (16-divisible pointers, sizes, row strides)."""
    half = "*bf16" if dtype == "bf16" else "*fp16"
    pointers = {"X": half, "W": "*i32", "WS2": "*i32", "LXP": "*fp32", "LU": half, "BIAS": half, "OUT": half,
                "PART": "*fp32", "COUNTS": "*i32"}
    fn = wg._w4a16_wgmma_kernel
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = pointers.get(name, "i32")
        if name in pointers or name in ("N", "K", "stride_xm", "stride_wsn"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = GluonASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": constexprs["WARPS_"]})


COMPILE_CASES = [(128, 4, 3, 4, True, False, "bf16"), (64, 4, 2, 1, False, True, "fp16"),
                 (256, 4, 3, 2, True, True, "bf16"), (128, 8, 4, 1, True, False, "bf16")]


def _compile_cases(cases):
    """(PTX, shared bytes) of each (tokens, warps, stages, split, lowrank, gelu, dtype) case."""
    out = []
    for tokens, warps, stages, split, lowrank, gelu, dtype in cases:
        kernel = _compile_for_hopper(dtype, HAS_LR=lowrank, RP=32, HAS_BIAS=True, GELU=gelu, SPLIT_K=split,
                                     TOK=tokens, STAGES=stages, WARPS_=warps, ASM=wg._ASM[dtype])
        out.append((kernel.asm["ptx"], kernel.metadata.shared))
    return out


@pytest.fixture(scope="module")
def compiled():
    """The compile cases, built in a fresh process: Triton's interpreter leaves ``triton.language`` patched after an
    interpreted kernel calls a ``@triton.jit`` helper (Triton 3.9), which breaks later Gluon compiles in the same
    process (``'block_argument' object has no attribute 'dtype'``)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return dict(zip(COMPILE_CASES, pool.apply(_compile_cases, (COMPILE_CASES,))))


@pytest.mark.parametrize("case", COMPILE_CASES)
def test_compiles_for_hopper(compiled, case):
    """sm_90a: asynchronous wgmma of the token block's width on shared-memory operands; activations, codes and scale
    words by cp.async (no global load left in the main loop, whose waits would stall every group); the format's
    decode (lop3 constant, the exact packed fma removing the magic number) and the scale multiply; the shared memory
    of the ring and the two weight buffers (the epilogue's tile reuses it)."""
    tokens, warps, stages, _, _, _, dtype = case
    magic, ptx_type, _, negative_magic, _ = mma.DECODE[dtype]
    ptx, shared = compiled[case]
    assert f"wgmma.mma_async.sync.aligned.m64n{tokens}k16.f32.{'bf16' if dtype == 'bf16' else 'f16'}" in ptx
    assert "cp.async.cg.shared.global" in ptx and "wgmma.wait_group.sync.aligned 1" in ptx
    assert f"0x000F000F, {magic}, 0x6A" in ptx and f"fma.rn.{ptx_type}" in ptx and negative_magic in ptx
    rows = 16 * warps
    weights, ring = 2 * rows * 64 * 2, stages * (tokens * 64 * 2 + rows * 32 + rows * 4)  # + codes, scale words
    assert shared == max(weights + ring, rows * tokens * 4)
    assert "ld.global" not in ptx.split("wgmma.wait_group.sync.aligned 1")[0].split("cp.async.commit_group")[-1]


def test_pick_config():
    """The smallest token block holding M (256 above), SPLIT_K dividing the groups and reaching the program target
    when the groups allow it."""
    for N, K in [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288), (200, 192)]:
        for M in (65, 128, 129, 256, 600, 4608):
            cfg = wg.pick_config(M, N, K)
            assert cfg["TOKENS_BLOCK"] == (128 if M <= 128 else 256) and cfg["WARPS"] == 4
            groups = K // 64
            tiles = triton.cdiv(N, 64) * triton.cdiv(M, cfg["TOKENS_BLOCK"])
            assert groups % cfg["SPLIT_K"] == 0
            assert tiles * cfg["SPLIT_K"] >= 264 or cfg["SPLIT_K"] == groups
            assert all(tiles * d < 264 for d in range(1, cfg["SPLIT_K"]) if groups % d == 0)  # the smallest such
    assert wg.pick_config(64, 3072, 3072)["TOKENS_BLOCK"] == 64
    assert wg.pick_config(128, 3072, 3072)["SPLIT_K"] == 6  # 48 tiles: 6 of the 48 groups each -> 288 programs


def test_bad_inputs():
    """Clear errors instead of a wrong answer (checked before any launch)."""
    qw = torch.zeros(64, 64, dtype=torch.uint8)
    ws = torch.ones(64, 2, dtype=torch.bfloat16)
    a = torch.zeros(100, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="wscales"):
        wg.w4a16_wgmma_gemm(a, qw, ws[:, :1], None, None, None, torch.bfloat16)
    with pytest.raises(ValueError, match="qweight"):
        wg.w4a16_wgmma_gemm(a, qw[:, :40].contiguous(), ws, None, None, None, torch.bfloat16)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        wg.w4a16_wgmma_gemm(a.float(), qw, ws, None, None, None, torch.bfloat16)
    for bad in (dict(SPLIT_K=3), dict(TOKENS_BLOCK=32), dict(WARPS=2), dict(STAGES=1)):
        with pytest.raises(ValueError, match="SPLIT_K"):
            wg.w4a16_wgmma_gemm(a, qw, ws, None, None, None, torch.bfloat16, config=bad)
    assert not wg.supports(a, qw, None)  # CPU tensors


def _operands(M, N, K, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=g) * 2).to(dtype).cuda()
    smooth = (torch.rand(K, generator=g) + 0.5).to(dtype).cuda()
    down = (torch.randn(K, max(r, 1), generator=g) * 0.1).to(dtype).cuda()
    up = (torch.randn(N, max(r, 1), generator=g) * 0.1).to(dtype).cuda()
    qw = qz.pack_int4(torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)).cuda()
    ws = (torch.rand(N, K // 64, generator=g) * 0.02 + 0.001).to(dtype).cuda()
    bias = torch.randn(N, generator=g).to(dtype).cuda()
    a, _, lxp = act_quant(x, smooth, None, down if r else None, "smooth")
    return a, qw, ws, lxp, (up if r else None), bias


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("M", [1, 65, 130, 256, 300])
@pytest.mark.parametrize("N,K,r,config,dtype,gelu", [
    (3072, 3072, 32, None, torch.bfloat16, False), (200, 192, 32, dict(SPLIT_K=3), torch.bfloat16, True),
    (80, 512, 0, dict(SPLIT_K=1, TOKENS_BLOCK=64), torch.float16, False),
    (12288, 3072, 16, dict(WARPS=8, STAGES=4), torch.float16, True),
    (3072, 12288, 32, dict(SPLIT_K=64, TOKENS_BLOCK=256, STAGES=2), torch.bfloat16, False)])
def test_gpu_w4a16_wgmma_gemm(M, N, K, r, config, dtype, gelu):
    """Every nibble value, row edges (N not a multiple of 64), partial token blocks, K split 1 / 3 / 64 ways or by the
    default, 4 and 8 warps, 2-4 stages, low-rank, bias, GELU, bf16 and fp16 vs the exact-weight reference (the
    weights are rounded once to the 16-bit dtype as ``q * s``); a second call gives the same result (workspace and
    counters reset)."""
    a, qw, ws, lxp, up, bias = _operands(M, N, K, r, dtype)
    y = wg.w4a16_wgmma_gemm(a, qw, ws, lxp, up, bias, dtype, gelu=gelu, config=config)
    y_ref = ref.w4_gemv_ref(a, qw, ws, lxp.sum(0) if r else None, up, bias, dtype)
    if gelu:
        y_ref = F.gelu(y_ref.float(), approximate="tanh").to(dtype)
    assert y.shape == (M, N) and torch.isfinite(y).all()
    assert relative_error(y, y_ref) < (4e-3 if dtype == torch.bfloat16 else 2e-3)
    again = wg.w4a16_wgmma_gemm(a, qw, ws, lxp, up, bias, dtype, gelu=gelu, config=config)
    assert torch.equal(again, y) or relative_error(again, y_ref) < 4e-3


@pytest.mark.gpu
@hopper
def test_gpu_engine_uses_wgmma_above_64_tokens(monkeypatch):
    """On sm_90 the a16 and fp8 executions of an INT4 layer run this kernel from 65 to 256 tokens (not at 64 or 257)
    and match the a16 reference."""
    from quantduo.engine import linear as engine
    from quantduo.svdquant import SVDQuantLinear

    calls = []
    real = wg.w4a16_wgmma_gemm
    monkeypatch.setattr(wg, "w4a16_wgmma_gemm", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = SVDQuantLinear(3072, 3072, rank=32, act_format="int4", dtype=torch.bfloat16, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        layer.qweight.copy_(qz.pack_int4(torch.randint(-8, 8, (3072, 3072), device="cuda", generator=g)))
        layer.wscales.copy_(torch.rand(3072, 48, device="cuda", generator=g) * 0.02 + 0.001)
        layer.smooth_factor.copy_(torch.rand(3072, device="cuda", generator=g) + 0.5)
        layer.proj_down.copy_(torch.randn(3072, 32, device="cuda", generator=g) * 0.05)
        layer.proj_up.copy_(torch.randn(3072, 32, device="cuda", generator=g) * 0.05)
    for execution in ("a16", "fp8"):
        layer.set_execution(execution)
        for tokens in (64, 65, 200, 256, 257):
            calls.clear()
            x = torch.randn(tokens, 3072, device="cuda", dtype=torch.bfloat16, generator=g)
            y = layer(x)
            assert bool(calls) == (65 <= tokens <= engine.WGMMA_MAX_TOKENS)
            if calls:
                assert relative_error(y, engine.a16_reference_forward(layer, x)) < 4e-3
