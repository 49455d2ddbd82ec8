"""DuoAttention demo on the shipped tiny LM: identify retrieval heads, compare passkey accuracy
and KV-cache memory of full attention, DuoAttention (50% streaming heads) and streaming only."""
from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch

from quantduo.duo.cache import DuoCache
from quantduo.duo.compat import cache_kwargs
from quantduo.duo.data import make_bos_sample
from quantduo.duo.deploy import apply_duo
from quantduo.duo.evaluate import kv_bytes_full, passkey_accuracy
from quantduo.duo.identify import IdentifyConfig, identify
from quantduo.duo.patterns import DuoPattern, load_pattern, save_pattern
from quantduo.duo.score import score_heads
from quantduo.models import tiny_lm

SHIPPED_PATTERN = tiny_lm.ASSET_DIR / "duo_pattern"
IDENTIFY_CONTEXT = 256


def tiny_identify(model, steps: int = 150, seed: int = 0, progress: bool = True,
                  context: int = IDENTIFY_CONTEXT) -> DuoPattern:
    """Gate training on the tiny LM: multi-passkey samples of ``context`` tokens, sink/recent of tiny_lm."""
    hay = tiny_lm.haystack_ids(seed=seed + 1, n_words=20_000)
    rng = np.random.default_rng(seed)

    def batches(step: int):
        s = make_bos_sample(hay, tiny_lm.encode, tiny_lm.BOS_ID, context, 4, rng,
                            min_distance=tiny_lm.SINK + tiny_lm.RECENT + 8)
        return s.input_ids[None].to(model.device), s.target_mask[None].to(model.device)

    # token-level streaming mask (the reference's "sdpa" option): the tiny model's window is far below a 128-token block
    cfg = IdentifyConfig(steps=steps, lr=0.05, reg_weight=0.05, sink=tiny_lm.SINK, recent=tiny_lm.RECENT,
                         chunk=context, activation_checkpointing=False, block=None)
    return identify(model, batches, cfg, progress=progress)


def tiny_score(model, n_batches: int = 8, seed: int = 0, context: int = IDENTIFY_CONTEXT) -> DuoPattern:
    """Training-free head scores (:func:`quantduo.duo.score.score_heads`) on the identification data of
    :func:`tiny_identify`."""
    hay = tiny_lm.haystack_ids(seed=seed + 1, n_words=20_000)
    rng = np.random.default_rng(seed)
    samples = [make_bos_sample(hay, tiny_lm.encode, tiny_lm.BOS_ID, context, 4, rng,
                               min_distance=tiny_lm.SINK + tiny_lm.RECENT + 8) for _ in range(n_batches)]
    batches = ((s.input_ids[None].to(model.device), s.target_mask[None].to(model.device)) for s in samples)
    return score_heads(model, batches, tiny_lm.SINK, tiny_lm.RECENT, chunk=context)


def eval_samples(n: int = 24, seed: int = 123, context: int = tiny_lm.EVAL_CONTEXT):
    """Passkey prompts of ``context`` tokens; every passkey lies > sink + recent tokens before the question."""
    hay = tiny_lm.haystack_ids(seed=seed, n_words=20_000)
    rng = np.random.default_rng(seed)
    return [make_bos_sample(hay, tiny_lm.encode, tiny_lm.BOS_ID, context, 4, rng,
                            min_distance=2 * (tiny_lm.SINK + tiny_lm.RECENT))
            for _ in range(n)]


def duo_accuracy(model, retrieval: np.ndarray, samples) -> float:
    """Passkey accuracy of a copy of ``model`` with DuoAttention (sink / recent of tiny_lm) on the bool
    [layers, kv_heads] retrieval mask."""
    m = apply_duo(copy.deepcopy(model), retrieval, tiny_lm.SINK, tiny_lm.RECENT)
    return passkey_accuracy(m, samples, lambda: DuoCache.from_model(m))


def evaluate_modes(model, retrieval: np.ndarray, samples) -> dict:
    """Accuracy and KV bytes (one EVAL_CONTEXT-token sequence) for full / duo / streaming-only."""
    n_tokens = tiny_lm.EVAL_CONTEXT
    elem = next(model.parameters()).element_size()
    res = {"full": {"accuracy": passkey_accuracy(model, samples),
                    "kv_bytes": kv_bytes_full(model.config, n_tokens, bytes_per_elem=elem)}}
    for name, mask in (("duo", retrieval), ("streaming", np.zeros_like(retrieval))):
        m = apply_duo(copy.deepcopy(model), mask, tiny_lm.SINK, tiny_lm.RECENT)
        res[name] = {"accuracy": passkey_accuracy(m, samples, lambda: DuoCache.from_model(m, max_cache_len=n_tokens))}
        cache = DuoCache.from_model(m, max_cache_len=n_tokens)
        with torch.no_grad():
            m(samples[0].input_ids[None, :n_tokens].to(m.device), **cache_kwargs(m, cache))
        res[name]["kv_bytes"] = cache.memory_bytes()
    return res


def save_heatmap(gates: np.ndarray, retrieval: np.ndarray, path: Path) -> None:
    """PNG heatmap of gates [layers, kv_heads]; retrieval heads are marked with 'R'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * gates.shape[1], 1 + 0.5 * gates.shape[0]))
    im = ax.imshow(gates, vmin=0, vmax=1, cmap="viridis")
    for (i, j), r in np.ndenumerate(retrieval):
        if r:
            ax.text(j, i, "R", ha="center", va="center", color="red")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_title("DuoAttention gates (R = retrieval)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_duo_demo(out_dir: Path, device: str = "cpu", identify_heads: bool = True, steps: int = 150,
                 n_eval: int = 24) -> dict:
    """Run the demo; writes ``duo_pattern/`` and ``duo_gates.png`` into out_dir and returns
    {"full"|"duo"|"streaming": {"accuracy", "kv_bytes"}, "gates", "retrieval", "identify_s", ...}.

    identify_heads=False uses the pattern shipped with the tiny LM instead of training gates.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = tiny_lm.load(device)
    t0 = time.time()
    pattern = tiny_identify(model, steps) if identify_heads else load_pattern(SHIPPED_PATTERN)
    identify_s = time.time() - t0
    pattern.validate_for(model.config)
    retrieval = pattern.binarize(0.5)
    save_pattern(pattern, out_dir / "duo_pattern")
    save_heatmap(pattern.gates, retrieval, out_dir / "duo_gates.png")
    res = evaluate_modes(model, retrieval, eval_samples(n_eval))
    res.update(gates=pattern.gates.tolist(), retrieval=retrieval.tolist(), identify_s=identify_s,
               identified=identify_heads, heatmap="duo_gates.png")
    for name in ("full", "duo", "streaming"):
        print(f"{name:>10}: passkey accuracy {res[name]['accuracy']:.3f}  KV cache {res[name]['kv_bytes']:,} bytes")
    shown = np.round(pattern.gates.clip(0, 1), 2) + 0.0  # trained gates may end slightly outside [0, 1]; no "-0."
    print(f"gates (identified in {identify_s:.1f}s, clipped to [0, 1]):\n{shown}")
    return res
