"""The mixed-input fp8 GEMM (quantduo.kernels.fp8_w4_gemm) against the fp8 product written out from the documented
layout: INT4 codes packed two per byte (low nibble = even input), group scales per 64 / 128 inputs, the weight
``(q * scale + up @ down^T) / smooth`` rounded to E4M3 per output channel, per-token E4M3 activations.

On CPU the kernel runs in Triton's interpreter with its fp8 operands widened to float32; outputs are poisoned.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantduo.formats import quantizers as qz
from quantduo.formats.fp8 import fp8_channel_scale, quantize_fp8_per_token_ref, quantize_fp8_weight
from quantduo.kernels.fp8_w4_gemm import fp8_w4_gemm, pick_config
from quantduo.utils import relative_error

pytestmark = pytest.mark.usefixtures("poison_empty")  # unwritten kernel outputs show (tests/conftest.py)


def _operands(M, N, K, rank, group, smoothed, seed=0, device="cpu"):
    """Random codes and factors, and the expected float32 output written out from the format's rules."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-7, 8, (N, K), generator=g)
    scales = (torch.rand(N, K // group, generator=g) * 0.02 + 0.001).half()
    down = (torch.randn(K, rank, generator=g) * 0.1).half() if rank else None
    up = (torch.randn(N, rank, generator=g) * 0.1).half() if rank else None
    smooth = torch.rand(K, generator=g) + 0.5 if smoothed else torch.ones(K)
    bias = torch.randn(N, generator=g).half()
    x = torch.randn(M, K, generator=g) * 2
    x[:, 5] *= 30  # an outlier channel

    weight = codes.float() * scales.float().repeat_interleave(group, dim=1)
    if rank:
        weight = weight + up.float() @ down.float().T
    weight = weight / smooth[None, :]
    wscale = fp8_channel_scale(weight)
    inv_wscale = 1.0 / wscale
    xq, xs = quantize_fp8_per_token_ref(x)
    w8 = quantize_fp8_weight(weight, inv_wscale)
    expected = (xq.float() @ w8.T) * xs[:, None] * wscale[None, :] + bias.float()

    # packed by hand: byte j of a row holds input 2j in its low nibble and input 2j + 1 in its high nibble
    nibbles = codes & 15
    qweight = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).to(torch.uint8)
    args = dict(xq=xq, x_scale=xs, qweight=qweight, wscales=scales, lora_down=down, lora_up=up,
                inv_smooth=(1.0 / smooth) if smoothed else None, inv_wscale=inv_wscale, wscale=wscale, bias=bias)
    args = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    return args, expected.to(device)


@pytest.mark.parametrize("M,N,K,rank,group,smoothed,config", [
    (5, 96, 256, 32, 64, True, None),             # tokens padded to 16, N not a multiple of 64
    (20, 64, 256, 0, 64, False, None),            # no low-rank branch, no smoothing
    (40, 80, 512, 16, 128, True, None),           # group of 128 inputs
    (20, 96, 256, 32, 64, True, [16, 32, 64, 4, 4, 2]),  # 16-token tiles: 2 token tiles, split-K 4
    (33, 64, 256, 32, 64, True, [32, 64, 128, 1, 4, 2]),  # no split
])
def test_fp8_w4_gemm(M, N, K, rank, group, smoothed, config):
    """Every element of ``[M, N]`` (poisoned output) equals the written-out fp8 product up to float32 summation
    order and an occasional one-step difference of the weight's E4M3 rounding."""
    args, expected = _operands(M, N, K, rank, group, smoothed)
    y = fp8_w4_gemm(**args, out_dtype=torch.float32, group_size=group, config=config)
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert relative_error(y, expected) < 2e-3
    y16 = fp8_w4_gemm(**args, out_dtype=torch.float16, group_size=group, config=config)
    assert y16.dtype == torch.float16 and relative_error(y16.float(), expected) < 3e-3


@settings(max_examples=12, deadline=None)
@given(M=st.integers(1, 70), n_tiles=st.integers(1, 3), n_rest=st.integers(0, 63), k_steps=st.sampled_from([1, 2, 4]),
       rank=st.sampled_from([0, 8, 32]), split=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**16))
def test_fp8_w4_gemm_any_shape(M, n_tiles, n_rest, k_steps, rank, split, seed):
    """Random token counts, output widths (partial 64-row tiles), depths, ranks and K splits (where they divide K):
    the written-out product, every element written."""
    N, K = 64 * (n_tiles - 1) + max(n_rest, 1), 64 * k_steps
    split = min(split, k_steps)
    args, expected = _operands(M, N, K, rank, 64, smoothed=seed % 2 == 0, seed=seed)
    config = [16 if M <= 16 else 32, 64, 64, split, 4, 2]
    y = fp8_w4_gemm(**args, out_dtype=torch.float32, group_size=64, config=config)
    assert torch.isfinite(y).all()
    assert relative_error(y, expected) < 2e-3


def test_fp8_w4_gemm_split_k_repeatable():
    """The split-K workspace and counters are left zero: repeated calls, and a call with other sizes between, give
    the same result."""
    args, expected = _operands(20, 96, 512, 32, 64, True)
    cfg = [16, 32, 64, 8, 4, 2]
    first = fp8_w4_gemm(**args, out_dtype=torch.float32, group_size=64, config=cfg)
    other, _ = _operands(7, 64, 256, 0, 64, False, seed=1)
    fp8_w4_gemm(**other, out_dtype=torch.float32, group_size=64, config=[16, 64, 64, 4, 4, 2])
    again = fp8_w4_gemm(**args, out_dtype=torch.float32, group_size=64, config=cfg)
    torch.testing.assert_close(again, first, rtol=1e-6, atol=1e-6)
    assert relative_error(first, expected) < 2e-3


def test_fp8_w4_gemm_detects_wrong_layout():
    """The comparison can fail: the same codes with the nibbles of each byte swapped (a wrong packing order) or the
    group scales of the two halves of K exchanged are far from the expected output."""
    args, expected = _operands(9, 64, 256, 16, 64, True)
    swapped = dict(args, qweight=(args["qweight"] >> 4) | (args["qweight"] << 4))
    assert relative_error(fp8_w4_gemm(**swapped, out_dtype=torch.float32, group_size=64), expected) > 0.1
    scales = args["wscales"]
    rolled = dict(args, wscales=torch.cat([scales[:, 2:], scales[:, :2]], dim=1))
    assert relative_error(fp8_w4_gemm(**rolled, out_dtype=torch.float32, group_size=64), expected) > 0.1


def test_fp8_w4_gemm_zero_tokens_and_bad_inputs():
    args, _ = _operands(4, 64, 256, 16, 64, True)
    empty = dict(args, xq=args["xq"][:0], x_scale=args["x_scale"][:0])
    assert fp8_w4_gemm(**empty, out_dtype=torch.float16, group_size=64).shape == (0, 64)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_w4_gemm(**dict(args, xq=args["xq"].float()), out_dtype=torch.float16, group_size=64)
    with pytest.raises(ValueError, match="xq must be"):  # K of the activations is not K of the weight
        fp8_w4_gemm(**dict(args, xq=args["xq"][:, :128].contiguous()), out_dtype=torch.float16, group_size=64)
    with pytest.raises(ValueError, match="contiguous uint8"):
        fp8_w4_gemm(**dict(args, qweight=args["qweight"].t().contiguous().t()), out_dtype=torch.float16,
                    group_size=64)
    with pytest.raises(ValueError, match="wscales"):
        fp8_w4_gemm(**dict(args, wscales=args["wscales"][:, 1:]), out_dtype=torch.float16, group_size=64)
    with pytest.raises(ValueError, match="come together"):
        fp8_w4_gemm(**dict(args, lora_up=None), out_dtype=torch.float16, group_size=64)
    with pytest.raises(ValueError, match="inv_wscale"):
        fp8_w4_gemm(**dict(args, inv_wscale=args["inv_wscale"].half()), out_dtype=torch.float16, group_size=64)
    with pytest.raises(ValueError, match="BK"):
        fp8_w4_gemm(**args, out_dtype=torch.float16, group_size=64, config=[16, 64, 96, 1, 4, 2])


def test_pick_config():
    """Token tiles of 16..128, BK a multiple of the group dividing K, and splits that fill an H100 only as far as K
    allows."""
    c = pick_config(64, 3072, 3072, 64)  # 48 tiles of 64-deep steps: split 8 (384 >= 384 programs)
    assert (c["BM"], c["BN"], c["BK"], c["SPLIT_K"]) == (64, 64, 64, 8)
    assert pick_config(64, 3072, 12288, 64)["SPLIT_K"] == 8 and pick_config(64, 12288, 3072, 64)["SPLIT_K"] == 2
    assert pick_config(64, 9216, 3072, 64)["SPLIT_K"] == 4  # 144 tiles: 288 programs < 384
    assert pick_config(64, 3072, 3072, 128)["BK"] == 128  # never less than a group
    assert pick_config(16, 64, 3072, 64)["BM"] == 16 and pick_config(300, 3072, 3072, 64)["BM"] == 128
    c = pick_config(32, 3072, 3072, 64)  # 48 tiles of 128-deep steps: split 8 (384 >= 256 programs)
    assert (c["BM"], c["BK"], c["SPLIT_K"]) == (32, 128, 8)
    c = pick_config(16, 64, 192, 64)
    assert c["BK"] == 64 and c["SPLIT_K"] == 1  # 3 steps of 64: no power-of-two split


@pytest.mark.gpu
@pytest.mark.parametrize("M", [16, 64, 200])
@pytest.mark.parametrize("N,K", [(3072, 3072), (12288, 3072), (3072, 12288)])
def test_gpu_fp8_w4_gemm(M, N, K):
    """On the GPU (native fp8 tensor cores) at FLUX shapes: the written-out product to fp8-accumulation accuracy,
    and repeatable across calls (split-K workspace)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    args, expected = _operands(M, N, K, 32, 64, True, device="cuda")
    y = fp8_w4_gemm(**args, out_dtype=torch.bfloat16, group_size=64)
    assert relative_error(y.float(), expected) < 8e-3
    for _ in range(5):  # float32 atomics: the order of the slices' sums may differ, not the result beyond it
        assert relative_error(fp8_w4_gemm(**args, out_dtype=torch.bfloat16, group_size=64).float(), y.float()) < 1e-3
