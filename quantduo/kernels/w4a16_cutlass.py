"""INT4 x bf16 GEMM from CUTLASS's Hopper mixed-input mainloop (TMA, warp-specialized ``wgmma``, the int4 weights
converted in registers, then scaled), for 16-bit activations between the few-token kernels and the reconstructed
weight (docs/kernel-notes.md, item 76)::

    out[m, n] = sum_k x[m, k] * bf16(q[n, k] * scales_t[k // 64, n])

x bfloat16 ``[M, K]`` (contiguous rows), q the stored INT4 codes (``qweight`` uint8 ``[N, K / 2]``, element ``2j`` in
the low nibble of byte ``j``, two's complement: the packing quantduo stores, read as is), scales_t bfloat16
``[K / 64, N]`` (the group scales transposed, N fastest, as the mainloop reads them), out bfloat16 ``[M, N]``. Tiles
of 64 tokens with stream-K up to 64 tokens, 128 above.

The kernels are compiled C++ (Triton and Gluon builds of this loop stayed at 0.1-0.6x of bf16 between 65 and 256
tokens, kernel-notes items 41-47), built by ``scripts/build_w4a8_lut.sh`` into a plain C-ABI library (no torch
headers) and loaded with ``ctypes`` from the path in ``QUANTDUO_CUTLASS_LIB``: without it nothing here runs and
:func:`available` is False. Reference: :func:`quantduo.formats.reference.w4a16_convert_scale_ref`.
"""
from __future__ import annotations

import ctypes
import functools
import os

import torch

LIBRARY_ENV = "QUANTDUO_CUTLASS_LIB"
GROUP = 64
# Tokens up to which the stream-K kernel with 64-token tiles runs (few output tiles: stream-K splits K over SMs).
STREAM_K_MAX_TOKENS = 64


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The library named by ``QUANTDUO_CUTLASS_LIB`` (None when unset); OSError names a path that does not load."""
    path = os.environ.get(LIBRARY_ENV)
    if not path:
        return None
    try:
        lib = ctypes.CDLL(path)
    except OSError as err:
        raise OSError(f"{LIBRARY_ENV}={path!r} does not load ({err}); build it with scripts/build_w4a8_lut.sh") from err
    lib.qd_w4a16_workspace.restype = ctypes.c_size_t
    lib.qd_w4a16_workspace.argtypes = [ctypes.c_int] * 5
    lib.qd_w4a16_gemm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 5 + [ctypes.c_void_p] * 2
    return lib


def enabled() -> bool:
    """Whether ``QUANTDUO_CUTLASS_LIB`` names a library (layers then keep their transposed bf16 scales)."""
    return _library() is not None


def transposed_scales(wscales: torch.Tensor) -> torch.Tensor:
    """The layer's group scales ``[N, K / 64]`` as the GEMM reads them: bfloat16 ``[K / 64, N]``, contiguous."""
    return wscales.to(torch.bfloat16).T.contiguous()


def available(x: torch.Tensor, qweight: torch.Tensor, scales_t: torch.Tensor | None) -> bool:
    """Whether :func:`w4a16_gemm` serves these operands: the library loaded, a Hopper GPU (sm_90), bfloat16
    activations in contiguous rows, K a multiple of 64 and N of 8 (TMA's 16-byte rows)."""
    if scales_t is None or not x.is_cuda or x.dtype != torch.bfloat16 or _library() is None:
        return False
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    return (torch.cuda.get_device_capability(x.device) == (9, 0) and x.dim() == 2 and x.shape[1] == K
            and x.stride(1) == 1 and x.stride(0) == K and K % GROUP == 0 and N % 8 == 0
            and tuple(scales_t.shape) == (K // GROUP, N) and scales_t.dtype == torch.bfloat16
            and scales_t.is_contiguous() and qweight.is_contiguous())


def w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales_t: torch.Tensor, tokens_tile: int | None = None,
               shuffled: bool = False) -> torch.Tensor:
    """bfloat16 ``[M, N] = x @ bf16(q * scale)^T`` (see the module docstring) on the current stream; callers check
    :func:`available` first. ``tokens_tile`` 64 (stream-K) or 128, by the token count where None; ``shuffled``:
    codes reordered by the library's ``qd_w4a16_reorder`` (benchmarks/w4a8_lut.py times both orders). RuntimeError
    if CUTLASS refuses or fails to launch the problem."""
    lib = _library()
    M, K = x.shape
    N = qweight.shape[0]
    tile = tokens_tile or (64 if M <= STREAM_K_MAX_TOKENS else 128)
    out = torch.empty(M, N, device=x.device, dtype=torch.bfloat16)
    workspace = torch.zeros(max(1, lib.qd_w4a16_workspace(M, N, K, tile, int(shuffled))), device=x.device,
                            dtype=torch.uint8)
    rc = lib.qd_w4a16_gemm(qweight.data_ptr(), scales_t.data_ptr(), x.data_ptr(), out.data_ptr(), M, N, K, tile,
                           int(shuffled), workspace.data_ptr(), torch.cuda.current_stream(x.device).cuda_stream)
    if rc:
        raise RuntimeError(f"CUTLASS W4A16 GEMM {'refused' if rc == 1 else 'failed'} (code {rc}) at M={M} N={N} "
                           f"K={K}")
    return out
