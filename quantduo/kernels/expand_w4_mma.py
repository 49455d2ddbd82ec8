"""INT4 -> fp8 weight expansion of the fp8 execution in Gluon: the low-rank term on ``mma.sync``, the weights decoded
straight into its accumulator registers, stored 16 contiguous bytes per thread and row.

    W8[n, k] = e4m3(clamp((q[n, k] * scale[n, k // 64] + (lora_up @ lora_down^T)[n, k]) * inv_smooth[k]
                          * inv_wscale[n], +-448))

the same values as :func:`quantduo.kernels.dequant_w4.dequant_w4` with float8_e4m3fn output (reference:
:func:`quantduo.formats.reference.w4_dequant_ref` times ``inv_wscale``, rounded to e4m3). A program owns one group
of 64 inputs and ``ROW_STEPS`` x 64 rows: the group's ``lora_down`` rows (the ``mma`` B operand) and
``inv_smooth`` are loaded once, and the row steps stream through a ring of ``STAGES`` row steps in flight (codes,
scales, row scales and ``lora_up`` rows, all as 32-bit words, unpacked where they are used: see
:mod:`.gemm_w4_mma`). Per row step a warp computes a 16 x 64 tile: the accumulator starts as ``q * scale`` and one
``mma`` per 8 columns and 16 ranks adds the low-rank term.

The accumulator's columns are a fixed permutation of the group's inputs (the "mma order": column
``8 j + 2 t + i`` holds input ``16 t + 2 j + i``), chosen so that thread ``t = lane % 4`` of the ``mma`` holds
inputs ``16 t .. 16 t + 15`` of its rows: the two code words it loads, the four words of fp8 it stores and the
``inv_smooth`` values it needs are contiguous, and every operand reaches its ``mma`` layout by a trivial layout
conversion (asserted at compile time). The rank index is permuted the same way in both operands (thread ``t``
holds ranks ``8 t .. 8 t + 7``: one 16-byte load per row of ``lora_up`` and of ``lora_down``), which leaves the
rank-r sum unchanged. Runs on NVIDIA GPUs of compute capability 8.0 and above; Gluon has no interpreter, so CPU tests
compile it for sm_90a and the Triton kernel of :mod:`.dequant_w4` is the CPU path. :func:`.fp8_linear.expand_w4_fp8`
takes it for eager calls; compiled models keep the Triton kernel, which Inductor launches itself.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .gemm_w4_mma import halves, mma_layout, operand_layout, scales_from_words, word_layout

GROUP = 64
WARPS = 4
ROWS = 16 * WARPS  # rows per row step
MAX_RANK = 32

# nibble i of the int32 word $8 shifted to bits 19-22 and XOR 8, in the mantissa of 16.0: 16 + (q + 8) exactly, so
# that v * scale - 24 * scale = q * scale is exact (both products fit float32's 24 bits); one shift and one lop3
_SHIFTS = (-19, -15, -11, -7, -3, 1, 5, 9)  # right shift of nibble i (negative: left)
_DECODE_F32 = gl.constexpr("{\n.reg .b32 t;\n" + "\n".join(
    (f"shl.b32 t, $8, {-d};" if d < 0 else f"shr.u32 t, $8, {d};")
    + f"\nlop3.b32 ${i}, t, 0x00780000, 0x41C00000, 0x6A;" for i, d in enumerate(_SHIFTS)) + "\n}")


@gluon.constexpr_function
def _bits_layout(reg, lane, warp, shape):
    return gl.DistributedLinearLayout(reg_bases=reg, lane_bases=lane, warp_bases=warp, block_bases=[], shape=shape)


@gluon.constexpr_function
def rows_by_lane_layout(warps, width, per_thread):
    """``[16 * warps, width]``: lane ``4 g + t`` of warp ``w`` holds elements ``per_thread * t ..`` (contiguous) of
    rows ``16 w + g`` and ``16 w + g + 8``, as the ``mma`` places its rows (width = 4 * per_thread)."""
    reg = [[0, 1 << b] for b in range(per_thread.bit_length() - 1)] + [[8, 0]]
    lane = [[0, per_thread], [0, 2 * per_thread], [1, 0], [2, 0], [4, 0]]
    warp = [[16 << w, 0] for w in range(warps.bit_length() - 1)]
    return _bits_layout(reg, lane, warp, [16 * warps, width])


@gluon.constexpr_function
def down_layout(warps):
    """``lora_down`` rows of one group, ``[64 inputs, 32 ranks]``: lane ``4 g + t`` holds ranks ``8 t .. 8 t + 7`` of
    the inputs ``16 (g >> 1) + 2 j + (g & 1)`` (j = 0..7), the B operand's columns ``8 j + g`` in mma order; every
    warp the same."""
    reg = [[0, 1], [0, 2], [0, 4], [2, 0], [4, 0], [8, 0]]
    lane = [[0, 8], [0, 16], [1, 0], [16, 0], [32, 0]]
    return _bits_layout(reg, lane, [[0, 0] for _ in range(warps.bit_length() - 1)], [64, 32])


@gluon.constexpr_function
def column_layout(warps):
    """``[64]`` inputs of a group: lane ``4 g + t`` holds inputs ``16 t .. 16 t + 15``; every warp the same."""
    return _bits_layout([[1], [2], [4], [8]], [[16], [32], [0], [0], [0]],
                        [[0] for _ in range(warps.bit_length() - 1)], [64])


@gluon.jit
def _inputs_to_mma(x, AXIS: gl.constexpr):
    """Axis AXIS (size 64, natural input order ``16 t + 2 j + i``) of the 1-D or 2-D ``x`` -> mma order
    (``8 j + 2 t + i``)."""
    if AXIS == 0:
        x = gl.reshape(x, [2, 2, 2, 2, 2, 2])  # (t1, t0, j2, j1, j0, i)
        x = gl.permute(x, [2, 3, 4, 0, 1, 5])  # (j2, j1, j0, t1, t0, i)
        return gl.reshape(x, [64])
    else:
        rows: gl.constexpr = x.shape[0]
        x = gl.reshape(x, [rows, 2, 2, 2, 2, 2, 2])
        x = gl.permute(x, [0, 3, 4, 5, 1, 2, 6])
        return gl.reshape(x, [rows, 64])


@gluon.jit
def _mma_to_inputs(x):
    """``[rows, 64]`` in mma order -> natural input order (the inverse of :func:`_inputs_to_mma`)."""
    rows: gl.constexpr = x.shape[0]
    x = gl.reshape(x, [rows, 2, 2, 2, 2, 2, 2])  # (j2, j1, j0, t1, t0, i)
    x = gl.permute(x, [0, 4, 5, 1, 2, 3, 6])  # (t1, t0, j2, j1, j0, i)
    return gl.reshape(x, [rows, 64])


@gluon.jit
def _ranks_to_mma(x):
    """Last axis (32 ranks, thread ``t`` holding ``8 t + 4 s + 2 h + e``) -> the ``mma`` K order
    ``16 s + 8 h + 2 t + e`` of both operands (the same permutation on each: the rank sum is unchanged)."""
    lead: gl.constexpr = x.shape[0]
    x = gl.reshape(x, [lead, 2, 2, 2, 2, 2])  # (t1, t0, s, h, e)
    x = gl.permute(x, [0, 3, 4, 1, 2, 5])  # (s, h, t1, t0, e)
    return gl.reshape(x, [lead, 32])


@gluon.jit
def _decoded_codes(words, ROWS_: gl.constexpr, WARPS_: gl.constexpr):
    """int32 code words ``[ROWS_, 8]`` (8 signed nibbles each, input ``8 w + n`` = nibble n of word w) -> float32
    ``24 + q`` ``[ROWS_, 64]`` in mma order and the accumulator layout."""
    e0, e1, e2, e3, e4, e5, e6, e7 = gl.inline_asm_elementwise(
        _DECODE_F32, "=r,=r,=r,=r,=r,=r,=r,=r,r", [words], dtype=(gl.float32,) * 8, is_pure=False, pack=1)
    # [rows, word, nibble] with nibble = 4 n2 + 2 n1 + n0 (the outermost join is the last axis)
    t = gl.join(gl.join(gl.join(e0, e4), gl.join(e2, e6)), gl.join(gl.join(e1, e5), gl.join(e3, e7)))
    t = gl.reshape(t, [ROWS_, 64])  # natural input order 8 w + n
    return gl.convert_layout(_inputs_to_mma(t, 1), mma_layout(WARPS_), assert_trivial=True)


@gluon.jit
def _up_operand(words, dt: gl.constexpr, WARPS_: gl.constexpr):
    """int32 words ``[ROWS, 16]`` of ``lora_up`` rank pairs (thread ``t``: ranks ``8 t .. 8 t + 7``) -> the A
    operand ``[ROWS, 32]`` in the mma rank order."""
    lo, hi = halves(words, dt)
    u = gl.reshape(gl.join(lo, hi), [16 * WARPS_, 32])
    return gl.convert_layout(_ranks_to_mma(u), operand_layout(0, WARPS_), assert_trivial=True)


@gluon.jit
def _load_step(w_ptrs, s_index, rs_ptrs, u_ptrs, WS32, row0, N, K, stride_wsn, valid, WARPS_: gl.constexpr,
               HAS_LR: gl.constexpr, R: gl.constexpr):
    """The row step at ``row0``, all 32-bit: code words ``[ROWS, 8]``, the words holding the scales ``[ROWS]``, the
    row scales ``[ROWS]`` and (HAS_LR) ``lora_up`` rank-pair words ``[ROWS, 16]``; zeros for rows past N or where
    not ``valid``. The pointers (and the scales' 16-bit indices) are those of row step 0 of the program. A scale at an
    even index is read with the next 2 bytes, past the tensor for the last scale of an odd count: inside the
    allocation (PyTorch rounds CUDA blocks to 512 bytes), and never used."""
    MMA: gl.constexpr = mma_layout(WARPS_)
    WL: gl.constexpr = word_layout(WARPS_, 1)
    UL: gl.constexpr = rows_by_lane_layout(WARPS_, 16, 4)
    row0 = row0.to(gl.int64)
    in_w = valid & (row0 + gl.arange(0, 16 * WARPS_, layout=gl.SliceLayout(1, WL)) < N)
    words = gl.load(w_ptrs + row0 * (K // 8), mask=in_w[:, None], other=0)
    in_s = valid & (row0 + gl.arange(0, 16 * WARPS_, layout=gl.SliceLayout(1, MMA)) < N)
    s_word = gl.load(WS32 + ((s_index + row0 * stride_wsn) >> 1), mask=in_s, other=0)
    rs = gl.load(rs_ptrs + row0, mask=in_s, other=0.0)
    if HAS_LR:
        in_u = valid & (row0 + gl.arange(0, 16 * WARPS_, layout=gl.SliceLayout(1, UL)) < N)
        pair = gl.arange(0, 16, layout=gl.SliceLayout(0, UL))
        up = gl.load(u_ptrs + row0 * (R // 2), mask=in_u[:, None] & (pair[None, :] < R // 2), other=0)
    else:
        up = s_word
    return words, s_word, rs, up


@gluon.jit
def _expand_w4_kernel(W, WS, LD, LU, INV_SMOOTH, ROW_SCALE, OUT, N, K, stride_wsn, stride_wsg,
                      HAS_LR: gl.constexpr, R: gl.constexpr, HAS_SMOOTH: gl.constexpr, ROW_STEPS: gl.constexpr,
                      STAGES: gl.constexpr, WARPS_: gl.constexpr):
    """Program (g, chunk): group ``g`` (inputs ``64 g ..``) of rows ``chunk * ROW_STEPS * ROWS ..`` of OUT.

    W int32 view ``[N, K / 8]`` of the packed codes, WS 16-bit group scales ``[N, K / 64]`` (strides given), LD
    ``[K, R]`` / LU ``[N, R]`` 16-bit low-rank factors (R a multiple of 8, <= 32), INV_SMOOTH float32 ``[K]``,
    ROW_SCALE float32 ``[N]``, OUT float8_e4m3fn ``[N, K]``.
    """
    BN: gl.constexpr = 16 * WARPS_
    MMA: gl.constexpr = mma_layout(WARPS_)
    OL: gl.constexpr = rows_by_lane_layout(WARPS_, 64, 16)
    g = gl.program_id(0)
    row_base = gl.program_id(1) * (ROW_STEPS * BN)
    WS32 = WS.to(gl.pointer_type(gl.int32), bitcast=True)
    LU32 = LU.to(gl.pointer_type(gl.int32), bitcast=True)
    DT: gl.constexpr = WS.dtype.element_ty
    if HAS_LR:
        DL: gl.constexpr = down_layout(WARPS_)
        kd = g * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, DL))
        rd = gl.arange(0, 32, layout=gl.SliceLayout(0, DL))
        down = gl.load(LD + kd.to(gl.int64)[:, None] * R + rd[None, :], mask=rd[None, :] < R, other=0.0)
        down_op = gl.convert_layout(_inputs_to_mma(gl.permute(_ranks_to_mma(down), [1, 0]), 1),
                                    operand_layout(1, WARPS_), assert_trivial=True)
    if HAS_SMOOTH:
        kc = g * 64 + gl.arange(0, 64, layout=column_layout(WARPS_))
        inv_smooth = gl.convert_layout(_inputs_to_mma(gl.load(INV_SMOOTH + kc), 0), gl.SliceLayout(0, MMA),
                                       assert_trivial=True)
    # pointers of row step 0 (rows row_base ..): each step adds its row offset
    WL: gl.constexpr = word_layout(WARPS_, 1)
    UL: gl.constexpr = rows_by_lane_layout(WARPS_, 16, 4)
    rows_w = row_base + gl.arange(0, BN, layout=gl.SliceLayout(1, WL))
    w_ptrs = W + rows_w.to(gl.int64)[:, None] * (K // 8) + g * 8 \
        + gl.arange(0, 8, layout=gl.SliceLayout(0, WL))[None, :]
    rows_m = row_base + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
    s_index = rows_m.to(gl.int64) * stride_wsn + g * stride_wsg  # 16-bit index of each row's scale
    rs_ptrs = ROW_SCALE + rows_m
    rows_u = row_base + gl.arange(0, BN, layout=gl.SliceLayout(1, UL))
    u_ptrs = LU32 + rows_u.to(gl.int64)[:, None] * (R // 2) + gl.arange(0, 16, layout=gl.SliceLayout(0, UL))[None, :]
    rows_o = row_base + gl.arange(0, BN, layout=gl.SliceLayout(1, OL))
    o_ptrs = OUT + rows_o.to(gl.int64)[:, None] * K + g * 64 + gl.arange(0, 64, layout=gl.SliceLayout(0, OL))[None, :]
    ring = ()
    for s in gl.static_range(STAGES):
        first = g * 0 + s  # a tensor: row step s
        ring = ring + (_load_step(w_ptrs, s_index, rs_ptrs, u_ptrs, WS32, first * BN, N - row_base, K, stride_wsn,
                                  first < ROW_STEPS, WARPS_, HAS_LR, R),)
    for step in range(0, ROW_STEPS, STAGES):
        for s in gl.static_range(STAGES):
            if step + s < ROW_STEPS:  # a block boundary the compiler does not move the unpacking across
                words, s_word, rs, up = ring[s]
                off = (step + s) * BN
                scale = scales_from_words(s_word, s_index + off * stride_wsn, DT)
                acc = _decoded_codes(words, BN, WARPS_) * scale[:, None] + (-24.0 * scale)[:, None]
                if HAS_LR:
                    acc = mma_v2(_up_operand(up, DT, WARPS_), down_op, acc)
                if HAS_SMOOTH:
                    acc = acc * inv_smooth[None, :]
                acc = acc * rs[:, None]
                codes8 = acc.to(gl.float8e4nv, fp_downcast_rounding="rtne")
                codes8 = gl.convert_layout(_mma_to_inputs(codes8), OL, assert_trivial=True)
                gl.store(o_ptrs + off.to(gl.int64) * K, codes8, mask=(rows_o + off < N)[:, None])
                ring = ring[:s] + (_load_step(w_ptrs, s_index, rs_ptrs, u_ptrs, WS32, off + STAGES * BN,
                                              N - row_base, K, stride_wsn, step + s + STAGES < ROW_STEPS, WARPS_,
                                              HAS_LR, R),) + ring[s + 1:]


def _operand_error(qweight, wscales, lora_down, lora_up, inv_smooth, inv_wscale) -> str | None:
    """Why this kernel cannot take these operands (one line), or None."""
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    if qweight.dtype != torch.uint8 or not qweight.is_contiguous() or K % GROUP:
        return f"qweight must be contiguous uint8 [N, K/2], K a multiple of {GROUP}"
    if wscales.shape != (N, K // GROUP) or wscales.dtype not in (torch.bfloat16, torch.float16):
        return f"wscales must be float16/bfloat16 [N, K/{GROUP}] = [{N}, {K // GROUP}]"
    if lora_down is not None:
        r = lora_down.shape[1]
        if (r % 8 or r > MAX_RANK or lora_down.shape != (K, r) or lora_up.shape != (N, r)
                or lora_down.dtype != wscales.dtype or lora_up.dtype != wscales.dtype
                or not (lora_down.is_contiguous() and lora_up.is_contiguous())):
            return (f"low-rank factors must be contiguous {wscales.dtype} [K, r] / [N, r] with r a multiple of 8 up "
                    f"to {MAX_RANK}")
    if inv_smooth is not None and (inv_smooth.shape != (K,) or inv_smooth.dtype != torch.float32
                                   or inv_smooth.stride(0) != 1):
        return f"inv_smooth must be contiguous float32 [K] = [{K}]"
    if inv_wscale.shape != (N,) or inv_wscale.dtype != torch.float32 or inv_wscale.stride(0) != 1:
        return f"inv_wscale must be contiguous float32 [N] = [{N}]"
    if qweight.data_ptr() % 16 or wscales.data_ptr() % 4 or any(
            t is not None and t.data_ptr() % 16 for t in (lora_down, lora_up, inv_smooth)):
        return ("qweight, the low-rank factors and inv_smooth need 16-byte aligned starts, wscales 4-byte (the kernel "
                "reads them as 32-bit words)")
    return None


def supports(qweight: torch.Tensor, wscales: torch.Tensor, lora_down: torch.Tensor | None,
             lora_up: torch.Tensor | None, inv_smooth: torch.Tensor | None, inv_wscale: torch.Tensor) -> bool:
    """Whether :func:`expand_w4_fp8_mma` serves these operands: a CUDA device with ``mma.sync`` (sm_80+), INT4-g64
    codes, 16-bit group scales and low-rank factors of rank 8, 16, 24 or 32 in the scales' dtype, float32
    ``inv_smooth`` / ``inv_wscale``, aligned as the kernel's vector loads need."""
    return (qweight.is_cuda and torch.cuda.get_device_capability(qweight.device)[0] >= 8
            and _operand_error(qweight, wscales, lora_down, lora_up, inv_smooth, inv_wscale) is None)


def pick_config(N: int, K: int) -> dict:
    """4 row steps of 64 rows per program (at most the layer's), 3 of them in flight: the best of the fifteenth
    session's sweep (2, 4, 8, 16 row steps x 1-3 in flight) at every FLUX shape on an H100."""
    row_steps = min(4, triton.cdiv(N, ROWS))
    return dict(ROW_STEPS=row_steps, STAGES=min(3, row_steps))


def expand_w4_fp8_mma(qweight: torch.Tensor, wscales: torch.Tensor, lora_down: torch.Tensor | None,
                      lora_up: torch.Tensor | None, inv_smooth: torch.Tensor | None, inv_wscale: torch.Tensor,
                      config: dict | None = None) -> torch.Tensor:
    """float8_e4m3fn ``[N, K]``: the fp8 expansion of an INT4-g64 layer (see the module docstring).

    Args:
        qweight: packed int4 uint8 ``[N, K // 2]`` (low nibble = even input); wscales float16 / bfloat16
            ``[N, K // 64]`` (any strides).
        lora_down ``[K, r]`` / lora_up ``[N, r]``: the low-rank branch in the scales' dtype, or both None.
        inv_smooth: float32 ``[K]`` = ``1 / smooth`` or None; inv_wscale: float32 ``[N]``, each row's fp8 factor.
        config: ROW_STEPS and / or STAGES (the rest from :func:`pick_config`).
    """
    if (lora_down is None) != (lora_up is None):
        raise ValueError("lora_down and lora_up come together")
    error = _operand_error(qweight, wscales, lora_down, lora_up, inv_smooth, inv_wscale)
    if error:
        raise ValueError(error)
    if not qweight.is_cuda:
        raise ValueError("the Gluon expansion runs on CUDA devices (dequant_w4 is the CPU path)")
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    cfg = {**pick_config(N, K), **(config or {})}
    row_steps, stages = cfg["ROW_STEPS"], min(cfg["STAGES"], cfg["ROW_STEPS"])
    r = 0 if lora_down is None else lora_down.shape[1]
    out = torch.empty(N, K, dtype=torch.float8_e4m3fn, device=qweight.device)
    _expand_w4_kernel[(K // GROUP, triton.cdiv(N, ROWS * row_steps))](
        qweight.view(torch.int32), wscales, lora_down if r else wscales, lora_up if r else wscales,
        inv_smooth if inv_smooth is not None else inv_wscale, inv_wscale, out, N, K, wscales.stride(0),
        wscales.stride(1), HAS_LR=r > 0, R=max(r, 8), HAS_SMOOTH=inv_smooth is not None, ROW_STEPS=row_steps,
        STAGES=stages, WARPS_=WARPS, num_warps=WARPS)
    return out
