"""Identification attention (gate * full + (1 - gate) * streaming) against dense masks written from the documented
rules: token-level sink + recent window, the reference's 128-token-style blocks, a sliding window, GQA; values and
gradients."""
import pytest
import torch

from quantduo.duo import attention as A

T, D = 70, 8


def _allowed(sink: int, recent: int, block: int | None, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(full, streaming) bool [T, T] written out from the rules, position by position."""
    full = torch.zeros(T, T, dtype=torch.bool)
    stream = torch.zeros(T, T, dtype=torch.bool)
    for p in range(T):
        for kp in range(p + 1):
            if window is not None and p - kp >= window:
                continue
            full[p, kp] = True
            if block is None:
                stream[p, kp] = kp < sink or p - kp < recent
            else:
                n_sink, n_recent = -(-sink // block), -(-recent // block)
                stream[p, kp] = kp // block < n_sink or p // block - kp // block < n_recent
    return full, stream


def _dense(q, k, v, gate, scaling, full_mask, stream_mask):
    rep = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ kk.transpose(-1, -2) * scaling
    p_full = scores.masked_fill(~full_mask, float("-inf")).softmax(-1)
    p_stream = scores.masked_fill(~stream_mask, float("-inf")).softmax(-1)
    g = gate.repeat_interleave(rep)[None, :, None, None]
    return (g * p_full + (1 - g) * p_stream) @ vv


@pytest.mark.parametrize("sink, recent, block, window, chunk", [
    (4, 9, None, None, 16), (0, 5, None, None, 7), (4, 9, None, 30, 16), (5, 20, 8, None, 16), (8, 8, 8, 40, 13)])
def test_gated_attention_matches_dense_rules_with_gradients(sink, recent, block, window, chunk):
    torch.manual_seed(0)
    q = torch.randn(2, 6, T, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, T, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, T, D, dtype=torch.float64, requires_grad=True)
    gate = torch.tensor([0.9, 0.3, 0.0], dtype=torch.float64, requires_grad=True)
    full_mask, stream_mask = _allowed(sink, recent, block, window)
    out = A.gated_attention(q, k, v, gate, sink, recent, D ** -0.5, chunk=chunk, block=block, window=window)
    ref = _dense(q, k, v, gate, D ** -0.5, full_mask, stream_mask)
    torch.testing.assert_close(out, ref)
    weights = torch.randn_like(ref)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v, gate))
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v, gate))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_soft_capped_path_agrees_when_the_cap_is_far():
    """The soft-capped (explicit scores) path and the SDPA path compute the same rule."""
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, T, D), torch.randn(1, 2, T, D), torch.randn(1, 2, T, D)
    gate = torch.tensor([0.25, 0.75])
    sdpa = A.gated_attention(q, k, v, gate, 4, 9, D ** -0.5, chunk=16, block=8, window=50)
    capped = A.gated_attention(q, k, v, gate, 4, 9, D ** -0.5, chunk=16, block=8, window=50, softcap=1e6)
    torch.testing.assert_close(sdpa, capped, atol=1e-5, rtol=1e-5)
