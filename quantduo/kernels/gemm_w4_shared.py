"""W4A16 GEMM for tens to hundreds of tokens: the INT4 weights decoded straight into ``mma.sync`` register operands
(as :mod:`.gemm_w4_mma`), the tokens staged once per program in shared memory and shared by all its warps (Gluon).

``out^T [N, M] = W [N, K] x a^T [K, M]`` on ``mma.sync`` m16n8k16: a program owns ``BN = 16 * WARPS * ROW_TILES``
output rows (each warp ``16 * ROW_TILES``) and ``TOKENS_BLOCK`` = 64 or 128 tokens, over the groups of 64 inputs of
its K slice. :mod:`.gemm_w4_mma` holds every token of a group in every warp's registers, which stops scaling at 32
tokens; here a group's activation tile ``[TOKENS_BLOCK, 64]`` arrives once per program by ``cp.async`` into a
ring of ``STAGES`` shared-memory slots (``STAGES - 1`` groups ahead), and each warp decodes its rows of the group
once and reuses them for every chunk of ``CHUNK`` tokens it loads from the tile (``ldmatrix``).

Input order. ``ldmatrix`` gives lane ``c = lane % 4`` the 16-bit pair at inputs ``2c, 2c + 1`` of each 8-input row
segment it reads, while the lane's weight codes are its 8 contiguous bytes (inputs ``16c .. 16c + 15``, two 32-bit
words, one vector load as in :mod:`.gemm_w4_mma`). The two meet in the "pair order" ``k' = 16 b + 8 j + 2 c + e``
of the natural input ``16 c + 8 j + 2 b + e`` (nibble ``e`` of byte ``b`` of the lane's word ``j``): the weights
are decoded in that order by one ``prmt`` + one ``lop3`` per byte (a trivial layout conversion, asserted at compile
time), and the activation tile is written into shared memory in that order by 4-byte ``cp.async`` copies (each
keeps a natural pair of inputs, the pairs are permuted). The sum over a group is order-free.

The decode: ``prmt`` puts byte ``b`` of a word and of the word shifted right by 4 in bytes 0 and 2, and the
``lop3`` of :mod:`.gemm_w4_mma` (LUT 0x6A) makes of nibbles ``e = 0, 1`` (XOR 8) the 16-bit pair ``magic + q``;
one packed ``fma`` removes the magic number exactly. Float32 accumulation per group, then ``acc += scale[n, g] *
d`` (exact group sums as the references). K is split over ``SPLIT_K`` programs with the atomic finish and the
low-rank / bias / GELU epilogue of :mod:`.gemm_w4_mma` (per chunk of tokens).

Reference: :func:`quantduo.formats.reference.w4_gemv_ref` (16-bit activations, exact float32 weights), the low-rank
term and bias as :func:`quantduo.kernels.gemm_w4_skinny.w4_skinny_gemm`'s epilogue. Runs on NVIDIA GPUs of compute
capability 8.0 and above (``mma.sync``, ``cp.async``); Gluon has no interpreter, so CPU tests compile it for sm_90a.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from .common import rank_pad, split_k_workspace
from .gemm_w4_mma import (DECODE, GROUP, cta_barrier, finish_tile, load_weights, mma_layout, operand_error,
                          operand_layout, scales_from_words, split_k, word_layout)

# cp.async of a pointer tile into shared memory: ``async_copy_global_to_shared`` in Triton 3.5-3.6, ``async_load``
# from 3.7 on
async_load = async_copy.async_load if hasattr(async_copy, "async_load") else async_copy.async_copy_global_to_shared

MAX_TOKENS = 256  # tokens served (any M works; above this the reconstructed weight and cuBLAS win by design)
TOKENS_BLOCKS = (64, 128)


def _decode_pairs_asm(dtype: str) -> str:
    """PTX: int32 word ``$8`` (eight signed nibbles) -> eight 16-bit ``q`` ``$0 .. $7``, output ``2 b + e`` =
    nibble ``e`` of byte ``b`` (one ``prmt`` + one ``lop3`` + one packed ``fma`` per byte)."""
    magic, ptx_type, one, negative_magic, _ = DECODE[dtype]
    lines = [".reg .b32 t, h, one, neg;", f"mov.b32 one, {one}; mov.b32 neg, {negative_magic};", "shr.u32 h, $8, 4;"]
    for b in range(4):
        selector = b | b << 4 | (4 + b) << 8 | (4 + b) << 12  # bytes 0, 1 <- byte b of $8; bytes 2, 3 <- of h
        lines.append(f"prmt.b32 t, $8, h, {selector:#06x};")
        lines.append(f"lop3.b32 t, t, 0x000F000F, {magic}, 0x6A;")
        lines.append(f"fma.rn.{ptx_type} t, t, one, neg;")  # (magic + q) * 1 - magic = q, exact
        lines.append(f"mov.b32 {{${2 * b}, ${2 * b + 1}}}, t;")
    return "{\n" + "\n".join(lines) + "\n}"


_ASM = {dtype: _decode_pairs_asm(dtype) for dtype in DECODE}


@gluon.constexpr_function
def tile_smem_layout():
    """Activation tiles ``[tokens, 64]`` of 16-bit values: 128-byte rows, XOR-swizzled 16-byte segments (``ldmatrix``
    without bank conflicts)."""
    return gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0])


@gluon.constexpr_function
def copy_layout(warps):
    """Activation tiles ``[tokens, 64]`` for ``cp.async`` (4 bytes: one input pair per copy): 8 lanes per 128-byte
    token row, 8 pair-order positions per thread, whose natural inputs differ from each other by constants."""
    return gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[warps, 1], order=[1, 0])


@gluon.jit
def pair_order_inputs(layout: gl.constexpr):
    """int32 ``[64]``: the natural input ``16 c + 8 j + 2 b + e`` at pair-order position ``k' = 16 b + 8 j + 2 c +
    e`` (runs of 2 contiguous inputs, for 4-byte copies)."""
    k = gl.arange(0, 64, layout=layout)
    natural = ((k >> 1) & 3) * 16 + (k & 8) + ((k >> 4) & 3) * 2 + (k & 1)
    return gl.max_contiguous(gl.multiple_of(natural, 2), 2)


@gluon.jit
def _weight_operand(words, dt: gl.constexpr, ASM: gl.constexpr, BN: gl.constexpr, WARPS_: gl.constexpr):
    """int32 words ``[BN, 8]`` (signed nibbles, :func:`word_layout`) -> the A operand ``[BN, 64]`` ``q`` in pair
    order, 16-bit ``dt``."""
    d = dt.value
    e0, e1, e2, e3, e4, e5, e6, e7 = gl.inline_asm_elementwise(
        ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r", [words], dtype=(d, d, d, d, d, d, d, d), is_pure=True, pack=1)
    t = gl.join(gl.join(gl.join(e0, e1), gl.join(e2, e3)), gl.join(gl.join(e4, e5), gl.join(e6, e7)))
    t = gl.reshape(t, [BN, 4, 2, 2, 2, 2])  # (row, c, j, e, b0, b1): nibble e of byte b0 + 2 b1 of word 2c + j
    t = gl.permute(t, [0, 5, 4, 2, 1, 3])  # (row, b1, b0, j, c, e) = pair order
    t = gl.reshape(t, [BN, 64])
    return gl.convert_layout(t, operand_layout(0, WARPS_), assert_trivial=True)


@gluon.jit
def _issue_tile(tile, x_ptrs, g):
    """``cp.async`` of group ``g``'s activation tile into the shared ``tile`` (pair order), one commit group."""
    async_load(tile, x_ptrs + g * 64)
    async_copy.commit_group()


@gluon.jit
def _w4a16_shared_kernel(
    X, W, WS, LXP, LU, BIAS, OUT, PART, COUNTS,
    M, N, K, GROUPS_PER_SPLIT, S, R, stride_xm, stride_wsn, stride_wsg,
    HAS_LR: gl.constexpr, RP: gl.constexpr, HAS_BIAS: gl.constexpr, GELU: gl.constexpr, SPLIT_K: gl.constexpr,
    ROW_TILES: gl.constexpr, TOK: gl.constexpr, CHUNK: gl.constexpr, WARPS_: gl.constexpr, ASM: gl.constexpr,
    STAGES: gl.constexpr,
):
    """Program (tile, slice): rows ``[BN]`` x tokens ``[TOK]`` of OUT ``[M, N]`` (tile = row tile x the
    ``cdiv(M, TOK)`` token blocks + token block), the groups of K slice ``slice``.

    X 16-bit ``[M, K]`` (row stride stride_xm), W int32 view ``[N, K / 8]`` of the packed int4 weights, WS
    ``[N, K / 64]`` group scales (strides given), LXP float32 ``[S, M, R]``, LU ``[N, R]``, BIAS ``[N]``; with
    SPLIT_K > 1, PART float32 ``[M, N]`` and COUNTS int32 ``[tiles]`` (zero on entry and exit).
    """
    BN: gl.constexpr = 16 * WARPS_ * ROW_TILES
    CHUNKS: gl.constexpr = TOK // CHUNK
    DT: gl.constexpr = X.dtype.element_ty
    MMA: gl.constexpr = mma_layout(WARPS_)
    WL: gl.constexpr = word_layout(WARPS_, ROW_TILES)
    XL: gl.constexpr = copy_layout(WARPS_)
    tile = gl.program_id(0)
    pid_k = gl.program_id(1)
    token_blocks = (M + TOK - 1) // TOK
    row0 = (tile // token_blocks) * BN
    tok0 = (tile % token_blocks) * TOK
    rows_w = gl.minimum(row0 + gl.arange(0, BN, layout=gl.SliceLayout(1, WL)), N - 1)
    w_ptrs = W + rows_w.to(gl.int64)[:, None] * (K // 8) + gl.arange(0, 8, layout=gl.SliceLayout(0, WL))[None, :]
    toks_x = gl.minimum(tok0 + gl.arange(0, TOK, layout=gl.SliceLayout(1, XL)), M - 1)
    x_ptrs = X + toks_x.to(gl.int64)[:, None] * stride_xm + pair_order_inputs(gl.SliceLayout(0, XL))[None, :]
    rows = row0 + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
    s_index = gl.minimum(rows, N - 1).to(gl.int64) * stride_wsn  # 16-bit index of the row's scales, less g's
    s_words = (WS.to(gl.pointer_type(gl.int32), bitcast=True), s_index)
    tiles = ()  # one allocation per ring slot: the compiler's barrier analysis tells them apart
    for s in gl.static_range(STAGES):
        tiles = tiles + (gl.allocate_shared_memory(DT, [TOK, 64], tile_smem_layout()),)
    zero = gl.zeros([BN, CHUNK], gl.float32, MMA)
    accs = ()
    for c in gl.static_range(CHUNKS):
        accs = accs + (gl.zeros([BN, CHUNK], gl.float32, MMA),)
    g0 = pid_k * GROUPS_PER_SPLIT
    g_end = g0 + GROUPS_PER_SPLIT
    # activation tiles STAGES - 1 groups ahead in shared memory (the copy of a group past the slice repeats the last
    # one: every step commits one copy group); weight codes and scale words STAGES groups ahead in registers
    for s in gl.static_range(STAGES - 1):
        _issue_tile(tiles[s], x_ptrs, gl.minimum(g0 + s, g_end - 1))
    weights = ()
    for s in gl.static_range(STAGES):
        weights = weights + (load_weights(w_ptrs, s_words, g0 + s, g_end, stride_wsg),)
    for g in range(g0, g_end, STAGES):
        for s in gl.static_range(STAGES):
            if g + s < g_end:
                async_copy.wait_group(STAGES - 2)  # this thread's copy of group g + s has landed
                cta_barrier()  # every thread's copy has, and every warp is done with the slot refilled below
                _issue_tile(tiles[(s + STAGES - 1) % STAGES], x_ptrs, gl.minimum(g + s + STAGES - 1, g_end - 1))
                words, s_word = weights[s]
                a = _weight_operand(words, DT, ASM, BN, WARPS_)
                scale = scales_from_words(s_word, s_index + (g + s) * stride_wsg, WS.dtype.element_ty)[:, None]
                weights = weights[:s] + (load_weights(w_ptrs, s_words, g + s + STAGES, g_end, stride_wsg),) \
                    + weights[s + 1:]
                for c in gl.static_range(CHUNKS):
                    b = tiles[s].slice(c * CHUNK, CHUNK, 0).permute((1, 0)).load(operand_layout(1, WARPS_))
                    accs = accs[:c] + (accs[c] + scale * mma_v2(a, b, zero),) + accs[c + 1:]
    async_copy.wait_group(0)
    if SPLIT_K > 1:
        for c in gl.static_range(CHUNKS):
            toks = tok0 + c * CHUNK + gl.arange(0, CHUNK, layout=gl.SliceLayout(0, MMA))
            mask = (rows[:, None] < N) & (toks[None, :] < M)
            gl.atomic_add(PART + toks[None, :] * N + rows[:, None], accs[c], mask=mask, sem="relaxed")
        cta_barrier()  # every thread's partial sums are issued before the counter increment (release)
        if gl.atomic_add(COUNTS + tile, 1) == SPLIT_K - 1:  # the last slice of this tile finishes it
            for c in gl.static_range(CHUNKS):
                toks = tok0 + c * CHUNK + gl.arange(0, CHUNK, layout=gl.SliceLayout(0, MMA))
                offsets = toks[None, :] * N + rows[:, None]
                mask = (rows[:, None] < N) & (toks[None, :] < M)
                total = gl.load(PART + offsets, mask=mask, other=0.0, cache_modifier=".cg")
                gl.store(PART + offsets, zero, mask=mask)
                finish_tile(total, rows, toks, tok0 + c * CHUNK, M, N, LXP, S, LU, R, BIAS, OUT, RP, HAS_LR,
                            HAS_BIAS, GELU, BN, CHUNK, WARPS_)
            gl.store(COUNTS + tile, 0)
    else:
        for c in gl.static_range(CHUNKS):
            toks = tok0 + c * CHUNK + gl.arange(0, CHUNK, layout=gl.SliceLayout(0, MMA))
            finish_tile(accs[c], rows, toks, tok0 + c * CHUNK, M, N, LXP, S, LU, R, BIAS, OUT, RP, HAS_LR, HAS_BIAS,
                        GELU, BN, CHUNK, WARPS_)


def tile_count(M: int, N: int, warps: int, row_tiles: int, tokens_block: int) -> int:
    """Output tiles (row tile x token block) of an ``[M, N]`` output: the programs per K slice."""
    return triton.cdiv(N, 16 * warps * row_tiles) * triton.cdiv(M, tokens_block)


def pick_config(M: int, N: int, K: int, programs: int = 264) -> dict:
    """8 warps of 16 rows (128 rows per program), blocks of 64 tokens up to 64 and 128 above, chunks of 32 tokens,
    3 groups in flight, ``SPLIT_K`` the smallest divisor of the K / 64 groups giving about ``programs`` programs."""
    tokens_block = 64 if M <= 64 else 128
    split = split_k(tile_count(M, N, 8, 1, tokens_block), K, programs)
    return dict(WARPS=8, ROW_TILES=1, TOKENS_BLOCK=tokens_block, CHUNK=32, STAGES=3, SPLIT_K=split)


def supports(a: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor, lora_up: torch.Tensor | None) -> bool:
    """Whether :func:`w4a16_shared_gemm` serves these operands: a CUDA device with ``mma.sync`` and ``cp.async``
    (sm_80+), <= 256 16-bit tokens in 16-byte aligned rows, K a multiple of 64, 16-bit group scales at a 4-byte
    aligned address and a low-rank branch in the activations' dtype."""
    return (a.is_cuda and torch.cuda.get_device_capability(a.device)[0] >= 8
            and operand_error(a, qweight, wscales, lora_up, MAX_TOKENS) is None)


def w4a16_shared_gemm(a, qweight, wscales, lxp, lora_up, bias, out_dtype: torch.dtype, gelu: bool = False,
                      config: dict | None = None) -> torch.Tensor:
    """``[M, N]`` output (M <= 256 tokens) of an INT4-g64 layer on 16-bit smoothed activations, with the low-rank,
    bias and GELU epilogue of :func:`quantduo.kernels.gemm_w4_mma.w4a16_mma_gemm`.

    Args:
        a: bfloat16 / float16 ``[M, K]`` (unit column stride, 16-byte aligned rows).
        qweight: packed int4 uint8 ``[N, K // 2]`` (contiguous, 8-byte aligned); wscales float16 / bfloat16
            ``[N, K // 64]`` group scales (any strides, 4-byte aligned start).
        lxp: float32 low-rank partials ``[S, M, r]`` or None; lora_up ``[N, r]`` in a's dtype; bias ``[N]`` or None.
        config: some of WARPS (4 / 8), ROW_TILES (1 / 2), TOKENS_BLOCK (64 / 128), CHUNK (16 / 32, dividing it),
            STAGES (>= 2), SPLIT_K (dividing K / 64); the rest from :func:`pick_config`.
    """
    M, K = a.shape
    N = qweight.shape[0]
    r = 0 if lxp is None else lxp.shape[2]
    error = operand_error(a, qweight, wscales, lora_up if r else None, MAX_TOKENS)
    if error:
        raise ValueError(error)
    cfg = {**pick_config(M, N, K), **(config or {})}
    split, tokens_block, warps, chunk = cfg["SPLIT_K"], cfg["TOKENS_BLOCK"], cfg["WARPS"], cfg["CHUNK"]
    if ((K // GROUP) % split or tokens_block not in TOKENS_BLOCKS or warps not in (4, 8)
            or cfg["ROW_TILES"] not in (1, 2) or chunk not in (16, 32) or cfg["STAGES"] < 2):
        raise ValueError(f"config {cfg}: SPLIT_K must divide the {K // GROUP} groups of 64 inputs, TOKENS_BLOCK be "
                         f"one of {TOKENS_BLOCKS}, WARPS 4 or 8, ROW_TILES 1 or 2, CHUNK 16 or 32, STAGES >= 2")
    name = "bf16" if a.dtype == torch.bfloat16 else "fp16"
    tiles = tile_count(M, N, warps, cfg["ROW_TILES"], tokens_block)
    out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    part, counts = split_k_workspace("shared", M * N, tiles, a.device) if split > 1 else (out, out)
    dummy = qweight
    _w4a16_shared_kernel[(tiles, split)](
        a, qweight.view(torch.int32), wscales, lxp if r else dummy, lora_up if r else dummy,
        bias if bias is not None else dummy, out, part, counts,
        M, N, K, K // GROUP // split, lxp.shape[0] if r else 0, r, a.stride(0), wscales.stride(0),
        wscales.stride(1),
        HAS_LR=r > 0, RP=rank_pad(r), HAS_BIAS=bias is not None, GELU=gelu, SPLIT_K=split,
        ROW_TILES=cfg["ROW_TILES"], TOK=tokens_block, CHUNK=chunk, WARPS_=warps, ASM=_ASM[name],
        STAGES=cfg["STAGES"], num_warps=warps,
    )
    return out
