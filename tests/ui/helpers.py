"""What the library itself draws, to compare the UI's pictures with."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from quantduo.integrations.lora import attach_lora
from quantduo.models.tiny_dit import load_tiny_dit, sample_digits
from quantduo.svdquant import load_quantized


def library_digit(digit: int, seed: int, steps: int, execution: str, cache: Path, loras=()) -> np.ndarray:
    """uint8 grey ``[8, 8]`` (255 = white paper, 0 = full ink) drawn by quantduo without the UI.

    ``execution`` ``int4`` loads the SVDQuant checkpoint the server quantized and cached; ``loras`` is a list of
    (path, strength) attached with :func:`quantduo.integrations.lora.attach_lora`."""
    model = load_tiny_dit(dtype=torch.bfloat16)
    if execution == "int4":
        load_quantized(model.transformer, Path(cache) / "tiny_dit_svdquant_int4")
    for i, (path, strength) in enumerate(loras):
        attach_lora(model.transformer, str(path), name=f"l{i}", strength=strength)
    ink = sample_digits(model, torch.tensor([digit]), steps=steps, seed=seed)[0, 0]
    return np.round(255.0 * (1.0 - ink.numpy())).astype(np.uint8)


def model_pixels(png: str | Path | bytes, size: int = 8) -> np.ndarray:
    """Decode the UI's PNG (dark ink on white, each model pixel an s x s block) back to ``[size, size]`` grey,
    checking that every block is uniform and the three channels are equal."""
    img = Image.open(io.BytesIO(png) if isinstance(png, bytes) else png)
    rgb = np.asarray(img.convert("RGB"))
    assert rgb.shape[0] == rgb.shape[1] and rgb.shape[0] % size == 0, rgb.shape
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    s = rgb.shape[0] // size
    blocks = rgb[..., 0].reshape(size, s, size, s)
    assert (blocks == blocks[:, :1, :, :1]).all(), "blocks are not uniform"
    return blocks[:, 0, :, 0]


def write_lora(path: Path, modules: list[str], rank: int = 4, seed: int = 0, scale: float = 0.5) -> Path:
    """A random diffusers/PEFT-format LoRA for ``modules`` of the tiny DiT (128 in/out features)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for m in modules:
        state[f"transformer.{m}.lora_A.weight"] = torch.randn(rank, 128, generator=g) * scale
        state[f"transformer.{m}.lora_B.weight"] = torch.randn(128, rank, generator=g) * scale
    save_file(state, str(path))
    return path
