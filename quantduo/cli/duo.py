"""``quantduo duo ...`` sub-commands: identify retrieval heads, evaluate passkey retrieval, generate from a long
prompt with DuoAttention."""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantduo.duo.cache import DuoCache
from quantduo.duo.data import make_sample, read_haystack
from quantduo.duo.decode import GraphedDecoder
from quantduo.duo.deploy import apply_duo, apply_pattern, chunked_prefill
from quantduo.duo.evaluate import kv_bytes_full, passkey_accuracy
from quantduo.duo.identify import IdentifyConfig, identify
from quantduo.duo.patterns import load_pattern, save_pattern
from quantduo.integrations.transformers import fuse_rms_norms, quantize_causal_lm
from quantduo.models import tiny_lm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

SPARSITIES = (0.25, 0.5, 0.75)


@dataclass
class TextCodec:
    """A model's tokenizer as the commands use it: ``encode`` adds no special tokens."""
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    bos_id: int | None
    eos_id: int | None


def _load(model_dir: str, device: str, dtype: str):
    """(model, TextCodec) from a local directory; the tiny LM (no tokenizer files) uses its own vocabulary."""
    path = Path(model_dir)
    if not (path / "config.json").exists():
        raise SystemExit(f"error: {path} is not a model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), local_files_only=True,
                                                 attn_implementation="sdpa").to(device).eval()
    if _is_tiny(model_dir):
        return model, TextCodec(tiny_lm.encode, tiny_lm.decode, tiny_lm.BOS_ID, None)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, TextCodec(lambda text: tok(text, add_special_tokens=False)["input_ids"], tok.decode,
                            tok.bos_token_id, tok.eos_token_id)


def _haystack(args, encode):
    """Haystack token ids: the --haystack file tokenized with the model's tokenizer; the tiny LM's Markov text
    by default for the tiny LM, an error for other models."""
    if args.haystack is not None:
        return read_haystack(args.haystack, encode)
    if not _is_tiny(args.model):
        raise SystemExit("error: give --haystack (a text file; it is tokenized with the model's tokenizer)")
    return tiny_lm.haystack_ids(seed=args.seed, n_words=max(20_000, 2 * args.context_max))


def _is_tiny(model_dir: str) -> bool:
    return Path(model_dir).resolve() == tiny_lm.ASSET_DIR.resolve()


def _context_defaults(args, model) -> None:
    """--context-max defaults to half the model's max_position_embeddings, --context-min to a quarter of that."""
    if args.context_max is None:
        args.context_max = model.config.max_position_embeddings // 2
    if args.context_min is None:
        args.context_min = args.context_max // 4


def _identify(args) -> int:
    model, codec = _load(args.model, args.device, args.dtype)
    encode = codec.encode
    _context_defaults(args, model)
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
    """Passkey accuracy of full attention, streaming-only and DuoAttention at each --sparsities value (reference
    semantics); prints them and writes the accuracy-vs-sparsity curve to --plot."""
    model, codec = _load(args.model, args.device, args.dtype)
    _context_defaults(args, model)
    pattern = load_pattern(args.pattern)
    pattern.validate_for(model.config)
    sink = args.sink if args.sink is not None else pattern.sink_size
    recent = args.recent if args.recent is not None else pattern.recent_size
    hay = _haystack(args, codec.encode)
    rng = np.random.default_rng(args.seed)
    samples = [make_sample(hay, codec.encode, args.context_max, args.passkeys, rng, min_distance=2 * (sink + recent))
               for _ in range(args.n)]
    full = passkey_accuracy(model, samples)
    print(f"full      accuracy {full:.3f}")
    curve = {}
    for sparsity in [*args.sparsities, 1.0]:
        mask = pattern.binarize(sparsity)
        m = apply_duo(copy.deepcopy(model), mask, sink, recent)
        curve[sparsity] = passkey_accuracy(m, samples, lambda: DuoCache.from_model(m))
        name = "streaming" if sparsity == 1.0 else f"duo@{sparsity:.2f}"
        print(f"{name:9} accuracy {curve[sparsity]:.3f}  ({int(mask.sum())}/{mask.size} retrieval heads)")
    save_accuracy_plot(full, curve, Path(args.plot), f"{Path(args.model).name}: sink {sink}, recent {recent}, "
                                                      f"{args.context_max} tokens")
    print(f"plot written to {args.plot}")
    return 0


def save_accuracy_plot(full: float, curve: dict[float, float], path: Path, title: str) -> None:
    """PNG of passkey accuracy vs the fraction of streaming heads (1.0 = streaming only), full attention dashed."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = sorted(curve)
    ax.plot(xs, [curve[x] for x in xs], "o-", label="DuoAttention (reference semantics)")
    ax.axhline(full, ls="--", color="gray", label="full attention")
    ax.set_xlabel("fraction of streaming heads")
    ax.set_ylabel("passkey accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _generate(args) -> int:
    """Chunked prefill of a long prompt into a static DuoCache, then greedy decoding (CUDA-graph steps on a GPU);
    prints the continuation and what the cache holds against a full KV cache."""
    if (args.prompt is None) == (args.prompt_file is None):
        raise SystemExit("error: give exactly one of --prompt and --prompt-file")
    model, codec = _load(args.model, args.device, args.dtype)
    text = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text()
    try:
        ids = ([] if codec.bos_id is None else [codec.bos_id]) + codec.encode(text)
    except KeyError as err:  # the tiny LM's word-level vocabulary
        raise SystemExit(f"error: {err.args[0]}") from None
    if len(ids) < 2:
        raise SystemExit("error: the prompt is empty")
    apply_pattern(model, load_pattern(args.pattern), args.sparsity, args.sink, args.recent)
    fuse_rms_norms(model)  # one launch per norm on a GPU
    prompt = torch.tensor([ids], device=model.device)
    if args.weights == "w4a16":
        quantize_causal_lm(model, prompt[:, :256], "w4a16")
    capacity = len(ids) + args.max_new_tokens + 2  # + the decoder's two warm-up steps
    cache = DuoCache.from_model(model, max_cache_len=capacity, static=True, kv_bits=args.kv_bits)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        t0 = time.perf_counter()
        logits = chunked_prefill(model, prompt, cache, args.chunk)
        sync()
        t1 = time.perf_counter()
        step = GraphedDecoder(model, cache, len(ids))  # one CUDA graph per token on a GPU, eager steps elsewhere
        new = []
        for _ in range(args.max_new_tokens):
            token = int(logits.argmax(-1))
            if token == codec.eos_id:
                break
            new.append(token)
            logits = step(torch.tensor([[token]], device=model.device))
        sync()
        t2 = time.perf_counter()
    full = kv_bytes_full(model.config, capacity, bytes_per_elem=model.dtype.itemsize)
    print(codec.decode(new))
    print(f"prompt {len(ids)} tokens, prefill {t1 - t0:.2f} s in chunks of {args.chunk}; {len(new)} new tokens, "
          f"{1e3 * (t2 - t1) / max(len(new), 1):.1f} ms/token; KV cache {cache.memory_bytes():,} bytes "
          f"({cache.memory_bytes() / full:.3f}x of a full {model.dtype} cache)")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local model directory (transformers format)")
    p.add_argument("--haystack", help="text file for the haystack, tokenized with the model's tokenizer "
                                      "(default for the tiny LM only: its Markov text)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--context-min", type=int, help="default: a quarter of --context-max")
    p.add_argument("--context-max", type=int, help="default: half the model's max_position_embeddings")
    p.add_argument("--passkeys", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)


def register(subparsers) -> None:
    """Add ``duo identify``, ``duo eval`` and ``duo generate`` to the quantduo CLI."""
    duo = subparsers.add_parser("duo", help="DuoAttention: retrieval-head identification, evaluation, generation")
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
    ev = sub.add_parser("eval", help="passkey accuracy vs sparsity: full, DuoAttention, streaming-only (+ PNG)")
    _common(ev)
    ev.add_argument("--pattern", required=True, help="pattern directory or .tsv")
    ev.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES),
                    help="fractions of streaming heads")
    ev.add_argument("--plot", default="duo_passkey_vs_sparsity.png", help="output PNG")
    ev.add_argument("--sink", type=int)
    ev.add_argument("--recent", type=int)
    ev.add_argument("-n", type=int, default=20, help="number of questions")
    ev.set_defaults(func=_eval)
    gen = sub.add_parser("generate", help="long-prompt generation with DuoAttention (chunked prefill, greedy decoding)")
    gen.add_argument("--model", required=True, help="local model directory (transformers format)")
    gen.add_argument("--pattern", required=True, help="pattern directory or .tsv")
    gen.add_argument("--prompt", help="prompt text")
    gen.add_argument("--prompt-file", help="file holding the prompt text")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--sparsity", type=float, default=0.5, help="fraction of streaming heads")
    gen.add_argument("--sink", type=int)
    gen.add_argument("--recent", type=int)
    gen.add_argument("--chunk", type=int, default=32768, help="prefill chunk (tokens)")
    gen.add_argument("--kv-bits", type=int, choices=(8, 4), help="quantize the retrieval heads' KV cache")
    gen.add_argument("--weights", choices=("keep", "w4a16"), default="keep",
                     help="w4a16: quantize the decoder linears to 4 bits (SVDQuant module) before generating")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    gen.set_defaults(func=_generate)
