"""Host-side overhead of calibration capture per block call: a FLUX double block at tiny width (2 heads x 64, 64 image
+ 16 text tokens), where compute is negligible and what remains is what the recorder's hooks and the token-stream
tracker add to every call (on a GPU the kernels of a full-size block are short, so this overhead adds to wall time).

    PYTHONPATH=. python benchmarks/capture_overhead.py [--calls 200]

Prints milliseconds per block call: plain, with :class:`ActivationRecorder` (512 rows), with :class:`StreamTracker`
on every call, and both as quantize_model runs them (the tracker on the first ``TRACKED_CALLS`` calls).
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.flux import SMALL, build_model, make_inputs
from quantduo.svdquant.calibration import ActivationRecorder
from quantduo.svdquant.dataflow import StreamTracker
from quantduo.svdquant.quantize import TRACKED_CALLS


def block_call(model):
    """The first double block and the arguments of its call in one model forward."""
    block, calls = model.transformer_blocks[0], []
    handle = block.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    with torch.no_grad():
        model(**make_inputs(model, 64, 16, "cpu"))
    handle.remove()
    return block, calls[0]


def ms_per_call(block, call, n: int) -> float:
    args, kwargs = call
    start = time.perf_counter()
    for _ in range(n):
        block(*args, **kwargs)
    return (time.perf_counter() - start) / n * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    block, call = block_call(build_model(SMALL, "cpu"))
    linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    rows = {}
    with torch.no_grad():
        ms_per_call(block, call, 20)  # warm-up
        rows["plain"] = ms_per_call(block, call, args.calls)
        with ActivationRecorder(linears, 512):
            rows["recorder"] = ms_per_call(block, call, args.calls)
        with StreamTracker(block, linears):
            rows["tracker, every call"] = ms_per_call(block, call, args.calls)
        with ActivationRecorder(linears, 512), StreamTracker(block, linears, max_calls=TRACKED_CALLS):
            rows[f"recorder + tracker (first {TRACKED_CALLS} calls), as calibration runs"] = ms_per_call(
                block, call, args.calls)
    print(f"{len(linears)} linears; ms per block call over {args.calls} calls (1 thread):")
    for name, ms in rows.items():
        print(f"  {name}: {ms:.2f} (+{ms - rows['plain']:.2f})")


if __name__ == "__main__":
    main()
