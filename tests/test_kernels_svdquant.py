"""Triton SVDQuant kernels vs their PyTorch references.

On CPU the kernels run in the Triton interpreter (tests/conftest.py) at tiny shapes in float16/float32
(bf16 tl.dot is wrong in the interpreter); the ``gpu`` tests run the same checks in bf16 at FLUX shapes.
Outputs are poisoned (NaN / sentinel bytes) before each kernel so unwritten elements fail.
FP8: the interpreter's float32 -> fp8 cast rounds some values wrongly, so the kernels round to E4M3 in
float32 arithmetic (``common.round_e4m3``) and cast exact values only; fp8 x fp8 ``tl.dot`` is exact in the
interpreter, so the fp8 kernels are tested for real here (codes bit-exact vs PyTorch) and again on GPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantduo import kernels as qk
from quantduo.formats import reference as ref
from quantduo.kernels.act_quant import act_quant
from quantduo.kernels.gemm_w4a4 import w4_gemm
from quantduo.kernels.gemm_w4_dequant import w4_dequant_gemm
from quantduo.kernels.gemm_w4_skinny import w4_skinny_gemm
from quantduo.kernels.gemv_w4 import w4_gemv
from quantduo.kernels.fp8_concat import fp8_concat_quant, fp8_row_stats, fp8_rowwise_gemm
from quantduo.kernels.dequant_w4 import dequant_w4
from quantduo.kernels.gemm_w4a8 import expand_w4, w4a8_gemm
from quantduo.kernels.nvfp4 import nvfp4_dequant
from quantduo.svdquant import SVDQuantLinear
from quantduo.svdquant import hopper_formats as hf
from quantduo.formats import quantizers as qz
from quantduo.utils import relative_error

CPU_GEMM = dict(BM=16, BN=32, GROUP_M=2, num_warps=4, num_stages=2)


pytestmark = pytest.mark.usefixtures("poison_empty")  # unwritten kernel outputs show (tests/conftest.py)


def _inputs(M, N, K, r, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype).to(device)  # noqa: E731
    x = t(M, K, scale=2.0)
    x[:, 3] *= 20  # an outlier channel
    smooth = (torch.rand(K, generator=g) + 0.5).to(dtype).to(device)
    shift = (torch.rand(K, generator=g) * 0.3).to(dtype).to(device)
    return x, smooth, shift, t(K, r, scale=0.1), t(N, r, scale=0.1), t(N)


@pytest.mark.parametrize("mode", ["int4", "uint4", "int8", "fp8", "none", "smooth", "amax", "int4_deq", "uint4_deq"])
@pytest.mark.parametrize("dtype,splits,bk", [(torch.float16, 2, 64), (torch.float32, 1, 64), (torch.float16, 32, 64)])
def test_act_quant(mode, dtype, splits, bk):
    """Kernel 1 vs its reference; 32 slices (> MAX_LX_PARTIALS) add their low-rank partials atomically into one."""
    M, K, r = (17, 2048, 16) if splits > 16 else (40, 256, 16)
    x, smooth, shift, ld, _, _ = _inputs(M, 8, K, r, dtype)
    x[5] = 0  # an all-zero token (scale 1)
    q, qs, lxp = act_quant(x, smooth, shift, ld, mode, config=(16, bk, splits))
    rq, rqs, rlx = ref.act_quant_ref(x, smooth, shift, ld, mode)
    if mode == "amax":
        assert qs.shape == (splits, M)
        qs = qs.amax(0)
    if q is not None or rq is not None:
        assert q.dtype == rq.dtype and torch.equal(q.view(torch.uint8) if mode == "fp8" else q,
                                                   rq.view(torch.uint8) if mode == "fp8" else rq)
    if qs is not None or rqs is not None:
        assert torch.equal(qs, rqs)
    n_partials = 1 if splits > 16 else splits
    assert lxp.shape[1:] == (M, r) and (mode in ("int8", "fp8") or lxp.shape[0] == n_partials)  # per-token: 2 launches
    torch.testing.assert_close(lxp.sum(0), rlx, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", ["int4", "uint4"])
@pytest.mark.parametrize("gelu", [False, True])
def test_w4_gemm(mode, gelu):
    M, N, K, r = 24, 96, 256, 16  # M, N not multiples of the tile: masked edges
    dtype = torch.float16
    x, smooth, shift, ld, lu, bias = _inputs(M, N, K, r, dtype)
    wq, ws = qz.quantize_int4(torch.randn(N, K), 64, dtype)
    qw, ws = qz.pack_int4(wq), ws.to(dtype)
    a, a_s, lxp = act_quant(x, smooth, shift, ld, mode)
    y = w4_gemm(a, a_s, qw, ws, lxp, lu, bias, mode, dtype, gelu=gelu, config=CPU_GEMM)
    y_ref = ref.w4_gemm_ref(a, a_s, qw, ws, lxp.sum(0), lu, bias, mode, dtype, gelu=gelu)
    assert torch.isfinite(y).all()
    assert relative_error(y, y_ref) < 1e-3


@pytest.mark.parametrize("act,split,smooth_in,dtype", [
    ("none", 1, True, torch.float16), ("none", 2, False, torch.float32), ("int8", 2, True, torch.float16),
    ("fp8", 1, True, torch.float32), ("fp8", 2, True, torch.float16)])
def test_w4_dequant_gemm(act, split, smooth_in, dtype):
    """Weight-streaming GEMM: 16-bit / int8 / fp8 activations, float scales (W4A16) or integer multipliers +
    row scales (W4A8), split-K with the self-cleaning workspace (run twice: it must be zero again)."""
    M, N, K, r = 20, 96, 256, 16  # M, N not multiples of the tile: masked edges
    x, smooth, _, ld, lu, bias = _inputs(M, N, K, r, dtype)
    if act == "none":
        wq, wf = qz.quantize_int4(torch.randn(N, K), 64, dtype)
        wf, wrow = wf.to(dtype), None
    else:
        quantize = hf.quantize_int4_fp8exact if act == "fp8" else hf.quantize_int4_int8exact
        wq, wf, wrow = quantize(torch.randn(N, K) * torch.logspace(-1, 1, K))
    qw = qz.pack_int4(wq)
    _, amaxp, lxp = act_quant(x, smooth, None, ld, "amax", config=(16, 64, 2))
    cfg = dict(BM=16, BN=32, BK=64, SPLIT_K=split, GROUP_M=2, num_warps=4, num_stages=2)
    kw = dict(smooth=smooth if smooth_in else None, act=act, wrow=wrow, gelu=True)
    xin = x if smooth_in else ref.smooth_input(x, smooth)
    y_ref = ref.w4_dequant_gemm_ref(xin, qw, wf, lxp.sum(0), lu, bias, dtype, amax=amaxp.amax(0), **kw)
    for _ in range(2):
        y = w4_dequant_gemm(xin, qw, wf, lxp, lu, bias, dtype, amax_partials=amaxp, config=cfg, **kw)
        assert torch.isfinite(y).all()
        assert relative_error(y, y_ref) < 1e-3


@pytest.mark.parametrize("M,N,K,r,dtype,cfg", [
    (1, 40, 256, 16, torch.float16, dict(BN=16, BKW=16, num_warps=4, num_stages=2)),  # 2 K steps, N edge
    (3, 24, 192, 0, torch.float32, dict(BN=8, BKW=16, num_warps=2, num_stages=1)),  # last K step partial
    (2, 8, 64, 0, torch.bfloat16, None)])  # default config, bf16 (no tl.dot); see the tolerance below
def test_w4_gemv(M, N, K, r, dtype, cfg):
    """One-token GEMV vs its reference: every nibble value and sign (codes cover [-8, 7]), groups spanning
    the word boundaries of a K step, masked rows and K steps, low-rank and bias."""
    x, smooth, _, ld, lu, bias = _inputs(M, N, K, max(r, 1), dtype)
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
    qw, ws = qz.pack_int4(codes), (torch.rand(N, K // 64, generator=g) + 0.1).to(dtype)
    lxp = act_quant(x, smooth, None, ld, "none", config=(16, 64, 2))[2] if r else None
    lu = lu if r else None
    y = w4_gemv(x, qw, ws, lxp, lu, bias, dtype, config=cfg)
    y_ref = ref.w4_gemv_ref(x, qw, ws, lxp.sum(0) if r else None, lu, bias, dtype)
    assert torch.isfinite(y).all()
    # the interpreter truncates float32 -> bf16 (1 ulp = 0.4 %)
    assert relative_error(y, y_ref) < {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]


def test_w4_gemv_bad_inputs():
    x, qw, ws = torch.randn(1, 128), torch.zeros(8, 64, dtype=torch.uint8), torch.ones(8, 2)
    with pytest.raises(ValueError, match="qweight must be uint8"):
        w4_gemv(torch.randn(1, 100), qw, ws, None, None, None, torch.float32)
    with pytest.raises(ValueError, match="wscales must be"):
        w4_gemv(x, qw, torch.ones(8, 4), None, None, None, torch.float32)
    with pytest.raises(ValueError, match="BKW must be a multiple of 8"):
        w4_gemv(x, qw, ws, None, None, None, torch.float32, config=dict(BN=8, BKW=4, num_warps=1, num_stages=1))


@pytest.mark.parametrize("mode,M,split,r,gelu", [
    ("none", 1, 1, 16, False), ("none", 5, 4, 16, True), ("none", 17, 2, 0, False), ("none", 40, 1, 16, False),
    ("int4", 9, 4, 16, False), ("int4", 33, 1, 0, True), ("uint4", 16, 2, 16, False), ("int4", 3, 8, 16, False)])
def test_w4_skinny_gemm(mode, M, split, r, gelu):
    """Skinny split-K GEMM vs its references (16-bit activations: exact float32 weights, ``w4_gemv_ref``; 4-bit
    codes: ``w4_gemm_ref``): every nibble value, masked token and row edges (N = 80 with 64-row tiles), K split
    1 / 2 / 4 / 8 ways (the group scales prefetched across slice ends), low-rank, bias and GELU; a second call
    gives the same result (workspace and counters reset)."""
    N, K, dtype = 80, 512, torch.float16
    x, smooth, shift, ld, lu, bias = _inputs(M, N, K, max(r, 1), dtype)
    g = torch.Generator().manual_seed(1)
    qw = qz.pack_int4(torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8))
    ws = (torch.rand(N, K // 64, generator=g) + 0.1).to(dtype)
    a, a_s, lxp = act_quant(x, smooth, shift, ld if r else None, "smooth" if mode == "none" else mode,
                            config=(16, 64, 2))
    lu = lu if r else None
    cfg = dict(BM=16 if M <= 16 else 64, BN=64, SPLIT_K=split, num_warps=4, num_stages=1)
    y = w4_skinny_gemm(a, a_s, qw, ws, lxp, lu, bias, mode, dtype, gelu=gelu, config=cfg)
    lx = lxp.sum(0) if r else None
    if mode == "none":
        y_ref = ref.w4_gemv_ref(a, qw, ws, lx, lu, bias, dtype)
        if gelu:
            y_ref = F.gelu(y_ref.float(), approximate="tanh").to(dtype)
    else:
        y_ref = ref.w4_gemm_ref(a, a_s, qw, ws, lx, lu, bias, mode, dtype, gelu=gelu)
    assert y.shape == (M, N) and torch.isfinite(y).all()
    assert relative_error(y, y_ref) < 1e-3
    again = w4_skinny_gemm(a, a_s, qw, ws, lxp, lu, bias, mode, dtype, gelu=gelu, config=cfg)
    assert relative_error(again, y_ref) < 1e-3


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(1, 64), n=st.integers(1, 150), groups=st.sampled_from([1, 2, 3, 4, 6]),
       split=st.sampled_from([1, 2, 3]), mode=st.sampled_from(["none", "int4", "uint4"]),
       r=st.sampled_from([0, 8, 32]), seed=st.integers(0, 2**16))
def test_w4_skinny_gemm_shapes(m, n, groups, split, mode, r, seed):
    """Any token count up to 64, row count, K (whole groups) and split that divides the groups."""
    if groups % split:
        split = 1
    K, dtype = 64 * groups, torch.float16
    x, smooth, shift, ld, lu, bias = _inputs(m, n, K, max(r, 1), dtype, seed=seed)
    g = torch.Generator().manual_seed(seed)
    qw = qz.pack_int4(torch.randint(-8, 8, (n, K), generator=g, dtype=torch.int8))
    ws = (torch.rand(n, groups, generator=g) + 0.1).to(dtype)
    a, a_s, lxp = act_quant(x, smooth, shift, ld if r else None, "smooth" if mode == "none" else mode,
                            config=(16, 64, 1))
    lu = lu if r else None
    cfg = dict(BM=16 if m <= 16 else (32 if m <= 32 else 64), BN=64, SPLIT_K=split, num_warps=4, num_stages=1)
    y = w4_skinny_gemm(a, a_s, qw, ws, lxp, lu, bias, mode, dtype, config=cfg)
    lx = lxp.sum(0) if r else None
    y_ref = (ref.w4_gemv_ref(a, qw, ws, lx, lu, bias, dtype) if mode == "none"
             else ref.w4_gemm_ref(a, a_s, qw, ws, lx, lu, bias, mode, dtype))
    assert relative_error(y, y_ref) < 1e-3


def test_w4_skinny_gemm_row_scale():
    """The fp8 W4A8 format's few-token path: integer group multipliers ``[N, K/64]`` (uint8) and a float32 row
    scale, 16-bit activations, against ``w4_gemv_ref`` on the dequantized factors."""
    M, N, K, r, dtype = 6, 72, 256, 16, torch.float16
    x, smooth, _, ld, lu, bias = _inputs(M, N, K, r, dtype)
    q8, mult, row = hf.quantize_int4_fp8exact(torch.randn(N, K) * torch.logspace(-1, 1, K))
    qw = qz.pack_int4(q8)
    xs, _, lxp = act_quant(x, smooth, None, ld, "smooth", config=(16, 64, 2))
    y = w4_skinny_gemm(xs, None, qw, mult, lxp, lu, bias, "none", dtype, wrow=row,
                       config=dict(BM=16, BN=64, SPLIT_K=2, num_warps=4, num_stages=1))
    y_ref = ref.w4_gemv_ref(xs, qw, mult.float() * row.float()[:, None], lxp.sum(0), lu, bias, dtype)
    assert relative_error(y, y_ref) < 1e-3


def test_act_quant_bad_config():
    x, smooth, shift, ld, _, _ = _inputs(4, 8, 256, 16, torch.float16)
    with pytest.raises(ValueError, match="multiple of splits \\* BK"):
        act_quant(x, smooth, shift, ld, "none", config=(16, 64, 3))


def test_w4_skinny_gemm_bad_inputs():
    qw, ws, x = torch.zeros(8, 64, dtype=torch.uint8), torch.ones(8, 2), torch.randn(4, 128).half()
    with pytest.raises(ValueError, match="mode must be one of"):
        w4_skinny_gemm(x, None, qw, ws, None, None, None, "int8", torch.float16)
    with pytest.raises(ValueError, match="16-bit activations must be"):
        w4_skinny_gemm(x.float(), None, qw, ws, None, None, None, "none", torch.float16)
    with pytest.raises(ValueError, match="wscales must be"):
        w4_skinny_gemm(x, None, qw, torch.ones(8, 3), None, None, None, "none", torch.float16)
    with pytest.raises(ValueError, match="at most 64 tokens"):
        w4_skinny_gemm(torch.randn(65, 128).half(), None, qw, ws, None, None, None, "none", torch.float16)
    with pytest.raises(ValueError, match="4-bit activations must be"):
        w4_skinny_gemm(torch.zeros(4, 64, dtype=torch.uint8), None, qw, ws, None, None, None, "int4", torch.float16)
    with pytest.raises(ValueError, match="SPLIT_K=4 must divide"):
        w4_skinny_gemm(x, None, qw, ws, None, None, None, "none", torch.float16,
                       config=dict(BM=16, BN=64, SPLIT_K=4, num_warps=4, num_stages=1))


@pytest.mark.parametrize("next_mode", ["int4", "uint4"])
def test_w4_gemm_quant_next(next_mode):
    """MLP fc1 epilogue: GELU, then fc2's smoothing, 4-bit quantization and low-rank partial sums."""
    M, N, K, r = 20, 128, 128, 16
    dtype = torch.float32  # exact epilogue arithmetic: the quantized codes must match bit for bit
    x, smooth, shift, ld, lu, bias = _inputs(M, N, K, r, dtype)
    _, smooth2, shift2, ld2, _, _ = _inputs(M, 8, N, r, dtype, seed=1)
    wq, ws = qz.quantize_int4(torch.randn(N, K), 64, dtype)
    qw = qz.pack_int4(wq)
    a, a_s, lxp = act_quant(x, smooth, shift, ld, "int4")
    q2, qs2, lx2 = w4_gemm(a, a_s, qw, ws, lxp, lu, bias, "int4", dtype, gelu=True, config=dict(CPU_GEMM, BN=64),
                           next_layer=dict(smooth=smooth2, shift=shift2, lora_down=ld2, mode=next_mode))
    h = ref.w4_gemm_ref(a, a_s, qw, ws, lxp.sum(0), lu, bias, "int4", dtype, gelu=True)
    rq, rqs, rlx = ref.quant_next_ref(h, smooth2, shift2, ld2, next_mode)
    codes = qz.unpack_int4 if next_mode == "int4" else qz.unpack_uint4
    assert (codes(q2).int() - codes(rq).int()).abs().max() <= 1  # GELU's tanh may differ in the last ulp
    assert (codes(q2) != codes(rq)).float().mean() < 0.01
    torch.testing.assert_close(qs2, rqs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lx2[0], rlx, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_w4a8_expand_and_gemm(fmt):
    """Expansion bit-exact; the 8-bit GEMM (int8: packed and expanded; fp8: expanded)."""
    M, N, K, r = 24, 96, 256, 16
    dtype = torch.float16
    fp8 = fmt == "fp8"
    x, smooth, _, ld, lu, bias = _inputs(M, N, K, r, dtype)
    quantize = hf.quantize_int4_fp8exact if fp8 else hf.quantize_int4_int8exact
    q8, mult, row = quantize(torch.randn(N, K) * torch.logspace(-1, 1, K))
    qw = qz.pack_int4(q8)
    expanded = expand_w4(qw, mult, fp8)
    expected = ref.w4_expand_ref(qw, mult, fp8)
    assert expanded.dtype == expected.dtype
    assert torch.equal(expanded.view(torch.uint8), expected.view(torch.uint8))
    a, a_s, lxp = act_quant(x, smooth, None, ld, fmt)
    y_ref = ref.w4a8_gemm_ref(a, a_s, qw, mult, row, lxp.sum(0), lu, bias, dtype, gelu=True)
    cfg = dict(BM=16, BN=32, BK=128, GROUP_M=2, num_warps=4, num_stages=2)
    runs = [(expanded, cfg)] if fp8 else [(qw, cfg), (expanded, cfg)]
    for w, c in runs:
        y = w4a8_gemm(a, a_s, w, mult, row, lxp, lu, bias, dtype, gelu=True, config=c)
        assert relative_error(y, y_ref) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group,rank,smoothed", [(64, 0, False), (64, 16, True), (128, 24, True), (64, 0, True)])
def test_dequant_w4(dtype, group, rank, smoothed):
    """W4A16 weight reconstruction ``(q * scale + up @ down^T) / smooth`` against its float32 reference, rounded
    to dtype: 16-bit within one ulp (float32 sums in another order; the interpreter also truncates float32 ->
    bfloat16 where the GPU rounds to nearest even), float32 to 1e-5. Low-rank factors in float16 / float32 (the
    interpreter's bfloat16 dot is wrong)."""
    torch.manual_seed(0)
    N, K = 40, 512
    q, scales = qz.quantize_int4(torch.randn(N, K) * torch.logspace(-2, 1, K), group, dtype)
    qw = qz.pack_int4(q)
    lr_dtype = torch.float16 if dtype == torch.bfloat16 else dtype
    down = torch.randn(K, rank, dtype=lr_dtype) * 0.3 if rank else None
    up = torch.randn(N, rank, dtype=lr_dtype) if rank else None
    smooth = torch.rand(K, dtype=dtype) + 0.5 if smoothed else None
    got = dequant_w4(qw, scales, dtype, group, down, up, smooth, scratch=False)
    expected = ref.w4_dequant_ref(qw, scales, dtype, group, down, up, smooth)
    assert got.dtype == dtype and got.shape == (N, K)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    else:
        assert ((got.float() - expected.float()).abs() <= torch.finfo(dtype).eps * expected.float().abs()).all()
    if rank:  # the low-rank term is there (a mutation dropping it fails)
        assert relative_error(got, ref.w4_dequant_ref(qw, scales, dtype, group, None, None, smooth)) > 0.1


def test_dequant_w4_bad_inputs():
    q, scales = qz.quantize_int4(torch.randn(32, 256), 64, torch.float16)
    qw = qz.pack_int4(q)
    with pytest.raises(ValueError, match="wscales"):
        dequant_w4(qw, scales[:, 1:], torch.float16)
    with pytest.raises(ValueError, match="come together"):
        dequant_w4(qw, scales, torch.float16, lora_down=torch.zeros(256, 8))
    with pytest.raises(ValueError, match="low-rank factors"):
        dequant_w4(qw, scales, torch.float16, lora_down=torch.zeros(128, 8), lora_up=torch.zeros(32, 8))
    with pytest.raises(ValueError, match="smooth"):
        dequant_w4(qw, scales, torch.float16, smooth=torch.ones(255))
    with pytest.raises(ValueError, match="BK"):
        dequant_w4(qw, scales, torch.float16, config=(16, 96, 4))


def test_nvfp4_dequant():
    codes, scales, gs = qz.quantize_nvfp4(torch.randn(40, 96))
    qw = qz.pack_nibbles(codes)
    assert torch.equal(nvfp4_dequant(qw, scales, gs), ref.nvfp4_dequant_ref(qw, scales, gs))


def _random_module(k, n, act_format, weight_format="int4", rank=16, dtype=torch.float16, device="cpu"):
    m = SVDQuantLinear(k, n, rank=rank, act_format=act_format, weight_format=weight_format, dtype=dtype,
                       device=device)
    kp = m.padded_in_features
    with torch.no_grad():
        w = torch.randn(n, kp, device=device)
        if weight_format == "nvfp4":
            codes, sc, gs = qz.quantize_nvfp4(w)
            m.qweight.copy_(qz.pack_nibbles(codes)); m.wscales.copy_(sc); m.wscale_global.copy_(gs)
        else:
            q, sc = qz.quantize_int4(w, 64, dtype)
            m.qweight.copy_(qz.pack_int4(q)); m.wscales.copy_(sc)
        m.smooth_factor.uniform_(0.5, 1.5)
        if act_format == "uint4":
            m.act_shift.fill_(0.17)
        m.proj_down.normal_(0, 0.1); m.proj_up.normal_(0, 0.1); m.bias.normal_()
    return m


@pytest.mark.parametrize("act_format,weight_format,tokens,dtype", [
    ("int4", "int4", 9, torch.float16), ("uint4", "int4", 9, torch.float16), ("int4", "int4", 80, torch.float16),
    ("none", "int4", 1, torch.float16), ("none", "int4", 9, torch.float16), ("none", "int4", 40, torch.float16),
    ("none", "int4", 9, torch.float32), ("none", "int4", 40, torch.float32), ("nvfp4", "nvfp4", 9, torch.float16),
    ("nvfp4", "int4", 9, torch.float16), ("int4", "nvfp4", 9, torch.float16)])
def test_module_forward(act_format, weight_format, tokens, dtype):
    """svdquant_linear_forward == forward_reference, with leading dims (rows = 2 x tokens) and padded in_features
    (100 -> 128): W4A16 at 2, 18 and 80 rows (2 and 18: the skinny GEMM; 80 > SKINNY_MAX_TOKENS: dequantized
    weights + GEMM, float16 and float32; one row, the GEMV: test_smoothing_identity_cache), W4A4 at 18 (skinny)
    and 160 (16-bit GEMM of the dequantized operands), float32 W4A16 at 18 (the weight-streaming GEMM's in-kernel
    smoothing). Every W4A4 path: test_w4a4_paths."""
    m = _random_module(100, 48, act_format, weight_format, dtype=dtype)
    m.backend = "triton"
    x = torch.randn(2, tokens, 100, dtype=dtype)
    y = m(x)
    assert y.shape == (2, tokens, 48)
    assert relative_error(y, m.forward_reference(x)) < 2e-3


@pytest.mark.parametrize("act_format", ["int4", "uint4"])
@pytest.mark.parametrize("path,tokens", [("skinny", 9), ("packed", 9), ("packed", 80), ("float", 9),
                                         ("float", 80)])
def test_w4a4_paths(act_format, path, tokens):
    """Every W4A4 path against forward_reference (rows = 2 x tokens), at a rank that is not a power of two (as
    after attaching a LoRA to the low-rank branch)."""
    m = _random_module(100, 48, act_format, rank=24)
    x = torch.randn(2, tokens, 100, dtype=torch.float16)
    assert relative_error(qk.svdquant_linear_forward(m, x, path=path), m.forward_reference(x)) < 2e-3


@pytest.mark.parametrize("tokens", [1, 9, 80])
def test_w4a16_group_128(tokens):
    """W4A16 with groups of 128 at every token count (the GEMV, skinny and weight-streaming kernels serve groups of
    64 only; the reconstruction serves any group), and the weight-streaming GEMM rejects other groups."""
    torch.manual_seed(0)
    m = SVDQuantLinear(256, 32, rank=8, act_format="none", group_size=128, dtype=torch.float32)
    with torch.no_grad():
        q, scales = qz.quantize_int4(torch.randn(32, 256), 128, torch.float32)
        m.qweight.copy_(qz.pack_int4(q)); m.wscales.copy_(scales)
        m.proj_down.normal_(0, 0.1); m.proj_up.normal_(0, 0.1); m.bias.normal_()
    m.backend = "triton"
    x = torch.randn(tokens, 256)
    assert relative_error(m(x), m.forward_reference(x)) < 1e-5
    with pytest.raises(ValueError, match="groups of 64"):
        w4_dequant_gemm(x, m.qweight, m.wscales, None, None, None, x.dtype)


def test_w4a4_bad_path():
    m = _random_module(64, 32, "int4")
    x = torch.randn(80, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="path must be one of"):
        qk.svdquant_linear_forward(m, x, path="fp8")
    with pytest.raises(ValueError, match="at most 64 tokens"):
        qk.svdquant_linear_forward(m, x, path="skinny")
    with pytest.raises(ValueError, match="for W4A4 INT4 layers"):
        qk.svdquant_linear_forward(_random_module(64, 32, "none"), x, path="float")
    with pytest.raises(ValueError, match="path must be one of"):
        qk.svdquant_mlp_forward(m, _random_module(32, 64, "uint4"), x, path="fused")


@pytest.mark.parametrize("tokens,rank", [(1, 0), (80, 0), (80, 8)])
def test_smoothing_identity_cache(tokens, rank):
    """W4A16 skips ``x / smooth`` only while smooth_factor is all ones (one token: the GEMV; 80: dequantized
    weights + GEMM): the cached answer follows in-place writes and load_state_dict."""
    m = _random_module(128, 32, "none", rank=rank)
    m.backend = "triton"
    x = torch.randn(tokens, 128, dtype=torch.float16)
    for factor, identity in ((None, True), (2.0, False), ("load", True)):
        if factor is None:
            m.smooth_factor.fill_(1.0)
        elif factor == "load":
            m.load_state_dict({**m.state_dict(), "smooth_factor": torch.ones(128, dtype=torch.float16)})
        else:
            m.smooth_factor.mul_(factor)
        assert m.smoothing_is_identity() == identity
        assert relative_error(m(x), m.forward_reference(x)) < 2e-3


@pytest.mark.parametrize("tokens,path", [(7, None), (30, None), (30, "packed"), (7, "float")])
def test_mlp_forward(tokens, path):
    """MLP at 21 tokens (default: skinny fc1 with GELU, then fc2) and 90 (default: both layers' 16-bit GEMMs;
    "packed": fc1 quantizes for fc2 in its epilogue)."""
    fc1, fc2 = _random_module(64, 128, "int4"), _random_module(128, 64, "uint4")
    x = torch.randn(3, tokens, 64, dtype=torch.float16)
    y = qk.svdquant_mlp_forward(fc1, fc2, x, path=path)
    y_ref = fc2.forward_reference(F.gelu(fc1.forward_reference(x).float(), approximate="tanh").to(x.dtype))
    assert y.shape == (3, tokens, 64)
    assert relative_error(y, y_ref) < 2e-2  # a few 4-bit codes of fc2's input may flip on GELU's last ulp


@pytest.mark.parametrize("act_format", ["int8", "fp8"])
def test_w4a8_module_and_converter(act_format):
    """to_w4a8 keeps the function (within W4A8 quantization error); every kernel path matches its reference."""
    torch.manual_seed(0)
    m = _random_module(128, 64, "uint4", dtype=torch.float32)
    m8 = hf.to_w4a8(m, act_format=act_format)
    assert m8.act_format == act_format
    x = torch.rand(33, 128) * 2 - 0.1
    assert m8.storage_bits_per_weight() < m.storage_bits_per_weight()
    assert relative_error(m8.forward_reference(x), m.forward_reference(x)) < 0.1
    m8.backend = "triton"
    for path in _w4a8_paths(act_format):
        assert relative_error(qk.w4a8_linear_forward(m8, x, path=path), _w4a8_expected(m8, x, path)) < 1e-5, path
    path = qk.w4a8_path(m8, 33)
    assert relative_error(m8(x), _w4a8_expected(m8, x, path)) < 1e-5
    if act_format == "fp8":  # 16-bit activations at few tokens: the skinny GEMM with the per-row scale
        m16 = hf.to_w4a8(_random_module(128, 64, "uint4", dtype=torch.float16), act_format="fp8")
        x16 = x[:5].half()
        assert relative_error(qk.w4a8_linear_forward(m16, x16), m16.forward_reference_a16(x16)) < 2e-3


@pytest.mark.parametrize("act_format", ["int4", "uint4"])
def test_to_w4a16(act_format):
    """to_w4a16: the same stored weights with 16-bit activations, y = (x / smooth) @ R^T + low-rank + bias with the
    unsigned shift's term unfolded from the bias; closer to the unquantized-activation layer than W4A4; its
    kernel path (80 rows: the reconstructed weight) matches its reference."""
    torch.manual_seed(0)
    m = _random_module(128, 64, act_format, dtype=torch.float32)
    m16 = hf.to_w4a16(m)
    assert m16.act_format == "none" and m16.rank == m.rank and torch.equal(m16.qweight, m.qweight)
    assert not m16.act_shift.any() and (act_format == "int4") == torch.equal(m16.bias, m.bias)
    x = torch.rand(80, 128) * 2 - 0.1
    xs = x / m.smooth_factor
    residual = m.dequantized_residual()
    expected = xs @ residual.T + (xs @ m.proj_down) @ m.proj_up.T + m.bias + residual @ m.act_shift
    assert relative_error(m16.forward_reference(x), expected) < 1e-6
    assert relative_error(m16.forward_reference(x), expected) < relative_error(m.forward_reference(x), expected)
    m16.backend = "triton"
    assert relative_error(m16(x), m16.forward_reference(x)) < 1e-5
    with pytest.raises(ValueError, match="already has 16-bit"):
        hf.to_w4a16(m16)


def _w4a8_paths(act_format):
    return ("dequant", "concat") if act_format == "fp8" else ("dequant", "packed", "expanded")


def _w4a8_expected(m8, x, path):
    """The reference of a W4A8 kernel path: fp8's weight-streaming path runs 16-bit activations."""
    return m8.forward_reference_a16(x) if (m8.act_format, path) == ("fp8", "dequant") else m8.forward_reference(x)


def test_fp8_concat_operands():
    """Both activation passes and the expansion build the fp8 concatenation's operands exactly as the PyTorch
    layout (``hopper_formats``): codes, hi/lo/hi tail, zero padding, scales; a row whose low-rank term exceeds
    its absmax takes the low-rank term's scale."""
    torch.manual_seed(1)
    M, N, K, r = 21, 40, 256, 16
    m8 = hf.to_w4a8_fp8(_random_module(K, N, "int4", rank=r, dtype=torch.float32))
    with torch.no_grad():
        m8.proj_down.mul_(1e3)  # the low-rank tail dominates the scale of most rows...
    inv_smooth, lora_down, up_fp8 = m8.fp8_operands()
    x = torch.randn(M, K)
    ld = lora_down.double()
    v = torch.randn(K, dtype=torch.float64)
    x[0] = ((v - ld @ torch.linalg.lstsq(ld, v).solution) / inv_smooth).float()  # ...but not of this one
    amaxp, lxp = fp8_row_stats(x, inv_smooth, lora_down, config=(16, 64, 2, 4))
    xs = x * inv_smooth
    torch.testing.assert_close(amaxp.amax(0), xs.abs().amax(1), rtol=0, atol=0)
    lx = lxp.sum(0)
    assert relative_error(lx, hf.fp8_lowrank_down(x, inv_smooth, lora_down)) < 1e-6
    a, a_scale = fp8_concat_quant(x, inv_smooth, amaxp, lxp, config=(16, 64, 2, 4))
    ra, ra_scale = hf.fp8_concat_activations(x, inv_smooth, lx)
    assert a.shape == (M, K + hf.fp8_tail_width(r)) == (M, K + 64) and torch.equal(a_scale, ra_scale)
    assert torch.equal(a.float(), ra.float())  # (float compare: +0 / -0 codes of a zero lo part may differ)
    tail_rows = lx.abs().amax(1) > xs.abs().amax(1)
    assert 0 < tail_rows.sum() < M and torch.equal(a_scale[tail_rows], lx.abs().amax(1)[tail_rows] / 448)
    b = expand_w4(m8.qweight, m8.wmult, True, tail=up_fp8, config=(16, 64, 4), scratch=False)
    rb = hf.fp8_concat_weights(ref.w4_expand_ref(m8.qweight, m8.wmult, True), up_fp8)
    assert torch.equal(b.view(torch.uint8), rb.view(torch.uint8))
    y = fp8_rowwise_gemm(a, b, a_scale, m8.wscale_row, m8.bias, torch.float32)
    assert relative_error(y, m8.forward_reference(x)) < 1e-6


def test_fp8_concat_lowrank_precision():
    """The hi/lo fp8 low-rank columns keep the 16-bit branch's precision: the concatenated layer equals the
    plain fp8 layer with a float low-rank branch to ~1e-4. When the low-rank term sets the scale of every row
    (x quantized on a ~5x coarser scale), the error vs 16-bit activations stays that of the plain layer."""
    torch.manual_seed(2)
    m8 = hf.to_w4a8_fp8(_random_module(256, 64, "int4", rank=32, dtype=torch.float32))
    x = torch.randn(64, 256)
    plain = super(hf.SVDQuantW4A8Linear, m8).forward_reference
    assert relative_error(m8.forward_reference(x), plain(x)) < 3e-4
    with torch.no_grad():
        m8.proj_down.mul_(40.0)
    inv_smooth, lora_down, _ = m8.fp8_operands()
    lx = hf.fp8_lowrank_down(x, inv_smooth, lora_down)
    assert (lx.abs().amax(1) > 2 * (x * inv_smooth).abs().amax(1)).all()
    exact = m8.forward_reference_a16(x)
    assert relative_error(m8.forward_reference(x), exact) < 1.2 * relative_error(plain(x), exact)


def test_int8exact_quantizer():
    r = torch.randn(16, 256) * torch.logspace(-2, 1, 256)
    q, mult, row = hf.quantize_int4_int8exact(r)
    assert q.abs().max() <= 7 and mult.min() >= 1 and mult.max() <= hf.MULT_MAX
    assert (q.int() * mult.int().repeat_interleave(64, 1)).abs().max() <= 127
    err = relative_error(hf.dequantize_int4_int8exact(q, mult, row), r)
    err_std = relative_error(qz.fake_quant(r, "int4", 64), r)
    assert err < 1.5 * err_std


def test_fp8exact_quantizer():
    r = torch.randn(16, 256) * torch.logspace(-2, 1, 256)
    r[3] = 0
    q, mult, row = hf.quantize_int4_fp8exact(r)
    assert q.abs().max() <= 7
    assert set(mult.unique().tolist()) <= set(hf.FP8_MULTS)
    w = (q.float() * mult.float().repeat_interleave(64, 1))
    assert w.abs().max() <= 448 and torch.equal(w.to(torch.float8_e4m3fn).float(), w)  # exact in fp8
    deq = hf.dequantize_int4_int8exact(q, mult, row)
    assert torch.equal(deq[3], torch.zeros(256))
    assert relative_error(deq, r) < 1.5 * relative_error(qz.fake_quant(r, "int4", 64), r)


# --------------------------------------------------------------------------------------------------
# GPU: the same checks in bf16 at FLUX shapes
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(3072, 3072), (12288, 3072), (3072, 12288)])
@pytest.mark.parametrize("tokens", [1, 16, 300, 4608])
def test_gpu_forward_bf16(n, k, tokens):
    torch.manual_seed(0)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    for fmt, rank in (("int4", 32), ("uint4", 32), ("none", 0), ("none", 32)):
        m = _random_module(k, n, fmt, rank=rank, dtype=torch.bfloat16, device="cuda")
        assert relative_error(qk.svdquant_linear_forward(m, x), m.forward_reference(x)) < 5e-3
    for act_format in hf.ACT_FORMATS:
        m8 = hf.to_w4a8(_random_module(k, n, "int4", rank=32, dtype=torch.bfloat16, device="cuda"), act_format=act_format)
        for path in _w4a8_paths(act_format):
            assert relative_error(qk.w4a8_linear_forward(m8, x, path=path), _w4a8_expected(m8, x, path)) < 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288)])
def test_gpu_split_k_repeatable(n, k):
    """The split-K GEMMs (float32 atomics) at M = 16 give the reference result on every one of 20 calls: the
    weight-streaming GEMM, and the skinny GEMM (W4A16, W4A4)."""
    torch.manual_seed(0)
    x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
    m = _random_module(k, n, "none", rank=32, dtype=torch.bfloat16, device="cuda")
    xs, _, lxp = act_quant(x, m.smooth_factor, None, m.proj_down, "smooth")
    expected = m.forward_reference(x)
    errors = [relative_error(w4_dequant_gemm(xs, m.qweight, m.wscales, lxp, m.proj_up, m.bias, x.dtype), expected)
              for _ in range(20)]
    assert max(errors) < 5e-3, errors
    for fmt in ("none", "int4"):
        m = _random_module(k, n, fmt, rank=32, dtype=torch.bfloat16, device="cuda")
        expected = m.forward_reference(x)
        errors = [relative_error(qk.svdquant_linear_forward(m, x), expected) for _ in range(20)]
        assert max(errors) < 5e-3, errors


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,group", [(3000, 3072, 64), (1000, 12288, 128)])
def test_gpu_dequant_w4(n, k, group, poison_empty):
    """The weight reconstruction at FLUX widths (N not a multiple of the tile, both group sizes): bfloat16 within
    one ulp of the float32 reference (plus the float32 rounding of the terms where they nearly cancel), fp8 at most
    one code apart (float32 sums in another order)."""
    torch.manual_seed(0)
    q, scales = qz.quantize_int4(torch.randn(n, k, device="cuda") * torch.logspace(-2, 1, k, device="cuda"), group,
                                 torch.bfloat16)
    qw = qz.pack_int4(q)
    down = torch.randn(k, 32, device="cuda", dtype=torch.bfloat16) * 0.3
    up = torch.randn(n, 32, device="cuda", dtype=torch.bfloat16)
    smooth = torch.rand(k, device="cuda") + 0.5
    w = ref.w4_dequant_ref(qw, scales, torch.float32, group, down, up, smooth)
    got = dequant_w4(qw, scales, torch.bfloat16, group, down, up, smooth, scratch=False)
    expected = ref.w4_dequant_ref(qw, scales, torch.bfloat16, group, down, up, smooth)
    tolerance = torch.finfo(torch.bfloat16).eps * expected.float().abs() + 1e-6 * w.abs().max()  # + float32 sums
    assert ((got.float() - expected.float()).abs() <= tolerance).all()  # (near-cancelling sums: absolute)
    row_scale = 448 / w.abs().amax(dim=1)
    got8 = dequant_w4(qw, scales, torch.float8_e4m3fn, group, down, up, scratch=False, row_scale=row_scale,
                      inv_smooth=1 / smooth)
    expected8 = (w * row_scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    codes_apart = (got8.view(torch.uint8).int() - expected8.view(torch.uint8).int()).abs()
    assert codes_apart.max() <= 1 and codes_apart.float().mean() < 1e-3
