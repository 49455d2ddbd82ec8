"""What the W4A16 GEMM tests share: random layer operands from the documented packing, and a stand-in launcher that
records a Gluon kernel's launches on the CPU (Gluon kernels do not run there)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantduo.formats import quantizers as qz
from quantduo.formats import reference as ref
from quantduo.kernels.act_quant import act_quant
from quantduo.utils import relative_error


def w4a16_operands(M: int, N: int, K: int, r: int, dtype: torch.dtype, seed: int = 0) -> tuple:
    """CUDA operands of an INT4-g64 layer with smoothing: kernel 1's smoothed activations ``a [M, K]``, packed codes
    (every value -8..7) ``[N, K / 2]``, group scales ``[N, K / 64]``, low-rank partials ``[S, M, r]`` (None for
    r = 0), ``lora_up [N, r]`` (None for r = 0) and a bias ``[N]``."""
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


def record_launches(monkeypatch, module, kernel_name: str) -> list:
    """Replace ``module.kernel_name`` by a launcher that records ``(grid, args, kwargs)`` of each launch; returns the
    list it appends to."""
    launches = []

    class Launcher:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, args, kwargs))

    monkeypatch.setattr(module, kernel_name, Launcher())
    return launches


def check_launch_binding(monkeypatch, module, kernel_name: str, gemm, tokens: int) -> tuple:
    """One recorded launch of ``gemm`` (a wrapper of ``module.kernel_name``) on CPU operands with low-rank, bias,
    transposed scales and ``SPLIT_K=2``: every kernel parameter bound once, each operand and size to the parameter of
    its name. Returns the launch's (grid, {parameter: argument})."""
    kernel = getattr(module, kernel_name)
    launches = record_launches(monkeypatch, module, kernel_name)
    a = torch.zeros(tokens, 128, dtype=torch.bfloat16)
    qw = torch.zeros(64, 64, dtype=torch.uint8)
    ws = torch.ones(2, 64, dtype=torch.bfloat16).t()
    lxp, up, bias = torch.zeros(2, tokens, 8), torch.zeros(64, 8, dtype=torch.bfloat16), torch.zeros(64)
    gemm(a, qw, ws, lxp, up, bias, torch.bfloat16, config=dict(SPLIT_K=2))
    (grid, args, kwargs), = launches
    names = list(kernel.arg_names)
    bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    assert len(args) + len(set(kwargs) & set(names)) == len(names) and sorted(bound) == sorted(names)
    assert bound["X"] is a and bound["WS"] is ws and bound["LXP"] is lxp and bound["LU"] is up and bound["BIAS"] is bias
    assert bound["W"].dtype == torch.int32 and bound["W"].data_ptr() == qw.data_ptr()
    assert (bound["M"], bound["N"], bound["K"], bound["GROUPS_PER_SPLIT"], bound["S"], bound["R"]) == \
        (tokens, 64, 128, 1, 2, 8)
    assert (bound["stride_xm"], bound["stride_wsn"], bound["stride_wsg"]) == (128, 1, 64)
    assert bound["HAS_LR"] and bound["HAS_BIAS"] and not bound["GELU"] and bound["SPLIT_K"] == 2
    return grid, bound


def check_operand_errors(gemm, max_tokens: int) -> None:
    """``gemm(a, qweight, wscales, lxp, lora_up, bias, out_dtype)`` raises a specific ValueError, before any launch,
    for too many tokens, scales of the wrong shape or dtype, codes not covering K, and float32 activations."""
    qw = torch.zeros(64, 64, dtype=torch.uint8)
    ws = torch.ones(64, 2, dtype=torch.bfloat16)
    a = torch.zeros(4, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=f"M <= {max_tokens}"):
        gemm(torch.zeros(max_tokens + 1, 128, dtype=torch.bfloat16), qw, ws, None, None, None, torch.bfloat16)
    with pytest.raises(ValueError, match="wscales"):
        gemm(a, qw, ws[:, :1], None, None, None, torch.bfloat16)
    with pytest.raises(ValueError, match="wscales must be float16/bfloat16"):
        gemm(a, qw, ws.float(), None, None, None, torch.bfloat16)
    with pytest.raises(ValueError, match="qweight"):
        gemm(a, qw[:, :40].contiguous(), ws, None, None, None, torch.bfloat16)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        gemm(a.float(), qw, ws, None, None, None, torch.bfloat16)


def check_against_reference(gemm, M: int, N: int, K: int, r: int, config: dict | None, dtype: torch.dtype,
                            gelu: bool, tolerance: float) -> None:
    """``gemm`` on :func:`w4a16_operands` (``config`` may add ``scales``: "transposed" = stride 1 between rows,
    "float16" = float16 scales) within ``tolerance`` (relative) of ``w4_gemv_ref`` (exact float32 weights; tanh GELU
    after it); a second call gives the same result (the split-K workspace and counters reset)."""
    config = dict(config or {})
    scales = config.pop("scales", None)
    a, qw, ws, lxp, up, bias = w4a16_operands(M, N, K, r, dtype)
    if scales == "transposed":
        ws = ws.t().contiguous().t()
    elif scales == "float16":
        ws = ws.to(torch.float16)
    y = gemm(a, qw, ws, lxp, up, bias, dtype, gelu=gelu, config=config)
    y_ref = ref.w4_gemv_ref(a, qw, ws, lxp.sum(0) if r else None, up, bias, dtype)
    if gelu:
        y_ref = F.gelu(y_ref.float(), approximate="tanh").to(dtype)
    assert y.shape == (M, N) and torch.isfinite(y).all()
    assert relative_error(y, y_ref) < tolerance
    again = gemm(a, qw, ws, lxp, up, bias, dtype, gelu=gelu, config=config)
    assert torch.equal(again, y) or relative_error(again, y_ref) < tolerance
