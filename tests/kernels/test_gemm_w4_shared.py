"""The shared-memory token-tile GEMM (quantduo.kernels.gemm_w4_shared, Gluon) vs ``w4_gemv_ref`` (exact float32 INT4
weights from the documented packing, float32 products, the low-rank / bias epilogue).

Gluon has no interpreter: on the CPU the kernel is compiled for sm_90a (the weight operand's layout conversion is
asserted trivial while compiling, so a decode order that does not match the mma operand fails to compile) and its
PTX is checked for the documented decode and copies; its configuration and input checks run; the numerics run on the
GPU (``gpu`` marker).
"""
from __future__ import annotations

import multiprocessing
import re

import pytest
import torch
import torch.nn.functional as F
import triton

from quantduo.formats import quantizers as qz
from quantduo.formats import reference as ref
from quantduo.kernels import gemm_w4_shared as shared
from quantduo.kernels.act_quant import act_quant
from quantduo.utils import relative_error

from .gluon_compile import compile_for_hopper

# (warps, row tiles, token block, chunk, stages, split, low-rank, GELU, dtype)
COMPILE_CASES = [(8, 1, 128, 32, 3, 4, True, False, "bf16"), (4, 2, 64, 16, 2, 1, False, True, "fp16"),
                 (4, 1, 64, 32, 4, 8, True, True, "bf16")]


def _compile_cases(cases):
    """(PTX, shared bytes) of each COMPILE_CASES case (FLUX-shape specializations: 16-divisible pointers, sizes and
    row strides)."""
    out = []
    for warps, row_tiles, tokens, chunk, stages, split, lowrank, gelu, dtype in cases:
        half = "*bf16" if dtype == "bf16" else "*fp16"
        pointers = {"X": half, "W": "*i32", "WS": half, "LXP": "*fp32", "LU": half, "BIAS": half, "OUT": half,
                    "PART": "*fp32", "COUNTS": "*i32"}
        kernel = compile_for_hopper(shared._w4a16_shared_kernel, pointers, ("N", "K", "stride_xm", "stride_wsn"),
                                    warps, HAS_LR=lowrank, RP=32, HAS_BIAS=True, GELU=gelu, SPLIT_K=split,
                                    ROW_TILES=row_tiles, TOK=tokens, CHUNK=chunk, WARPS_=warps,
                                    ASM=shared._ASM[dtype], STAGES=stages)
        out.append((kernel.asm["ptx"], kernel.metadata.shared))
    return out


@pytest.fixture(scope="module")
def compiled():
    """The compile cases, built in a fresh process (Triton's interpreter breaks later Gluon compiles in the same
    process: docs/kernel-notes.md item 42)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return dict(zip(COMPILE_CASES, pool.apply(_compile_cases, (COMPILE_CASES,))))


@pytest.mark.parametrize("case", COMPILE_CASES)
def test_compiles_for_hopper(compiled, case):
    """sm_90a PTX with the documented pieces: the activation tiles copied by 4-byte ``cp.async`` (one input pair per
    copy, never 2 bytes or a wider run that would cross a pair boundary of the pair order), the B operand by
    ``ldmatrix``, the weights decoded by ``prmt`` with the byte selectors of bytes 0-3 (byte b of the word into bytes
    0-1, byte b of the word >> 4 into bytes 2-3) and the format's ``lop3`` constant, the ring in shared memory
    (``STAGES`` tiles of ``tokens x 64`` 16-bit values)."""
    warps, row_tiles, tokens, chunk, stages, split, lowrank, gelu, dtype = case
    magic, ptx_type, _, negative_magic, _ = shared.DECODE[dtype]
    ptx, smem = compiled[case]
    sizes = set(re.findall(r"cp\.async\.c[ag]\.shared\.global \[[^]]*\], \[[^]]*\], (0x[0-9a-f]+)", ptx))
    assert sizes == {"0x4"}
    assert "ldmatrix.sync.aligned" in ptx and "mma.sync.aligned.m16n8k16" in ptx
    for selector in ("0x4400", "0x5511", "0x6622", "0x7733"):
        assert re.search(rf"prmt\.b32 t, %r\d+, h, {selector};", ptx)
    assert f"0x000F000F, {magic}, 0x6A" in ptx and negative_magic in ptx and f"fma.rn.{ptx_type}" in ptx
    assert smem >= stages * tokens * 64 * 2


def test_pick_config():
    """8 warps of 16 rows, 64-token blocks up to 64 tokens and 128 above, SPLIT_K a divisor of the groups reaching
    the program target when the groups allow it."""
    for N, K in [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288), (80, 192)]:
        for M in (33, 64, 65, 128, 200, 256):
            cfg = shared.pick_config(M, N, K)
            groups = K // 64
            tiles = triton.cdiv(N, 16 * cfg["WARPS"] * cfg["ROW_TILES"]) * triton.cdiv(M, cfg["TOKENS_BLOCK"])
            assert groups % cfg["SPLIT_K"] == 0
            assert tiles * cfg["SPLIT_K"] >= 264 or cfg["SPLIT_K"] == groups
            assert cfg["TOKENS_BLOCK"] == (64 if M <= 64 else 128)


def test_bad_inputs():
    """Clear errors instead of a wrong answer (checked before any launch)."""
    qw = torch.zeros(64, 64, dtype=torch.uint8)
    ws = torch.ones(64, 2, dtype=torch.bfloat16)
    a = torch.zeros(100, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="M <= 256"):
        shared.w4a16_shared_gemm(torch.zeros(257, 128, dtype=torch.bfloat16), qw, ws, None, None, None,
                                 torch.bfloat16)
    with pytest.raises(ValueError, match="wscales"):
        shared.w4a16_shared_gemm(a, qw, ws[:, :1], None, None, None, torch.bfloat16)
    with pytest.raises(ValueError, match="qweight"):
        shared.w4a16_shared_gemm(a, qw[:, :40].contiguous(), ws, None, None, None, torch.bfloat16)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        shared.w4a16_shared_gemm(a.float(), qw, ws, None, None, None, torch.bfloat16)
    for bad in (dict(SPLIT_K=3), dict(TOKENS_BLOCK=32), dict(CHUNK=64), dict(WARPS=2), dict(STAGES=1),
                dict(ROW_TILES=4)):
        with pytest.raises(ValueError, match="config"):
            shared.w4a16_shared_gemm(a, qw, ws, None, None, None, torch.bfloat16, config=bad)
    assert not shared.supports(a, qw, ws, None)  # CPU tensors: other paths serve them


def test_launch_passes_every_parameter(monkeypatch):
    """The wrapper binds every kernel parameter (checked against the kernel's own signature: Gluon kernels do not
    run on the CPU) and launches one program per (row tile x token block, K slice)."""
    names = list(shared._w4a16_shared_kernel.arg_names)
    launches = []

    class Launcher:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, args, kwargs))

    monkeypatch.setattr(shared, "_w4a16_shared_kernel", Launcher())
    a = torch.zeros(130, 128, dtype=torch.bfloat16)
    qw = torch.zeros(300, 64, dtype=torch.uint8)
    ws = torch.ones(300, 2, dtype=torch.bfloat16)
    shared.w4a16_shared_gemm(a, qw, ws, None, None, None, torch.bfloat16, config=dict(SPLIT_K=2, WARPS=4))
    (grid, args, kwargs), = launches
    bound = names[:len(args)] + [k for k in kwargs if k in names]
    assert sorted(bound) == sorted(names)
    assert grid == (5 * 2, 2)  # 300 rows / 64 per program (4 warps) = 5 row tiles x 2 blocks of 128 tokens


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
@pytest.mark.parametrize("M", [33, 64, 65, 128, 200, 256])
@pytest.mark.parametrize("N,K,r,config,dtype,gelu", [
    (3072, 3072, 32, None, torch.bfloat16, False), (200, 192, 32, dict(SPLIT_K=3), torch.bfloat16, True),
    (80, 512, 0, dict(SPLIT_K=1, WARPS=4, ROW_TILES=2), torch.float16, False),
    (12288, 3072, 16, dict(TOKENS_BLOCK=64, CHUNK=16), torch.float16, True),
    (3072, 12288, 32, dict(SPLIT_K=64, STAGES=2), torch.bfloat16, False),
    (200, 960, 32, dict(SPLIT_K=1, STAGES=4, scales="transposed"), torch.bfloat16, False),
    (136, 1216, 16, dict(SPLIT_K=1, STAGES=3, WARPS=4, scales="float16"), torch.bfloat16, True)])
def test_gpu_w4a16_shared_gemm(M, N, K, r, config, dtype, gelu):
    """Every nibble value, row edges, 33-256 tokens in blocks of 64 / 128 (partial blocks), chunks of 16 / 32, 4 / 8
    warps, K split 1 / 3 / 64 ways or by the default, groups in flight that do not divide a slice (15 / 19 groups),
    odd and transposed scale strides, float16 scales under bfloat16, low-rank, bias, GELU, bf16 and fp16 vs the
    exact-weight reference; a second call gives the same result (workspace and counters reset)."""
    config = dict(config or {})
    scales = config.pop("scales", None)
    a, qw, ws, lxp, up, bias = _operands(M, N, K, r, dtype)
    if scales == "transposed":
        ws = ws.t().contiguous().t()
    elif scales == "float16":
        ws = ws.to(torch.float16)
    y = shared.w4a16_shared_gemm(a, qw, ws, lxp, up, bias, dtype, gelu=gelu, config=config)
    y_ref = ref.w4_gemv_ref(a, qw, ws, lxp.sum(0) if r else None, up, bias, dtype)
    if gelu:
        y_ref = F.gelu(y_ref.float(), approximate="tanh").to(dtype)
    assert y.shape == (M, N) and torch.isfinite(y).all()
    assert relative_error(y, y_ref) < 2e-3
    again = shared.w4a16_shared_gemm(a, qw, ws, lxp, up, bias, dtype, gelu=gelu, config=config)
    assert torch.equal(again, y) or relative_error(again, y_ref) < 2e-3
