"""Few-token W4A16 GEMM (M <= 64 tokens) with the weights decoded straight into tensor-core operand registers (Gluon).

``out^T [N, M] = W [N, K] x a^T [K, M]`` on ``mma.sync`` m16n8k16: the INT4 weights are the A operand (16 output
rows per instruction), the tokens the 8-wide B operand, in blocks of ``TOKENS_BLOCK`` = 16 or 32 tokens per
program (2 or 4 B tiles). Each thread loads, per row and group of 64 inputs, the 8 bytes of its lane (inputs
``16c .. 16c + 15`` for lane ``c = lane % 4``) and the same 16 contiguous activations of each of its tokens, both
with plain vector loads: nothing goes through shared memory and no warp waits for another. ``STAGES`` groups are in
flight per program: group ``g + STAGES`` is loaded into group ``g``'s registers right after group ``g`` is consumed,
and everything a program carries from one group to the next is 32-bit words (weights, activation pairs, the words
holding the 16-bit scales), unpacked by an asm statement where they are used, so the compiler neither copies a
loaded register (a copy waits for the load) nor moves the unpacking up to the load. The sum over a group is
order-free, so the kernel feeds the tensor cores the inputs in the order the registers already hold them (the "mma
order" ``k'``, a fixed permutation of the 64 inputs of a group, the same for weights and activations):
``k' = 32 j + 16 i1 + 8 i0 + 2 c + i2`` for the natural input ``16 c + 8 j + 4 i2 + 2 i1 + i0`` (nibble ``i`` of the
thread's word ``j``). With that order the decode needs no data movement (a Gluon trivial layout conversion, checked at
compile time):

* one ``lop3`` per two weights puts nibbles ``i`` and ``i + 4`` of a word (XOR 8) in the mantissas of a pair of
  16-bit ``128.0`` (bfloat16; ``1024.0`` for float16): ``136 + q`` exactly, no integer-to-float conversion;
* the offset goes either on the tensor cores, ``d = dot(136 + q, a) + dot(-136, a)`` (a constant A operand: one
  more mma per weight mma, cheap while few token tiles share each decoded weight), or (``SIGNED``) by one packed
  ``fma`` per two weights, ``(136 + q) * 1 - 136 = q`` exactly; float32 accumulation, then
  ``acc += scale[n, g] * d`` (exact group sums as the references).

K is split over ``SPLIT_K`` programs; partial tiles are added atomically into a zeroed float32 workspace and the last
slice of a tile (per-tile counter) adds the low-rank up-projection (``lx [M, r]`` from the smoothing kernel, rounded
to the lora dtype, times ``lora_up^T`` on the tensor cores, the product rounded to the lora dtype), the bias, the
optional tanh GELU, stores ``[M, N]`` and leaves the workspace and counter zero.

Reference: :func:`quantduo.formats.reference.w4_gemv_ref` (16-bit activations, exact float32 weights), with the
low-rank term and bias as :func:`quantduo.kernels.gemm_w4_skinny.w4_skinny_gemm`'s epilogue. Runs on NVIDIA GPUs of
compute capability 8.0 and above (``mma.sync``); Gluon has no interpreter, so CPU tests compile it for sm_90a.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .common import rank_pad, split_k_workspace

# the CTA barrier: ``thread_barrier`` in Triton 3.5-3.6, ``barrier`` from 3.7 on
_cta_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier

GROUP = 64
MAX_TOKENS = 64  # tokens served, in blocks of TOKENS_BLOCK (16 or 32: 2 or 4 mma B tiles of 8) per program
WARPS = 4
# groups of 64 inputs in flight per program by (token block, row tiles): the most within 168 registers per thread
# (3 programs of 4 warps per SM; more registers cost programs per SM, which the sweep measured as slower), at least
# one (32-token blocks with 2 row tiles: 193 registers with Triton 3.6's compiler)
STAGES = {(16, 1): 4, (16, 2): 2, (32, 1): 2, (32, 2): 1}

# nibble pairs (i, i + 4) of a word w, XOR 8, as two 16-bit (magic + u): lop3 LUT 0x6A = (a & b) ^ c; then
# (signed decode) one packed fma t * 1 - magic: the signed value q
_DECODE = {  # dtype: (magic pair = 128 + 8 / 1024 + 8, PTX type, 1.0 pair, -magic pair, magic value)
    "bf16": ("0x43084308", "bf16x2", "0x3F803F80", "0xC308C308", 136.0),
    "fp16": ("0x64086408", "f16x2", "0x3C003C00", "0xE408E408", 1032.0),
}


def _decode_asm(dtype: str, signed: bool) -> str:
    """PTX: int32 word ``$8`` -> eight 16-bit values ``$0 .. $7`` (nibbles 0, 4, 1, 5, ...: output ``i`` and
    ``i + 4`` from one lop3): ``magic + q`` or, signed, ``q``."""
    magic, ptx_type, one, negative_magic, _ = _DECODE[dtype]
    lines = [".reg .b32 t, one, neg;", f"mov.b32 one, {one}; mov.b32 neg, {negative_magic};"] if signed else \
        [".reg .b32 t;"]
    for i in range(4):
        src = "$8" if i == 0 else "t"
        if i:
            lines.append(f"shr.u32 t, $8, {4 * i};")
        lines.append(f"lop3.b32 t, {src}, 0x000F000F, {magic}, 0x6A;")
        if signed:
            lines.append(f"fma.rn.{ptx_type} t, t, one, neg;")
        lines.append(f"mov.b32 {{${i}, ${i + 4}}}, t;")
    return "{\n" + "\n".join(lines) + "\n}"


_ASM = {(dtype, signed): _decode_asm(dtype, signed) for dtype in _DECODE for signed in (False, True)}


@gluon.constexpr_function
def mma_layout(warps):
    return gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[warps, 1], instr_shape=[16, 8])


@gluon.constexpr_function
def operand_layout(index, warps):
    return gl.DotOperandLayout(operand_index=index, parent=mma_layout(warps), k_width=2)


@gluon.constexpr_function
def word_layout(warps, row_tiles):
    """int32 words ``[16 * warps * row_tiles, 8]`` of one group: lane ``4 g + c`` holds words ``2c, 2c + 1`` of rows
    ``g, g + 8`` of each 16-row tile (warp ``w``: tiles ``w + warps * t``), as the A operand places its rows."""
    rows = 16 * warps * row_tiles
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [8, 0]] + [[16 * warps * (1 << t), 0] for t in range(row_tiles.bit_length() - 1)],
        lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16 * (1 << w), 0] for w in range(warps.bit_length() - 1)],
        block_bases=[], shape=[rows, 8])


@gluon.constexpr_function
def act_word_layout(warps, tokens):
    """int32 words (pairs of 16-bit activations) ``[tokens, 32]`` of one group: lane ``4 g + c`` holds words
    ``8c .. 8c + 7`` (inputs ``16c .. 16c + 15``) of tokens ``g, g + 8, g + 16, ...`` (every warp the same)."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [0, 4]] + [[8 * (1 << t), 0] for t in range(tokens.bit_length() - 4)],
        lane_bases=[[0, 8], [0, 16], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[0, 0] for _ in range(warps.bit_length() - 1)],
        block_bases=[], shape=[tokens, 32])


@gluon.jit
def _weight_operand(words, like, ASM: gl.constexpr, BN: gl.constexpr, WARPS_: gl.constexpr):
    """int32 words ``[BN, 8]`` (raw signed nibbles) -> A operand ``[BN, 64]`` in mma order of what ``ASM`` decodes
    (``magic + q`` or ``q``), in the 16-bit dtype of the tensor ``like``."""
    dt = like.dtype
    e0, e1, e2, e3, e4, e5, e6, e7 = gl.inline_asm_elementwise(
        ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r", [words], dtype=(dt, dt, dt, dt, dt, dt, dt, dt), is_pure=True, pack=1)
    t = gl.join(gl.join(gl.join(e0, e1), gl.join(e2, e3)), gl.join(gl.join(e4, e5), gl.join(e6, e7)))
    t = gl.reshape(t, [BN, 4, 2, 2, 2, 2])  # (row, c, j, i0, i1, i2): element = nibble 4 i2 + 2 i1 + i0 of word 2c + j
    t = gl.permute(t, [0, 2, 4, 3, 1, 5])  # (row, j, i1, i0, c, i2) = mma order
    t = gl.reshape(t, [BN, 64])
    return gl.convert_layout(t, operand_layout(0, WARPS_), assert_trivial=True)


@gluon.jit
def _act_operand(x, TOK: gl.constexpr, WARPS_: gl.constexpr):
    """16-bit ``[TOK tokens, 64]`` in natural input order -> B operand ``[64, TOK]`` in mma order."""
    x = gl.reshape(x, [TOK, 4, 2, 2, 2, 2])  # (token, c, j, i2, i1, i0)
    x = gl.permute(x, [2, 4, 5, 1, 3, 0])  # (j, i1, i0, c, i2, token)
    x = gl.reshape(x, [64, TOK])
    return gl.convert_layout(x, operand_layout(1, WARPS_), assert_trivial=True)


@gluon.jit
def halves(words, dt: gl.constexpr):
    """int32 ``words`` -> their low and high 16-bit halves as ``dt`` (an asm statement: the compiler keeps the
    unpacking, and everything after it, where the halves are used instead of moving it up to the load)."""
    return gl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [words], dtype=(dt.value, dt.value),
                                     is_pure=False, pack=1)


@gluon.jit
def _activations(words, dt: gl.constexpr, TOK: gl.constexpr):
    """int32 words ``[TOK, 32]`` of 16-bit pairs -> ``[TOK, 64]`` ``dt`` activations in natural input order."""
    lo, hi = halves(words, dt)
    return gl.reshape(gl.join(lo, hi), [TOK, 64])


@gluon.jit
def scales_from_words(words, index, dt: gl.constexpr):
    """float32 group scales from the int32 ``words`` holding them: the high half where the scale's 16-bit index
    ``index`` is odd."""
    lo, hi = halves(words, dt)
    return gl.where((index & 1) == 1, hi, lo).to(gl.float32)


@gluon.jit
def _load_weights(w_ptrs, s_words, g, g_end, stride_wsg):
    """Group ``g``'s int32 words: weights ``[BN, 8]`` and the words holding the scales ``[BN]`` (``s_words``: the
    int32 view of the scales, the rows' 16-bit index without ``g``); predicated off (zeros) from ``g_end`` on. The
    word of a scale at an even index also covers the next 2 bytes, past the tensor for the last scale of an odd
    count: inside the allocation (PyTorch rounds CUDA blocks to 512 bytes), and never used."""
    valid = g < g_end
    return (gl.load(w_ptrs + g * 8, mask=valid, other=0),
            gl.load(s_words[0] + ((s_words[1] + g * stride_wsg) >> 1), mask=valid, other=0))


@gluon.jit
def _load_activations(x_ptrs, g, g_end):
    """Group ``g``'s activation pairs, int32 ``[TOK, 32]`` (zeros from ``g_end`` on)."""
    return gl.load(x_ptrs + g * 32, mask=g < g_end, other=0)


@gluon.jit
def _finish(acc, rows, toks, tok0, M, N, LXP, S, LU, R, BIAS, OUT, RP: gl.constexpr, HAS_LR: gl.constexpr,
            HAS_BIAS: gl.constexpr, GELU: gl.constexpr, BN: gl.constexpr, TOK: gl.constexpr, WARPS_: gl.constexpr):
    """float32 ``acc [BN, TOK]`` (rows x tokens ``tok0 ..``, mma layout) + low-rank + bias (+ GELU) -> OUT
    ``[M, N]``."""
    MMA: gl.constexpr = mma_layout(WARPS_)
    if HAS_LR:
        B_L: gl.constexpr = operand_layout(1, WARPS_)
        A_L: gl.constexpr = operand_layout(0, WARPS_)
        rb = gl.arange(0, RP, layout=gl.SliceLayout(1, B_L))
        tb = tok0 + gl.arange(0, TOK, layout=gl.SliceLayout(0, B_L))
        lmask = (rb[:, None] < R) & (tb[None, :] < M)
        lx = gl.zeros([RP, TOK], gl.float32, B_L)
        for s in range(S):
            lx += gl.load(LXP + s * M * R + tb[None, :] * R + rb[:, None], mask=lmask, other=0.0)
        ra = gl.convert_layout(rows, gl.SliceLayout(1, A_L))
        ka = gl.arange(0, RP, layout=gl.SliceLayout(0, A_L))
        lu = gl.load(LU + ra[:, None] * R + ka[None, :], mask=(ra[:, None] < N) & (ka[None, :] < R), other=0.0)
        lr = mma_v2(lu, lx.to(lu.dtype), gl.zeros([BN, TOK], gl.float32, MMA))
        acc += lr.to(lu.dtype).to(gl.float32)
    if HAS_BIAS:
        acc += gl.load(BIAS + rows, mask=rows < N, other=0.0).to(gl.float32)[:, None]
    y = acc.to(OUT.dtype.element_ty)
    if GELU:
        v = y.to(gl.float32)
        u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        y = (0.5 * v * (2.0 - 2.0 / (gl.exp(2.0 * u) + 1.0))).to(OUT.dtype.element_ty)
    gl.store(OUT + toks[None, :] * N + rows[:, None], y, mask=(rows[:, None] < N) & (toks[None, :] < M))


@gluon.jit
def _w4a16_mma_kernel(
    X, W, WS, LXP, LU, BIAS, OUT, PART, COUNTS,
    M, N, K, GROUPS_PER_SPLIT, S, R, stride_xm, stride_wsn, stride_wsg,
    HAS_LR: gl.constexpr, RP: gl.constexpr, HAS_BIAS: gl.constexpr, GELU: gl.constexpr, SPLIT_K: gl.constexpr,
    ROW_TILES: gl.constexpr, TOK: gl.constexpr, WARPS_: gl.constexpr, ASM: gl.constexpr, OFFSET: gl.constexpr,
    STAGES: gl.constexpr,
):
    """Program (tile, slice): rows ``[BN]`` x tokens ``[TOK]`` of OUT ``[M, N]`` (tile = row tile x the
    ``cdiv(M, TOK)`` token blocks + token block), groups of K slice ``slice``.

    X 16-bit ``[M, K]`` (row stride stride_xm), W int32 view ``[N, K / 8]`` of the packed int4 weights, WS
    ``[N, K / 64]`` group scales (strides given), LXP float32 ``[S, M, R]``, LU ``[N, R]``, BIAS ``[N]``; with
    SPLIT_K > 1, PART float32 ``[M, N]`` and COUNTS int32 ``[tiles]`` (zero on entry and exit). ASM decodes
    ``OFFSET + q`` (OFFSET = 0: the signed decode; otherwise a constant dot removes the offset).
    """
    BN: gl.constexpr = 16 * WARPS_ * ROW_TILES
    DT: gl.constexpr = X.dtype.element_ty
    MMA: gl.constexpr = mma_layout(WARPS_)
    WL: gl.constexpr = word_layout(WARPS_, ROW_TILES)
    XW: gl.constexpr = act_word_layout(WARPS_, TOK)
    tile = gl.program_id(0)
    pid_k = gl.program_id(1)
    token_blocks = (M + TOK - 1) // TOK
    row0 = (tile // token_blocks) * BN
    tok0 = (tile % token_blocks) * TOK
    rows_w = gl.minimum(row0 + gl.arange(0, BN, layout=gl.SliceLayout(1, WL)), N - 1)
    w_ptrs = W + rows_w.to(gl.int64)[:, None] * (K // 8) + gl.arange(0, 8, layout=gl.SliceLayout(0, WL))[None, :]
    toks_x = gl.minimum(tok0 + gl.arange(0, TOK, layout=gl.SliceLayout(1, XW)), M - 1)
    x_ptrs = X.to(gl.pointer_type(gl.int32), bitcast=True) + toks_x[:, None] * (stride_xm // 2) \
        + gl.arange(0, 32, layout=gl.SliceLayout(0, XW))[None, :]
    rows = row0 + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
    s_index = gl.minimum(rows, N - 1).to(gl.int64) * stride_wsn  # 16-bit index of the row's scales, less g's
    s_words = (WS.to(gl.pointer_type(gl.int32), bitcast=True), s_index)
    zero = gl.zeros([BN, TOK], gl.float32, MMA)
    acc = gl.zeros([BN, TOK], gl.float32, MMA)
    if OFFSET != 0:
        offset = gl.full([BN, 64], -OFFSET, DT, operand_layout(0, WARPS_))
    g0 = pid_k * GROUPS_PER_SPLIT
    g_end = g0 + GROUPS_PER_SPLIT
    # a ring of STAGES groups in flight: group g + STAGES is loaded (straight into the registers of group g, which are
    # dead by then: no register moves wait on it) right after group g is consumed
    weights = ()
    for s in gl.static_range(STAGES):
        weights = weights + (_load_weights(w_ptrs, s_words, g0 + s, g_end, stride_wsg),)
    acts = ()
    for s in gl.static_range(STAGES):
        acts = acts + (_load_activations(x_ptrs, g0 + s, g_end),)
    for g in range(g0, g_end, STAGES):
        for s in gl.static_range(STAGES):
            if g + s < g_end:  # also a block boundary the compiler does not move the operand shuffles across
                words, s_word = weights[s]
                x = _activations(acts[s], DT, TOK)
                xb = _act_operand(x, TOK, WARPS_)
                if OFFSET != 0:
                    d = mma_v2(_weight_operand(words, x, ASM, BN, WARPS_), xb, mma_v2(offset, xb, zero))
                else:
                    d = mma_v2(_weight_operand(words, x, ASM, BN, WARPS_), xb, zero)
                acc += scales_from_words(s_word, s_index + (g + s) * stride_wsg, WS.dtype.element_ty)[:, None] * d
                weights = weights[:s] + (_load_weights(w_ptrs, s_words, g + s + STAGES, g_end, stride_wsg),) \
                    + weights[s + 1:]
                acts = acts[:s] + (_load_activations(x_ptrs, g + s + STAGES, g_end),) + acts[s + 1:]
    toks = tok0 + gl.arange(0, TOK, layout=gl.SliceLayout(0, MMA))
    if SPLIT_K > 1:
        tile_off = toks[None, :] * N + rows[:, None]
        mask = (rows[:, None] < N) & (toks[None, :] < M)
        gl.atomic_add(PART + tile_off, acc, mask=mask, sem="relaxed")
        _cta_barrier()  # every thread's partial sum is issued before the counter increment (release)
        if gl.atomic_add(COUNTS + tile, 1) == SPLIT_K - 1:  # the last slice of this tile finishes it
            total = gl.load(PART + tile_off, mask=mask, other=0.0, cache_modifier=".cg")
            gl.store(PART + tile_off, gl.zeros([BN, TOK], gl.float32, MMA), mask=mask)
            gl.store(COUNTS + tile, 0)
            _finish(total, rows, toks, tok0, M, N, LXP, S, LU, R, BIAS, OUT, RP, HAS_LR, HAS_BIAS, GELU, BN, TOK,
                    WARPS_)
    else:
        _finish(acc, rows, toks, tok0, M, N, LXP, S, LU, R, BIAS, OUT, RP, HAS_LR, HAS_BIAS, GELU, BN, TOK, WARPS_)


def tile_count(M: int, N: int, row_tiles: int, tokens_block: int) -> int:
    """Output tiles (row tile x token block) of an ``[M, N]`` output: the programs per K slice."""
    return triton.cdiv(N, 16 * WARPS * row_tiles) * triton.cdiv(M, tokens_block)


def split_k(tiles: int, K: int, programs: int = 384) -> int:
    """The smallest divisor of the K / 64 groups that gives ``tiles`` output tiles about ``programs`` programs."""
    groups = K // GROUP
    return next((d for d in range(1, groups + 1) if groups % d == 0 and tiles * d >= programs), groups)


def pick_config(M: int, N: int, K: int, programs: int = 384) -> dict:
    """Blocks of 16 tokens up to 16 tokens and, up to 48, for layers of <= 9216 x 3072 weights, with 16 output rows
    per warp (``ROW_TILES`` = 1) and 4 groups in flight; else blocks of 32 with 32 rows per warp and one group in
    flight (:data:`STAGES`); the signed decode; ``SPLIT_K`` the smallest divisor of the K / 64 groups giving about
    ``programs`` programs (~3 per SM of an H100). Within a few % of the best of the fourteenth session's sweep at
    most FLUX shapes and 1-64 tokens (BENCHMARKS.md; 64-token blocks were 1.3-1.8x slower than the best everywhere
    in the twelfth)."""
    tokens_block = 16 if M <= 16 or (M <= 48 and N * K <= 9216 * 3072) else 32
    row_tiles = 1 if tokens_block == 16 else 2
    split = split_k(tile_count(M, N, row_tiles, tokens_block), K, programs)
    return dict(ROW_TILES=row_tiles, SPLIT_K=split, TOKENS_BLOCK=tokens_block, SIGNED=True)


def _operand_error(a: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor,
                   lora_up: torch.Tensor | None) -> str | None:
    """Why this kernel cannot take these operands (one line), or None."""
    M, K = a.shape
    N = qweight.shape[0]
    if qweight.dtype != torch.uint8 or qweight.shape[1] * 2 != K or K % GROUP or not qweight.is_contiguous():
        return (f"qweight must be contiguous uint8 [N, K/2] with K = {K} a multiple of {GROUP}, "
                f"got {qweight.dtype} {tuple(qweight.shape)}")
    if M > MAX_TOKENS or a.dtype not in (torch.bfloat16, torch.float16) or a.stride(1) != 1:
        return (f"a must be float16/bfloat16 [M <= {MAX_TOKENS}, K] with unit column stride, got {a.dtype} "
                f"{tuple(a.shape)}")
    if wscales.shape != (N, K // GROUP) or wscales.dtype not in (torch.bfloat16, torch.float16):
        return (f"wscales must be float16/bfloat16 [N, K/{GROUP}] = [{N}, {K // GROUP}], got {wscales.dtype} "
                f"{tuple(wscales.shape)}")
    if a.data_ptr() % 16 or a.stride(0) % 8 or qweight.data_ptr() % 8 or wscales.data_ptr() % 4:
        return ("a needs 16-byte aligned rows, qweight 8-byte and wscales 4-byte alignment (the kernel reads them as "
                "32-bit words)")
    if lora_up is not None and lora_up.dtype != a.dtype:
        return f"lora_up must be {a.dtype} like the activations, got {lora_up.dtype}"
    return None


def supports(a: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor,
             lora_up: torch.Tensor | None) -> bool:
    """Whether :func:`w4a16_mma_gemm` serves these operands: a CUDA device with ``mma.sync`` (sm_80+), <= 64 16-bit
    tokens in 16-byte aligned rows, K a multiple of 64, 16-bit group scales at a 4-byte aligned address and a
    low-rank branch in the activations' dtype (float32 lora factors or scales keep the Triton kernel)."""
    return (a.is_cuda and torch.cuda.get_device_capability(a.device)[0] >= 8
            and _operand_error(a, qweight, wscales, lora_up) is None)


def w4a16_mma_gemm(a, qweight, wscales, lxp, lora_up, bias, out_dtype: torch.dtype, gelu: bool = False,
                   config: dict | None = None) -> torch.Tensor:
    """``[M, N]`` output (M <= 64 tokens) of an INT4-g64 layer on 16-bit smoothed activations, with the fused
    low-rank, bias and GELU epilogue of :func:`quantduo.kernels.gemm_w4_skinny.w4_skinny_gemm` (mode ``"none"``).

    Args:
        a: bfloat16 / float16 ``[M, K]`` (unit column stride, 16-byte aligned rows).
        qweight: packed int4 uint8 ``[N, K // 2]`` (contiguous, 8-byte aligned); wscales float16 / bfloat16
            ``[N, K // 64]`` group scales (any strides, 4-byte aligned start).
        lxp: float32 low-rank partials ``[S, M, r]`` or None; lora_up ``[N, r]`` in a's dtype; bias ``[N]`` or None.
        config: some of ROW_TILES, SPLIT_K, TOKENS_BLOCK, SIGNED (the rest from :func:`pick_config`) and STAGES
            (groups in flight; default :data:`STAGES` of the token block and row tiles); SPLIT_K must divide K / 64,
            TOKENS_BLOCK is 16 or 32.
    """
    M, K = a.shape
    N = qweight.shape[0]
    r = 0 if lxp is None else lxp.shape[2]
    error = _operand_error(a, qweight, wscales, lora_up if r else None)
    if error:
        raise ValueError(error)
    cfg = {**pick_config(M, N, K), **(config or {})}
    split, tokens_block = cfg["SPLIT_K"], cfg["TOKENS_BLOCK"]
    if (K // GROUP) % split or tokens_block not in (16, 32):
        raise ValueError(f"SPLIT_K={split} must divide the {K // GROUP} groups of 64 inputs and TOKENS_BLOCK="
                         f"{tokens_block} be 16 or 32")
    name = "bf16" if a.dtype == torch.bfloat16 else "fp16"
    stages = min(cfg.get("STAGES", STAGES.get((tokens_block, cfg["ROW_TILES"]), 1)), K // GROUP // split)
    tiles = tile_count(M, N, cfg["ROW_TILES"], tokens_block)
    out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    part, counts = split_k_workspace("mma", M * N, tiles, a.device) if split > 1 else (out, out)
    dummy = qweight
    _w4a16_mma_kernel[(tiles, split)](
        a, qweight.view(torch.int32), wscales, lxp if r else dummy, lora_up if r else dummy,
        bias if bias is not None else dummy, out, part, counts,
        M, N, K, K // GROUP // split, lxp.shape[0] if r else 0, r, a.stride(0), wscales.stride(0),
        wscales.stride(1),
        HAS_LR=r > 0, RP=rank_pad(r), HAS_BIAS=bias is not None, GELU=gelu, SPLIT_K=split,
        ROW_TILES=cfg["ROW_TILES"], TOK=tokens_block, WARPS_=WARPS, ASM=_ASM[name, cfg["SIGNED"]],
        OFFSET=0.0 if cfg["SIGNED"] else _DECODE[name][4], STAGES=stages, num_warps=WARPS,
    )
    return out
