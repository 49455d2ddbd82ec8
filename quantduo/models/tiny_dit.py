"""Tiny class-conditional flow-matching DiT built from the real ``diffusers.FluxTransformer2DModel``.

The model draws 8x8 grey-scale digits in the style of scikit-learn's bundled ``load_digits`` data set. It is
small enough (about 1.8 M parameters, a few MB of fp16 safetensors) to be trained on a CPU in minutes by
``scripts/train_tiny_dit.py`` and to sample a grid of digits in well under a second, yet it uses the genuine
FLUX block structure (double-stream ``FluxTransformerBlock`` + single-stream ``FluxSingleTransformerBlock``,
AdaLN modulation, RoPE over ``img_ids``/``txt_ids``, 2x2 patch packing), so the SVDQuant FLUX integration can be
exercised on it end to end.

Every ``nn.Linear`` inside the transformer blocks has ``in_features`` a multiple of 64 (inner dim 128, MLP dim 512,
single-block ``proj_out`` input 640), as needed by the 4-bit quantizer's 64-channel groups.

A second model of the same class, ``name="shapes"``, draws 12x12 shapes of the procedural data set of
:mod:`quantduo.models.shapes` (6 classes; 2 double + 1 single block, inner dim 64, about 0.4 M parameters, under
1 MB of fp16 safetensors); it checks SVDQuant's quality on a second trained model (benchmarks/calibration_quality.py).
Both load with :func:`load_tiny_dit` and sample with :func:`sample_digits`.

Conventions (rectified flow):
    x_t = (1 - t) * x0 + t * noise,  t in [0, 1],  t = 1 is pure noise,
    the network predicts the velocity v = noise - x0, and sampling integrates dx/dt = v from t = 1 to t = 0
    with Euler steps. Images are scaled to [-1, 1] inside the model space; public APIs use [0, 1].
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

__all__ = [
    "ASSET_DIR",
    "ASSET_DIRS",
    "CONFIGS",
    "DEFAULT_CONFIG",
    "SHAPES_CONFIG",
    "DigitFlux",
    "build_tiny_dit",
    "load_tiny_dit",
    "sample_digits",
    "save_grid_png",
]

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_dit"

# Full model configuration. ``transformer`` holds the kwargs of ``FluxTransformer2DModel``.
DEFAULT_CONFIG: dict[str, Any] = {
    "image_size": 8,  # H = W = 8 (native resolution of sklearn digits)
    "patch_size": 2,  # 2x2 patches packed into the channel dim, as FLUX packs latents
    "image_channels": 1,
    "num_classes": 10,  # class index 10 is the "null" (unconditional) class used for CFG
    "num_text_tokens": 4,  # tokens of encoder_hidden_states produced by the class embedding
    "default_guidance": 2.0,
    "default_steps": 25,
    "transformer": {
        "patch_size": 1,
        "in_channels": 4,  # image_channels * patch_size**2
        "out_channels": 4,
        "num_layers": 2,  # double-stream blocks
        "num_single_layers": 2,  # single-stream blocks
        "attention_head_dim": 64,
        "num_attention_heads": 2,  # inner_dim = 128
        "joint_attention_dim": 64,
        "pooled_projection_dim": 64,
        "guidance_embeds": False,
        "axes_dims_rope": [8, 28, 28],  # sums to attention_head_dim
    },
}

# The shapes model: 12x12 images (36 image tokens), 6 classes, inner dim 64 (2 heads x 32), MLP dim 256.
SHAPES_CONFIG: dict[str, Any] = {
    **DEFAULT_CONFIG,
    "image_size": 12,
    "num_classes": 6,
    "transformer": {
        **DEFAULT_CONFIG["transformer"],
        "num_layers": 2,
        "num_single_layers": 1,
        "attention_head_dim": 32,
        "num_attention_heads": 2,  # inner_dim = 64
        "axes_dims_rope": [4, 14, 14],
    },
}

CONFIGS: dict[str, dict[str, Any]] = {"digits": DEFAULT_CONFIG, "shapes": SHAPES_CONFIG}
ASSET_DIRS: dict[str, Path] = {"digits": ASSET_DIR, "shapes": ASSET_DIR.parent / "tiny_dit_shapes"}


class DigitFlux(nn.Module):
    """FLUX transformer + learned class embedding, predicting rectified-flow velocities for small images
    (8x8 digits with :data:`DEFAULT_CONFIG`, 12x12 shapes with :data:`SHAPES_CONFIG`).

    Attributes:
        transformer: the ``diffusers.FluxTransformer2DModel`` (the part that gets quantized).
        class_tokens: ``nn.Embedding(num_classes + 1, num_text_tokens * joint_attention_dim)`` producing
            ``encoder_hidden_states``; the last row is the null class.
        class_pooled: ``nn.Embedding(num_classes + 1, pooled_projection_dim)`` producing ``pooled_projections``.
        img_ids / txt_ids: non-persistent buffers, float ``[N_img, 3]`` / ``[N_txt, 3]`` RoPE position ids.
    """

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__()
        from diffusers import FluxTransformer2DModel

        self.config = json.loads(json.dumps(config or DEFAULT_CONFIG))  # deep copy, JSON-serialisable
        c = self.config
        tc = dict(c["transformer"])
        tc["axes_dims_rope"] = tuple(tc["axes_dims_rope"])
        self.image_size = int(c["image_size"])
        self.patch_size = int(c["patch_size"])
        self.image_channels = int(c["image_channels"])
        self.num_classes = int(c["num_classes"])
        self.null_class = self.num_classes
        self.num_text_tokens = int(c["num_text_tokens"])
        self.joint_dim = int(tc["joint_attention_dim"])
        assert tc["in_channels"] == self.image_channels * self.patch_size**2

        self.transformer = FluxTransformer2DModel(**tc)
        self.class_tokens = nn.Embedding(self.num_classes + 1, self.num_text_tokens * self.joint_dim)
        self.class_pooled = nn.Embedding(self.num_classes + 1, int(tc["pooled_projection_dim"]))
        nn.init.normal_(self.class_tokens.weight, std=0.5)
        nn.init.normal_(self.class_pooled.weight, std=0.5)

        g = self.image_size // self.patch_size
        rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(g * g, 3).float()
        self.register_buffer("img_ids", img_ids, persistent=False)
        self.register_buffer("txt_ids", torch.zeros(self.num_text_tokens, 3), persistent=False)

    # ---- packing -------------------------------------------------------------------------------------------
    def pack(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, (H/p)*(W/p), C*p*p]`` (FLUX-style 2x2 patch packing)."""
        b, c, h, w = images.shape
        p = self.patch_size
        x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`pack`: ``[B, N, C*p*p]`` -> ``[B, C, H, W]``."""
        b = tokens.shape[0]
        p, c, g = self.patch_size, self.image_channels, self.image_size // self.patch_size
        x = tokens.reshape(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, g * p, g * p)

    # ---- conditioning --------------------------------------------------------------------------------------
    def encode_labels(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``labels`` long ``[B]`` (0..num_classes-1, or ``num_classes`` for null) ->
        (``encoder_hidden_states`` ``[B, num_text_tokens, joint_attention_dim]``,
        ``pooled_projections`` ``[B, pooled_projection_dim]``)."""
        ehs = self.class_tokens(labels).view(labels.shape[0], self.num_text_tokens, self.joint_dim)
        return ehs, self.class_pooled(labels)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Predict the velocity.

        Args:
            x_t: noisy images ``[B, 1, S, S]`` (``S = image_size``) in model space (data in [-1, 1]), model dtype.
            t: float ``[B]`` noise levels in [0, 1] (1 = pure noise).
            labels: long ``[B]`` class ids (``num_classes`` = unconditional).
        Returns:
            velocity ``[B, 1, S, S]`` (same dtype as ``x_t``).
        """
        dtype = x_t.dtype
        ehs, pooled = self.encode_labels(labels)
        out = self.transformer(
            hidden_states=self.pack(x_t),
            encoder_hidden_states=ehs.to(dtype),
            pooled_projections=pooled.to(dtype),
            timestep=t.to(dtype),
            img_ids=self.img_ids.to(dtype),
            txt_ids=self.txt_ids.to(dtype),
            return_dict=False,
        )[0]
        return self.unpack(out)


def build_tiny_dit(config: dict[str, Any] | None = None) -> DigitFlux:
    """Freshly initialised :class:`DigitFlux` (fp32, CPU)."""
    return DigitFlux(config)


def load_tiny_dit(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    path: str | Path | None = None,
    name: str = "digits",
) -> DigitFlux:
    """Load shipped weights: ``quantduo/assets/tiny_dit/`` (``name="digits"``) or ``tiny_dit_shapes/``
    (``name="shapes"``), each holding ``config.json`` and ``model.safetensors``; ``path`` overrides the folder.

    Returns an eval-mode :class:`DigitFlux` on ``device`` with parameters in ``dtype``.
    """
    d = Path(path) if path is not None else ASSET_DIRS[name]
    config = json.loads((d / "config.json").read_text())
    model = DigitFlux(config["model"] if "model" in config else config)
    state = load_file(str(d / "model.safetensors"))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def sample_digits(
    model: DigitFlux,
    labels: torch.Tensor,
    steps: int = 25,
    seed: int = 0,
    guidance: float = 2.0,
) -> torch.Tensor:
    """Draw images (digits, or shapes with the shapes model) with an Euler rectified-flow sampler and
    classifier-free guidance.

    Args:
        model: a :class:`DigitFlux` (any device/dtype; its ``.transformer`` may be quantized).
        labels: long ``[B]`` classes in ``0..model.num_classes-1``.
        steps: number of Euler steps (uniform in t from 1 to 0).
        seed: seed of the initial noise (drawn on CPU in fp32, so it is identical across devices/dtypes).
        guidance: CFG scale; 1.0 disables guidance (one forward per step), >1 uses
            ``v = v_uncond + guidance * (v_cond - v_uncond)``.
    Returns:
        float32 CPU tensor ``[B, 1, S, S]`` with values in [0, 1] (1 = ink, like ``load_digits().images / 16``).
    """
    p = next(model.parameters())
    device, dtype = p.device, p.dtype
    labels = labels.to(device=device, dtype=torch.long)
    b = labels.shape[0]
    s, c = model.image_size, model.image_channels
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn(b, c, s, s, generator=gen, dtype=torch.float32).to(device)
    use_cfg = guidance != 1.0
    if use_cfg:
        lab2 = torch.cat([labels, torch.full_like(labels, model.null_class)])
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32)
    for i in range(steps):
        t, t_next = float(ts[i]), float(ts[i + 1])
        if use_cfg:
            v2 = model(torch.cat([x, x]).to(dtype), torch.full((2 * b,), t, device=device), lab2).float()
            v_c, v_u = v2[:b], v2[b:]
            v = v_u + guidance * (v_c - v_u)
        else:
            v = model(x.to(dtype), torch.full((b,), t, device=device), labels).float()
        x = x + (t_next - t) * v
    return ((x.clamp(-1, 1) + 1) / 2).cpu()


def save_grid_png(
    images: torch.Tensor,
    path: str | Path,
    nrow: int = 10,
    scale: int = 8,
    titles: list[str] | None = None,
) -> Path:
    """Save ``images`` (``[B, 1, H, W]`` float in [0, 1], 1 = ink) as a PNG grid (dark ink on white),
    each image upscaled ``scale`` x with nearest neighbour. ``titles`` (optional, one per image) are drawn above
    each cell with matplotlib. Returns the path."""
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imgs = images.detach().float().cpu().clamp(0, 1).numpy()[:, 0]
    b, h, w = imgs.shape
    ncol = min(nrow, b)
    nr = (b + ncol - 1) // ncol
    if titles is None:
        from PIL import Image

        pad = 2
        canvas = np.ones((nr * (h * scale + pad) + pad, ncol * (w * scale + pad) + pad), dtype=np.float32)
        for i, im in enumerate(imgs):
            r, cidx = divmod(i, ncol)
            big = np.kron(1.0 - im, np.ones((scale, scale), dtype=np.float32))
            y0, x0 = pad + r * (h * scale + pad), pad + cidx * (w * scale + pad)
            canvas[y0 : y0 + h * scale, x0 : x0 + w * scale] = big
        Image.fromarray((canvas * 255).round().astype(np.uint8), mode="L").save(path)
        return path
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nr, ncol, figsize=(ncol * 0.9, nr * 1.05), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < b:
            ax.imshow(imgs[i], cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(titles[i], fontsize=7)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
