"""The batched smoothing search (candidates solved together, one batched randomized SVD per batch) matches solving
them one at a time."""
import torch

from quantduo.svdquant import SVDQuantConfig, solve_group


def test_batched_search_matches_one_by_one(single_thread):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 256, generator=g) * torch.where(torch.rand(256, generator=g) < 0.03, 20.0, 1.0)
    w = torch.randn(384, 256, generator=g) / 16
    solutions = {}
    for batch_bytes in (1, 1 << 30):  # one candidate per batch / all 39 in one batch
        cfg = SVDQuantConfig(rank=16, lowrank_iters=4, dtype="float32", search_batch_bytes=batch_bytes)
        solutions[batch_bytes] = solve_group(w, x, x.abs().amax(0), cfg, act_format="int4", rank=16, smooth=True)
    one, batched = solutions[1], solutions[1 << 30]
    assert batched.smooth_ab != (0.0, 0.0)  # the outlier channels make smoothing worth it
    assert abs(batched.rel_error - one.rel_error) < 0.02 * one.rel_error, (batched.rel_error, one.rel_error)
