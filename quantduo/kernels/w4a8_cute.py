"""INT4 x fp8 GEMMs with SVDQuant's groups of 64 and the rank-r up-projection in the epilogue (CuTe DSL, sm_90a).

Notation (``T`` tokens, ``N`` output features, ``K`` inputs, ``G = K / 64`` groups, ``R`` the low-rank width).
Two ways to bring the group scales in, one kernel:

* **promoted** (:func:`w4a8_group_gemm`): the weights decode to fp8 exactly (every integer in [-8, 7] is an E4M3
  value); each group's two 32-deep MMAs accumulate into a temporary float32 accumulator that is then added to the
  main one times the group's scale of each row (CUTLASS's fp8 "promotion", here once per group)::

      out[t, n] = xs[t] * sum_g ws[g, n] * sum_{k in g} q[n, k] * xq[t, k]  +  sum_r lx[t, r] * up[n, r]  +  bias[n]

* **folded** (:func:`w4a8_folded_gemm`): each weight decodes to ``e4m3(q[n, k] * fs[g, n])`` (float32 product,
  one rounding), with ``fs = ws / row_scale`` (:func:`quantduo.formats.quantizers.fp8_folded_scales`), into one
  accumulator: no promotion, the weights rounded as the fp8 expansion rounds them::

      out[t, n] = xs[t] * row_scale[n] * sum_k e4m3(q[n, k] * fs[g(k), n]) * xq[t, k]  +  lx @ up^T  +  bias[n]

Operands: ``codes`` uint8 ``[N, K / 2]``, two's-complement nibbles, input ``2 j`` in the low nibble of byte ``j``
(:func:`quantduo.formats.quantizers.pack_int4`, as :class:`~quantduo.svdquant.linear.SVDQuantLinear` stores them);
``ws`` bf16 ``[G, N]`` (the stored scales transposed) or ``fs`` float32 ``[G, N]``; ``xq`` float8_e4m3fn ``[T, K]``,
the activations' codes (of ``x / smooth``: smoothing is the producer's), ``xs`` float32 ``[T]``; ``lx`` bf16 ``[T, R]``,
the low-rank down-projection, ``up`` bf16 ``[N, R]``, ``bias`` bf16 ``[N]``; ``out`` bf16 ``[T, N]``.

The weights stay in registers as ``wgmma``'s A operand; the tokens are its N, read from shared memory. Warp roles:
warpgroup 0 issues the TMA copies (one warp), warpgroups 1 and 2 each own 64 of the CTA's 128 weight rows and decode
group ``g`` while group ``g - 1``'s MMAs run. The epilogue scales per token (and per row), adds the up-projection by
a bf16 ``wgmma`` from shared memory and the bias, and stores bf16. Why a DSL: Triton cannot give the weights to
``wgmma`` from registers behind a TMA producer warp with mbarriers; the three Triton / Gluon designs of
docs/kernel-notes.md rounds 14-18 that decoded in the consumer without them stayed at 0.1-0.6x of bf16.
Requirements: ``N % 128 == 0``, ``K % 128 == 0`` (groups taken in pairs), ``R % 16 == 0``; any ``T``.

References: :func:`quantduo.formats.reference.w4a8_group_gemm_ref` and
:func:`~quantduo.formats.reference.w4a8_folded_gemm_ref`.
"""
from __future__ import annotations

import functools

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.memory
import cutlass.pipeline as pipeline
import cutlass.utils.hopper_helpers as sm90_utils
import torch
from cutlass.cute.nvgpu import OperandMajorMode, cpasync, warpgroup
from cutlass.cute.runtime import from_dlpack, make_fake_stream, make_fake_tensor
from cutlass.tensor_utils import LayoutEnum
from cutlass.utils.mixed_input_helpers import cvt_tensor_a_mxf8

ROWS = 128  # weight rows per CTA: two consumer warpgroups of 64
GROUP = 64  # inputs per stage: one SVDQuant group
WARPGROUP = 128


class W4A8GroupGemm:
    """The kernel for one configuration: ``tokens_tile`` tokens per CTA, ``stages`` groups in flight, ``folded``
    scales (else promoted)."""

    def __init__(self, tokens_tile: int = 128, stages: int = 6, folded: bool = False):
        if tokens_tile not in (64, 128):
            raise ValueError(f"tokens_tile must be 64 or 128 (256 spills), got {tokens_tile}")
        self.tokens_tile = tokens_tile
        self.stages = stages
        self.folded = folded
        self.scale_dtype = cutlass.Float32 if folded else cutlass.BFloat16
        self.threads = 3 * WARPGROUP

    @cute.jit
    def __call__(self, m_codes: cute.Tensor, m_scales: cute.Tensor, m_row_scale: cute.Tensor, m_x: cute.Tensor,
                 m_xs: cute.Tensor, m_lx: cute.Tensor, m_up: cute.Tensor, m_bias: cute.Tensor, m_out: cute.Tensor,
                 stream):
        """``m_codes`` (N, K/2) u8, ``m_scales`` (N, G) N-major (bf16 promoted, f32 folded), ``m_row_scale`` (N,) f32
        (read when folded), ``m_x`` (T, K) e4m3, ``m_xs`` (T,) f32, ``m_lx`` (T, R) bf16, ``m_up`` (N, R) bf16,
        ``m_bias`` (N,) bf16, ``m_out`` (N, T) bf16 N-major."""
        rank = m_up.shape[1]
        tile_mnk = (ROWS, self.tokens_tile, GROUP)
        # the same fp8 MMA twice, set once each to overwrite / to accumulate (a TiledMma keeps that field as a traced
        # value, which may not leave a loop that sets it)
        mma_first, mma_rest = (sm90_utils.make_trivial_tiled_mma(
            cutlass.Float8E4M3FN, cutlass.Float8E4M3FN, OperandMajorMode.K, OperandMajorMode.K, cutlass.Float32,
            (2, 1, 1), (64, self.tokens_tile), warpgroup.OperandSource.RMEM) for _ in range(2))
        tiled_mma_lr = sm90_utils.make_trivial_tiled_mma(
            cutlass.BFloat16, cutlass.BFloat16, OperandMajorMode.K, OperandMajorMode.K, cutlass.Float32, (2, 1, 1),
            (64, self.tokens_tile))
        x_layout = sm90_utils.make_smem_layout_b(LayoutEnum.from_tensor(m_x), tile_mnk, cutlass.Float8E4M3FN,
                                                 self.stages)
        lr_tile = (ROWS, self.tokens_tile, rank)
        up_layout = sm90_utils.make_smem_layout_a(LayoutEnum.from_tensor(m_up), lr_tile, cutlass.BFloat16, 1)
        lx_layout = sm90_utils.make_smem_layout_b(LayoutEnum.from_tensor(m_lx), lr_tile, cutlass.BFloat16, 1)
        codes_layout = cute.make_layout((ROWS, GROUP // 2, self.stages), stride=(GROUP // 2, 1, ROWS * GROUP // 2))
        scales_layout = cute.make_layout((ROWS, 1, self.stages), stride=(1, ROWS, ROWS))

        op = cpasync.CopyBulkTensorTileG2SOp()
        tma_codes, t_codes = cpasync.make_tiled_tma_atom(
            op, m_codes, cute.slice_(codes_layout, (None, None, 0)), (ROWS, GROUP // 2))
        tma_scales, t_scales = cpasync.make_tiled_tma_atom(
            op, m_scales, cute.slice_(scales_layout, (None, None, 0)), (ROWS, 1))
        tma_x, t_x = cpasync.make_tiled_tma_atom(
            op, m_x, cute.slice_(x_layout, (None, None, 0)), (self.tokens_tile, GROUP))
        stage_bytes = ROWS * GROUP // 2 + ROWS * self.scale_dtype.width // 8 + self.tokens_tile * GROUP
        stages, scale_dtype = self.stages, self.scale_dtype

        @cute.struct
        class SharedStorage:
            barriers: cute.struct.MemRange[cutlass.Int64, stages * 2]
            codes: cute.struct.Align[cute.struct.MemRange[cutlass.Uint8, cute.cosize(codes_layout)], 1024]
            x: cute.struct.Align[cute.struct.MemRange[cutlass.Float8E4M3FN, cute.cosize(x_layout)], 1024]
            scales: cute.struct.Align[cute.struct.MemRange[scale_dtype, cute.cosize(scales_layout)], 128]
            up: cute.struct.Align[cute.struct.MemRange[cutlass.BFloat16, cute.cosize(up_layout)], 1024]
            lx: cute.struct.Align[cute.struct.MemRange[cutlass.BFloat16, cute.cosize(lx_layout)], 1024]

        self.shared_storage = SharedStorage
        grid = (cute.ceil_div(m_codes.shape[0], ROWS), cute.ceil_div(m_x.shape[0], self.tokens_tile), 1)
        self.kernel(mma_first, mma_rest, tiled_mma_lr, tma_codes, t_codes, tma_scales, t_scales, tma_x, t_x,
                    m_row_scale, m_xs, m_lx, m_up, m_bias, m_out, codes_layout, scales_layout, x_layout, up_layout,
                    lx_layout, stage_bytes).launch(grid=grid, block=[self.threads, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mma_first: cute.TiledMma, mma_rest: cute.TiledMma, tiled_mma_lr: cute.TiledMma,
               tma_codes: cute.CopyAtom, t_codes: cute.Tensor, tma_scales: cute.CopyAtom, t_scales: cute.Tensor,
               tma_x: cute.CopyAtom, t_x: cute.Tensor, m_row_scale: cute.Tensor, m_xs: cute.Tensor,
               m_lx: cute.Tensor, m_up: cute.Tensor, m_bias: cute.Tensor, m_out: cute.Tensor,
               codes_layout: cute.Layout, scales_layout: cute.Layout, x_layout: cute.ComposedLayout,
               up_layout: cute.ComposedLayout, lx_layout: cute.ComposedLayout, stage_bytes: cutlass.Constexpr):
        tidx, _, _ = cute.arch.thread_idx()
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        row_tile, token_tile, _ = cute.arch.block_idx()
        if warp_idx == 0:
            cpasync.prefetch_descriptor(tma_codes)
            cpasync.prefetch_descriptor(tma_scales)
            cpasync.prefetch_descriptor(tma_x)

        mma_first.set(warpgroup.Field.ACCUMULATE, False)
        mma_rest.set(warpgroup.Field.ACCUMULATE, True)
        storage = cutlass.memory.SmemAllocator().allocate(self.shared_storage)
        mainloop = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.barriers.data_ptr(), num_stages=self.stages,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 2 * 4),
            tx_count=stage_bytes, cta_layout_vmnk=cute.make_layout((1, 1, 1, 1)))
        s_codes = storage.codes.get_tensor(codes_layout)
        s_scales = storage.scales.get_tensor(scales_layout)
        s_x = storage.x.get_tensor(x_layout.outer, swizzle=x_layout.inner)
        s_up = storage.up.get_tensor(up_layout.outer, swizzle=up_layout.inner)
        s_lx = storage.lx.get_tensor(lx_layout.outer, swizzle=lx_layout.inner)

        # per group: the tile's codes (ROWS, GROUP / 2), row scales (ROWS, 1) and activations (tokens, GROUP)
        g_codes = cute.local_tile(t_codes, (ROWS, GROUP // 2), (row_tile, None))
        g_scales = cute.local_tile(t_scales, (ROWS, 1), (row_tile, None))
        g_x = cute.local_tile(t_x, (self.tokens_tile, GROUP), (token_tile, None))
        groups = cute.size(g_codes, mode=[2])
        p_s_codes, p_g_codes = cpasync.tma_partition(
            tma_codes, 0, cute.make_layout(1), cute.group_modes(s_codes, 0, 2), cute.group_modes(g_codes, 0, 2))
        p_s_scales, p_g_scales = cpasync.tma_partition(
            tma_scales, 0, cute.make_layout(1), cute.group_modes(s_scales, 0, 2), cute.group_modes(g_scales, 0, 2))
        p_s_x, p_g_x = cpasync.tma_partition(
            tma_x, 0, cute.make_layout(1), cute.group_modes(s_x, 0, 2), cute.group_modes(g_x, 0, 2))

        cute.arch.sync_threads()
        warp_group = cute.arch.make_warp_uniform(tidx // WARPGROUP)
        if warp_group == 0:
            cute.arch.setmaxregister_decrease(40)
            if warp_idx == 0:
                self._produce(mainloop, groups, tma_codes, p_g_codes, p_s_codes, tma_scales, p_g_scales,
                              p_s_scales, tma_x, p_g_x, p_s_x)
        else:
            cute.arch.setmaxregister_increase(232)
            thread = tidx - WARPGROUP
            thr_mma = mma_rest.get_slice(thread)
            # the codes of each stage seen as int4 (ROWS, GROUP), K-major, split as the A operand
            s_nibbles = cute.make_tensor(cute.recast_ptr(s_codes.iterator, dtype=cutlass.Int4),
                                         cute.make_layout((ROWS, GROUP, self.stages), stride=(GROUP, 1, ROWS * GROUP)))
            operands = (thr_mma.partition_A(s_nibbles),  # (MMA, MMA_M, MMA_K, STAGE)
                        thr_mma.partition_A(cute.make_identity_tensor((ROWS, GROUP))),  # (row, k) of each
                        mma_rest.make_fragment_B(thr_mma.partition_B(s_x)))
            acc = thr_mma.make_fragment_C(thr_mma.partition_shape_C((ROWS, self.tokens_tile)))
            coords = thr_mma.partition_C(cute.make_identity_tensor((ROWS, self.tokens_tile)))
            acc.fill(0.0)
            partial = thr_mma.make_fragment_C(thr_mma.partition_shape_C((ROWS, self.tokens_tile)))
            self._mainloop((mma_first, mma_rest), mainloop, groups, operands, s_scales, acc, partial, coords)
            self._epilogue(tiled_mma_lr, thread, acc, coords, row_tile, token_tile, s_up, s_lx, m_row_scale, m_xs,
                           m_lx, m_up, m_bias, m_out)

    @cute.jit
    def _produce(self, mainloop, groups, tma_codes, p_g_codes, p_s_codes, tma_scales, p_g_scales, p_s_scales,
                 tma_x, p_g_x, p_s_x):
        """One warp: the TMA copies of each group's codes, row scales and activation tile into the ring."""
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
        for group in range(groups):
            mainloop.producer_acquire(state)
            barrier = mainloop.producer_get_barrier(state)
            cute.copy(tma_codes, p_g_codes[(None, group)], p_s_codes[(None, state.index)], tma_bar_ptr=barrier)
            cute.copy(tma_scales, p_g_scales[(None, group)], p_s_scales[(None, state.index)], tma_bar_ptr=barrier)
            cute.copy(tma_x, p_g_x[(None, group)], p_s_x[(None, state.index)], tma_bar_ptr=barrier)
            mainloop.producer_commit(state)
            state.advance()
        mainloop.producer_tail(state)

    @cute.jit
    def _mainloop(self, mmas, mainloop, groups, operands, s_scales, acc, partial, coords):
        """Group 0, then a step per group g (decode g while g - 1's MMAs run; :meth:`_step`), freeing the stage of
        g - 1 after it; groups taken in pairs so that each step's A fragment is a static one of two."""
        t_nibbles, a_coords, r_x = operands
        r_w = [cute.make_rmem_tensor(t_nibbles[(None, None, None, 0)].shape, cutlass.Float8E4M3FN) for _ in range(2)]
        target = acc if cutlass.const_expr(self.folded) else partial
        read = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
        release = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
        mainloop.consumer_wait(read)
        self._decode(r_w[0], t_nibbles, a_coords, s_scales, read.index)
        self._issue(mmas, target, r_w[0], r_x, read.index)
        read.advance()
        for _pair in range(groups // 2 - 1):
            for j in cutlass.range_constexpr(2):  # groups 2 pair + 1 (buffer 1) and 2 pair + 2 (buffer 0)
                mainloop.consumer_wait(read)
                self._step(mmas, target, r_w[1 - j], operands, s_scales, acc, partial, coords, read.index,
                           release.index)
                mainloop.consumer_release(release)
                release.advance()
                read.advance()
        mainloop.consumer_wait(read)  # the last group (an odd index: buffer 1)
        self._step(mmas, target, r_w[1], operands, s_scales, acc, partial, coords, read.index, release.index)
        mainloop.consumer_release(release)
        release.advance()
        cute.nvgpu.warpgroup.wait_group(0)
        if cutlass.const_expr(not self.folded):
            self._promote(acc, partial, coords, s_scales, release.index)
        mainloop.consumer_release(release)

    @cute.jit
    def _step(self, mmas, target, r_w, operands, s_scales, acc, partial, coords, stage, previous_stage):
        """Decode group g into ``r_w`` while g - 1's MMAs run; promoted: wait for them and promote g - 1, then issue
        g into ``partial``; folded: issue g into the accumulator behind them, then wait for g - 1."""
        t_nibbles, a_coords, r_x = operands
        self._decode(r_w, t_nibbles, a_coords, s_scales, stage)
        if cutlass.const_expr(not self.folded):
            cute.nvgpu.warpgroup.wait_group(0)
            self._promote(acc, partial, coords, s_scales, previous_stage)
        self._issue(mmas, target, r_w, r_x, stage)
        if cutlass.const_expr(self.folded):
            cute.nvgpu.warpgroup.wait_group(1)

    @cute.jit
    def _decode(self, r_w, t_nibbles, a_coords, s_scales, stage):
        """The stage's codes of this thread into the A fragment ``r_w``: exact E4M3 integers (promoted), or
        ``e4m3(q * fs[row])`` with the stage's float32 row scales (folded)."""
        for kb in cutlass.range_constexpr(cute.size(r_w, mode=[2])):
            nibbles = t_nibbles[(None, None, kb, stage)]
            if cutlass.const_expr(self.folded):
                scale = cute.make_rmem_tensor(nibbles.shape, cutlass.Float16)
                rows = a_coords[(None, None, kb)]
                for i in cutlass.range_constexpr(cute.size(scale)):
                    row, _ = rows[i]
                    scale[i] = s_scales[row, 0, stage].to(cutlass.Float16)
                values = cvt_tensor_a_mxf8(nibbles, cutlass.Float8E4M3FN).to(cutlass.Float16) * scale.load()
                r_w[(None, None, kb)].store(values.to(cutlass.Float8E4M3FN))
            else:
                r_w[(None, None, kb)].store(cvt_tensor_a_mxf8(nibbles, cutlass.Float8E4M3FN))

    @cute.jit
    def _issue(self, mmas, accumulator, r_w, r_x, stage):
        """The group's 32-deep MMAs into ``accumulator`` (promoted: the first overwrites it), committed."""
        mma_first, mma_rest = mmas
        cute.nvgpu.warpgroup.fence()
        for kb in cutlass.range_constexpr(cute.size(r_w, mode=[2])):
            mma = mma_first if cutlass.const_expr(kb == 0 and not self.folded) else mma_rest
            cute.gemm(mma, accumulator, r_w[(None, None, kb)], r_x[(None, None, kb, stage)], accumulator)
        cute.nvgpu.warpgroup.commit_group()

    @cute.jit
    def _promote(self, acc, partial, coords, s_scales, stage):
        """``acc += partial * scale[row]`` with the stage's bf16 row scales (the group's MMAs waited for)."""
        for i in cutlass.range_constexpr(cute.size(acc)):
            row, _ = coords[i]
            acc[i] = acc[i] + partial[i] * s_scales[row, 0, stage].to(cutlass.Float32)

    @cute.jit
    def _epilogue(self, tiled_mma_lr, thread, acc, coords, row_tile, token_tile, s_up, s_lx, m_row_scale, m_xs,
                  m_lx, m_up, m_bias, m_out):
        """``acc * xs[t]`` (``* row_scale[n]`` folded), then ``+ up @ lx^T`` by a bf16 ``wgmma`` from shared memory,
        ``+ bias``, bf16 stores of the tokens that exist."""
        tokens = m_out.shape[1]
        row0 = row_tile * ROWS
        token0 = token_tile * self.tokens_tile
        rank = m_up.shape[1]
        # the low-rank operands into shared memory (zeros past the last token)
        for i in range(thread, ROWS * rank, 2 * WARPGROUP):
            r, c = i // rank, i % rank
            s_up[r, c, 0] = m_up[row0 + r, c]
        for i in range(thread, self.tokens_tile * rank, 2 * WARPGROUP):
            t, c = i // rank, i % rank
            value = cutlass.BFloat16(0.0)
            if token0 + t < tokens:
                value = m_lx[token0 + t, c]
            s_lx[t, c, 0] = value
        cute.arch.fence_proxy("async.shared", space="cta")
        cute.arch.barrier(barrier_id=1, number_of_threads=2 * WARPGROUP)

        for i in cutlass.range_constexpr(cute.size(acc)):
            row, col = coords[i]
            scale = cutlass.Float32(0.0)
            if token0 + col < tokens:
                scale = m_xs[token0 + col]
            if cutlass.const_expr(self.folded):
                scale = scale * m_row_scale[row0 + row]
            acc[i] = acc[i] * scale

        thr_lr = tiled_mma_lr.get_slice(thread)
        r_up = tiled_mma_lr.make_fragment_A(thr_lr.partition_A(s_up))
        r_lx = tiled_mma_lr.make_fragment_B(thr_lr.partition_B(s_lx))
        tiled_mma_lr.set(warpgroup.Field.ACCUMULATE, True)
        cute.nvgpu.warpgroup.fence()
        for kb in cutlass.range_constexpr(cute.size(r_up, mode=[2])):
            cute.gemm(tiled_mma_lr, acc, r_up[(None, None, kb, 0)], r_lx[(None, None, kb, 0)], acc)
        cute.nvgpu.warpgroup.commit_group()
        cute.nvgpu.warpgroup.wait_group(0)

        for i in cutlass.range_constexpr(cute.size(acc)):
            row, col = coords[i]
            if token0 + col < tokens:
                m_out[row0 + row, token0 + col] = (acc[i] + m_bias[row0 + row].to(cutlass.Float32)).to(
                    cutlass.BFloat16)


_NAMES = ("codes", "scales", "row_scale", "xq", "xs", "lx", "up", "bias", "out")
_COMPILED: dict = {}


def _types(folded: bool) -> tuple:
    """The CuTe element type of each operand of ``_NAMES``."""
    return (cutlass.Uint8, cutlass.Float32 if folded else cutlass.BFloat16, cutlass.Float32, cutlass.Float8E4M3FN,
            cutlass.Float32, cutlass.BFloat16, cutlass.BFloat16, cutlass.BFloat16, cutlass.BFloat16)


def check_shapes(n: int, k: int, rank: int) -> None:
    """Raise ValueError for a layer the kernel does not take."""
    if n % ROWS or k % (2 * GROUP) or rank % 16 or rank == 0:
        raise ValueError(f"w4a8 group GEMM needs N % {ROWS} == 0, K % {2 * GROUP} == 0 (an even number of groups) "
                         f"and a rank that is a nonzero multiple of 16; got N={n}, K={k}, rank={rank}")


def _layouts(tokens: int, n: int, k: int, rank: int) -> list[tuple]:
    """(shape, stride) of each operand of ``_NAMES`` as the kernel sees it (scales and out N-major views)."""
    return [((n, k // 2), (k // 2, 1)), ((n, k // GROUP), (1, n)), ((n,), (1,)), ((tokens, k), (k, 1)),
            ((tokens,), (1,)), ((tokens, rank), (rank, 1)), ((n, rank), (rank, 1)), ((n,), (1,)),
            ((n, tokens), (1, n))]


def compile_kernel(tokens: int, n: int, k: int, rank: int, tokens_tile: int = 128, stages: int = 6,
                   folded: bool = False):
    """Compile for the current ``CUTE_DSL_ARCH`` without a GPU (fake tensors): for tests and SASS counts."""
    check_shapes(n, k, rank)
    fakes = [make_fake_tensor(dtype, shape, stride, assumed_align=16)
             for dtype, (shape, stride) in zip(_types(folded), _layouts(tokens, n, k, rank))]
    return cute.compile(W4A8GroupGemm(tokens_tile, stages, folded), *fakes, make_fake_stream())


def _as_cute(t: torch.Tensor, dtype) -> cute.Tensor:
    view = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
    tensor = from_dlpack(view, assumed_align=16)
    tensor.element_type = dtype
    return tensor


@functools.lru_cache(maxsize=64)
def _filled(n: int, device: torch.device, dtype: torch.dtype, value: float) -> torch.Tensor:
    """A constant ``[n]`` operand (the promoted mode's unread row scales, a missing bias), made once per shape and
    device rather than per call (a CUDA graph would replay the fill)."""
    return torch.full((n,), value, dtype=dtype, device=device)


def _launch(folded: bool, codes, scales_t, row_scale, xq, xs, lx, up, bias, tokens_tile: int,
            stages: int) -> torch.Tensor:
    tokens, k = xq.shape
    n, rank = up.shape
    check_shapes(n, k, rank)
    bias = _filled(n, xq.device, torch.bfloat16, 0.0) if bias is None else bias
    expected = {"codes": (codes, torch.uint8, (n, k // 2)),
                "scales_t": (scales_t, torch.float32 if folded else torch.bfloat16, (k // GROUP, n)),
                "row_scale": (row_scale, torch.float32, (n,)), "xq": (xq, torch.float8_e4m3fn, (tokens, k)),
                "xs": (xs, torch.float32, (tokens,)), "lx": (lx, torch.bfloat16, (tokens, rank)),
                "up": (up, torch.bfloat16, (n, rank)), "bias": (bias, torch.bfloat16, (n,))}
    for name, (tensor, dtype, shape) in expected.items():
        if tensor.dtype != dtype or tuple(tensor.shape) != shape or not tensor.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous {dtype} tensor of shape {shape}, got {tensor.dtype} "
                             f"{tuple(tensor.shape)}")
    out = torch.empty(tokens, n, dtype=torch.bfloat16, device=xq.device)
    tensors = (codes, scales_t.t(), row_scale, xq, xs, lx, up, bias, out.t())
    args = [_as_cute(t, dtype) for t, dtype in zip(tensors, _types(folded))]
    stream = cuda.CUstream(torch.cuda.current_stream().cuda_stream)
    key = (tokens, n, k, rank, tokens_tile, stages, folded)
    if key not in _COMPILED:
        _COMPILED[key] = cute.compile(W4A8GroupGemm(tokens_tile, stages, folded), *args, stream)
    _COMPILED[key](*args, stream)
    return out


def w4a8_group_gemm(codes: torch.Tensor, scales_t: torch.Tensor, xq: torch.Tensor, xs: torch.Tensor,
                    lx: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None = None, *, tokens_tile: int = 128,
                    stages: int = 6) -> torch.Tensor:
    """bf16 ``[T, N]``, the promoted formula of the module docstring, on contiguous CUDA tensors: codes uint8
    ``[N, K / 2]``, scales_t bf16 ``[K / 64, N]``, xq float8_e4m3fn ``[T, K]``, xs float32 ``[T]``, lx bf16
    ``[T, R]``, up bf16 ``[N, R]``, bias bf16 ``[N]`` or None. One compile per shape and configuration."""
    unit_row_scales = _filled(up.shape[0], xq.device, torch.float32, 1.0)
    return _launch(False, codes, scales_t, unit_row_scales, xq, xs, lx, up, bias, tokens_tile, stages)


def w4a8_folded_gemm(codes: torch.Tensor, folded_t: torch.Tensor, row_scale: torch.Tensor, xq: torch.Tensor,
                     xs: torch.Tensor, lx: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None = None, *,
                     tokens_tile: int = 128, stages: int = 6) -> torch.Tensor:
    """bf16 ``[T, N]``, the folded formula of the module docstring: as :func:`w4a8_group_gemm` with float32
    ``folded_t [K / 64, N]`` and ``row_scale [N]`` (:func:`quantduo.formats.quantizers.fp8_folded_scales`)."""
    return _launch(True, codes, folded_t, row_scale, xq, xs, lx, up, bias, tokens_tile, stages)
