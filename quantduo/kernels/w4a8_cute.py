"""INT4 x fp8 GEMM with SVDQuant's groups of 64 and the rank-r up-projection in the epilogue (CuTe DSL, sm_90a).

Notation (``T`` tokens, ``N`` output features, ``K`` inputs, ``G = K / 64`` groups, ``R`` the low-rank width)::

    out[t, n] = xs[t] * sum_g ws[g, n] * sum_{k in g} q[n, k] * xq[t, k]  +  sum_r lx[t, r] * up[n, r]  +  bias[n]

- ``codes``: uint8 ``[N, K / 2]``, two's-complement nibbles, input ``2 j`` in the low nibble of byte ``j``
  (:func:`quantduo.formats.quantizers.pack_int4`), the layout :class:`~quantduo.svdquant.linear.SVDQuantLinear`
  stores;
- ``scales_t``: bf16 ``[G, N]``, the group scales transposed (``SVDQuantLinear.library_scales``);
- ``xq``: float8_e4m3fn ``[T, K]``, the activations' codes, ``xs``: float32 ``[T]``, their per-token scales;
- ``lx``: bf16 ``[T, R]``, the low-rank branch's down-projection, ``up``: bf16 ``[N, R]``, ``bias``: bf16 ``[N]``;
- ``out``: bf16 ``[T, N]``.

The weights are decoded to fp8 exactly (every integer in [-8, 7] is an E4M3 value) and stay in registers as
``wgmma``'s A operand; the tokens are its N, read from shared memory. Each pipeline stage holds one group: its two
32-deep MMAs accumulate into a temporary float32 accumulator that is then added to the main one times the group's
scale of each row (the "promotion" of CUTLASS's fp8 GEMMs, here once per group). So the weights carry no rounding
at all, and the per-token scale, the up-projection (a bf16 ``wgmma`` from shared memory) and the bias are applied
once in the epilogue. Why a DSL: Triton cannot give the weights to ``wgmma`` from registers behind a TMA producer
warp with mbarriers; the three Triton / Gluon designs of docs/kernel-notes.md rounds 14-18 that decoded in the
consumer without them stayed at 0.1-0.6x of bf16.

Warp roles: warpgroup 0 issues the TMA copies (one warp), warpgroups 1 and 2 each own 64 of the CTA's 128 weight
rows. Requirements: ``N % 128 == 0``, ``K % 128 == 0`` (groups taken in pairs), ``R % 16 == 0``; any ``T``.

The reference is :func:`quantduo.formats.reference.w4a8_group_gemm_ref`.
"""
from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.memory
import torch
import cutlass.pipeline as pipeline
from cutlass.tensor_utils import LayoutEnum
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass.cute.nvgpu import OperandMajorMode, cpasync, warpgroup
from cutlass.cute.runtime import from_dlpack, make_fake_stream, make_fake_tensor
from cutlass.utils.mixed_input_helpers import cvt_tensor_a_mxf8

ROWS = 128  # weight rows per CTA: two consumer warpgroups of 64
GROUP = 64  # inputs per stage: one SVDQuant group
WARPGROUP = 128


class W4A8GroupGemm:
    """The kernel for one configuration: ``tokens_tile`` tokens per CTA, ``stages`` groups in flight."""

    def __init__(self, tokens_tile: int = 128, stages: int = 6):
        if tokens_tile not in (64, 128):
            raise ValueError(f"tokens_tile must be 64 or 128 (256 spills), got {tokens_tile}")
        self.tokens_tile = tokens_tile
        self.stages = stages
        self.threads = 3 * WARPGROUP

    @cute.jit
    def __call__(self, m_codes: cute.Tensor, m_scales: cute.Tensor, m_x: cute.Tensor, m_xs: cute.Tensor,
                 m_lx: cute.Tensor, m_up: cute.Tensor, m_bias: cute.Tensor, m_out: cute.Tensor, stream):
        """``m_codes`` (N, K/2) u8, ``m_scales`` (N, G) bf16 N-major, ``m_x`` (T, K) e4m3, ``m_xs`` (T,) f32,
        ``m_lx`` (T, R) bf16, ``m_up`` (N, R) bf16, ``m_bias`` (N,) bf16, ``m_out`` (N, T) bf16 N-major."""
        rank = m_up.shape[1]
        tile_mnk = (ROWS, self.tokens_tile, GROUP)
        # the same fp8 MMA twice: one for the main loop, one for the MMAs before and after it (a TiledMma keeps its
        # ACCUMULATE field as a traced value, which may not leave the loop that set it)
        tiled_mma, tiled_mma_edge = (sm90_utils.make_trivial_tiled_mma(
            cutlass.Float8E4M3FN, cutlass.Float8E4M3FN, OperandMajorMode.K, OperandMajorMode.K, cutlass.Float32,
            (2, 1, 1), (64, self.tokens_tile), warpgroup.OperandSource.RMEM) for _ in range(2))
        tiled_mma_lr = sm90_utils.make_trivial_tiled_mma(
            cutlass.BFloat16, cutlass.BFloat16, OperandMajorMode.K, OperandMajorMode.K,
            cutlass.Float32, (2, 1, 1), (64, self.tokens_tile))
        x_layout = sm90_utils.make_smem_layout_b(LayoutEnum.from_tensor(m_x), tile_mnk,
                                                 cutlass.Float8E4M3FN, self.stages)
        lr_tile = (ROWS, self.tokens_tile, rank)
        up_layout = sm90_utils.make_smem_layout_a(LayoutEnum.from_tensor(m_up), lr_tile, cutlass.BFloat16, 1)
        lx_layout = sm90_utils.make_smem_layout_b(LayoutEnum.from_tensor(m_lx), lr_tile, cutlass.BFloat16, 1)
        codes_layout = cute.make_layout((ROWS, GROUP // 2, self.stages),
                                        stride=(GROUP // 2, 1, ROWS * GROUP // 2))
        scales_layout = cute.make_layout((ROWS, 1, self.stages), stride=(1, ROWS, ROWS))

        op = cpasync.CopyBulkTensorTileG2SOp()
        tma_codes, t_codes = cpasync.make_tiled_tma_atom(
            op, m_codes, cute.slice_(codes_layout, (None, None, 0)), (ROWS, GROUP // 2))
        tma_scales, t_scales = cpasync.make_tiled_tma_atom(
            op, m_scales, cute.slice_(scales_layout, (None, None, 0)), (ROWS, 1))
        tma_x, t_x = cpasync.make_tiled_tma_atom(
            op, m_x, cute.slice_(x_layout, (None, None, 0)), (self.tokens_tile, GROUP))
        stage_bytes = ROWS * GROUP // 2 + ROWS * 2 + self.tokens_tile * GROUP

        stages = self.stages

        @cute.struct
        class SharedStorage:
            barriers: cute.struct.MemRange[cutlass.Int64, stages * 2]
            codes: cute.struct.Align[cute.struct.MemRange[cutlass.Uint8, cute.cosize(codes_layout)], 1024]
            x: cute.struct.Align[cute.struct.MemRange[cutlass.Float8E4M3FN, cute.cosize(x_layout)], 1024]
            scales: cute.struct.Align[cute.struct.MemRange[cutlass.BFloat16, cute.cosize(scales_layout)], 128]
            up: cute.struct.Align[cute.struct.MemRange[cutlass.BFloat16, cute.cosize(up_layout)], 1024]
            lx: cute.struct.Align[cute.struct.MemRange[cutlass.BFloat16, cute.cosize(lx_layout)], 1024]

        self.shared_storage = SharedStorage
        grid = (cute.ceil_div(m_codes.shape[0], ROWS), cute.ceil_div(m_x.shape[0], self.tokens_tile), 1)
        self.kernel(tiled_mma, tiled_mma_edge, tiled_mma_lr, tma_codes, t_codes, tma_scales, t_scales, tma_x, t_x, m_xs, m_lx,
                    m_up, m_bias, m_out, codes_layout, scales_layout, x_layout, up_layout, lx_layout, stage_bytes).launch(
            grid=grid, block=[self.threads, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, tiled_mma: cute.TiledMma, tiled_mma_edge: cute.TiledMma, tiled_mma_lr: cute.TiledMma, tma_codes: cute.CopyAtom, t_codes: cute.Tensor, tma_scales: cute.CopyAtom,
               t_scales: cute.Tensor, tma_x: cute.CopyAtom, t_x: cute.Tensor, m_xs: cute.Tensor,
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

        # (ROWS, GROUP/2, rest_n, groups) and friends
        g_codes = cute.local_tile(t_codes, (ROWS, GROUP // 2), (row_tile, None))
        g_scales = cute.local_tile(t_scales, (ROWS, 1), (row_tile, None))
        g_x = cute.local_tile(t_x, (self.tokens_tile, GROUP), (token_tile, None))
        groups = cute.size(g_codes, mode=[2])
        p_s_codes, p_g_codes = cpasync.tma_partition(
            tma_codes, 0, cute.make_layout(1), cute.group_modes(s_codes, 0, 2), cute.group_modes(g_codes, 0, 2))
        p_s_scales, p_g_scales = cpasync.tma_partition(
            tma_scales, 0, cute.make_layout(1), cute.group_modes(s_scales, 0, 2),
            cute.group_modes(g_scales, 0, 2))
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
            self._consume(tiled_mma, tiled_mma_edge, tiled_mma_lr, mainloop, groups, tidx - WARPGROUP, row_tile, token_tile, s_codes, s_scales, s_x,
                          s_up, s_lx, m_xs, m_lx, m_up, m_bias, m_out)

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
    def _consume(self, tiled_mma, tiled_mma_edge, tiled_mma_lr, mainloop, groups, thread, row_tile, token_tile, s_codes, s_scales, s_x, s_up, s_lx,
                 m_xs, m_lx, m_up, m_bias, m_out):
        """Two warpgroups: decode, MMA, promotion per group; then the epilogue."""
        thr_mma = tiled_mma.get_slice(thread)
        # the codes of each stage seen as int4 (ROWS, GROUP), K-major
        s_nibbles = cute.make_tensor(cute.recast_ptr(s_codes.iterator, dtype=cutlass.Int4),
                                     cute.make_layout((ROWS, GROUP, self.stages),
                                                      stride=(GROUP, 1, ROWS * GROUP)))
        t_nibbles = thr_mma.partition_A(s_nibbles)  # (MMA, MMA_M, MMA_K, STAGE)
        t_sx = thr_mma.partition_B(s_x)
        r_x = tiled_mma.make_fragment_B(t_sx)
        r_w = [cute.make_rmem_tensor(t_nibbles[(None, None, None, 0)].shape, cutlass.Float8E4M3FN)
               for _ in range(2)]  # group g decoded into r_w[g % 2] while group g - 1's MMAs read the other

        acc_shape = thr_mma.partition_shape_C((ROWS, self.tokens_tile))
        acc = thr_mma.make_fragment_C(acc_shape)
        partial = thr_mma.make_fragment_C(acc_shape)
        coords = thr_mma.partition_C(cute.make_identity_tensor((ROWS, self.tokens_tile)))
        acc.fill(0.0)

        read = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
        release = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
        k_blocks = cute.size(r_w[0], mode=[2])
        # group 0, then each step decodes group g while group g - 1's MMAs run, promotes g - 1, issues g
        mainloop.consumer_wait(read)
        self._decode(r_w[0], t_nibbles, read.index, k_blocks)
        self._issue(tiled_mma_edge, partial, r_w[0], r_x, read.index, k_blocks)
        read.advance()
        for _pair in range(groups // 2 - 1):
            for j in cutlass.range_constexpr(2):
                mainloop.consumer_wait(read)
                self._decode(r_w[1 - j], t_nibbles, read.index, k_blocks)
                self._promote(acc, partial, coords, s_scales, release.index)
                mainloop.consumer_release(release)
                release.advance()
                self._issue(tiled_mma, partial, r_w[1 - j], r_x, read.index, k_blocks)
                read.advance()
        mainloop.consumer_wait(read)  # the last group (an odd index: buffer 1)
        self._decode(r_w[1], t_nibbles, read.index, k_blocks)
        self._promote(acc, partial, coords, s_scales, release.index)
        mainloop.consumer_release(release)
        release.advance()
        self._issue(tiled_mma_edge, partial, r_w[1], r_x, read.index, k_blocks)
        self._promote(acc, partial, coords, s_scales, release.index)
        mainloop.consumer_release(release)

        self._epilogue(tiled_mma_lr, thread, acc, coords, row_tile, token_tile, s_up, s_lx, m_xs, m_lx, m_up, m_bias, m_out)

    @cute.jit
    def _decode(self, r_w, t_nibbles, stage, k_blocks: cutlass.Constexpr):
        """The stage's codes of this thread, exact E4M3 integers, into the A fragment ``r_w``."""
        for kb in cutlass.range_constexpr(k_blocks):
            r_w[(None, None, kb)].store(cvt_tensor_a_mxf8(t_nibbles[(None, None, kb, stage)], cutlass.Float8E4M3FN))

    @cute.jit
    def _issue(self, tiled_mma, partial, r_w, r_x, stage, k_blocks: cutlass.Constexpr):
        """The group's 32-deep MMAs into ``partial`` (zeroed by the first), committed, not waited."""
        cute.nvgpu.warpgroup.fence()
        for kb in cutlass.range_constexpr(k_blocks):
            tiled_mma.set(warpgroup.Field.ACCUMULATE, kb != 0)
            cute.gemm(tiled_mma, partial, r_w[(None, None, kb)], r_x[(None, None, kb, stage)], partial)
        cute.nvgpu.warpgroup.commit_group()

    @cute.jit
    def _promote(self, acc, partial, coords, s_scales, stage):
        """Waits for the group's MMAs, then ``acc += partial * scale[row]`` with the stage's bf16 row scales."""
        cute.nvgpu.warpgroup.wait_group(0)
        for i in cutlass.range_constexpr(cute.size(acc)):
            row, _ = coords[i]
            acc[i] = acc[i] + partial[i] * s_scales[row, 0, stage].to(cutlass.Float32)

    @cute.jit
    def _epilogue(self, tiled_mma_lr, thread, acc, coords, row_tile, token_tile, s_up, s_lx, m_xs, m_lx, m_up, m_bias, m_out):
        """``acc * xs[t]``, then ``+ up @ lx^T`` by a bf16 ``wgmma`` from shared memory, ``+ bias``, bf16 stores."""
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
            _, col = coords[i]
            scale = cutlass.Float32(0.0)
            if token0 + col < tokens:
                scale = m_xs[token0 + col]
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


_OPERANDS = (  # name, CuTe element type; the layouts the kernel is traced with: (N, K/2), (N, G), (T, K), ...
    ("codes", cutlass.Uint8), ("scales", cutlass.BFloat16), ("xq", cutlass.Float8E4M3FN), ("xs", cutlass.Float32),
    ("lx", cutlass.BFloat16), ("up", cutlass.BFloat16), ("bias", cutlass.BFloat16), ("out", cutlass.BFloat16))
_COMPILED: dict = {}


def check_shapes(n: int, k: int, rank: int) -> None:
    """Raise ValueError for a layer the kernel does not take."""
    if n % ROWS or k % (2 * GROUP) or rank % 16 or rank == 0:
        raise ValueError(f"w4a8 group GEMM needs N % {ROWS} == 0, K % {2 * GROUP} == 0 (an even number of groups) "
                         f"and a rank that is a nonzero multiple of 16; got N={n}, K={k}, rank={rank}")


def _shapes(tokens: int, n: int, k: int, rank: int) -> dict:
    """(shape, stride) of each operand as the kernel sees it (``out`` and ``scales`` N-major views)."""
    groups = k // GROUP
    return {"codes": ((n, k // 2), (k // 2, 1)), "scales": ((n, groups), (1, n)), "xq": ((tokens, k), (k, 1)),
            "xs": ((tokens,), (1,)), "lx": ((tokens, rank), (rank, 1)), "up": ((n, rank), (rank, 1)),
            "bias": ((n,), (1,)), "out": ((n, tokens), (1, n))}


def compile_kernel(tokens: int, n: int, k: int, rank: int, tokens_tile: int = 128, stages: int = 6):
    """Compile for the current ``CUTE_DSL_ARCH`` without a GPU (fake tensors): for tests and SASS counts."""
    check_shapes(n, k, rank)
    shapes = _shapes(tokens, n, k, rank)
    fakes = [make_fake_tensor(dtype, *shapes[name], assumed_align=16) for name, dtype in _OPERANDS]
    return cute.compile(W4A8GroupGemm(tokens_tile, stages), *fakes, make_fake_stream())


def _as_cute(t: torch.Tensor, dtype) -> cute.Tensor:
    view = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
    tensor = from_dlpack(view, assumed_align=16)
    tensor.element_type = dtype
    return tensor


def w4a8_group_gemm(codes: torch.Tensor, scales_t: torch.Tensor, xq: torch.Tensor, xs: torch.Tensor,
                    lx: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None = None, *, tokens_tile: int = 128,
                    stages: int = 6) -> torch.Tensor:
    """bf16 ``[T, N]`` = the module docstring's formula on CUDA tensors (one compile per shape and configuration).

    codes uint8 ``[N, K / 2]``, scales_t bf16 ``[K / 64, N]``, xq float8_e4m3fn ``[T, K]``, xs float32 ``[T]``,
    lx bf16 ``[T, R]``, up bf16 ``[N, R]``, bias bf16 ``[N]`` or None; all contiguous.
    """
    tokens, k = xq.shape
    n, rank = up.shape
    check_shapes(n, k, rank)
    expected = {"codes": (codes, torch.uint8, (n, k // 2)), "scales_t": (scales_t, torch.bfloat16, (k // GROUP, n)),
                "xq": (xq, torch.float8_e4m3fn, (tokens, k)), "xs": (xs, torch.float32, (tokens,)),
                "lx": (lx, torch.bfloat16, (tokens, rank))}
    for name, (tensor, dtype, shape) in expected.items():
        if tensor.dtype != dtype or tuple(tensor.shape) != shape or not tensor.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous {dtype} tensor of shape {shape}, got {tensor.dtype} "
                             f"{tuple(tensor.shape)}")
    if bias is None:
        bias = torch.zeros(n, dtype=torch.bfloat16, device=xq.device)
    out = torch.empty(tokens, n, dtype=torch.bfloat16, device=xq.device)
    tensors = (codes, scales_t.t(), xq, xs, lx, up.contiguous(), bias.contiguous(), out.t())
    args = [_as_cute(t, dtype) for t, (_, dtype) in zip(tensors, _OPERANDS)]
    stream = cuda.CUstream(torch.cuda.current_stream().cuda_stream)
    key = (tokens, n, k, rank, tokens_tile, stages)
    if key not in _COMPILED:
        _COMPILED[key] = cute.compile(W4A8GroupGemm(tokens_tile, stages), *args, stream)
    _COMPILED[key](*args, stream)
    return out
