"""ActivationRecorder: exact per-channel statistics, a uniform row sample bounded by max_rows whatever the call
boundaries, and (on a GPU) no host synchronisation per recorded call."""
import pytest
import torch
from torch import nn

from quantduo.svdquant.calibration import ActivationRecorder


def _record(rows_per_call: list[torch.Tensor], max_rows: int, seed: int = 0, device: str = "cpu"):
    layer = nn.Linear(rows_per_call[0].shape[-1], 3).to(device=device, dtype=rows_per_call[0].dtype)
    recorder = ActivationRecorder({"layer": layer}, max_rows=max_rows, seed=seed)
    with torch.no_grad(), recorder:
        for rows in rows_per_call:
            layer(rows.to(device))
    return recorder.stats["layer"]


def _row_ids(sample: torch.Tensor, all_rows: torch.Tensor) -> list[int]:
    """Index of each sampled row in ``all_rows`` (the rows are distinct by construction)."""
    matches = (sample[:, None, :] == all_rows[None, :, :].float()).all(-1)
    assert bool((matches.sum(1) == 1).all()), "a sampled row is not one of the inputs"
    return sorted(matches.int().argmax(1).tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_statistics_are_exact_and_the_sample_is_input_rows(dtype):
    g = torch.Generator().manual_seed(1)
    calls = [torch.randn(n, 16, generator=g).to(dtype) * (1 + torch.arange(16)) for n in (7, 30, 1, 12)]
    every = torch.cat(calls)
    st = _record(calls, max_rows=20)
    assert torch.equal(st.absmax, every.abs().amax(0).float())
    assert torch.equal(st.minimum, every.amin(0).float())
    assert st.rows.dtype == torch.float32 and st.rows.shape == (20, 16) and st.seen_rows == 50
    assert len(set(_row_ids(st.rows, every))) == 20
    small = _record(calls[:2], max_rows=100)  # fewer rows than max_rows: all of them, in call order
    assert torch.equal(small.rows, torch.cat(calls[:2]).float())


def test_the_sample_does_not_depend_on_call_boundaries():
    """One priority per row, drawn in row order: the same rows survive whether they arrive in one call or in many."""
    every = torch.randn(90, 8, generator=torch.Generator().manual_seed(2))
    one_call = _row_ids(_record([every], max_rows=25, seed=5).rows, every)
    many_calls = _row_ids(_record(list(every.split([4, 40, 1, 20, 25])), max_rows=25, seed=5).rows, every)
    assert one_call == many_calls
    assert _row_ids(_record([every], max_rows=25, seed=6).rows, every) != one_call  # the seed matters


def test_a_layers_sample_does_not_depend_on_the_other_layers():
    """Each layer draws its priorities from its own generator: recording a second layer (called in between, on other
    rows) leaves the first one's sample as it was; two layers on the same rows keep different samples."""
    every = torch.randn(90, 8, generator=torch.Generator().manual_seed(4))
    first, second, twin = nn.Linear(8, 3), nn.Linear(8, 3), nn.Linear(8, 3)
    alone = ActivationRecorder({"first": first}, max_rows=25, seed=5)
    both = ActivationRecorder({"first": first, "second": second, "twin": twin}, max_rows=25, seed=5)
    for recorder in (alone, both):
        with torch.no_grad(), recorder:
            for rows in every.split(30):
                first(rows)
                second(torch.randn(7, 8))
                twin(rows)
    assert torch.equal(alone.stats["first"].rows, both.stats["first"].rows)
    assert _row_ids(both.stats["twin"].rows, every) != _row_ids(both.stats["first"].rows, every)


def test_the_sample_is_uniform_over_rows():
    """Over 300 seeds every one of 40 rows (in 4 calls) is kept with frequency close to max_rows / rows = 1/4."""
    every = torch.randn(40, 4, generator=torch.Generator().manual_seed(3))
    counts = torch.zeros(40)
    for seed in range(300):
        counts[_row_ids(_record(list(every.split(10)), max_rows=10, seed=seed).rows, every)] += 1
    frequency = counts / 300
    assert float((frequency - 0.25).abs().max()) < 0.12  # binomial(300, 1/4): sd 0.025, 40 rows
    assert float(frequency[:10].mean()) == pytest.approx(0.25, abs=0.04)  # early calls not favoured
    assert float(frequency[30:].mean()) == pytest.approx(0.25, abs=0.04)  # nor late ones


@pytest.mark.gpu
def test_gpu_recording_never_synchronises_with_the_host():
    """Calls recorded on the GPU queue their statistics without a device-to-host round trip (a synchronising op
    raises under ``set_sync_debug_mode("error")``); the statistics equal the CPU recorder's."""
    g = torch.Generator().manual_seed(4)
    calls = [torch.randn(300, 64, generator=g).bfloat16() for _ in range(5)]
    layer = nn.Linear(64, 3).cuda().bfloat16()
    recorder = ActivationRecorder({"layer": layer}, max_rows=128)
    on_gpu = [c.cuda() for c in calls]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            recorder.__enter__()
            for rows in on_gpu:
                layer(rows)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    recorder.__exit__(None, None, None)
    st, cpu = recorder.stats["layer"], _record(calls, max_rows=128)
    assert torch.equal(st.absmax.cpu(), cpu.absmax) and torch.equal(st.minimum.cpu(), cpu.minimum)
    assert st.rows.shape == (128, 64) and len(set(_row_ids(st.rows.cpu(), torch.cat(calls)))) == 128
