"""The few-token register-operand GEMM (quantduo.kernels.gemm_w4_mma, Gluon) vs ``w4_gemv_ref`` (exact float32
INT4 weights from the documented packing, float32 products, the shared low-rank / bias epilogue).

Gluon has no interpreter: on the CPU the kernel is compiled for sm_90a (every layout conversion of the in-register
decode is asserted trivial at compile time, so a wrong mma order or word layout fails to compile), and its
configuration / input checks run; the numerics run on the GPU (``gpu`` marker).
"""
from __future__ import annotations

import multiprocessing

import pytest
import torch
import torch.nn.functional as F
import triton

from quantduo.formats import quantizers as qz
from quantduo.formats import reference as ref
from quantduo.kernels import gemm_w4_mma as mma
from quantduo.kernels.act_quant import act_quant
from quantduo.utils import relative_error

from .gluon_compile import compile_for_hopper


def _pointer_types(dtype: str) -> dict:
    half = "*bf16" if dtype == "bf16" else "*fp16"
    return {"X": half, "W": "*i32", "WS": half, "LXP": "*fp32", "LU": half, "BIAS": half, "OUT": half,
            "PART": "*fp32", "COUNTS": "*i32"}


def _compile_for_hopper(pointers: dict, **constexprs):
    """The kernel compiled for sm_90a with FLUX-shape specializations (16-divisible pointers, sizes, row strides)."""
    return compile_for_hopper(mma._w4a16_mma_kernel, pointers, ("N", "K", "stride_xm", "stride_wsn"), mma.WARPS,
                              **constexprs)


# (row tiles, split, low-rank, GELU, dtype, token block, signed decode, groups in flight)
COMPILE_CASES = [(2, 8, True, False, "bf16", 16, False, 4), (1, 1, False, True, "fp16", 32, True, 2),
                 (4, 3, True, True, "bf16", 16, False, 1), (1, 8, True, False, "bf16", 32, True, 3),
                 (2, 4, True, False, "fp16", 32, False, 2), (1, 8, True, True, "bf16", 16, True, 4)]


def _compile_cases(cases):
    """(PTX, shared bytes) of each COMPILE_CASES case."""
    out = []
    for row_tiles, split, lowrank, gelu, dtype, tokens, signed, stages in cases:
        kernel = _compile_for_hopper(_pointer_types(dtype), HAS_LR=lowrank, RP=32, HAS_BIAS=True, GELU=gelu,
                                     SPLIT_K=split, ROW_TILES=row_tiles, TOK=tokens, WARPS_=mma.WARPS,
                                     ASM=mma._ASM[dtype, signed], OFFSET=0.0 if signed else mma._DECODE[dtype][4],
                                     STAGES=stages)
        out.append((kernel.asm["ptx"], kernel.metadata.shared))
    return out


@pytest.fixture(scope="module")
def compiled():
    """The compile cases, built in a fresh process: Triton's interpreter leaves ``triton.language`` patched after an
    interpreted kernel calls a ``@triton.jit`` helper (Triton 3.9), which breaks later Gluon compiles in the same
    process (``'block_argument' object has no attribute 'dtype'``; docs/kernel-notes.md item 42)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return dict(zip(COMPILE_CASES, pool.apply(_compile_cases, (COMPILE_CASES,))))


@pytest.mark.parametrize("case", COMPILE_CASES)
def test_compiles_for_hopper(compiled, case):
    """The kernel compiles for sm_90a (no GPU needed) with its decode free of data movement: the weight and
    activation operands of 16 / 32-token blocks are built by trivial layout conversions only (asserted while
    compiling), without shared memory in the main loop, and with the documented lop3 decode (and, signed, the
    packed fma that removes the magic number) in the PTX."""
    dtype, signed = case[4], case[6]
    magic, ptx_type, _, negative_magic, _ = mma._DECODE[dtype]
    ptx, shared = compiled[case]
    assert "mma.sync.aligned.m16n8k16" in ptx and ("bf16" if dtype == "bf16" else "f16") in ptx
    assert f"0x000F000F, {magic}, 0x6A" in ptx  # the format's decode constant
    assert (f"fma.rn.{ptx_type}" in ptx) == signed and (negative_magic in ptx) == signed
    assert shared <= 4096  # only the epilogue's small conversions use shared memory


def test_pick_config():
    """Token blocks of 16 (16 rows per warp) up to 16 tokens and up to 48 for weights of <= 9216 x 3072, else 32 (32
    rows per warp); the signed decode; SPLIT_K divides the groups and reaches the program target when the groups
    allow it."""
    for N, K in [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288), (80, 192), (128, 64)]:
        for M in (1, 16, 17, 48, 49, 64):
            cfg = mma.pick_config(M, N, K)
            groups = K // 64
            tiles = triton.cdiv(N, 16 * mma.WARPS * cfg["ROW_TILES"]) * triton.cdiv(M, cfg["TOKENS_BLOCK"])
            assert groups % cfg["SPLIT_K"] == 0
            assert tiles * cfg["SPLIT_K"] >= 384 or cfg["SPLIT_K"] == groups
            small = M <= 16 or (M <= 48 and N * K <= 9216 * 3072)
            assert cfg["TOKENS_BLOCK"] == (16 if small else 32) and cfg["ROW_TILES"] == (1 if small else 2)
            assert cfg["SIGNED"]
    assert mma.pick_config(16, 3072, 3072) == dict(ROW_TILES=1, SPLIT_K=8, TOKENS_BLOCK=16, SIGNED=True)
    assert mma.pick_config(64, 3072, 3072)["SPLIT_K"] == 8  # 32-token blocks, 2 row tiles: 24 x 2 tiles


def test_bad_inputs():
    """Clear errors instead of a wrong answer (checked before any launch)."""
    qw = torch.zeros(64, 64, dtype=torch.uint8)
    ws = torch.ones(64, 2, dtype=torch.bfloat16)
    a = torch.zeros(4, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=f"M <= {mma.MAX_TOKENS}"):
        mma.w4a16_mma_gemm(torch.zeros(mma.MAX_TOKENS + 1, 128, dtype=torch.bfloat16), qw, ws, None, None, None,
                           torch.bfloat16)
    with pytest.raises(ValueError, match="wscales"):
        mma.w4a16_mma_gemm(a, qw, ws[:, :1], None, None, None, torch.bfloat16)
    with pytest.raises(ValueError, match="wscales must be float16/bfloat16"):
        mma.w4a16_mma_gemm(a, qw, ws.float(), None, None, None, torch.bfloat16)
    with pytest.raises(ValueError, match="qweight"):
        mma.w4a16_mma_gemm(a, qw[:, :40].contiguous(), ws, None, None, None, torch.bfloat16)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        mma.w4a16_mma_gemm(a.float(), qw, ws, None, None, None, torch.bfloat16)
    with pytest.raises(ValueError, match="SPLIT_K"):
        mma.w4a16_mma_gemm(a, qw, ws, None, None, None, torch.bfloat16, config=dict(ROW_TILES=2, SPLIT_K=3))
    with pytest.raises(ValueError, match="TOKENS_BLOCK"):
        mma.w4a16_mma_gemm(a, qw, ws, None, None, None, torch.bfloat16, config=dict(TOKENS_BLOCK=8))
    with pytest.raises(ValueError, match="4-byte"):  # the scales are read as 32-bit words
        mma.w4a16_mma_gemm(a, qw, torch.ones(64 * 2 + 1, dtype=torch.bfloat16)[1:].view(64, 2), None, None, None,
                           torch.bfloat16)
    assert not mma.supports(a, qw, ws, None)  # CPU tensors: the Triton kernels serve them


def test_launch_passes_every_parameter(monkeypatch):
    """The wrapper binds every kernel parameter once, each operand and size to the parameter of its name (checked
    against the kernel's own signature: Gluon kernels do not run on the CPU), on operands with low-rank, bias,
    transposed scales and ``SPLIT_K=2``, and caps the groups in flight at the groups of a K slice."""
    names = list(mma._w4a16_mma_kernel.arg_names)
    launches = []

    class Launcher:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, args, kwargs))

    monkeypatch.setattr(mma, "_w4a16_mma_kernel", Launcher())
    a = torch.zeros(16, 128, dtype=torch.bfloat16)
    qw = torch.zeros(64, 64, dtype=torch.uint8)
    ws = torch.ones(2, 64, dtype=torch.bfloat16).t()
    lxp, up, bias = torch.zeros(2, 16, 8), torch.zeros(64, 8, dtype=torch.bfloat16), torch.zeros(64)
    mma.w4a16_mma_gemm(a, qw, ws, lxp, up, bias, torch.bfloat16, config=dict(SPLIT_K=2))
    (_, args, kwargs), = launches
    bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    assert len(args) + len(set(kwargs) & set(names)) == len(names) and sorted(bound) == sorted(names)
    assert bound["X"] is a and bound["WS"] is ws and bound["LXP"] is lxp and bound["LU"] is up and bound["BIAS"] is bias
    assert bound["W"].dtype == torch.int32 and bound["W"].data_ptr() == qw.data_ptr()
    assert (bound["M"], bound["N"], bound["K"], bound["GROUPS_PER_SPLIT"], bound["S"], bound["R"]) == \
        (16, 64, 128, 1, 2, 8)
    assert (bound["stride_xm"], bound["stride_wsn"], bound["stride_wsg"]) == (128, 1, 64)
    assert bound["HAS_LR"] and bound["HAS_BIAS"] and not bound["GELU"] and bound["SPLIT_K"] == 2
    assert bound["STAGES"] == 1  # 2 groups in 2 slices: one in flight


def _operands(M: int, N: int, K: int, r: int, dtype: torch.dtype, seed: int = 0) -> tuple:
    """CUDA operands of an INT4-g64 layer with smoothing: kernel 1's smoothed activations ``a [M, K]``, packed codes
    (every value -8..7) ``[N, K / 2]``, group scales ``[N, K / 64]``, low-rank partials ``[S, M, r]`` (None for
    r = 0), ``lora_up [N, r]`` (None for r = 0) and a bias ``[N]``."""
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
@pytest.mark.parametrize("M", [1, 7, 16, 17, 40, 64])
@pytest.mark.parametrize("N,K,r,config,dtype,gelu", [
    (3072, 3072, 32, None, torch.bfloat16, False), (200, 192, 32, dict(SPLIT_K=3), torch.bfloat16, True),
    (80, 512, 0, dict(SPLIT_K=1, SIGNED=True), torch.float16, False),
    (12288, 3072, 16, dict(TOKENS_BLOCK=16, SIGNED=True), torch.float16, True),
    (3072, 12288, 32, dict(SPLIT_K=64, SIGNED=False), torch.bfloat16, False),
    (1000, 1024, 32, dict(TOKENS_BLOCK=32, ROW_TILES=1, SIGNED=False), torch.bfloat16, False),
    (200, 960, 32, dict(SPLIT_K=1, STAGES=4, scales="transposed"), torch.bfloat16, False),
    (136, 1216, 16, dict(SPLIT_K=1, STAGES=3, TOKENS_BLOCK=32, scales="float16"), torch.bfloat16, True),
    (3072, 3072, 32, dict(SPLIT_K=4, STAGES=2), torch.float16, False),
    (9216, 3072, 32, dict(ROW_TILES=1, TOKENS_BLOCK=16, SIGNED=True, STAGES=4), torch.bfloat16, True)])
def test_gpu_w4a16_mma_gemm(M, N, K, r, config, dtype, gelu):
    """Every nibble value, row edges (N not a multiple of the 128-row tile), 1 to 64 tokens in blocks of 16 / 32
    (partial blocks), both decodes, K split 1 / 3 / 64 ways or by the default, low-rank, bias, GELU, bf16 and fp16
    (their own decode constants) vs the exact-weight reference; a second call gives the same result (workspace and
    counters reset). Groups in flight (STAGES) that do not divide a slice's groups (15 / 19 groups), scales with an
    odd row stride (K / 64 = 3, 15, 19: half of the rows' scales start in the high half of a 32-bit word), transposed
    scales (stride 1 between rows) and float16 scales under bfloat16 activations."""
    config = dict(config or {})
    scales = config.pop("scales", None)
    a, qw, ws, lxp, up, bias = _operands(M, N, K, r, dtype)
    if scales == "transposed":
        ws = ws.t().contiguous().t()
    elif scales == "float16":
        ws = ws.to(torch.float16)
    y = mma.w4a16_mma_gemm(a, qw, ws, lxp, up, bias, dtype, gelu=gelu, config=config)
    y_ref = ref.w4_gemv_ref(a, qw, ws, lxp.sum(0) if r else None, up, bias, dtype)
    if gelu:
        y_ref = F.gelu(y_ref.float(), approximate="tanh").to(dtype)
    assert y.shape == (M, N) and torch.isfinite(y).all()
    assert relative_error(y, y_ref) < 2e-3
    again = mma.w4a16_mma_gemm(a, qw, ws, lxp, up, bias, dtype, gelu=gelu, config=config)
    assert torch.equal(again, y) or relative_error(again, y_ref) < 2e-3


@pytest.mark.gpu
def test_gpu_engine_uses_mma_for_few_tokens(monkeypatch):
    """The a16 execution of an INT4 layer runs this kernel for 1, 16 and 64 tokens and matches the a16 reference."""
    from quantduo.engine import linear as engine
    from quantduo.svdquant import SVDQuantLinear

    calls = []
    real = mma.w4a16_mma_gemm
    monkeypatch.setattr(mma, "w4a16_mma_gemm", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = SVDQuantLinear(3072, 3072, rank=32, act_format="int4", dtype=torch.bfloat16, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        layer.qweight.copy_(qz.pack_int4(torch.randint(-8, 8, (3072, 3072), device="cuda", generator=g)))
        layer.wscales.copy_(torch.rand(3072, 48, device="cuda", generator=g) * 0.02 + 0.001)
        layer.smooth_factor.copy_(torch.rand(3072, device="cuda", generator=g) + 0.5)
        layer.proj_down.copy_(torch.randn(3072, 32, device="cuda", generator=g) * 0.05)
        layer.proj_up.copy_(torch.randn(3072, 32, device="cuda", generator=g) * 0.05)
    layer.set_execution("a16")
    for tokens in (1, 16, 64):
        calls.clear()
        x = torch.randn(tokens, 3072, device="cuda", dtype=torch.bfloat16, generator=g)
        y = layer(x)
        assert calls
        assert relative_error(y, engine.a16_reference_forward(layer, x)) < 2e-3

