"""``quantduo duo ...`` sub-commands: identify retrieval heads, evaluate passkey retrieval, generate from a long
prompt with DuoAttention.

Every argument is checked before the model is loaded: the model folder's ``config.json`` gives the defaults and
limits (contexts from ``max_position_embeddings``, sink / recent sizes scaled to it, or the reference's
scripts/train.sh values with ``--data reference``), the haystack and prompts are
tokenized with the model's tokenizer, the pattern must match the model's layers x KV heads."""
from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from quantduo.cli.validate import (MAX_SEED, bad, device, float_in, int_in, lm_config, output_file, output_folder,
                                   read_text_file)
from quantduo.duo.cache import DuoCache
from quantduo.duo.data import (PasskeyFormat, ReferencePasskeyTask, make_reference_sample, make_sample,
                                reference_context_lengths, reference_haystack)
from quantduo.duo.decode import GraphedDecoder
from quantduo.duo.deploy import WINDOWS, apply_duo, apply_pattern, chunked_prefill
from quantduo.duo.evaluate import answer_logprob, kv_bytes_full, passkey_accuracy
from quantduo.duo.identify import IdentifyConfig, identify
from quantduo.duo.patterns import DuoPattern, load_pattern, save_pattern
from quantduo.duo.score import score_heads
from quantduo.integrations.transformers import fuse_rms_norms, quantize_causal_lm
from quantduo.models import tiny_lm
from quantduo.utils import atomic_write, show_progress

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

SPARSITIES = (0.25, 0.5, 0.75)
MAX_PASSKEYS = len(PasskeyFormat().names)
PASSKEYS = 4  # --passkeys of quantduo's samples
# the reference's training run, mit-han-lab/duo-attention scripts/train.sh (duo_attn/train.py; the published patterns'
# config.json hold the same values): --min_needle_depth_ratio 0.05 --max_needle_depth_ratio 0.95
# --depth_ratio_num_intervals 1000 --context_lengths_num_intervals 50 (torch.linspace points, duo_attn/data.py),
# --num_passkey 10 (the published runs' value of its 6th argument; utils.py's --num_passkeys default too)
REFERENCE_TRAINING = dict(min_depth=0.05, max_depth=0.95, depth_intervals=1000, context_intervals=50, num_passkeys=10)
# its streaming window: --sink_size 128 --recent_size 256, and utils.py's default --streaming_attn_implementation
# "blocksparse" (duo_attn/patch/llama.py: sink and recent in blocks of 128 tokens)
REFERENCE_WINDOW = dict(sink=128, recent=256, block=128)
DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass
class TextCodec:
    """A model's tokenizer as the commands use it: ``encode`` adds no special tokens."""
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    bos_id: int | None
    eos_id: int | None


def _codec(model_dir: str) -> TextCodec:
    """The model's tokenizer (loaded alone, before the model); the tiny LM (no tokenizer files) uses its own
    vocabulary."""
    if _is_tiny(model_dir):
        return TextCodec(tiny_lm.encode, tiny_lm.decode, tiny_lm.BOS_ID, None)
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise bad("--model", f"{model_dir} has no usable tokenizer ({err})") from None
    return TextCodec(lambda text: tok(text, add_special_tokens=False)["input_ids"], tok.decode,
                     tok.bos_token_id, tok.eos_token_id)


def _encode(codec: TextCodec, text: str, arg: str) -> list[int]:
    """Token ids of ``text`` (``CliError`` naming ``arg`` for words the tiny LM's vocabulary lacks)."""
    try:
        return codec.encode(text)
    except KeyError as err:
        raise bad(arg, f"{err.args[0]}; give text in the model's vocabulary") from None


def _load(model_dir: str, device: str, dtype: str):
    """The causal LM of a checked local directory, in eval mode on ``device``."""
    return AutoModelForCausalLM.from_pretrained(Path(model_dir), dtype=getattr(torch, dtype), local_files_only=True,
                                                attn_implementation="sdpa").to(device).eval()


def _haystack(args, codec: TextCodec) -> list[int]:
    """Haystack token ids: the --haystack file tokenized with the model's tokenizer; the tiny LM's Markov text
    by default for the tiny LM, an error for other models."""
    if args.haystack is not None:
        return _encode(codec, " ".join(read_text_file(args.haystack, "--haystack").split()), "--haystack")
    if not _is_tiny(args.model):
        raise bad("--haystack", "required for models other than the bundled tiny LM (a text file; it is tokenized "
                                "with the model's tokenizer)")
    return tiny_lm.haystack_ids(seed=args.seed, n_words=max(20_000, 2 * args.context_max))


def _is_tiny(model_dir: str) -> bool:
    return Path(model_dir).resolve() == tiny_lm.ASSET_DIR.resolve()


def _context_defaults(args, config: dict) -> None:
    """--context-max defaults to half the model's max_position_embeddings, --context-min to half of that; given
    values must fit the model (``CliError`` otherwise)."""
    max_pos = config["max_position_embeddings"]
    if args.context_max is None:
        args.context_max = max_pos // 2
    elif args.context_max > max_pos:
        raise bad("--context-max", f"{args.context_max} exceeds the model's {max_pos} positions (valid: 1 to {max_pos})")
    if args.context_min is None:
        args.context_min = max(1, args.context_max // 2)
    elif args.context_min > args.context_max:
        raise bad("--context-min", f"{args.context_min} is above --context-max {args.context_max} (valid: 1 to "
                                   f"{args.context_max})")


def _window_defaults(args, config: dict) -> None:
    """--sink / --recent (and --block) defaults, given values kept.

    ``--data reference`` (``args.data``): the reference's scripts/train.sh, sink 128, recent 256 and the 128-token
    block-sparse mask (:data:`REFERENCE_WINDOW`), when --context-max (after :func:`_context_defaults`) is longer
    than that 384-token window. A shorter one, which that window would cover, falls back to sizes scaled to it (1/128
    and 1/16 of --context-max: the ``--data quantduo`` proportions) and :func:`_streaming_block`'s mask, with a
    one-line note on stderr.

    ``--data quantduo``: the reference's 128 / 256 tokens scaled to the model's positions (1/256 and 1/32 of
    max_position_embeddings, at most 128 / 256; 4 / 32 on the tiny LM), the mask by :func:`_streaming_block`."""
    if getattr(args, "data", None) != "reference":
        args.sink, args.recent = _scaled_window(args, config["max_position_embeddings"])
        return
    if args.context_max > REFERENCE_WINDOW["sink"] + REFERENCE_WINDOW["recent"]:
        args.sink = REFERENCE_WINDOW["sink"] if args.sink is None else args.sink
        args.recent = REFERENCE_WINDOW["recent"] if args.recent is None else args.recent
        if getattr(args, "block", 0) is None:
            args.block = REFERENCE_WINDOW["block"]
        return
    sink, recent = _scaled_window(args, 2 * args.context_max)
    block_default = getattr(args, "block", 0) is None and getattr(args, "method", "gates") == "gates"
    if args.sink is None or args.recent is None or block_default:
        mask = f", a {_mask_words(_streaming_block(None, recent))} streaming mask" if block_default else ""
        print(f"note: --context-max {args.context_max} is not longer than scripts/train.sh's sink "
              f"{REFERENCE_WINDOW['sink']} + recent {REFERENCE_WINDOW['recent']} tokens (--data reference): "
              f"sizes scaled to it instead (sink {sink}, recent {recent}{mask})", file=sys.stderr)
    args.sink, args.recent = sink, recent


def _scaled_window(args, positions: int) -> tuple[int, int]:
    """(--sink, --recent), where not given 1/256 and 1/32 of ``positions`` (at most 128 / 256, recent at least 1)."""
    sink = min(128, positions // 256) if args.sink is None else args.sink
    recent = max(1, min(256, positions // 32)) if args.recent is None else args.recent
    return sink, recent


def _mask_words(block: int | None) -> str:
    return "token-level" if block is None else f"{block}-token block-sparse"


def _check_samples(args, hay: list[int], encode, lengths: tuple[int, ...], min_distance: int) -> None:
    """Build one sample at each context length (no model needed): a context too short for the passkeys and the
    streaming window, or a haystack too short, is an error here rather than after loading the model."""
    rng = np.random.default_rng(args.seed)
    for n in sorted(set(lengths)):
        try:
            make_sample(hay, encode, n, args.passkeys, rng, min_distance=min_distance)
        except ValueError as err:
            arg = "--haystack" if "haystack has" in str(err) else "--context-min"
            raise bad(arg, f"a {n}-token context with {args.passkeys} passkey(s) at least {min_distance} tokens "
                           f"(sink + recent) before the questions cannot be built: {err}") from None


def _pattern(args, config: dict) -> DuoPattern:
    """--pattern loaded and checked against the model's layers x KV heads."""
    try:
        pattern = load_pattern(args.pattern)
        pattern.validate_for(argparse.Namespace(**config))
    except (OSError, ValueError) as err:
        raise bad("--pattern", f"{' '.join(str(err).split())}") from None
    return pattern


def _streaming_block(block: int | None, recent: int) -> int | None:
    """The gate-training streaming mask's block size (None: token level) for ``--block`` (None: 128 when the recent
    window spans a block, the reference's default, else token level: a 128-token block would show a short window's
    streaming heads everything)."""
    if block is None:
        block = 128 if recent >= 128 else 0
    return block or None


def _quantduo_samples(args, hay: list[int], codec: TextCodec):
    """step -> :func:`make_sample` of a random length in [--context-min, --context-max], every passkey at least
    sink + recent tokens before the questions (checked at both lengths before any model loads)."""
    min_distance = args.sink + args.recent
    _check_samples(args, hay, codec.encode, (args.context_min, args.context_max), min_distance)
    rng = np.random.default_rng(args.seed)
    return lambda step: make_sample(hay, codec.encode, int(rng.integers(args.context_min, args.context_max + 1)),
                                    args.passkeys, rng, min_distance=min_distance)


def _reference_samples(args, hay: list[int], codec: TextCodec):
    """step -> the reference's sample (:func:`make_reference_sample`, --passkeys needles) from the reference's
    haystack (:func:`reference_haystack`, cut to leave room for a sample's other tokens) with the haystack lengths
    of :func:`reference_context_lengths` in a new random order every pass over them (its shuffled data loader);
    a haystack shorter than --context-max is an error here, before any model loads."""
    task = ReferencePasskeyTask(**(REFERENCE_TRAINING | dict(num_passkeys=args.passkeys)))
    if args.passkeys > task.depth_intervals:
        raise bad("--passkeys", f"{args.passkeys} needles need as many of the reference's {task.depth_intervals} "
                  f"depths (valid with --data reference: 1 to {task.depth_intervals})")
    lengths = reference_context_lengths(args.context_min, args.context_max, task)
    if len(hay) < args.context_max:
        raise bad("--haystack", f"haystack has {len(hay)} tokens, need at least {args.context_max} (--data "
                  "reference: the reference's haystack holds --context-max tokens)")
    gen = torch.Generator().manual_seed(args.seed)
    encode = lambda text: _encode(codec, text, "--data")  # noqa: E731
    try:
        hay = reference_haystack(hay, encode, codec.bos_id, args.context_max, gen, task)
        make_reference_sample(hay, encode, codec.bos_id, max(lengths), torch.Generator().manual_seed(args.seed), task)
    except ValueError as err:
        raise bad("--haystack", f"{err} (--data reference, --context-max {args.context_max})") from None
    order: list[int] = []

    def sample(step: int):
        if not order:
            order.extend(torch.randperm(len(lengths), generator=gen).tolist())
        return make_reference_sample(hay, encode, codec.bos_id, lengths[order.pop(0)], gen, task)
    return sample


def _identify(args) -> int:
    """Retrieval-head gates from passkey samples, trained (``--method gates``, the reference's) or scored in
    ``--samples`` forward passes without training (``--method score``); writes the pattern folder atomically."""
    config = lm_config(args.model)
    _context_defaults(args, config)
    _window_defaults(args, config)
    args.passkeys = args.passkeys or (REFERENCE_TRAINING["num_passkeys"] if args.data == "reference" else PASSKEYS)
    out = output_folder(args.out, "--out", inputs=[args.model])
    codec = _codec(args.model)
    hay = _haystack(args, codec)
    samples = _reference_samples(args, hay, codec) if args.data == "reference" else _quantduo_samples(args, hay, codec)
    model = _load(args.model, args.device, args.dtype)

    def batches(step: int):
        s = samples(step)
        return s.input_ids[None].to(model.device), s.target_mask[None].to(model.device)

    if args.method == "score":
        scored = tqdm((batches(i) for i in range(args.samples)), total=args.samples, desc="scoring heads",
                      unit="sample", disable=not show_progress())
        pattern = score_heads(model, scored, args.sink, args.recent, chunk=args.chunk,
                              respect_sliding_window=args.respect_sliding_window)
    else:
        cfg = IdentifyConfig(steps=args.steps, lr=args.lr, reg_weight=args.reg, sink=args.sink, recent=args.recent,
                             chunk=args.chunk, block=_streaming_block(args.block, args.recent),
                             respect_sliding_window=args.respect_sliding_window)
        pattern = identify(model, batches, cfg, progress=show_progress())
    pattern.extra.update(model_name=Path(args.model).name, context_length_min=args.context_min,
                         context_length_max=args.context_max, num_passkeys=args.passkeys, seed=args.seed)
    if args.data == "reference":  # the reference's config.json names
        pattern.extra.update(dataset_format="multiple_passkey",
                             min_needle_depth_ratio=REFERENCE_TRAINING["min_depth"],
                             max_needle_depth_ratio=REFERENCE_TRAINING["max_depth"],
                             depth_ratio_num_intervals=REFERENCE_TRAINING["depth_intervals"],
                             context_lengths_num_intervals=REFERENCE_TRAINING["context_intervals"])
    save_pattern(pattern, out, made_by={"command": args.command_line})
    print(f"pattern written to {out} (gates as trained; shown clipped to [0, 1])\n"
          f"{np.round(pattern.gates.clip(0, 1), 2) + 0.0}")
    return 0


def _eval(args) -> int:
    """Passkey accuracy of full attention, streaming-only and DuoAttention at each --sparsities value, for each
    streaming window of --windows (``chunk``: the reference semantics; ``token``: per-token window), the prompt
    prefilled in one pass or --prefill-chunk tokens at a time; prints them and writes the curves to --plot."""
    config = lm_config(args.model)
    _context_defaults(args, config)
    args.passkeys = args.passkeys or PASSKEYS
    pattern = _pattern(args, config)
    plot = output_file(args.plot, "--plot", ".png")
    sink = args.sink if args.sink is not None else pattern.sink_size
    recent = args.recent if args.recent is not None else pattern.recent_size
    codec = _codec(args.model)
    hay = _haystack(args, codec)
    _check_samples(args, hay, codec.encode, (args.context_max,), 2 * (sink + recent))
    rng = np.random.default_rng(args.seed)
    samples = [make_sample(hay, codec.encode, args.context_max, args.passkeys, rng, min_distance=2 * (sink + recent))
               for _ in range(args.n)]
    model = _load(args.model, args.device, args.dtype)
    full = (passkey_accuracy(model, samples), answer_logprob(model, samples, DynamicCache))
    print(f"full      accuracy {full[0]:.3f}  answer log-prob {full[1]:.3e}")
    curves = {}
    for window in args.windows:
        curves[window] = curve = {}
        for sparsity in [*args.sparsities, 1.0]:
            mask = pattern.binarize(sparsity)
            m = apply_duo(copy.deepcopy(model), mask, sink, recent, window=window,
                          respect_sliding_window=args.respect_sliding_window)
            make_cache = lambda: DuoCache.from_model(m)  # noqa: E731
            curve[sparsity] = (passkey_accuracy(m, samples, make_cache, args.prefill_chunk),
                               answer_logprob(m, samples, make_cache, args.prefill_chunk))
            name = "streaming" if sparsity == 1.0 else f"duo@{sparsity:.2f}"
            print(f"{name:9} accuracy {curve[sparsity][0]:.3f}  answer log-prob {curve[sparsity][1]:.3e}  "
                  f"({int(mask.sum())}/{mask.size} retrieval heads, {window} window)")
    prefill = "one-pass prefill" if args.prefill_chunk is None else f"prefill in chunks of {args.prefill_chunk}"
    save_accuracy_plot(full, curves, plot, f"{Path(args.model).name}: sink {sink}, recent {recent}, "
                                           f"{args.context_max} tokens, {prefill}")
    print(f"plot written to {plot}")
    return 0


WINDOW_LABELS = {"chunk": "DuoAttention (reference semantics)", "token": "DuoAttention (per-token window)"}


def save_accuracy_plot(full: tuple[float, float], curves: dict[str, dict[float, tuple[float, float]]], path: Path,
                       title: str) -> None:
    """PNG of passkey accuracy (left) and the answer tokens' mean log-probability (right, symlog) vs the fraction
    of streaming heads (1.0 = streaming only), one line per streaming window (``curves``: window -> {sparsity:
    (accuracy, log-prob)}), full attention's (``full``) dashed."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for i, (ax, ylabel) in enumerate(zip(axes, ("passkey accuracy", "answer log-prob (nats)"))):
        for window, curve in curves.items():
            xs = sorted(curve)
            ax.plot(xs, [curve[x][i] for x in xs], "o-" if window == "chunk" else "s--", label=WINDOW_LABELS[window])
        ax.axhline(full[i], ls="--", color="gray", label="full attention")
        ax.set_xlabel("fraction of streaming heads")
        ax.set_ylabel(ylabel)
    axes[0].set_ylim(-0.05, 1.05)
    axes[1].set_yscale("symlog", linthresh=1e-5)
    axes[1].set_ylim(top=0)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def _prompt_ids(args, codec: TextCodec, config: dict) -> list[int]:
    """Token ids of --prompt / --prompt-file (with the model's BOS), checked to fit the model's positions together
    with --max-new-tokens."""
    if (args.prompt is None) == (args.prompt_file is None):
        raise bad("--prompt", "give exactly one of --prompt and --prompt-file")
    arg = "--prompt" if args.prompt is not None else "--prompt-file"
    text = args.prompt if args.prompt is not None else read_text_file(args.prompt_file, "--prompt-file")
    ids = ([] if codec.bos_id is None else [codec.bos_id]) + _encode(codec, text, arg)
    if len(ids) < 2:
        raise bad(arg, "the prompt is empty; give some text")
    max_pos = config["max_position_embeddings"]
    if len(ids) + args.max_new_tokens + 2 > max_pos:  # + the decoder's two warm-up steps
        raise bad("--max-new-tokens", f"the prompt's {len(ids)} tokens + {args.max_new_tokens} new tokens exceed "
                                      f"the model's {max_pos} positions (valid: at most {max(0, max_pos - len(ids) - 2)}"
                                      f" new tokens for this prompt)")
    return ids


def _decode_greedy(step, logits: torch.Tensor, max_new_tokens: int, eos_id: int | None, device) -> list[int]:
    """Greedy tokens from ``logits`` on; on Ctrl-C the tokens so far are attached to the KeyboardInterrupt."""
    new: list[int] = []
    try:
        for _ in range(max_new_tokens):
            token = int(logits.argmax(-1))
            if token == eos_id:
                break
            new.append(token)
            logits = step(torch.tensor([[token]], device=device))
    except KeyboardInterrupt as interrupt:
        interrupt.tokens = new
        raise
    return new


def _generate(args) -> int:
    """Chunked prefill of a long prompt into a static DuoCache, then greedy decoding (CUDA-graph steps on a GPU);
    prints the continuation and what the cache holds against a full KV cache. On Ctrl-C during decoding the tokens
    generated so far are printed before the command stops."""
    config = lm_config(args.model)
    pattern = _pattern(args, config)
    codec = _codec(args.model)
    ids = _prompt_ids(args, codec, config)
    model = _load(args.model, args.device, args.dtype)
    apply_pattern(model, pattern, args.sparsity, args.sink, args.recent)
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
        try:
            new = _decode_greedy(step, logits, args.max_new_tokens, codec.eos_id, model.device)
        except KeyboardInterrupt as interrupt:
            print(codec.decode(interrupt.tokens), flush=True)  # the partial result
            raise
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
    _runtime(p)
    p.add_argument("--context-min", type=int_in(1), help="default: half of --context-max")
    p.add_argument("--context-max", type=int_in(1), help="default: half the model's max_position_embeddings")
    p.add_argument("--passkeys", type=int_in(1, MAX_PASSKEYS),
                   help=f"passkeys per sample (default {PASSKEYS}; {REFERENCE_TRAINING['num_passkeys']} with --data "
                   "reference, as the reference trains)")
    p.add_argument("--seed", type=int_in(0, MAX_SEED), default=0)
    p.add_argument("--respect-sliding-window", action="store_true",
                   help="apply the model's sliding window (e.g. Mistral's) to every head of the DuoAttention layers "
                        "(default: ignored, as the reference implementation does)")


def _runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)


def register(subparsers) -> None:
    """Add ``duo identify``, ``duo eval`` and ``duo generate`` to the quantduo CLI."""
    duo = subparsers.add_parser("duo", help="DuoAttention: retrieval-head identification, evaluation, generation")
    sub = duo.add_subparsers(dest="duo_command", required=True)
    ident = sub.add_parser("identify", help="find retrieval heads (gate training, or scoring without training); writes "
                                            "full_attention_heads.tsv + config.json")
    _common(ident)
    ident.add_argument("--out", required=True, help="output pattern folder (new, empty, or written by quantduo)")
    ident.add_argument("--method", choices=["gates", "score"], default="gates",
                       help="gates: train per-head gates (the reference, --steps); score: rank KV heads by how much "
                            "streaming attention changes each layer's output, one forward per sample (--samples)")
    ident.add_argument("--samples", type=int_in(1), default=32, help="passkey samples scored (--method score)")
    ident.add_argument("--data", choices=["quantduo", "reference"], default="quantduo",
                       help="quantduo: short passkey sentences, questions in random order, every passkey beyond the "
                            "streaming window, contexts of --context-min..--context-max tokens; reference: the "
                            "reference's samples (NATO-word passkeys of 32 words, its prompts, questions in insertion "
                            "order) with its training script's (scripts/train.sh) settings: 50 haystack lengths from "
                            "--context-min to --context-max, needles at depths drawn from 1000 evenly spaced values "
                            "in 0.05..0.95, 10 passkeys, and by default sink 128, recent 256 and the 128-token "
                            "block-sparse streaming mask; a --context-max of at most 384 tokens, which that window "
                            "would cover, falls back to --sink / --recent of 1/128 and 1/16 of it and --block's "
                            "quantduo default, with a note)")
    ident.add_argument("--steps", type=int_in(1), default=2000, help="gate-training steps (--method gates)")
    ident.add_argument("--lr", type=float_in(0.0, lo_open=True), default=0.02)
    ident.add_argument("--reg", type=float_in(0.0), default=0.05, help="L1 weight on the gates")
    ident.add_argument("--sink", type=int_in(0), help="default: 128 with --data reference (scripts/train.sh; "
                                                      "--context-max / 128 where it is at most 384), else "
                                                      "max_position_embeddings / 256, at most 128")
    ident.add_argument("--recent", type=int_in(1), help="default: 256 with --data reference (scripts/train.sh; "
                                                        "--context-max / 16 where it is at most 384), else "
                                                        "max_position_embeddings / 32, at most 256")
    ident.add_argument("--chunk", type=int_in(1), default=1024, help="query chunk of the gated attention")
    ident.add_argument("--block", type=int_in(0), default=None,
                       help="streaming mask of --method gates in blocks of this many tokens (128: the reference's "
                            "default block-sparse mask, which trained the published patterns); 0: token-level sink + "
                            "recent window (the reference's sdpa option); default 128 with --data reference "
                            "(scripts/train.sh) and a --context-max above 384, else 128 when --recent is at least "
                            "128, else 0")
    ident.set_defaults(func=_identify)
    ev = sub.add_parser("eval", help="passkey accuracy vs sparsity: full, DuoAttention, streaming-only (+ PNG)")
    _common(ev)
    ev.add_argument("--pattern", required=True, help="pattern directory or .tsv")
    ev.add_argument("--sparsities", type=float_in(0.0, 1.0), nargs="+", default=list(SPARSITIES),
                    help="fractions of streaming heads")
    ev.add_argument("--plot", default="duo_passkey_vs_sparsity.png", help="output PNG")
    ev.add_argument("--sink", type=int_in(0), help="default: the pattern's")
    ev.add_argument("--recent", type=int_in(1), help="default: the pattern's")
    ev.add_argument("-n", type=int_in(1), default=20, help="number of questions")
    ev.add_argument("--windows", nargs="+", choices=WINDOWS, default=list(WINDOWS),
                    help="streaming windows to compare: chunk (the reference semantics), token (per-token window)")
    ev.add_argument("--prefill-chunk", type=int_in(1), help="prefill the prompt this many tokens at a time "
                                                            "(default: one pass, the first chunk is dense)")
    ev.set_defaults(func=_eval)
    gen = sub.add_parser("generate", help="long-prompt generation with DuoAttention (chunked prefill, greedy decoding)")
    gen.add_argument("--model", required=True, help="local model directory (transformers format)")
    gen.add_argument("--pattern", required=True, help="pattern directory or .tsv")
    gen.add_argument("--prompt", help="prompt text")
    gen.add_argument("--prompt-file", help="file holding the prompt text")
    gen.add_argument("--max-new-tokens", type=int_in(1), default=64)
    gen.add_argument("--sparsity", type=float_in(0.0, 1.0), default=0.5, help="fraction of streaming heads")
    gen.add_argument("--sink", type=int_in(0), help="default: the pattern's")
    gen.add_argument("--recent", type=int_in(1), help="default: the pattern's")
    gen.add_argument("--chunk", type=int_in(1), default=32768, help="prefill chunk (tokens)")
    gen.add_argument("--kv-bits", type=int, choices=(8, 4), help="quantize the retrieval heads' KV cache")
    gen.add_argument("--weights", choices=("keep", "w4a16"), default="keep",
                     help="w4a16: quantize the decoder linears to 4 bits (SVDQuant module) before generating")
    _runtime(gen)
    gen.set_defaults(func=_generate)
