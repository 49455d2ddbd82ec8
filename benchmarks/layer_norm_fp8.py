"""FLUX's adaLN + per-token fp8 quantization at the FLUX.1 shapes: the one-kernel path against what the compiler
makes of the eager chain.

    PYTHONPATH=. python3 benchmarks/layer_norm_fp8.py [--sweep] [--out DIR]

Inputs as FLUX.1 at 1024x1024 has them: 3072-wide bf16 rows, a single block's 512 text + 4096 image tokens
(normalized together, as two streams), a double block's image (4096) and text (512) streams; shift / scale views of
the modulation output ``[1, 6 x 3072]``. Times: CUDA-graph replays (``benchmarks.linear.time_on_fresh_inputs``), us
per call, and GB/s of one read of the rows and one write of the codes. Rows: :func:`quantduo.kernels.layer_norm_fp8
.layer_norm_modulate_fp8` at its default warps (with ``--sweep`` also others), and the eager chain (diffusers'
expression, the text + image concatenation for the single block, then the per-token quantization) under
``torch.compile``, which is what the unfused block runs. Each row's codes are compared with the reference
(:func:`quantduo.formats.fp8.layer_norm_modulate_fp8_ref`). The double block's streams are also timed with the
attention's residual update in front (``x + gate * r``, then ``norm2``): one pass
(:func:`quantduo.kernels.layer_norm_fp8.gated_residual_layer_norm_fp8`) against the compiled update followed by the
adaLN kernel. Writes ``layer_norm_fp8.json`` to DIR.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.linear import time_on_fresh_inputs  # noqa: E402
from quantduo.formats.fp8 import fp8_steps_apart, layer_norm_modulate_fp8_ref, quantize_fp8_per_token_ref  # noqa: E402
from quantduo.kernels import layer_norm_fp8  # noqa: E402
from quantduo.utils import atomic_write  # noqa: E402

EPS = 1e-6
SHAPES = {"single (512 + 4096)": (512, 4096), "double image (4096)": (4096, 0), "double text (512)": (512, 0)}
SWEEP = [2, 8]
UPDATE_SHAPES = {"double image update (4096)": 4096, "double text update (512)": 512}


def adaln_inputs(device: str, tokens: tuple[int, int], width: int = 3072, seed: int = 0) -> dict:
    """``x0 [1, S0, C]``, ``x1 [1, S1, C]`` or None (bf16, a per-row offset and an outlier channel), shift / scale
    ``[1, C]`` views of a ``[1, 6 C]`` modulation output."""
    g = torch.Generator().manual_seed(seed)

    def rows(s):
        x = torch.randn(1, s, width, generator=g) * 2 + torch.randn(1, s, 1, generator=g)
        x[..., 7] *= 30
        return x.to(device=device, dtype=torch.bfloat16)
    emb = (torch.randn(1, 6 * width, generator=g) * 0.5).to(device=device, dtype=torch.bfloat16)
    return dict(x0=rows(tokens[0]), x1=rows(tokens[1]) if tokens[1] else None, shift=emb[:, :width],
                scale=emb[:, width: 2 * width])


def eager_chain(inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused block: diffusers' adaLN expression, then the per-token quantization of the layers reading it."""
    x = inputs["x0"] if inputs["x1"] is None else torch.cat([inputs["x0"], inputs["x1"]], dim=1)
    y = F.layer_norm(x, x.shape[-1:], eps=EPS) * (1 + inputs["scale"][:, None]) + inputs["shift"][:, None]
    return quantize_fp8_per_token_ref(y.reshape(-1, x.shape[-1]))


def kernel_call(inputs: dict, warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return layer_norm_fp8._launch(inputs["x0"], inputs["x1"], inputs["shift"], inputs["scale"], EPS, warps=warps)


def reference(inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    x = inputs["x0"] if inputs["x1"] is None else torch.cat([inputs["x0"], inputs["x1"]], dim=1)
    return layer_norm_modulate_fp8_ref(x, inputs["shift"], inputs["scale"], EPS)


def update_inputs(device: str, tokens: int, seed: int = 0) -> dict:
    """:func:`adaln_inputs` of one stream plus the attention output ``r [1, S, C]`` and the gate ``[1, C]`` (a view
    of the same modulation output)."""
    inputs = adaln_inputs(device, (tokens, 0), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    r = torch.randn(1, tokens, 3072, generator=g).to(device=device, dtype=torch.bfloat16)
    return inputs | dict(r=r, gate=inputs["shift"] * 0.5)


def updated_kernel_call(inputs: dict) -> tuple[torch.Tensor, ...]:
    return layer_norm_fp8.gated_residual_layer_norm_fp8(inputs["x0"], inputs["r"], inputs["gate"], inputs["shift"],
                                                        inputs["scale"], EPS)


def update_then_kernel(update: Callable) -> Callable:
    """The update by ``update`` (the compiled ``x + gate * r``), then the adaLN kernel on it."""
    def call(inputs: dict) -> tuple[torch.Tensor, ...]:
        x = update(inputs["x0"], inputs["gate"], inputs["r"])
        return (*layer_norm_fp8.layer_norm_modulate_fp8(x, inputs["shift"], inputs["scale"], EPS), x)
    return call


def time_updates() -> list[dict]:
    """The double block's update + norm2 both ways, codes against the reference of the eager update."""
    paths = {"kernel with the update": updated_kernel_call,
             "compiled update + kernel": update_then_kernel(torch.compile(lambda x, g, r: x + g[:, None] * r))}
    rows = []
    for shape, tokens in UPDATE_SHAPES.items():
        inputs = update_inputs("cuda", tokens)
        updated = inputs["x0"] + inputs["gate"][:, None] * inputs["r"]
        ref = layer_norm_modulate_fp8_ref(updated, inputs["shift"], inputs["scale"], EPS)
        nbytes = 7 * 3072 * tokens  # x, r read and u written in bf16, E4M3 codes written
        for name, path in paths.items():
            with torch.no_grad():
                out = path(inputs)
                check = dict(agreement(out[:2], ref), update_equal=bool(torch.equal(out[2], updated)))
                us = time_on_fresh_inputs(path, lambda: update_inputs("cuda", tokens, seed=1), nbytes)
            rows.append(dict(shape=shape, path=name, us=us, gb_s=nbytes / us / 1e3, **check))
            print(f"{shape}, {name}: {us:.1f} us ({nbytes / us / 1e3:.0f} GB/s), codes vs reference: max "
                  f"{check['max_steps']} steps, {check['differing']:.2e} differ; update equal to eager: "
                  f"{check['update_equal']}", flush=True)
    return rows


def agreement(got: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Largest E4M3 step difference from the reference, the share of codes that differ, the largest relative
    difference of the row scales."""
    apart = fp8_steps_apart(got[0], ref[0])
    return dict(max_steps=int(apart.max()), differing=float(apart.gt(0).float().mean()),
                scale_rel=float(((got[1] - ref[1]).abs() / ref[1]).max()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time the warps of SWEEP")
    parser.add_argument("--out", default=".", help="directory of layer_norm_fp8.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    compiled = torch.compile(eager_chain)
    paths = {"kernel (default)": lambda i: kernel_call(i)}
    if args.sweep:
        paths |= {f"kernel w{w}": lambda i, w=w: kernel_call(i, w) for w in SWEEP}
    paths["compiled eager chain"] = compiled
    rows = []
    for shape, tokens in SHAPES.items():
        inputs = adaln_inputs("cuda", tokens)
        ref = reference(inputs)
        nbytes = 3 * 3072 * sum(tokens)  # bf16 rows read, E4M3 codes written
        for name, path in paths.items():
            with torch.no_grad():
                check = agreement(path(inputs), ref)
                us = time_on_fresh_inputs(path, lambda: adaln_inputs("cuda", tokens, seed=1), nbytes)
            rows.append(dict(shape=shape, path=name, us=us, gb_s=nbytes / us / 1e3, **check))
            print(f"{shape}, {name}: {us:.1f} us ({nbytes / us / 1e3:.0f} GB/s), codes vs reference: max "
                  f"{check['max_steps']} steps, {check['differing']:.2e} differ, scales {check['scale_rel']:.1e}",
                  flush=True)
    rows += time_updates()
    atomic_write(os.path.join(args.out, "layer_norm_fp8.json"), lambda tmp: Path(tmp).write_text(json.dumps(
        dict(device=torch.cuda.get_device_name(), rows=rows), indent=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
