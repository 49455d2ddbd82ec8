"""The Hopper W4A16 GEMM on ``wgmma`` (quantduo.kernels.gemm_w4_wgmma, Gluon) vs ``w4_gemv_ref`` (exact float32 INT4
weights from the documented packing, float32 products, the low-rank / bias epilogue).

Gluon has no interpreter: on the CPU the kernel is compiled for sm_90a (the conversion of the decoded codes into the
wgmma's register A operand is asserted trivial while compiling, so a decode order that does not match the operand
fails to compile) and its PTX is checked for the documented decode and copies; its configuration and input checks
run; the numerics run on an H100 / H200 (``gpu`` marker).
"""
from __future__ import annotations

import multiprocessing
import re

import pytest
import torch
import triton

from quantduo.formats import quantizers as qz
from quantduo.kernels import gemm_w4_wgmma as wg

from .gluon_compile import compile_for_hopper
from .w4a16_cases import check_against_reference, check_launch_binding, check_operand_errors

# (token block, stages, split, low-rank, GELU, dtype, warps)
COMPILE_CASES = [(128, 4, 4, True, False, "bf16", 8), (64, 3, 1, False, True, "fp16", 4),
                 (64, 5, 8, True, True, "bf16", 8), (128, 3, 2, True, False, "bf16", 4)]


def _compile_cases(cases):
    """(PTX, shared bytes) of each COMPILE_CASES case (FLUX-shape specializations: 16-divisible pointers, sizes and
    row strides)."""
    out = []
    for tokens, stages, split, lowrank, gelu, dtype, warps in cases:
        half = "*bf16" if dtype == "bf16" else "*fp16"
        pointers = {"X": half, "W": "*i32", "WS": half, "LXP": "*fp32", "LU": half, "BIAS": half, "OUT": half,
                    "PART": "*fp32", "COUNTS": "*i32"}
        kernel = compile_for_hopper(wg._w4a16_wgmma_kernel, pointers, ("N", "K", "stride_xm", "stride_wsn"), warps,
                                    HAS_LR=lowrank, RP=32, HAS_BIAS=True, GELU=gelu, SPLIT_K=split, TOK=tokens,
                                    STAGES=stages, ASM=wg._ASM[dtype], WARPS_=warps)
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
    """sm_90a PTX with the documented pieces: ``wgmma`` with the A operand in registers (``m64nTOKk16``), the
    activation tiles copied 16 bytes at a time, the byte selector ``0x4400 + 0x1111 c`` of the quad lane, the
    format's ``lop3`` constant, the two packed ``fma`` (magic removed, scale applied), a ring of ``STAGES`` slots of
    activations, codes and scale words in shared memory (one or two warpgroups: 64 or 128 rows of codes)."""
    tokens, stages, split, lowrank, gelu, dtype, warps = case
    magic, ptx_type, _, negative_magic, _ = wg.DECODE[dtype]
    ptx, smem = compiled[case]
    assert re.search(rf"wgmma\.mma_async\.sync\.aligned\.m64n{tokens}k16\.f32\.{ptx_type[:-2]}", ptx)
    assert re.search(r"wgmma\.mma_async[^;]*\}, \{%r\d+,%r\d+,%r\d+,%r\d+\}, %rd\d+", ptx)  # A: 4 registers
    assert re.search(r"cp\.async\.cg\.shared\.global \[[^]]*\], \[[^]]*\], 0x10", ptx)
    assert "0x1111, 0x4400" in ptx and f"0x000F000F, {magic}, 0x6A" in ptx and negative_magic in ptx
    assert ptx.count(f"fma.rn.{ptx_type}") >= 2
    assert smem >= stages * (tokens * 64 * 2 + 16 * warps * (32 + 4))


def _run_ptx(asm: str, inputs: dict) -> dict:
    """A tiny interpreter of the PTX the decode uses (``mov``, ``shr.u32``, ``mad.lo.u32``, ``prmt.b32`` default
    mode, ``lop3.b32``, packed ``fma.rn`` on bf16x2 / f16x2), from the PTX ISA's definitions: returns the ``$n``
    operands after the block, 16-bit outputs as raw bit patterns."""
    regs = dict(inputs)

    def val(tok):
        tok = tok.strip()
        return int(tok, 16) if tok.startswith("0x") else int(tok) if tok.isdigit() else regs[tok]

    def halves_as(bits, dtype):
        return torch.tensor([bits & 0xFFFF, bits >> 16], dtype=torch.int32).to(torch.int16).view(dtype).double()

    for line in re.split(r";\s*", asm.replace("{\n", "").replace("\n}", "")):
        line = line.strip()
        if not line or line.startswith(".reg") or line in "{}":
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32" and rest.startswith("{"):
            lo, hi, src = re.match(r"\{(\S+), (\S+)\}, (\S+)", rest).groups()
            regs[lo], regs[hi] = val(src) & 0xFFFF, val(src) >> 16
            continue
        dst, *args = [t.strip() for t in rest.split(",")]
        a = [val(t) for t in args]
        if op == "mov.b32":
            regs[dst] = a[0]
        elif op == "shr.u32":
            regs[dst] = a[0] >> a[1]
        elif op == "mad.lo.u32":
            regs[dst] = (a[0] * a[1] + a[2]) & 0xFFFFFFFF
        elif op == "prmt.b32":
            source = [(a[0] >> 8 * i) & 0xFF for i in range(4)] + [(a[1] >> 8 * i) & 0xFF for i in range(4)]
            regs[dst] = sum(source[(a[2] >> 4 * i) & 7] << 8 * i for i in range(4))
        elif op == "lop3.b32":
            regs[dst] = sum(((a[3] >> (4 * ((a[0] >> i) & 1) + 2 * ((a[1] >> i) & 1) + ((a[2] >> i) & 1))) & 1) << i
                            for i in range(32))
        elif op in ("fma.rn.bf16x2", "fma.rn.f16x2"):
            dtype = torch.bfloat16 if "bf16" in op else torch.float16
            r = (halves_as(a[0], dtype) * halves_as(a[1], dtype) + halves_as(a[2], dtype)).to(dtype)
            bits = r.view(torch.int16).to(torch.int32) & 0xFFFF
            regs[dst] = int(bits[0]) | int(bits[1]) << 16
        else:
            raise AssertionError(f"unexpected PTX {op}")
    return regs


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_decode_gives_lane_bytes_in_natural_order(dtype):
    """The decode, run by a PTX interpreter on codes packed as the format documents (two per byte, the even input in
    the low nibble): quad lane ``c`` gets, from code word ``m``, the weights of inputs ``8 m + 2 c`` and ``+ 1`` times
    the group scale, rounded once to 16 bits, for every code value -8..7 and a scale in either half of its word."""
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float16
    g = torch.Generator().manual_seed(1)
    q = torch.cat([torch.arange(-8, 8), torch.randint(-8, 8, (48,), generator=g)]).to(torch.int8)
    words = qz.pack_int4(q).view(torch.int32)  # 64 inputs -> 8 little-endian words
    scale = torch.tensor([0.0123], dtype=torch_dtype)
    scale_bits = int(scale.view(torch.int16).to(torch.int32)) & 0xFFFF
    expected = (q.double() * scale.double()).to(torch_dtype)
    for m in range(8):
        for c in range(4):
            for scale_word in (scale_bits, scale_bits | 0x5A5A0000):  # the high half is ignored
                regs = _run_ptx(wg._ASM[dtype], {"$2": int(words[m]) & 0xFFFFFFFF, "$3": c, "$4": scale_word})
                got = torch.tensor([regs["$0"], regs["$1"]], dtype=torch.int32).to(torch.int16).view(torch_dtype)
                assert torch.equal(got, expected[8 * m + 2 * c: 8 * m + 2 * c + 2]), (m, c)


def test_pick_config():
    """Two warpgroups (128 rows), 64-token blocks up to 64 tokens and 128 above, 4 ring slots, SPLIT_K a divisor of
    the groups reaching one program per SM of an H100 when the groups allow it."""
    for N, K in [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288), (80, 192)]:
        for M in (33, 64, 65, 128, 200, 256):
            cfg = wg.pick_config(M, N, K)
            groups = K // 64
            tiles = triton.cdiv(N, 128) * triton.cdiv(M, cfg["TOKENS_BLOCK"])
            assert groups % cfg["SPLIT_K"] == 0
            assert tiles * cfg["SPLIT_K"] >= 132 or cfg["SPLIT_K"] == groups
            assert cfg["TOKENS_BLOCK"] == (64 if M <= 64 else 128) and cfg["STAGES"] == 4 and cfg["WARPS"] == 8


def test_bad_inputs():
    """Clear errors instead of a wrong answer (checked before any launch)."""
    check_operand_errors(wg.w4a16_wgmma_gemm, wg.MAX_TOKENS)
    qw = torch.zeros(64, 64, dtype=torch.uint8)
    ws = torch.ones(64, 2, dtype=torch.bfloat16)
    a = torch.zeros(100, 128, dtype=torch.bfloat16)
    for bad in (dict(SPLIT_K=3), dict(TOKENS_BLOCK=32), dict(STAGES=2), dict(WARPS=2)):
        with pytest.raises(ValueError, match="config"):
            wg.w4a16_wgmma_gemm(a, qw, ws, None, None, None, torch.bfloat16, config=bad)
    assert not wg.supports(a, qw, ws, None)  # CPU tensors: other paths serve them


def test_launch_passes_every_parameter(monkeypatch):
    """The wrapper binds every kernel parameter to its operand (checked against the kernel's own signature: Gluon
    kernels do not run on the CPU) and launches one program per (row tile x token block, K slice)."""
    grid, bound = check_launch_binding(monkeypatch, wg, "_w4a16_wgmma_kernel", wg.w4a16_wgmma_gemm, 130)
    assert grid == (1 * 2, 2) and bound["TOK"] == 128  # 64 rows = 1 row tile x 2 blocks of 128 tokens, 2 slices
    assert bound["WARPS_"] == 8


needs_hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                  reason="wgmma needs an sm_90 GPU")


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("M", [33, 64, 65, 128, 200, 256])
@pytest.mark.parametrize("N,K,r,config,dtype,gelu", [
    (3072, 3072, 32, None, torch.bfloat16, False), (200, 192, 32, dict(SPLIT_K=3), torch.bfloat16, True),
    (80, 512, 0, dict(SPLIT_K=1, TOKENS_BLOCK=128, WARPS=4), torch.float16, False),
    (12288, 3072, 16, dict(TOKENS_BLOCK=64, STAGES=3, WARPS=4), torch.float16, True),
    (3072, 12288, 32, dict(SPLIT_K=64, STAGES=5), torch.bfloat16, False),
    (200, 960, 32, dict(SPLIT_K=1, STAGES=4, scales="transposed"), torch.bfloat16, False),
    (136, 1216, 16, dict(SPLIT_K=1, STAGES=3, scales="float16"), torch.bfloat16, True)])
def test_gpu_w4a16_wgmma_gemm(M, N, K, r, config, dtype, gelu):
    """Every nibble value, row edges, 33-256 tokens in blocks of 64 / 128 (partial blocks), one or two warpgroups,
    K split 1 / 3 / 64 ways
    or by the default, 3-5 ring slots with slices of 1, 15 or 19 groups, odd and transposed scale strides, float16
    scales under bfloat16, low-rank, bias, GELU, bf16 and fp16 vs the exact-weight reference (the weights enter the
    tensor cores as q * s rounded once to 16 bits: bf16 2**-9, fp16 2**-11 relative); a second call gives the same
    result (workspace and counters reset)."""
    tolerance = 4e-3 if dtype == torch.bfloat16 else 1e-3
    check_against_reference(wg.w4a16_wgmma_gemm, M, N, K, r, config, dtype, gelu, tolerance)
