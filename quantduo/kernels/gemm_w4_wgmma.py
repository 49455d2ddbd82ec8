"""W4A16 GEMM for tens to hundreds of tokens on Hopper's warpgroup MMA (Gluon): the INT4 codes decoded straight into
the ``wgmma`` register A operand, the tokens streamed into shared memory, no scratch weight.

``out^T [N, M] = W [N, K] x a^T [K, M]`` on ``wgmma`` (sm_90a): a program is one or two warpgroups, each owning 64
output rows, and ``TOKENS_BLOCK`` = 64 or 128 tokens (the wgmma's N), over the groups of 64 inputs of its K slice.
Per group:

* the activation tile ``[TOKENS_BLOCK, 64]`` (16-byte ``cp.async``, natural input order, 128-byte swizzle: the
  wgmma's B operand as it is, shared by the warpgroups), the program's packed codes ``[64 or 128, 8]`` int32 and,
  per row, the int32 word holding the group's 16-bit scale arrive in a ring of ``STAGES`` shared-memory slots,
  ``STAGES - 2`` groups ahead;
* each thread reads the 8 code words of each of its two rows (the 4 lanes of a quad read the same words: a shared
  memory broadcast) and decodes byte ``c`` (its lane in the quad) of each: the wgmma A fragment gives lane ``c`` the
  inputs ``16 kb + 2c, + 1`` and ``16 kb + 8 + 2c, + 1`` of each 16-input step ``kb``, which are nibbles 0 and 1 of
  byte ``c`` of words ``2 kb`` and ``2 kb + 1``. One ``prmt`` (selector ``0x4400 + 0x1111 c``) puts the byte's two
  nibbles in the low bits of two 16-bit halves, the ``lop3`` of :mod:`.gemm_w4_mma` (LUT 0x6A) makes them
  ``magic + q``, one packed ``fma`` removes the magic number exactly and one multiplies by the group scale: the
  16-bit weight ``q * s``, rounded once (as the reconstructed weight of the ``a16`` path above 64 tokens);
* one asynchronous ``wgmma`` accumulates ``W_g x a_g^T`` in float32; the next group is decoded while it runs, and
  its completion frees its A registers and (two groups later) its shared-memory slot.

The accumulator leaves through shared memory in chunks of 32 tokens; K is split over ``SPLIT_K`` programs whose
partial tiles are added atomically into a zeroed float32 workspace, and the last slice of a tile runs the low-rank
up-projection, bias and GELU epilogue of :mod:`.gemm_w4_mma`, leaving the workspace zero.

Reference: :func:`quantduo.formats.reference.w4_gemv_ref` (16-bit activations, exact float32 weights), the low-rank
term and bias as :func:`quantduo.kernels.gemm_w4_skinny.w4_skinny_gemm`'s epilogue. Needs sm_90 (``wgmma``); Gluon
has no interpreter, so CPU tests compile it for sm_90a.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from .common import split_k_workspace
from .gemm_w4_mma import (DECODE, GROUP, cta_barrier, finish_tile, launch_operands, mma_layout, operand_error,
                          split_k)

# cp.async of a pointer tile into shared memory: ``async_copy_global_to_shared`` in Triton 3.5-3.6, ``async_load``
# from 3.7 on
async_load = async_copy.async_load if hasattr(async_copy, "async_load") else async_copy.async_copy_global_to_shared

MAX_TOKENS = 256  # tokens served (more run the reconstructed weight and cuBLAS)
TOKENS_BLOCKS = (64, 128)  # the wgmma N of one program
WARPS = (4, 8)  # one or two warpgroups of 64 rows per program, sharing the activation tiles
CHUNK = gl.constexpr(32)  # tokens per step of the epilogue


def _decode_asm(dtype: str) -> str:
    """PTX: int32 code word ``$2``, quad lane ``c`` ``$3`` and an int32 ``$4`` holding the 16-bit group scale in its
    low half -> the 16-bit ``q * s`` of nibbles 0 and 1 of byte ``c`` of the word (``$0``, ``$1``)."""
    magic, ptx_type, one, negative_magic, _ = DECODE[dtype]
    return "\n".join([
        "{", ".reg .b32 t, h, sel, s2, one, neg, mz;",
        f"mov.b32 one, {one}; mov.b32 neg, {negative_magic}; mov.b32 mz, 0x80008000;",
        "shr.u32 h, $2, 4;",
        "mad.lo.u32 sel, $3, 0x1111, 0x4400;",  # bytes 0, 1 <- byte c of $2; bytes 2, 3 <- byte c of $2 >> 4
        "prmt.b32 t, $2, h, sel;",
        f"lop3.b32 t, t, 0x000F000F, {magic}, 0x6A;",  # (nibble XOR 8) in the mantissas of two 16-bit magic values
        f"fma.rn.{ptx_type} t, t, one, neg;",  # (magic + q) * 1 - magic = q, exact
        "prmt.b32 s2, $4, 0, 0x1010;",  # the scale in both halves
        f"fma.rn.{ptx_type} t, t, s2, mz;",  # q * s + (-0): one rounding
        "mov.b32 {$0, $1}, t;", "}"])


_ASM = {dtype: _decode_asm(dtype) for dtype in DECODE}


@gluon.constexpr_function
def acc_layout(tokens, warps):
    """float32 accumulator ``[16 * warps, tokens]``: 64 rows per warpgroup, the tokens the wgmma's N."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, tokens, 16])


@gluon.constexpr_function
def code_layout(warps):
    """int32 ``[16 * warps rows, 8 words, 4 quad lanes]``: lane ``4 g + c`` of warp ``w`` holds all 8 code words of
    rows ``16 w + g`` and ``16 w + g + 8`` at index ``c`` (the same words in the 4 lanes of a quad)."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 1, 0], [0, 2, 0], [0, 4, 0], [8, 0, 0]],
        lane_bases=[[0, 0, 1], [0, 0, 2], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=[[16 << w, 0, 0] for w in range(warps.bit_length() - 1)], block_bases=[], shape=[16 * warps, 8, 4])


@gluon.constexpr_function
def tile_smem_layout():
    """Activation tiles ``[tokens, 64]`` of 16-bit values: 128-byte rows, 128-byte swizzle (the wgmma operand)."""
    return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)


@gluon.constexpr_function
def copy_layout(warps):
    """Activation tiles ``[tokens, 64]`` for ``cp.async``: 8 contiguous 16-bit values (16 bytes) per copy."""
    return gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[warps, 1],
                            order=[1, 0])


@gluon.constexpr_function
def word_copy_layout(warps):
    """Code words ``[16 * warps, 8]`` int32 for ``cp.async``: 4 words (16 bytes) per copy."""
    return gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[16, 2], warps_per_cta=[warps, 1],
                            order=[1, 0])


@gluon.jit
def _issue_group(x_tile, w_tile, s_tile, x_ptrs, w_ptrs, s_base, s_row, g, stride_wsg):
    """``cp.async`` of group ``g`` (activations, code words, each row's scale word) into one ring slot, one commit
    group. The word of a scale at an even index also covers the next 2 bytes, past the tensor for the last scale of
    an odd count: inside the allocation (PyTorch rounds CUDA blocks to 512 bytes), and never used."""
    async_load(x_tile, x_ptrs + g * 64)
    async_load(w_tile, w_ptrs + g * 8)
    async_load(s_tile, s_base + ((s_row + g * stride_wsg) >> 1))
    async_copy.commit_group()


@gluon.jit
def _weights(w_tile, s_tile, s_row, g, stride_wsg, quad, ASM: gl.constexpr, dt: gl.constexpr, TOK: gl.constexpr,
             WARPS_: gl.constexpr):
    """Group ``g``'s ring slot -> the wgmma A operand ``[16 * WARPS_, 64]`` ``q * s`` (``dt``, natural input
    order)."""
    CL: gl.constexpr = code_layout(WARPS_)
    words = gl.expand_dims(w_tile.load(gl.SliceLayout(2, CL)), 2)  # [rows, 8, 1]
    scale = s_tile.load(gl.SliceLayout(1, gl.SliceLayout(2, CL)))
    scale = gl.where(((s_row + g * stride_wsg) & 1) == 1, scale >> 16, scale)  # the 16-bit scale in the low half
    scale = gl.expand_dims(gl.expand_dims(scale, 1), 2)  # [rows, 1, 1]
    words, lanes = gl.broadcast(words, quad)
    words, scale = gl.broadcast(words, scale)
    d = dt.value
    lo, hi = gl.inline_asm_elementwise(ASM, "=h,=h,r,r,r", [words, lanes, scale], dtype=(d, d), is_pure=True,
                                       pack=1)
    w = gl.reshape(gl.join(lo, hi), [16 * WARPS_, 64])  # input 8 m + 2 c + e: nibble e of byte c of word m
    return gl.convert_layout(w, gl.DotOperandLayout(operand_index=0, parent=acc_layout(TOK, WARPS_), k_width=2),
                             assert_trivial=True)


@gluon.jit
def _w4a16_wgmma_kernel(
    X, W, WS, LXP, LU, BIAS, OUT, PART, COUNTS,
    M, N, K, GROUPS_PER_SPLIT, S, R, stride_xm, stride_wsn, stride_wsg,
    HAS_LR: gl.constexpr, RP: gl.constexpr, HAS_BIAS: gl.constexpr, GELU: gl.constexpr, SPLIT_K: gl.constexpr,
    TOK: gl.constexpr, STAGES: gl.constexpr, ASM: gl.constexpr, WARPS_: gl.constexpr,
):
    """Program (tile, slice): rows ``[16 * WARPS_]`` x tokens ``[TOK]`` of OUT ``[M, N]`` (tile = row tile x the
    ``cdiv(M, TOK)`` token blocks + token block), the groups of K slice ``slice``.

    X 16-bit ``[M, K]`` (row stride stride_xm), W int32 view ``[N, K / 8]`` of the packed int4 weights, WS 16-bit
    ``[N, K / 64]`` group scales (strides given, read as the int32 words holding them), LXP float32 ``[S, M, R]``,
    LU ``[N, R]``, BIAS ``[N]``; with SPLIT_K > 1, PART float32 ``[M, N]`` and COUNTS int32 ``[tiles]`` (zero on
    entry and exit).
    """
    BN: gl.constexpr = 16 * WARPS_
    DT: gl.constexpr = X.dtype.element_ty
    XL: gl.constexpr = copy_layout(WARPS_)
    WL: gl.constexpr = word_copy_layout(WARPS_)
    SL: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, code_layout(WARPS_)))
    ACC: gl.constexpr = acc_layout(TOK, WARPS_)
    tile = gl.program_id(0)
    pid_k = gl.program_id(1)
    token_blocks = (M + TOK - 1) // TOK
    row0 = (tile // token_blocks) * BN
    tok0 = (tile % token_blocks) * TOK
    toks_x = gl.minimum(tok0 + gl.arange(0, TOK, layout=gl.SliceLayout(1, XL)), M - 1)
    x_ptrs = X + toks_x.to(gl.int64)[:, None] * stride_xm + gl.arange(0, 64, layout=gl.SliceLayout(0, XL))[None, :]
    rows_w = gl.minimum(row0 + gl.arange(0, BN, layout=gl.SliceLayout(1, WL)), N - 1)
    w_ptrs = W + rows_w.to(gl.int64)[:, None] * (K // 8) + gl.arange(0, 8, layout=gl.SliceLayout(0, WL))[None, :]
    s_base = WS.to(gl.pointer_type(gl.int32), bitcast=True)
    s_row = gl.minimum(row0 + gl.arange(0, BN, layout=SL), N - 1).to(gl.int64) * stride_wsn  # 16-bit index less g's
    quad = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(0, code_layout(WARPS_))))
    quad = gl.expand_dims(gl.expand_dims(quad, 0), 0)  # [1, 1, 4]: the lane's byte of each word
    x_tiles = ()
    w_tiles = ()
    s_tiles = ()
    for s in gl.static_range(STAGES):  # one allocation per slot: the compiler's barrier analysis tells them apart
        x_tiles = x_tiles + (gl.allocate_shared_memory(DT, [TOK, 64], tile_smem_layout()),)
        w_tiles = w_tiles + (gl.allocate_shared_memory(gl.int32, [BN, 8], gl.SwizzledSharedLayout(1, 1, 1, [1, 0])),)
        s_tiles = s_tiles + (gl.allocate_shared_memory(gl.int32, [BN], gl.SwizzledSharedLayout(1, 1, 1, [0])),)
    g0 = pid_k * GROUPS_PER_SPLIT
    last = g0 + GROUPS_PER_SPLIT - 1
    for s in gl.static_range(STAGES - 2):  # the first groups in flight (a group past the slice repeats the last)
        _issue_group(x_tiles[s], w_tiles[s], s_tiles[s], x_ptrs, w_ptrs, s_base, s_row, gl.minimum(g0 + s, last),
                     stride_wsg)
    acc = gl.zeros([BN, TOK], gl.float32, ACC)
    a_prev = gl.zeros([BN, 64], DT, gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=2))
    for g in range(g0, last + 1, STAGES):
        for s in gl.static_range(STAGES):
            if g + s <= last:
                async_copy.wait_group(STAGES - 3)  # this thread's copies of group g + s have landed
                fence_async_shared()  # ... and are visible to the tensor cores' (async proxy) reads
                cta_barrier()  # every thread's are, and every warp's wgmma of group g + s - 2 is done
                nxt: gl.constexpr = (s + STAGES - 2) % STAGES
                _issue_group(x_tiles[nxt], w_tiles[nxt], s_tiles[nxt], x_ptrs, w_ptrs, s_base, s_row,
                             gl.minimum(g + s + STAGES - 2, last), stride_wsg)
                a = _weights(w_tiles[s], s_tiles[s], s_row, g + s, stride_wsg, quad, ASM, DT, TOK, WARPS_)
                acc = warpgroup_mma(a, x_tiles[s].permute((1, 0)), acc, is_async=True)
                # the previous group's MMA is done (its A registers free); this one runs on, its A kept alive
                acc, a_prev, a = warpgroup_mma_wait(num_outstanding=1, deps=[acc, a_prev, a])
                a_prev = a
    acc, a_prev = warpgroup_mma_wait(num_outstanding=0, deps=[acc, a_prev])
    async_copy.wait_group(0)
    # the accumulator leaves through shared memory in chunks of 32 tokens (bounded registers for the epilogue)
    c_smem = gl.allocate_shared_memory(gl.float32, [BN, TOK], gl.SwizzledSharedLayout(2, 1, 8, order=[1, 0]), acc)
    cta_barrier()
    MMA: gl.constexpr = mma_layout(WARPS_)
    rows = row0 + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
    if SPLIT_K > 1:
        for c in gl.static_range(TOK // CHUNK):
            toks = tok0 + c * CHUNK + gl.arange(0, CHUNK, layout=gl.SliceLayout(0, MMA))
            mask = (rows[:, None] < N) & (toks[None, :] < M)
            gl.atomic_add(PART + toks[None, :] * N + rows[:, None], c_smem.slice(c * CHUNK, CHUNK, 1).load(MMA),
                          mask=mask, sem="relaxed")
        cta_barrier()  # every thread's partial sums are issued before the counter increment (release)
        if gl.atomic_add(COUNTS + tile, 1) == SPLIT_K - 1:  # the last slice of this tile finishes it
            for c in gl.static_range(TOK // CHUNK):
                toks = tok0 + c * CHUNK + gl.arange(0, CHUNK, layout=gl.SliceLayout(0, MMA))
                offsets = toks[None, :] * N + rows[:, None]
                mask = (rows[:, None] < N) & (toks[None, :] < M)
                total = gl.load(PART + offsets, mask=mask, other=0.0, cache_modifier=".cg")
                gl.store(PART + offsets, gl.zeros([BN, CHUNK], gl.float32, MMA), mask=mask)
                finish_tile(total, rows, toks, tok0 + c * CHUNK, M, N, LXP, S, LU, R, BIAS, OUT, RP, HAS_LR,
                            HAS_BIAS, GELU, BN, CHUNK, WARPS_)
            gl.store(COUNTS + tile, 0)
    else:
        for c in gl.static_range(TOK // CHUNK):
            toks = tok0 + c * CHUNK + gl.arange(0, CHUNK, layout=gl.SliceLayout(0, MMA))
            finish_tile(c_smem.slice(c * CHUNK, CHUNK, 1).load(MMA), rows, toks, tok0 + c * CHUNK, M, N, LXP, S, LU,
                        R, BIAS, OUT, RP, HAS_LR, HAS_BIAS, GELU, BN, CHUNK, WARPS_)


def tile_count(M: int, N: int, tokens_block: int, warps: int) -> int:
    """Output tiles (``16 * warps``-row tile x token block) of an ``[M, N]`` output: the programs per K slice."""
    return triton.cdiv(N, 16 * warps) * triton.cdiv(M, tokens_block)


def pick_config(M: int, N: int, K: int, programs: int = 132) -> dict:
    """Two warpgroups (128 rows: each activation tile read once per 128 rows), blocks of 64 tokens up to 64 and 128
    above, 4 ring slots (2 groups in flight), ``SPLIT_K`` the smallest divisor of the K / 64 groups giving about
    ``programs`` programs (one per SM of an H100 at ~233 registers per thread). Not yet tuned on a GPU."""
    tokens_block = 64 if M <= 64 else 128
    split = split_k(tile_count(M, N, tokens_block, 8), K, programs)
    return dict(WARPS=8, TOKENS_BLOCK=tokens_block, STAGES=4, SPLIT_K=split)


def supports(a: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor, lora_up: torch.Tensor | None) -> bool:
    """Whether :func:`w4a16_wgmma_gemm` serves these operands: an sm_90 GPU (``wgmma``), <= 256 16-bit tokens in
    16-byte aligned rows, K a multiple of 64, 16-bit group scales at a 4-byte aligned address and a low-rank branch
    in the activations' dtype."""
    return (a.is_cuda and torch.cuda.get_device_capability(a.device) == (9, 0)
            and operand_error(a, qweight, wscales, lora_up, MAX_TOKENS) is None)


def w4a16_wgmma_gemm(a, qweight, wscales, lxp, lora_up, bias, out_dtype: torch.dtype, gelu: bool = False,
                     config: dict | None = None) -> torch.Tensor:
    """``[M, N]`` output (M <= 256 tokens) of an INT4-g64 layer on 16-bit smoothed activations, with the low-rank,
    bias and GELU epilogue of :func:`quantduo.kernels.gemm_w4_mma.w4a16_mma_gemm`; the weights enter the tensor
    cores as ``q * s`` rounded to a's dtype.

    Args:
        a: bfloat16 / float16 ``[M, K]`` (unit column stride, 16-byte aligned rows).
        qweight: packed int4 uint8 ``[N, K // 2]`` (contiguous, 8-byte aligned); wscales float16 / bfloat16
            ``[N, K // 64]`` group scales (any strides, 4-byte aligned start).
        lxp: float32 low-rank partials ``[S, M, r]`` or None; lora_up ``[N, r]`` in a's dtype; bias ``[N]`` or None.
        config: some of WARPS (4 / 8), TOKENS_BLOCK (64 / 128), STAGES (>= 3), SPLIT_K (dividing K / 64); the
            rest from :func:`pick_config`.
    """
    M, K = a.shape
    N = qweight.shape[0]
    r = 0 if lxp is None else lxp.shape[2]
    error = operand_error(a, qweight, wscales, lora_up if r else None, MAX_TOKENS)
    if error:
        raise ValueError(error)
    cfg = {**pick_config(M, N, K), **(config or {})}
    split, tokens_block, warps = cfg["SPLIT_K"], cfg["TOKENS_BLOCK"], cfg["WARPS"]
    if (K // GROUP) % split or tokens_block not in TOKENS_BLOCKS or warps not in WARPS or cfg["STAGES"] < 3:
        raise ValueError(f"config {cfg}: SPLIT_K must divide the {K // GROUP} groups of 64 inputs, TOKENS_BLOCK be "
                         f"one of {TOKENS_BLOCKS}, WARPS one of {WARPS}, STAGES >= 3")
    name = "bf16" if a.dtype == torch.bfloat16 else "fp16"
    tiles = tile_count(M, N, tokens_block, warps)
    out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    part, counts = split_k_workspace("wgmma", M * N, tiles, a.device) if split > 1 else (out, out)
    args, epilogue = launch_operands(a, qweight, wscales, lxp, lora_up, bias, out, part, counts, split, gelu)
    _w4a16_wgmma_kernel[(tiles, split)](*args, **epilogue, TOK=tokens_block, STAGES=cfg["STAGES"], ASM=_ASM[name],
                                         WARPS_=warps, num_warps=warps)
    return out
