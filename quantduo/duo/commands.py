"""``quantduo duo ...`` sub-commands: identify retrieval heads, evaluate passkey retrieval."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def _load(model_dir: str, device: str, dtype: str):
    """(model, encode) from a local directory; the tiny LM (no tokenizer files) uses its own vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantduo.models import tiny_lm

    path = Path(model_dir)
    if not (path / "config.json").exists():
        raise SystemExit(f"error: {path} is not a model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), local_files_only=True,
                                                 attn_implementation="sdpa").to(device).eval()
    if path.resolve() == tiny_lm.ASSET_DIR.resolve():
        return model, tiny_lm.encode
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, lambda text: tok(text, add_special_tokens=False)["input_ids"]


def _haystack(args, encode):
    from quantduo.duo.data import read_haystack
    from quantduo.models import tiny_lm

    if args.haystack is None:
        return tiny_lm.haystack_ids(seed=args.seed, n_words=max(20_000, 2 * args.context_max))
    return read_haystack(args.haystack, encode)


def _identify(args) -> int:
    from quantduo.duo.data import make_sample
    from quantduo.duo.identify import IdentifyConfig, identify
    from quantduo.duo.patterns import save_pattern

    model, encode = _load(args.model, args.device, args.dtype)
    hay = _haystack(args, encode)
    rng = np.random.default_rng(args.seed)

    def batches(step: int):
        n = int(rng.integers(args.context_min, args.context_max + 1))
        s = make_sample(hay, encode, n, args.passkeys, rng, min_distance=args.sink + args.recent)
        return s.input_ids[None].to(model.device), s.target_mask[None].to(model.device)

    cfg = IdentifyConfig(steps=args.steps, lr=args.lr, reg_weight=args.reg, sink=args.sink, recent=args.recent,
                         chunk=args.chunk)
    try:
        pattern = identify(model, batches, cfg)
    except KeyboardInterrupt:
        print("interrupted: nothing written")
        return 130
    pattern.extra.update(model_name=str(args.model), context_length_min=args.context_min,
                         context_length_max=args.context_max, num_passkeys=args.passkeys, seed=args.seed)
    out = save_pattern(pattern, args.out)
    print(f"pattern written to {out}\n{np.round(pattern.gates, 2)}")
    return 0


def _eval(args) -> int:
    import copy

    from quantduo.duo.cache import DuoCache
    from quantduo.duo.data import make_sample
    from quantduo.duo.deploy import apply_duo
    from quantduo.duo.evaluate import passkey_accuracy
    from quantduo.duo.patterns import load_pattern

    model, encode = _load(args.model, args.device, args.dtype)
    pattern = load_pattern(args.pattern)
    pattern.validate_for(model.config)
    sink = args.sink if args.sink is not None else pattern.sink_size
    recent = args.recent if args.recent is not None else pattern.recent_size
    hay = _haystack(args, encode)
    rng = np.random.default_rng(args.seed)
    samples = [make_sample(hay, encode, args.context_max, args.passkeys, rng, min_distance=2 * (sink + recent))
               for _ in range(args.n)]
    print(f"full      accuracy {passkey_accuracy(model, samples):.3f}")
    for name, mask in (("duo", pattern.binarize(args.sparsity)), ("streaming", None)):
        mask = np.zeros(pattern.shape, bool) if mask is None else mask
        m = apply_duo(copy.deepcopy(model), mask, sink, recent)
        acc = passkey_accuracy(m, samples, lambda: DuoCache.from_model(m))
        print(f"{name:9} accuracy {acc:.3f}  ({int(mask.sum())}/{mask.size} retrieval heads)")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local model directory (transformers format)")
    p.add_argument("--haystack", help="text file for the haystack (default: tiny-LM Markov text)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--context-min", type=int, default=1000)
    p.add_argument("--context-max", type=int, default=4000)
    p.add_argument("--passkeys", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)


def register(subparsers) -> None:
    """Add ``duo identify`` and ``duo eval`` to the quantduo CLI."""
    duo = subparsers.add_parser("duo", help="DuoAttention: retrieval-head identification and evaluation")
    sub = duo.add_subparsers(dest="duo_command", required=True)
    ident = sub.add_parser("identify", help="train retrieval-head gates; writes full_attention_heads.tsv + config.json")
    _common(ident)
    ident.add_argument("--out", required=True, help="output pattern directory")
    ident.add_argument("--steps", type=int, default=2000)
    ident.add_argument("--lr", type=float, default=0.02)
    ident.add_argument("--reg", type=float, default=0.05, help="L1 weight on the gates")
    ident.add_argument("--sink", type=int, default=128)
    ident.add_argument("--recent", type=int, default=256)
    ident.add_argument("--chunk", type=int, default=1024, help="query chunk of the gated attention")
    ident.set_defaults(func=_identify)
    ev = sub.add_parser("eval", help="passkey accuracy: full vs DuoAttention vs streaming-only")
    _common(ev)
    ev.add_argument("--pattern", required=True, help="pattern directory or .tsv")
    ev.add_argument("--sparsity", type=float, default=0.5, help="fraction of streaming heads")
    ev.add_argument("--sink", type=int)
    ev.add_argument("--recent", type=int)
    ev.add_argument("-n", type=int, default=20, help="number of questions")
    ev.set_defaults(func=_eval)
