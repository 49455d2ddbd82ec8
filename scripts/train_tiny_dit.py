#!/usr/bin/env python
"""Train a tiny class-conditional flow-matching FLUX DiT on CPU in minutes: on scikit-learn's bundled digits
(``--dataset digits``, default) or on the procedural shapes of ``quantduo.models.shapes`` (``--dataset shapes``).

Reproducible: everything is seeded (torch, data order, noise, t, label dropout). Writes ``config.json`` and
``model.safetensors`` (EMA weights, fp16) atomically to ``quantduo/assets/tiny_dit/`` (digits) or
``quantduo/assets/tiny_dit_shapes/`` (shapes). Each data set has its own model config (``CONFIGS``), seed and
number of steps (``RECIPES``); after training, the generated images are checked by a digits SVM classifier or by the
shapes' nearest-class-mean rule.

Cost: 2000 steps of batch 64 on ONE torch thread (default ``--threads 1``: bitwise-reproducible, and immune to
OpenMP oversubscription on shared cores, which made 2-thread runs 5-8x slower here): ~0.2 s/step on an idle core
(~7 min); the shipped weights took 775 s on a 2-core machine shared with other jobs. Training is deterministic
(two short runs gave byte-identical files), so the default command should re-create the shipped weights on the same
torch build and CPU. Shapes: 6000 steps of the 0.4 M-parameter model, ~0.08 s/step on an idle core (~8 min); the
shipped shapes weights took 816 s on the same shared machine.

Usage:
    .venv/bin/python scripts/train_tiny_dit.py                 # default recipe, writes the shipped weights
    .venv/bin/python scripts/train_tiny_dit.py --steps 200 --out /tmp/tiny_dit --grid /tmp/grid.png
    .venv/bin/python scripts/train_tiny_dit.py --dataset shapes   # writes the shipped shapes weights
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save as st_save
from sklearn.datasets import load_digits
from sklearn.svm import SVC
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantduo.models.shapes import class_means, make_shapes, nearest_class_mean  # noqa: E402
from quantduo.models.tiny_dit import (  # noqa: E402
    ASSET_DIRS,
    CONFIGS,
    build_tiny_dit,
    load_tiny_dit,
    sample_digits,
    save_grid_png,
)
from quantduo.utils import atomic_write  # noqa: E402

SHAPES_TRAIN = 6000  # images in the shapes training set (make_shapes seed 0)
# Per data set: default training seed and steps, and the description stored in config.json.
RECIPES = {
    "digits": {"seed": 0, "steps": 2000, "data": "sklearn.datasets.load_digits (1797 images, 8x8, /16 -> [-1, 1])"},
    "shapes": {"seed": 1, "steps": 6000, "data": f"quantduo.models.shapes.make_shapes({SHAPES_TRAIN}, size=12, "
                                                 "seed=0) (6 classes, [0, 1] -> [-1, 1])"},
}


def load_data(dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Training images as float32 ``[N, 1, S, S]`` in [0, 1] (1 = ink) and long labels ``[N]``."""
    if dataset == "shapes":
        return make_shapes(SHAPES_TRAIN, size=CONFIGS["shapes"]["image_size"], seed=0)
    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0, torch.tensor(d.target, dtype=torch.long)


def class_predictor(dataset: str, x: torch.Tensor, y: torch.Tensor):
    """Function images ``[B, 1, S, S]`` in [0, 1] -> predicted long labels ``[B]``, fitted on the training data
    ``x``/``y`` of :func:`load_data`: an RBF SVM for digits (as tests/models/test_tiny_dit.py), the nearest class
    mean for shapes (as tests/models/test_tiny_dit_shapes.py)."""
    if dataset == "shapes":
        means = class_means(x, y, int(y.max()) + 1)
        return lambda images: nearest_class_mean(images, means)
    clf = SVC().fit(x.flatten(1).numpy(), y.numpy())
    return lambda images: torch.from_numpy(clf.predict(images.flatten(1).numpy()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(RECIPES), default="digits")
    ap.add_argument("--steps", type=int, default=None, help="default: the data set's recipe (RECIPES)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--label-dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=None, help="default: the data set's recipe (RECIPES)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = bitwise-reproducible default; robust on shared CPUs)")
    ap.add_argument("--out", type=Path, default=None, help="default: the shipped folder of the data set (ASSET_DIRS)")
    ap.add_argument("--grid", type=Path, default=None, help="also save a sample grid PNG here")
    args = ap.parse_args()
    recipe = RECIPES[args.dataset]
    args.steps = recipe["steps"] if args.steps is None else args.steps
    args.seed = recipe["seed"] if args.seed is None else args.seed
    args.out = ASSET_DIRS[args.dataset] if args.out is None else args.out

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    images, y_all = load_data(args.dataset)
    x_all = images * 2.0 - 1.0
    n = x_all.shape[0]
    config = copy.deepcopy(CONFIGS[args.dataset])
    model = build_tiny_dit(config).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params / 1e6:.3f} M (transformer {sum(p.numel() for p in model.transformer.parameters()) / 1e6:.3f} M)")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        prog = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))

    gen = torch.Generator().manual_seed(args.seed)
    perm, pos = torch.randperm(n, generator=gen), 0
    t0 = time.time()
    bar = tqdm(range(args.steps), desc=f"train tiny DiT ({args.dataset})", dynamic_ncols=True)
    loss_avg = None
    for step in bar:
        if pos + args.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + args.batch_size]
        pos += args.batch_size
        x0, y = x_all[idx], y_all[idx].clone()
        b = x0.shape[0]
        drop = torch.rand(b, generator=gen) < args.label_dropout
        y[drop] = model.null_class
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.rand(b, generator=gen)
        tt = t.view(b, 1, 1, 1)
        x_t = (1 - tt) * x0 + tt * noise
        v_target = noise - x0

        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        v = model(x_t, t, y)
        loss = torch.nn.functional.mse_loss(v, v_target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{lr_at(step):.2e}")
    train_s = time.time() - t0
    print(f"training took {train_s:.1f} s, final smoothed loss {loss_avg:.4f}")

    # Store EMA weights as fp16 (a few MB); they are loaded back into fp32 by load_tiny_dit.
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in ema.state_dict().items()}
    meta = {
        "model": config,
        "training": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup": args.warmup,
            "ema": args.ema,
            "label_dropout": args.label_dropout,
            "seed": args.seed,
            "train_seconds": round(train_s, 1),
            "final_loss": round(loss_avg, 5),
            "data": recipe["data"],
            "objective": "rectified flow: x_t=(1-t)x0+t*noise, predict v=noise-x0, t~U(0,1)",
            "weights": "EMA, fp16",
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    weights = st_save(state, metadata={"format": "pt"})
    atomic_write(args.out / "model.safetensors", lambda tmp: Path(tmp).write_bytes(weights))
    atomic_write(args.out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    print(f"wrote {args.out}/model.safetensors ({(args.out / 'model.safetensors').stat().st_size / 1e6:.2f} MB)")

    # Quick evaluation of the shipped (fp16-rounded) weights.
    m = load_tiny_dit(path=args.out)
    predict = class_predictor(args.dataset, images, y_all)
    labels = torch.arange(m.num_classes).repeat(10)
    for g in (1.0, 1.5, 2.0, 3.0):
        imgs = sample_digits(m, labels, steps=25, seed=123, guidance=g)
        acc = float((predict(imgs) == labels).float().mean())
        print(f"guidance {g}: classifier accuracy on {len(labels)} samples = {acc:.3f}")
    if args.grid is not None:
        labels = torch.arange(m.num_classes).repeat(5)
        imgs = sample_digits(m, labels, steps=25, seed=0, guidance=config["default_guidance"])
        save_grid_png(imgs, args.grid, nrow=m.num_classes)
        print(f"grid saved to {args.grid}")


if __name__ == "__main__":
    main()
