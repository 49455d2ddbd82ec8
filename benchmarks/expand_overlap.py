"""Probe: does the INT4 -> fp8 weight expansion hide behind the DiT's attention on a second stream?

The fp8 execution expands each INT4 layer into an fp8 buffer right before its GEMM (~8.5 ms of a ~95 ms FLUX step).
A FLUX block's post-attention layers (``to_out``, the MLPs) and the next block's QKV do not depend on the attention
output's values, so their expansions could run on a side stream while the attention kernel runs. This probe times,
in one CUDA graph per case at the FLUX shape ``[1, 24, 4608, 128]``:

* the attention alone (cuDNN bf16 SDPA; FlashAttention-3 fp8 on codes where ``flash_attn_3`` imports),
* the expansions of one double block's (or single block's) layers alone (the Triton kernel that compiled models run),
* both, the expansions forked onto a second stream and joined after the attention.

``hidden = 1 - (both - attention) / expansions``: the share of the expansions' time the overlap hides (1: all of it,
0: none, < 0: the two slow each other down). Median us per graph replay over ``--reps`` replays.

    PYTHONPATH=. python3 benchmarks/expand_overlap.py [--reps 30] [--out DIR]

Writes ``expand_overlap.json`` to DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import linear as L  # noqa: E402  (benchmarks/linear.py: random layers)
from expand_w4 import triton_expansion  # noqa: E402

from quantduo.kernels.attention_fa3 import FA3_AVAILABLE, fa3_attention_on_codes, fa3_operands  # noqa: E402
from quantduo.utils import atomic_write  # noqa: E402

HEADS, TOKENS, HEAD_DIM = 24, 4608, 128
# (N, K) of the layers whose expansions could run beside one block's attention
BLOCK_LAYERS = {
    # double block: image and text streams' to_out, MLP up / down, and the next block's fused QKV
    "double": [(3072, 3072), (12288, 3072), (3072, 12288), (9216, 3072)] * 2,
    # single block: proj_out (attention + MLP halves) and the next block's fused QKV + MLP up-projection
    "single": [(3072, 15360), (21504, 3072)],
}


def graph_us(call: Callable[[], None], reps: int) -> float:
    """Median us of one CUDA-graph replay of ``call`` (which may fork its own streams)."""
    return L.time_graph(lambda: call, L.L2_DEFEAT_BYTES, reps=reps)


def beside(main: Callable[[], None], side: Callable[[], None]) -> Callable[[], None]:
    """``main`` on the current stream with ``side`` forked onto a second stream and joined after both."""
    side_stream = torch.cuda.Stream()

    def call():
        side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side_stream):
            side()
        main()
        torch.cuda.current_stream().wait_stream(side_stream)
    return call


def attention_kernels() -> dict[str, Callable[[], None]]:
    """The attention calls at the FLUX shape: name -> call on fixed random inputs."""
    q, k, v = (torch.randn(1, TOKENS, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    kernels = {"cudnn bf16": lambda: F.scaled_dot_product_attention(q, k, v)}
    if FA3_AVAILABLE:
        operands = fa3_operands(q, k, v)
        kernels["fa3 fp8 on codes"] = lambda: fa3_attention_on_codes(operands, HEAD_DIM ** -0.5)
    return kernels


def expansions(shapes: list[tuple[int, int]]) -> Callable[[], None]:
    """One call expanding a fresh random fp8-execution layer of each ``(N, K)`` (the Triton kernel)."""
    layers = [L.random_module(n, k, execution="fp8") for n, k in shapes]

    def call():
        for layer in layers:
            triton_expansion(layer)
    return call


def measure(reps: int) -> list[dict]:
    rows = []
    for block, shapes in BLOCK_LAYERS.items():
        expand = expansions(shapes)
        expand_us = graph_us(expand, reps)
        for name, attention in attention_kernels().items():
            attention_us = graph_us(attention, reps)
            both_us = graph_us(beside(attention, expand), reps)
            rows.append(dict(block=block, attention=name, attention_us=attention_us, expansions_us=expand_us,
                             serial_us=attention_us + expand_us, both_us=both_us,
                             hidden=1 - (both_us - attention_us) / expand_us))
            print(f"| {block} | {name} | {attention_us:.1f} | {expand_us:.1f} | {both_us:.1f} | "
                  f"{rows[-1]['hidden']:.2f} |", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30, help="timed graph replays per case")
    parser.add_argument("--out", default=".", help="directory of expand_overlap.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    print("| block | attention | attention us | expansions us | both, two streams us | hidden |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = measure(args.reps)
    atomic_write(os.path.join(args.out, "expand_overlap.json"),
                 lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
