"""quantduo DuoAttention vs kvpress's DuoAttentionPress on the shipped tiny LM (CPU, ~30 s for 24 samples).

Same model, same pattern (shipped gates binarized at 50% streaming heads), same sink/recent
(tiny_lm.SINK / tiny_lm.RECENT), greedy decoding of the passkey after the first question of each
demo.eval_samples() prompt. Variants:

  full         dense attention, transformers DynamicCache
  quantduo     apply_duo + DuoCache (streaming heads use sink + recent during prefill and decoding)
  kvpress      ``with press(model)`` around the prefill of the whole prompt (question included)
  kvpress-ctx  kvpress's pipeline protocol: the press runs on the context, then the question
               tokens and the answer are decoded on the pressed cache

kvpress's press gets our retrieval mask, sink and recent instead of its hub download
(:class:`FixedDuoPress`). Reported: passkey accuracy, KV bytes held once the prompt is processed
(distinct tensor storages reachable from the cache object; for kvpress also the key indices the
press keeps on the attention modules), identical answers and first-answer-token logits between pairs.

kvpress 0.5.5 evicts nothing: after the prefill the press records the streaming-head key positions
[sink, T - recent) and every later forward overwrites those keys in the cache with a fake key whose
attention weight underflows to 0; the prefill itself is dense in every head.

Setup. kvpress 0.5.5 needs transformers<5.3, so it lives in a side directory that shadows the
project venv's transformers (torch, numpy, safetensors, ... still come from the venv):

    .venv/bin/python -m pip install --no-deps --target /work/kvp_site "kvpress==0.5.5" \
        "transformers==5.2.0" "huggingface-hub>=1.31,<2" "tokenizers>=0.22,<=0.23.0" \
        "fire>=0.6,<0.7" six termcolor "cachetools>=5.5.2,<6" datasets pyarrow "dill<0.4.2" \
        "multiprocess<0.70.20" xxhash pandas httpx httpcore h11 typer-slim

Run (from the repository root):

    OMP_NUM_THREADS=1 PYTHONPATH=/work/kvp_site .venv/bin/python benchmarks/kvpress_compare.py \
        [--n 24] [--seed 123] [--out kvpress_compare.json]

Not part of the test suite (kvpress does not support the transformers the project pins).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
try:
    # kvpress wraps every attention function registered when it is imported; quantduo's "duo"
    # function takes a DuoKV, not a tensor, and is registered again below, unwrapped.
    import kvpress  # noqa: E402
except ImportError as err:
    raise SystemExit(f"kvpress is not importable ({err}): see the setup in the docstring of {__file__}")
from transformers import DynamicCache  # noqa: E402

from quantduo.duo import demo  # noqa: E402
from quantduo.duo.cache import DuoCache  # noqa: E402
from quantduo.duo.data import PasskeyFormat  # noqa: E402
from quantduo.duo.deploy import apply_duo, duo_attention_forward, register_attention  # noqa: E402
from quantduo.duo.patterns import load_pattern  # noqa: E402
from quantduo.models import tiny_lm  # noqa: E402
from quantduo.utils import relative_error  # noqa: E402

PASSKEY = PasskeyFormat()

register_attention("duo", duo_attention_forward)
warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")

VARIANTS = ("full", "quantduo", "kvpress", "kvpress-ctx")
PAIRS = (("quantduo", "kvpress"), ("quantduo", "kvpress-ctx"), ("quantduo", "full"), ("kvpress", "full"),
         ("kvpress-ctx", "full"))


@dataclass
class FixedDuoPress(kvpress.DuoAttentionPress):
    """DuoAttentionPress with a given retrieval mask, sink and recent (no pattern download)."""

    retrieval: np.ndarray = None
    sink: int = tiny_lm.SINK
    recent: int = tiny_lm.RECENT

    def post_init_from_model(self, model):
        self.sink_size, self.recent_size = self.sink, self.recent
        self.streaming_mask = torch.as_tensor(~self.retrieval, device=model.device)


@dataclass
class Run:
    """One variant on one sample: greedy answer tokens, logits of the first answer token, bytes held."""

    answer: list[int]
    first_logits: torch.Tensor = field(repr=False)
    kv_bytes: int
    press_bytes: int


def storage_bytes(obj, seen: set) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj`` (attributes, dicts, lists)."""
    if torch.is_tensor(obj):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(storage_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(storage_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        return storage_bytes(vars(obj), seen)
    return 0


def cache_bytes(cache) -> int:
    """What a transformers Cache object (DynamicCache, DuoCache) holds in tensors."""
    return storage_bytes(cache.layers, set())


def press_bytes(model) -> int:
    """Bytes of the key indices kvpress keeps on the attention modules to mask streaming keys."""
    return storage_bytes([getattr(layer.self_attn, "masked_key_indices", None) for layer in model.model.layers],
                         set())


@torch.no_grad()
def greedy(model, cache, prompt: torch.Tensor, n_new: int, press=None, n_after: int = 0) -> Run:
    """Prefill prompt[:, :-n_after] (inside ``press(model)`` when given), feed the last ``n_after``
    prompt tokens, then decode ``n_new`` tokens greedily. KV bytes are taken once the whole prompt
    is in the cache, before the first answer token is fed."""
    split = prompt.shape[1] - n_after
    with press(model) if press is not None else contextlib.nullcontext():
        logits = model(prompt[:, :split], past_key_values=cache, logits_to_keep=1).logits[0, -1]
    if n_after:
        logits = model(prompt[:, split:], past_key_values=cache, logits_to_keep=1).logits[0, -1]
    first, kv = logits.float().clone(), cache_bytes(cache)
    answer = [int(logits.argmax())]
    while len(answer) < n_new:
        logits = model(torch.tensor([answer[-1:]]), past_key_values=cache).logits[0, -1]
        answer.append(int(logits.argmax()))
    return Run(answer, first, kv, press_bytes(model))


def run_all(model, retrieval: np.ndarray, samples) -> dict[str, list[Run]]:
    """Every variant on every sample (the first question of each)."""
    duo = apply_duo(copy.deepcopy(model), retrieval, tiny_lm.SINK, tiny_lm.RECENT)
    kvp = copy.deepcopy(model)  # the press leaves state on its attention modules
    press = FixedDuoPress(head_compression_ratio=float((~retrieval).mean()), retrieval=retrieval)
    n_question = len(tiny_lm.encode(PASSKEY.question.format(name=PASSKEY.names[0])))
    runs = {name: [] for name in VARIANTS}
    for s in samples:
        prompt_len, answer = s.questions[0]
        prompt, n = s.input_ids[None, :prompt_len], len(answer)
        runs["full"].append(greedy(model, DynamicCache(), prompt, n))
        runs["quantduo"].append(greedy(duo, DuoCache.from_model(duo, max_cache_len=prompt_len + n), prompt, n))
        runs["kvpress"].append(greedy(kvp, DynamicCache(), prompt, n, press=press))
        runs["kvpress-ctx"].append(greedy(kvp, DynamicCache(), prompt, n, press=press, n_after=n_question))
    return runs


def summarize(runs: dict[str, list[Run]], samples) -> dict:
    """Per-variant accuracy and bytes, and per-pair agreement of answers and first-token logits."""
    truth = [list(s.questions[0][1]) for s in samples]
    full_kv = np.mean([r.kv_bytes for r in runs["full"]])
    per_variant = {name: {"accuracy": float(np.mean([r.answer == t for r, t in zip(rs, truth)])),
                          "kv_bytes": float(np.mean([r.kv_bytes for r in rs])),
                          "kv_vs_full": float(np.mean([r.kv_bytes for r in rs]) / full_kv),
                          "press_bytes": float(np.mean([r.press_bytes for r in rs]))}
                   for name, rs in runs.items()}
    pairs = {}
    for a, b in PAIRS:
        ra, rb = runs[a], runs[b]
        pairs[f"{a} vs {b}"] = {
            "same_answer": float(np.mean([x.answer == y.answer for x, y in zip(ra, rb)])),
            "same_first_token": float(np.mean([x.answer[0] == y.answer[0] for x, y in zip(ra, rb)])),
            "first_logits_max_abs": max(float((x.first_logits - y.first_logits).abs().max()) for x, y in zip(ra, rb)),
            "first_logits_rel_l2": float(np.mean([relative_error(x.first_logits, y.first_logits)
                                                  for x, y in zip(ra, rb)])),
        }
    answers = {name: [r.answer for r in rs] for name, rs in runs.items()}
    return {"variants": per_variant, "pairs": pairs, "answers": answers, "truth": truth}


def markdown(res: dict, n: int) -> str:
    """The two result tables in Markdown."""
    lines = [f"tiny LM, shipped pattern at 50% streaming heads, sink={tiny_lm.SINK}, recent={tiny_lm.RECENT}, "
             f"{n} passkey samples, float32, CPU", "",
             "| variant | passkey accuracy | KV bytes held after the prompt (mean) | vs full | "
             "press index bytes (mean) |", "|---|---|---|---|---|"]
    for name, v in res["variants"].items():
        lines.append(f"| {name} | {v['accuracy']:.3f} | {v['kv_bytes']:,.0f} | {v['kv_vs_full']:.3f} | "
                     f"{v['press_bytes']:,.0f} |")
    lines += ["", "| pair | identical answers | same first token | first-token logits max abs diff | "
              "first-token logits rel. L2 (mean) |", "|---|---|---|---|---|"]
    for pair, p in res["pairs"].items():
        lines.append(f"| {pair} | {p['same_answer']:.3f} | {p['same_first_token']:.3f} | "
                     f"{p['first_logits_max_abs']:.3g} | {p['first_logits_rel_l2']:.3g} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=24, help="passkey samples (demo.eval_samples)")
    ap.add_argument("--seed", type=int, default=123, help="seed of demo.eval_samples")
    ap.add_argument("--out", type=Path, help="write the results (and every answer) as JSON here")
    args = ap.parse_args(argv)
    model = tiny_lm.load()
    pattern = load_pattern(demo.SHIPPED_PATTERN)
    pattern.validate_for(model.config)
    samples = demo.eval_samples(args.n, args.seed)
    res = summarize(run_all(model, pattern.binarize(0.5), samples), samples)
    print(markdown(res, args.n))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
