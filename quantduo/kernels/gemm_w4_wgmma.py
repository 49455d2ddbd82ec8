"""W4A16 GEMM for 65-256 tokens on Hopper's warpgroup MMA (Gluon): INT4 codes decoded into shared memory, no
scratch weight, the tokens streamed by ``cp.async``.

``out^T [N, M] = W [N, K] x a^T [K, M]`` on ``wgmma`` (sm_90a): a program owns ``BN = 16 * WARPS`` output rows
(one or two warpgroups, 64 rows each) and ``TOKENS_BLOCK`` = 64, 128 or 256 tokens (the wgmma's N), over the groups
of 64 inputs of its K slice. Per group:

* the activation tile ``[TOKENS_BLOCK, 64]``, the program's packed codes ``[BN, 32 bytes]`` and, per row, the
  int32 word holding the group's scale (two groups per word) arrive by ``cp.async`` ``STAGES - 1`` groups ahead (a
  ring of ``STAGES`` slots: no global load is waited inside the loop);
* each thread reads from shared memory the code words of its lane (as :mod:`quantduo.kernels.gemm_w4_mma` loads
  them: lane ``c`` of a row holds words ``2c, 2c + 1``, inputs ``16c .. 16c + 15``), decodes them by one ``lop3``
  per two weights into ``136 + q`` (bfloat16; ``1032 + q`` float16), one packed ``fma`` removes the magic number
  exactly and a second multiplies by the row's group scale: the 16-bit weight ``q * s`` (one rounding, relative
  error <= 2**-9 in bfloat16, 2**-11 in float16), stored in natural input order into a swizzled shared tile
  ``[BN, 64]`` (two buffers);
* one asynchronous ``wgmma`` accumulates ``W_g x a_g^T`` in float32 while the next group is decoded (at most one
  in flight; its completion frees the slot and the weight buffer it read).

The scale multiplies the weights before the MMA, so one float32 accumulator runs through every group (the exact
per-group float32 sums of :mod:`quantduo.kernels.gemm_w4_mma` would need each group's MMA waited for and rescaled).
The accumulator leaves through shared memory in chunks of 32 tokens (bounded registers); K is split over
``SPLIT_K`` programs whose partial tiles are added atomically into a zeroed float32 workspace, and the last slice
of a tile runs the low-rank up-projection, bias and GELU epilogue of :mod:`quantduo.kernels.gemm_w4_mma` on it,
leaving the workspace zero.

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

from .common import rank_pad, split_k_workspace
from .gemm_w4_mma import DECODE, GROUP, cta_barrier, finish_tile, mma_layout, operand_error, split_k, word_layout

# cp.async of a pointer tile into shared memory: ``async_copy_global_to_shared`` in Triton 3.5-3.6, ``async_load``
# from 3.7 on
async_load = async_copy.async_load if hasattr(async_copy, "async_load") else async_copy.async_copy_global_to_shared

TOKENS_BLOCKS = (64, 128, 256)  # the wgmma N of one program
CHUNK = gl.constexpr(32)  # tokens per step of the epilogue


def _decode_scaled_asm(dtype: str) -> str:
    """PTX: int32 word ``$8`` (eight signed nibbles) and the 16-bit group scale in the low half of ``$9`` -> eight
    16-bit ``q * s`` ``$0 .. $7`` in nibble order (output ``i`` and ``i + 4`` from one lop3 of the word shifted by
    ``4 i``)."""
    magic, ptx_type, one, negative_magic, _ = DECODE[dtype]
    lines = [".reg .b32 t, one, neg, s2, mz;", f"mov.b32 one, {one}; mov.b32 neg, {negative_magic};",
             "prmt.b32 s2, $9, 0, 0x1010; mov.b32 mz, 0x80008000;"]
    for i in range(4):
        src = "$8" if i == 0 else "t"
        if i:
            lines.append(f"shr.u32 t, $8, {4 * i};")
        lines.append(f"lop3.b32 t, {src}, 0x000F000F, {magic}, 0x6A;")
        lines.append(f"fma.rn.{ptx_type} t, t, one, neg;")  # (magic + q) * 1 - magic = q, exact
        lines.append(f"fma.rn.{ptx_type} t, t, s2, mz;")  # q * s + (-0): one rounding
        lines.append(f"mov.b32 {{${i}, ${i + 4}}}, t;")
    return "{\n" + "\n".join(lines) + "\n}"


_ASM = {dtype: _decode_scaled_asm(dtype) for dtype in DECODE}


@gluon.constexpr_function
def wgmma_layout(warps, tokens):
    """float32 accumulator ``[16 * warps, tokens]``: 64 rows per warpgroup, the tokens the wgmma's N."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, tokens, 16])


@gluon.constexpr_function
def tile_smem_layout():
    """Shared tiles ``[rows, 64]`` of 16-bit values: 128-byte rows, 128-byte swizzle (the wgmma operand layout)."""
    return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)


@gluon.constexpr_function
def copy_layout(warps, tokens):
    """Activations ``[tokens, 64]``: 8 contiguous 16-bit values (16 bytes, one ``cp.async``) per thread."""
    return gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[warps, 1], order=[1, 0])


@gluon.jit
def _issue_group(x_smem, w_smem, s_smem, stage, x_ptrs, w_ptrs, s_ptrs, g):
    """``cp.async`` of group ``g`` into ring slot ``stage``: the activations ``[TOK, 64]``, the codes ``[BN, 8]``
    int32 and each row's int32 word holding the scales of groups ``g`` and ``g ^ 1``; one commit group."""
    async_load(x_smem.index(stage), x_ptrs + g * 64)
    async_load(w_smem.index(stage), w_ptrs + g * 8)
    async_load(s_smem.index(stage), s_ptrs + g // 2)
    async_copy.commit_group()


@gluon.jit
def _scaled_weights(words, scale, ASM: gl.constexpr, BN: gl.constexpr, X):
    """int32 words ``[BN, 8]`` (signed nibbles, word layout) and int32 ``[BN, 8]`` holding each row's 16-bit group
    scale in the low half -> ``q * s`` ``[BN, 64]`` in the 16-bit type of the pointer ``X``, natural input order
    (input ``8 w + n`` = nibble ``n`` of word ``w``)."""
    dt = X.dtype.element_ty
    e0, e1, e2, e3, e4, e5, e6, e7 = gl.inline_asm_elementwise(
        ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [words, scale], dtype=(dt, dt, dt, dt, dt, dt, dt, dt), is_pure=True,
        pack=1)
    t = gl.join(gl.join(gl.join(e0, e1), gl.join(e2, e3)), gl.join(gl.join(e4, e5), gl.join(e6, e7)))
    t = gl.reshape(t, [BN, 8, 2, 2, 2])  # (row, w, i0, i1, i2): nibble 4 i2 + 2 i1 + i0 of word w
    t = gl.permute(t, [0, 1, 4, 3, 2])  # (row, w, i2, i1, i0) = natural order
    return gl.reshape(t, [BN, 64])


@gluon.jit
def _w4a16_wgmma_kernel(
    X, W, WS2, LXP, LU, BIAS, OUT, PART, COUNTS,
    M, N, K, GROUPS_PER_SPLIT, S, R, stride_xm, stride_wsn,
    HAS_LR: gl.constexpr, RP: gl.constexpr, HAS_BIAS: gl.constexpr, GELU: gl.constexpr, SPLIT_K: gl.constexpr,
    TOK: gl.constexpr, STAGES: gl.constexpr, WARPS_: gl.constexpr, ASM: gl.constexpr,
):
    """Program (tile, slice): rows ``[BN]`` x tokens ``[TOK]`` of OUT ``[M, N]`` (tile = row tile x the
    ``cdiv(M, TOK)`` token blocks + token block), the groups of K slice ``slice``.

    X 16-bit ``[M, K]`` (row stride stride_xm), W int32 view ``[N, K / 8]`` of the packed int4 weights, WS2 int32
    view ``[N, G / 2]`` (row stride stride_wsn) of the group scales in X's dtype (G even), LXP float32 ``[S, M, R]``, LU ``[N, R]``, BIAS ``[N]``; with
    SPLIT_K > 1, PART float32 ``[M, N]`` and COUNTS int32 ``[tiles]`` (zero on entry and exit).
    """
    BN: gl.constexpr = 16 * WARPS_
    WL: gl.constexpr = word_layout(WARPS_, 1)
    SL: gl.constexpr = gl.SliceLayout(1, WL)
    XL: gl.constexpr = copy_layout(WARPS_, TOK)
    ACC: gl.constexpr = wgmma_layout(WARPS_, TOK)
    SMEM: gl.constexpr = tile_smem_layout()
    tile = gl.program_id(0)
    pid_k = gl.program_id(1)
    token_blocks = (M + TOK - 1) // TOK
    row0 = (tile // token_blocks) * BN
    tok0 = (tile % token_blocks) * TOK
    rows_w = gl.minimum(row0 + gl.arange(0, BN, layout=SL), N - 1).to(gl.int64)
    w_ptrs = W + rows_w[:, None] * (K // 8) + gl.arange(0, 8, layout=gl.SliceLayout(0, WL))[None, :]
    s_ptrs = WS2 + rows_w * stride_wsn  # int32 words of two group scales
    toks_x = gl.minimum(tok0 + gl.arange(0, TOK, layout=gl.SliceLayout(1, XL)), M - 1)
    x_ptrs = X + toks_x.to(gl.int64)[:, None] * stride_xm + gl.arange(0, 64, layout=gl.SliceLayout(0, XL))[None, :]
    a_smem = gl.allocate_shared_memory(X.dtype.element_ty, [2, BN, 64], SMEM)
    x_smem = gl.allocate_shared_memory(X.dtype.element_ty, [STAGES, TOK, 64], SMEM)
    PLAIN2: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
    w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, BN, 8], PLAIN2)
    s_smem = gl.allocate_shared_memory(gl.int32, [STAGES, BN], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    g0 = pid_k * GROUPS_PER_SPLIT
    last = GROUPS_PER_SPLIT - 1
    for i in gl.static_range(STAGES - 1):  # the first groups in flight
        _issue_group(x_smem, w_smem, s_smem, i, x_ptrs, w_ptrs, s_ptrs, g0 + gl.minimum(i, last))
    acc = gl.zeros([BN, TOK], gl.float32, ACC)
    for i in range(GROUPS_PER_SPLIT):
        stage = i % STAGES
        g = g0 + i
        async_copy.wait_group(STAGES - 2)  # this thread's copies of group i have landed (the compiler's barrier
        # after the wait makes every thread's copies visible)
        words = w_smem.index(stage).load(WL)
        scale_pair = s_smem.index(stage).load(SL) >> (16 * (g % 2))  # the group's scale in the low half
        weights = _scaled_weights(words, scale_pair[:, None] + gl.zeros([BN, 8], gl.int32, WL), ASM, BN, X)
        a_smem.index(i % 2).store(weights)
        fence_async_shared()
        cta_barrier()  # every thread's weights of group i are in shared memory
        acc = warpgroup_mma(a_smem.index(i % 2), x_smem.index(stage).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=[acc])  # group i - 1's MMA done: its buffers are free
        _issue_group(x_smem, w_smem, s_smem, (i + STAGES - 1) % STAGES, x_ptrs, w_ptrs, s_ptrs,
                     g0 + gl.minimum(i + STAGES - 1, last))
    acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
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
            for chunk in range(TOK // CHUNK):
                toks = tok0 + chunk * CHUNK + gl.arange(0, CHUNK, layout=gl.SliceLayout(0, MMA))
                offsets = toks[None, :] * N + rows[:, None]
                mask = (rows[:, None] < N) & (toks[None, :] < M)
                total = gl.load(PART + offsets, mask=mask, other=0.0, cache_modifier=".cg")
                gl.store(PART + offsets, gl.zeros([BN, CHUNK], gl.float32, MMA), mask=mask)
                finish_tile(total, rows, toks, tok0 + chunk * CHUNK, M, N, LXP, S, LU, R, BIAS, OUT, RP, HAS_LR,
                            HAS_BIAS, GELU, BN, CHUNK, WARPS_)
            gl.store(COUNTS + tile, 0)
    else:
        for c in gl.static_range(TOK // CHUNK):
            toks = tok0 + c * CHUNK + gl.arange(0, CHUNK, layout=gl.SliceLayout(0, MMA))
            finish_tile(c_smem.slice(c * CHUNK, CHUNK, 1).load(MMA), rows, toks, tok0 + c * CHUNK, M, N, LXP, S, LU,
                        R, BIAS, OUT, RP, HAS_LR, HAS_BIAS, GELU, BN, CHUNK, WARPS_)


def _scale_words(wscales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int32 view ``[N, G / 2]`` of the group scales ``[N, G]`` in ``dtype`` (two groups per word, 4-byte copies):
    ``wscales`` itself when it already is (contiguous rows, G even), else a padded copy."""
    scales = wscales.to(dtype)
    if scales.stride(1) != 1 or scales.shape[1] % 2 or scales.stride(0) % 2 or scales.data_ptr() % 4:
        scales = torch.nn.functional.pad(scales, (0, scales.shape[1] % 2)).contiguous()
    return scales.view(torch.int32)


def tile_count(M: int, N: int, warps: int, tokens_block: int) -> int:
    """Output tiles (row tile x token block) of an ``[M, N]`` output: the programs per K slice."""
    return triton.cdiv(N, 16 * warps) * triton.cdiv(M, tokens_block)


def pick_config(M: int, N: int, K: int, programs: int = 264) -> dict:
    """One warpgroup (64 rows) per program, the smallest token block of 64 / 128 / 256 that holds M (256 above),
    3 activation stages, ``SPLIT_K`` the smallest divisor of the K / 64 groups giving about ``programs`` programs
    (~2 per SM of an H100)."""
    tokens_block = next((t for t in TOKENS_BLOCKS if M <= t), TOKENS_BLOCKS[-1])
    split = split_k(tile_count(M, N, 4, tokens_block), K, programs)
    return dict(WARPS=4, SPLIT_K=split, TOKENS_BLOCK=tokens_block, STAGES=3)


def supports(a: torch.Tensor, qweight: torch.Tensor, lora_up: torch.Tensor | None) -> bool:
    """Whether :func:`w4a16_wgmma_gemm` serves these operands: an sm_90 GPU (``wgmma``), 16-bit tokens in
    16-byte aligned rows, K a multiple of 64 and a low-rank branch in the activations' dtype."""
    return (a.is_cuda and torch.cuda.get_device_capability(a.device) == (9, 0)
            and operand_error(a, qweight, lora_up, max_tokens=None) is None)


def w4a16_wgmma_gemm(a, qweight, wscales, lxp, lora_up, bias, out_dtype: torch.dtype, gelu: bool = False,
                     config: dict | None = None) -> torch.Tensor:
    """``[M, N]`` output of an INT4-g64 layer on 16-bit smoothed activations (any M; tuned for 65-256 tokens), with
    the low-rank, bias and GELU epilogue of :func:`quantduo.kernels.gemm_w4_mma.w4a16_mma_gemm`.

    Args:
        a: bfloat16 / float16 ``[M, K]`` (unit column stride, 16-byte aligned rows).
        qweight: packed int4 uint8 ``[N, K // 2]`` (contiguous, 8-byte aligned); wscales ``[N, K // 64]`` group
            scales (rounded to a's dtype; copied per call unless rows are contiguous with an even group count).
        lxp: float32 low-rank partials ``[S, M, r]`` or None; lora_up ``[N, r]`` in a's dtype; bias ``[N]`` or None.
        config: some of WARPS (4 or 8), SPLIT_K, TOKENS_BLOCK (64 / 128 / 256), STAGES (>= 2); the rest from
            :func:`pick_config`; SPLIT_K must divide K / 64.
    """
    M, K = a.shape
    N = qweight.shape[0]
    r = 0 if lxp is None else lxp.shape[2]
    error = operand_error(a, qweight, lora_up if r else None, max_tokens=None)
    if error is None and wscales.shape != (N, K // GROUP):
        error = f"wscales must be [N, K/{GROUP}] = [{N}, {K // GROUP}], got {tuple(wscales.shape)}"
    if error:
        raise ValueError(error)
    cfg = {**pick_config(M, N, K), **(config or {})}
    split, tokens_block, warps = cfg["SPLIT_K"], cfg["TOKENS_BLOCK"], cfg["WARPS"]
    if (K // GROUP) % split or tokens_block not in TOKENS_BLOCKS or warps not in (4, 8) or cfg["STAGES"] < 2:
        raise ValueError(f"SPLIT_K={split} must divide the {K // GROUP} groups of 64 inputs, TOKENS_BLOCK="
                         f"{tokens_block} be one of {TOKENS_BLOCKS}, WARPS={warps} 4 or 8, STAGES >= 2")
    name = "bf16" if a.dtype == torch.bfloat16 else "fp16"
    scale_words = _scale_words(wscales, a.dtype)
    tiles = tile_count(M, N, warps, tokens_block)
    out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    part, counts = split_k_workspace("wgmma", M * N, tiles, a.device) if split > 1 else (out, out)
    dummy = qweight
    _w4a16_wgmma_kernel[(tiles, split)](
        a, qweight.view(torch.int32), scale_words, lxp if r else dummy, lora_up if r else dummy,
        bias if bias is not None else dummy, out, part, counts,
        M, N, K, K // GROUP // split, lxp.shape[0] if r else 0, r, a.stride(0), scale_words.stride(0),
        HAS_LR=r > 0, RP=rank_pad(r), HAS_BIAS=bias is not None, GELU=gelu, SPLIT_K=split, TOK=tokens_block,
        STAGES=cfg["STAGES"], WARPS_=warps, ASM=_ASM[name], num_warps=warps,
    )
    return out
