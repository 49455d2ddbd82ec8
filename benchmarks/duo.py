"""DuoAttention device benchmark: Llama-3-8B architecture (random bf16 weights) on one GPU.

    PYTHONUNBUFFERED=1 python3 benchmarks/duo.py [--contexts 32768 131072]

One run measures, per context N and per variant (full attention = every head full in a static
DuoCache, same kernels as Duo; duo = 50% retrieval heads; duo + INT8 / INT4 KV): prefill latency
(one pass over N tokens writing the cache), decode latency per token with the step captured in a
CUDA graph (and eagerly), KV-cache bytes and peak memory. It also times transformers' own SDPA +
StaticCache decode step in a CUDA graph, checks Duo against the reference rules over a DynamicCache and graph
replays against eager steps, times the attention kernels of one layer, a 32K-chunked Duo prefill
(time, peak memory), and computes the largest context that fits from measured bytes per token.
Then, on synthetic cache contents (decode time does not depend on the values): decode at longer
contexts (--decode-contexts), a config sweep of the decode kernel, and (last; the weights are
quantized to W4A16 in place) the largest context that runs with 4-bit weights + INT4 KV, with and
without DuoAttention. --only runs one part, or one of these extras: long-prefill (chunked prefill, full vs Duo,
at contexts too long for one pass; --w4a16 repeats it with W4A16 weights), w4-decode (decode only with bf16
weights, then with the weights quantized to W4A16, full vs Duo at each KV precision; --profile adds kernel times
per token), chunk-attn (one later chunk's causal attention per implementation). --fuse-norms makes every variant
use one-launch RMSNorms.
Timings: CUDA events, warm-up, median.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache  # noqa: E402

from quantduo.duo import attention as A  # noqa: E402
from quantduo.duo.cache import DuoCache  # noqa: E402
from quantduo.utils import relative_error  # noqa: E402
from quantduo.duo.decode import GraphedDecoder  # noqa: E402
from quantduo.duo.deploy import apply_duo, chunked_prefill  # noqa: E402
from quantduo.duo.identify import IdentifyConfig, identify  # noqa: E402
from quantduo.duo.score import score_heads  # noqa: E402
from quantduo.formats.kv import quantize_unchecked  # noqa: E402
from quantduo.integrations.transformers import fuse_rms_norms, quantize_causal_lm, weight_bytes  # noqa: E402
from quantduo.kernels.decode_attention import decode_attention  # noqa: E402
from quantduo.formats.reference import decode_attention_ref  # noqa: E402
from quantduo.duo.compat import cache_kwargs  # noqa: E402

GB = 1e9
SINK, RECENT = 64, 256
SLACK = 64  # cache slots beyond N for the decode steps
DEV = "cuda"  # every tensor of the benchmark lives here
GRAPHS = {"on": True}  # switched off (and reported) if the graph check fails: decode then runs eagerly
VARIANTS = {"full": dict(all_full=True), "duo": {}, "duo+int8": dict(kv_bits=8), "duo+int4": dict(kv_bits=4)}
CAPACITY_LAYOUTS = {"duo+int4": dict(kv_bits=4), "full+int4": dict(all_full=True, kv_bits=4)}
DECODE_SWEEP = [None, (32, 4, 4, 3), (32, 8, 4, 3), (64, 1, 4, 3), (64, 2, 4, 3), (64, 8, 4, 3), (64, 4, 4, 4),
                (64, 4, 8, 3), (128, 2, 8, 3), (128, 4, 4, 3), (128, 1, 8, 3), (32, 16, 2, 3)]


def llama3_8b_config(max_pos: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                       rope_theta=500000.0, max_position_embeddings=max_pos, attn_implementation="sdpa",
                       tie_word_embeddings=False)


def cuda_ms(fn, warmup: int, reps: int) -> list[float]:
    """Per-call milliseconds of ``fn`` (CUDA events)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return out


@torch.no_grad()
def decode_ms(model, cache, n: int, args, use_graph: bool, steps: int) -> tuple[float, GraphedDecoder]:
    """Median ms per token of decode steps at position n.. (graph replays or eager static steps), and the
    decoder (its ``graph`` tells whether one was captured)."""
    dec = GraphedDecoder(model, cache, n, use_graph=use_graph and GRAPHS["on"])
    tok = torch.ones(1, 1, dtype=torch.long, device=DEV)
    return statistics.median(cuda_ms(lambda: dec(tok), args.warmup, steps)), dec


@torch.no_grad()
def bench_variant(model, n: int, args, warm: bool, reps: int, eager: bool, **opts) -> dict:
    """Prefill (one pass writing a static DuoCache), graph decode, KV bytes and peak memory."""
    ids = torch.randint(0, 128000, (1, n), device=DEV)
    cache = DuoCache.from_model(model, max_cache_len=n + SLACK, static=True, **opts)

    def prefill():
        cache.reset()
        model.model(input_ids=ids, cache=cache, use_cache=True)

    if warm:
        prefill()  # warm-up (cuDNN plans) for this shape
    torch.cuda.reset_peak_memory_stats()
    res = dict(prefill=statistics.median(cuda_ms(prefill, 0, reps)), peak_prefill=torch.cuda.max_memory_allocated(),
               kv=cache.memory_bytes())
    torch.cuda.reset_peak_memory_stats()
    res["decode"] = decode_ms(model, cache, n, args, True, args.steps)[0]
    res["peak_decode"] = torch.cuda.max_memory_allocated()
    res["decode_eager"] = decode_ms(model, cache, n + args.steps + args.warmup, args, False, 8)[0] if eager else None
    return res


@contextlib.contextmanager
def sdpa_attention(model):
    """The model runs transformers' SDPA attention inside (reordered heads compute the same function)."""
    saved = model.config._attn_implementation
    model.config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        model.config._attn_implementation = saved


@torch.no_grad()
def bench_sdpa_static(model, n: int, args) -> float:
    """transformers SDPA + StaticCache decode step in a CUDA graph (cache filled with random values:
    the time does not depend on them)."""
    cache = StaticCache(config=model.config, max_cache_len=n + SLACK)
    with sdpa_attention(model):
        model.model(input_ids=torch.ones(1, 1, dtype=torch.long, device=DEV), **cache_kwargs(model.model, cache))
        for layer in cache.layers:
            layer.keys.normal_()
            layer.values.normal_()
            layer.cumulative_length.fill_(n)
        return decode_ms(model, cache, n, args, True, args.steps)[0]


def _decode_tokens(model, cache, ids: torch.Tensor, n: int, use_graph: bool) -> torch.Tensor:
    """Logits [steps, 1, vocab] of decoding ids[:, n:] one token at a time after an n-token prefill."""
    dec = GraphedDecoder(model, cache, n, use_graph=use_graph)
    return torch.stack([dec(ids[:, i:i + 1]).clone() for i in range(n, ids.shape[1])])


@torch.no_grad()
def graph_check(model, n: int = 2048, steps: int = 8) -> dict:
    """Relative L2 of graph-replayed vs eager decode logits: Duo static cache, SDPA StaticCache."""
    ids = torch.randint(0, 128000, (1, n + steps), device=DEV)
    out = {}
    for name in ("duo", "sdpa"):
        logits = []
        for use_graph in (False, True):
            if name == "duo":
                cache = DuoCache.from_model(model, max_cache_len=n + SLACK, static=True)
                model.model(input_ids=ids[:, :n], **cache_kwargs(model.model, cache))
                logits.append(_decode_tokens(model, cache, ids, n, use_graph))
                continue
            cache = StaticCache(config=model.config, max_cache_len=n + SLACK)
            with sdpa_attention(model):
                model.model(input_ids=ids[:, :n], **cache_kwargs(model.model, cache))
                logits.append(_decode_tokens(model, cache, ids, n, use_graph))
        out[name] = relative_error(logits[1], logits[0])
    return out


@torch.no_grad()
def attention_profile(n: int, reps: int = 3) -> dict:
    """ms of one layer's attention at n tokens (Llama-3-8B heads). Prefill: full SDPA over 32 query heads,
    the 16 query heads of the retrieval half, the streaming half over a later chunk (its last min(n, 32K) queries
    over sink + recent window keys + the chunk: causal, bottom-right aligned). Decode
    (eager, one token): our masked split-KV decode over 8 / 4 KV heads, SDPA over 8 without a mask."""
    q = torch.randn(1, 32, n, 128, device=DEV, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, n, 128, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    m, w = min(n, 32768), min(n - min(n, 32768), SINK + RECENT)
    fns = {"sdpa_32_heads": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
           "sdpa_16_heads": lambda: F.scaled_dot_product_attention(q[:, :16], k[:, :4], v[:, :4], is_causal=True,
                                                                   enable_gqa=True),
           "stream_16_heads_chunk": lambda: A.full_prefill(q[:, 16:, -m:], k[:, 4:, -(w + m):], v[:, 4:, -(w + m):],
                                                           w, 0.088)}
    out = {name: statistics.median(cuda_ms(fn, 1, reps)) for name, fn in fns.items()}
    q1, length = q[:, :, -1:], torch.tensor([n - 7], device=DEV)
    k4, v4 = (quantize_unchecked(x[:, :4], 4, 128) for x in (k, v))
    decode = {"decode_8kv": lambda: A.decode(q1, k, v, 0.088, length),  # one token, all heads (full attention)
              "decode_4kv": lambda: A.decode(q1[:, :16], k[:, :4], v[:, :4], 0.088, length),  # Duo retrieval half
              "decode_4kv_int4": lambda: A.decode(q1[:, :16], k4, v4, 0.088, length),
              "decode_4kv_torch": lambda: decode_attention_ref(q1[:, :16], k[:, :4], v[:, :4], 0.088, length),
              "decode_sdpa_8kv_nomask": lambda: F.scaled_dot_product_attention(q1, k, v, enable_gqa=True)}
    return {**out, **{name: statistics.median(cuda_ms(fn, 3, 20)) for name, fn in decode.items()}}


@torch.no_grad()
def chunk_attention_probe(n: int, chunk: int, reps: int = 3) -> None:
    """The last chunk of a chunked prefill (queries at n - chunk.., keys 0..n): ms and TFLOP/s of the causal
    attention for 32 / 16 query heads (full / Duo retrieval half): the library's path (unmasked rectangle over
    the cached keys + causal square, cuDNN, log-sum-exp merge) vs SDPA with a lower-right causal bias (the
    previous path: FlashAttention-2), and the causal square alone per SDPA backend."""
    start = n - chunk
    flops_per_head = 4 * 128 * (chunk * start + chunk * chunk / 2)
    print(f"\nchunk attention at n={n}, chunk={chunk}\n| query heads | variant | ms | TFLOP/s | rel. L2 vs SDPA "
          "lower-right |\n|---|---|---|---|---|")
    for hq, hkv in ((32, 8), (16, 4)):
        q = torch.randn(1, hq, chunk, 128, device=DEV, dtype=torch.bfloat16)
        k, v = (torch.randn(1, hkv, n, 128, device=DEV, dtype=torch.bfloat16) for _ in range(2))
        lower_right = causal_lower_right(chunk, n)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=lower_right, scale=0.088, enable_gqa=True)
        variants = {"library: rectangle + causal square, LSE merge": lambda: A.full_prefill(q, k, v, start, 0.088),
                    "SDPA + lower-right causal bias": lambda: F.scaled_dot_product_attention(
                        q, k, v, attn_mask=lower_right, scale=0.088, enable_gqa=True)}
        for name, fn in variants.items():
            err = relative_error(fn(), expected)
            ms = statistics.median(cuda_ms(fn, 1, reps))
            print(f"| {hq} | {name} | {ms:.1f} | {flops_per_head * hq / ms / 1e9:.0f} | {err:.1e} |")
        sq, sk, sv = q, k[:, :, start:], v[:, :, start:]  # the causal square alone, per SDPA backend
        for backend in (None, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                ms = statistics.median(cuda_ms(lambda: F.scaled_dot_product_attention(
                    sq, sk, sv, is_causal=True, scale=0.088, enable_gqa=True), 1, reps))
            print(f"| {hq} | square {chunk}x{chunk} causal, SDPA {backend or 'auto'} | {ms:.1f} | "
                  f"{4 * 128 * hq * chunk * chunk / 2 / ms / 1e9:.0f} | - |")
    torch.cuda.empty_cache()


SWEEP_CASES = ("8 bf16", "4 bf16", "4 int8", "4 int4")  # KV heads and cache format of the kernel sweep


@torch.no_grad()
def decode_kernel_sweep(n: int, configs: list) -> list[tuple]:
    """(config, [ms per case of SWEEP_CASES]) of the decode kernel at n keys (eager, one layer)."""
    q1 = torch.randn(1, 32, 1, 128, device=DEV, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, n, 128, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    caches = [(k, v, 32), (k[:, :4], v[:, :4], 16)]
    caches += [(*(quantize_unchecked(x[:, :4], bits, 128) for x in (k, v)), 16) for bits in (8, 4)]
    length = torch.tensor([n], device=DEV)
    return [(cfg, [statistics.median(cuda_ms(lambda: decode_attention(q1[:, :hq], kc, vc, 0.088, length, config=cfg),
                                             3, 20)) for kc, vc, hq in caches])
            for cfg in configs]


@torch.no_grad()
def chunked(model, n: int, chunk: int, warm_n: int, **opts) -> dict:
    """One chunked prefill of n tokens into a static DuoCache (``opts`` as for DuoCache.from_model) after a
    warm-up prefill of warm_n tokens: ms and peak memory."""
    for length in (warm_n, n):
        ids = torch.randint(0, 128000, (1, length), device=DEV)
        cache = DuoCache.from_model(model, max_cache_len=length + SLACK, static=True, **opts)
        torch.cuda.reset_peak_memory_stats()
        ms = cuda_ms(lambda: chunked_prefill(model, ids, cache, chunk), 0, 1)[0]
        cache = None  # freed before the next allocation
        torch.cuda.empty_cache()
    return dict(prefill=ms, peak=torch.cuda.max_memory_allocated(), chunk=chunk)


def long_prefill(model, contexts: list[int], chunk: int) -> None:
    """Chunked prefill, full attention vs Duo, at contexts whose one-pass full prefill does not fit (the
    warm-up is a whole identical prefill, so every chunk shape is compiled before the timed run)."""
    print("\n| N | chunk | variant | prefill ms | speedup | peak GB |\n|---|---|---|---|---|---|")
    for n in contexts:
        res = {name: chunked(model, n, chunk, n, **opts) for name, opts in (("full", dict(all_full=True)),
                                                                            ("duo", {}))}
        for name, r in res.items():
            print(f"| {n} | {chunk} | {name} | {r['prefill']:.0f} | {res['full']['prefill'] / r['prefill']:.2f}x "
                  f"| {r['peak'] / GB:.1f} |", flush=True)


def fill_synthetic(model, cache: DuoCache, n: int) -> None:
    """Make a DuoCache (static, or any whose layers are DuoLayers) hold n tokens of random bf16 K/V (head_dim
    128, on the model's device) without a prefill (decode time does not depend on the values): every buffer
    allocated and filled, streaming slots at the positions a real prefill
    leaves (sinks, then the last ``recent + 1`` positions), lengths and device counters at n."""
    x = torch.zeros(1, model.config.num_key_value_heads, 1, 128, device=model.device, dtype=torch.bfloat16)
    for layer in cache.layers:
        layer.lazy_initialization(x, x)
        for name, buf in layer.full.bufs.items():
            if buf.dtype == torch.uint8:
                buf.random_(0, 256)
            elif name.endswith("scale"):
                buf.fill_(0.01)
            elif name.endswith("zero"):
                buf.fill_(-1.25)
            else:
                buf.normal_()
        layer.stream_keys.normal_()
        layer.stream_values.normal_()
        pos = torch.cat([torch.arange(layer.sink), torch.arange(n - layer.recent - 1, n)]).to(x.device)
        layer.stream_pos[:, layer._slot(pos)] = pos
        layer.length = n
        layer.position.fill_(n)


@torch.no_grad()
def decode_only(model, n: int, args, **opts) -> dict:
    """Graph decode ms/token at n tokens of a synthetic static DuoCache (no prefill); KV bytes, peak
    memory; "OOM" when it does not fit."""
    cache = None
    try:
        torch.cuda.reset_peak_memory_stats()
        cache = DuoCache.from_model(model, max_cache_len=n + SLACK, static=True, **opts)
        fill_synthetic(model, cache, n)
        try:
            ms, dec = decode_ms(model, cache, n, args, True, args.steps)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # reported in the result ("graph": False), timed eagerly
            print(f"graph capture failed at N={n}: {type(err).__name__}: {str(err)[:200]}", flush=True)
            ms, dec = decode_ms(model, cache, n, args, False, args.steps)
        finite = bool(torch.isfinite(dec(torch.ones(1, 1, dtype=torch.long, device=DEV))).all())
        return dict(decode=ms, kv=cache.memory_bytes(), peak=torch.cuda.max_memory_allocated(), finite=finite,
                    graph=dec.graph is not None)
    except torch.OutOfMemoryError:
        return dict(decode="OOM")
    finally:
        del cache
        torch.cuda.empty_cache()


def capacity_search(model, layouts: dict, candidates: list[int], args) -> dict:
    """Largest of ``candidates`` whose synthetic cache + decode steps run, per layout, trying them in
    increasing order up to the first that does not fit (a failed allocation can strand memory, so no
    attempt follows a failure); returns {layout: (n, decode_only result)}."""
    out = {}
    for name, opts in layouts.items():
        for n in sorted(candidates):
            res = decode_only(model, n, args, **opts)
            print(f"capacity {name} N={n}: {res}", flush=True)
            if res["decode"] == "OOM":
                break
            out[name] = (n, res)
    return out


def bytes_per_token(model) -> dict:
    """Measured KV bytes per token and constant bytes of each cache layout (allocated at two lengths)."""
    out = {}
    layouts = {**VARIANTS, "full+int4": dict(all_full=True, kv_bits=4)}
    x = torch.zeros(1, model.config.num_key_value_heads, 1, 128, device=DEV, dtype=torch.bfloat16)
    for name, opts in layouts.items():
        size = []
        for cap in (1024, 2048):
            cache = DuoCache.from_model(model, max_cache_len=cap, **opts)
            for layer in cache.layers:
                layer.lazy_initialization(x, x)
            size.append(cache.memory_bytes())
        per_tok = (size[1] - size[0]) / 1024
        out[name] = (per_tok, size[0] - 1024 * per_tok)
    return out


def _chunked_hidden(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """Final hidden states [1, n, H] float32 of ids fed as chunks (0, 1024), (1024, n - 16), then 16 decode steps."""
    n = ids.shape[1]
    outs = [model.model(input_ids=ids[:, a:b], cache=cache, use_cache=True).last_hidden_state
            for a, b in ((0, 1024), (1024, n - 16))]
    outs += [model.model(input_ids=ids[:, i:i + 1], cache=cache, use_cache=True).last_hidden_state
             for i in range(n - 16, n)]
    return torch.cat(outs, 1).float()


@torch.no_grad()
def correctness(model, mask: np.ndarray, n: int = 2048) -> dict:
    """Relative L2 error of DuoCache chunked prefill + decode (ring, Triton decode, cuDNN chunks) vs the same
    reference rules computed over a transformers DynamicCache holding every token (dense masks), and of full
    attention vs that reference (shows the check is sensitive)."""
    ids = torch.randint(0, 128000, (1, n), device=DEV)
    full = model.model(input_ids=ids, use_cache=False).last_hidden_state.float()
    apply_duo(model, mask, SINK, RECENT)
    ref = _chunked_hidden(model, ids, DynamicCache(config=model.config))
    duo = _chunked_hidden(model, ids, DuoCache.from_model(model))
    return {"duo_vs_ref": relative_error(duo, ref), "full_vs_ref": relative_error(full, ref),
            "duo_vs_ref_decode": relative_error(duo[:, -16:], ref[:, -16:])}


def int4_weight_bytes(model, group: int = 128) -> int:
    """Bytes of the model with every decoder Linear packed to INT4 (two codes a byte, bf16 scale per
    ``group`` inputs; symmetric) — packed for real, layer by layer, and counted — plus all other
    parameters (embeddings, lm_head, norms) kept in bf16."""
    total = 0
    linear_params = set()
    for mod in model.model.layers.modules():
        if isinstance(mod, torch.nn.Linear):
            w = mod.weight.float().reshape(mod.out_features, -1, group)
            scale = w.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 7
            q = (w / scale).round().clamp(-8, 7).to(torch.int8).reshape(mod.out_features, -1) + 8
            packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
            total += packed.numel() + scale.numel() * 2
            linear_params.add(id(mod.weight))
    return total + sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in linear_params)


def print_tables(rows: dict, sdpa: dict, cap_rows: list, check: dict, gcheck: dict, prof: dict, chunk: dict,
                 info: str) -> None:
    print("\n| N | variant | prefill ms | prefill speedup | decode ms/tok (graph) | decode speedup | decode ms/tok "
          "(eager) | KV GB | KV ratio | peak prefill GB | peak decode GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, byvar in rows.items():
        base = byvar["full"]
        for name, r in byvar.items():
            eager = f"{r['decode_eager']:.2f}" if r["decode_eager"] is not None else "-"
            print(f"| {n} | {name} | {r['prefill']:.0f} | {base['prefill'] / r['prefill']:.2f}x | {r['decode']:.2f} "
                  f"| {base['decode'] / r['decode']:.2f}x | {eager} | {r['kv'] / GB:.2f} | {base['kv'] / r['kv']:.2f}x "
                  f"| {r['peak_prefill'] / GB:.1f} | {r['peak_decode'] / GB:.1f} |")
        print(f"| {n} | transformers SDPA + StaticCache | - | - | {sdpa[n]} | - | - | - | - | - | - |")
    print(f"\nGPU correctness: Duo (eager, chunked prefill + decode) vs dense gated reference rel L2 "
          f"{check['duo_vs_ref']:.4f} (decode tokens {check['duo_vs_ref_decode']:.4f}); full attention vs same "
          f"reference {check['full_vs_ref']:.4f}. Graph replay vs eager decode logits: {gcheck}")
    print_prefill_bound(rows, prof)
    print(f"Duo prefill of N={max(rows)} in {chunk['chunk']}-token chunks: {chunk['prefill']:.0f} ms, "
          f"peak {chunk['peak'] / GB:.1f} GB")
    print(f"\nCapacity ({info}):\n| weights | KV layout | max context (tokens) |\n|---|---|---|")
    for w, name, tokens in cap_rows:
        print(f"| {w} | {name} | {tokens:,} |")


def print_decode_only(decode_rows: dict) -> None:
    """Decode-only table (synthetic caches)."""
    print("\n| N | variant | decode ms/tok (graph) | decode speedup vs full | KV GB | peak GB |"
          "\n|---|---|---|---|---|---|")
    for n, byvar in decode_rows.items():
        base = byvar["full"]["decode"]
        for name, r in byvar.items():
            if r["decode"] == "OOM":
                print(f"| {n} | {name} | OOM | - | - | - |")
                continue
            ratio = f"{base / r['decode']:.2f}x" if base != "OOM" else "-"
            print(f"| {n} | {name} | {r['decode']:.2f} | {ratio} | {r['kv'] / GB:.2f} | {r['peak'] / GB:.1f} |")


def print_sweep(sweep: list) -> None:
    print("\n| decode kernel config (keys/tile, programs/SM, warps, stages) | "
          + " | ".join(f"{c} KV heads ms" for c in SWEEP_CASES) + " |\n|---|" + "---|" * len(SWEEP_CASES))
    for cfg, times in sweep:
        print(f"| {cfg or 'default'} | " + " | ".join(f"{t:.3f}" for t in times) + " |")


def print_prefill_bound(rows: dict, prof: dict, layers: int = 32) -> None:
    """One-layer attention times, and the prefill speedup they imply: non-attention time = measured full
    prefill at the largest N minus its attention, scaled linearly in N (a projection where N was not run)."""
    n_max = max(rows)
    print("\n| N | SDPA 32 heads ms/layer | SDPA 16 heads | streaming 16 heads | non-attention ms (all layers) "
          "| prefill speedup bound | measured |\n|---|---|---|---|---|---|---|")
    non_attn = (rows[n_max]["full"]["prefill"] - layers * prof[n_max]["sdpa_32_heads"]) / n_max  # ms per token
    for n, p in sorted(prof.items()):
        full = layers * p["sdpa_32_heads"] + non_attn * n
        duo = layers * (p["sdpa_16_heads"] + p["stream_16_heads"]) + non_attn * n
        measured = f"{rows[n]['full']['prefill'] / rows[n]['duo']['prefill']:.2f}x" if n in rows else "not run"
        print(f"| {n} | {p['sdpa_32_heads']:.1f} | {p['sdpa_16_heads']:.1f} | {p['stream_16_heads']:.2f} "
              f"| {non_attn * n:.0f} | {full / duo:.2f}x | {measured} |")


def capacity_run(model, args, total: int) -> None:
    """Quantize the (Duo) model's weights to W4A16 in place, time decode at the first context, and find the
    largest context that runs with INT4 KV, with and without DuoAttention (synthetic cache contents)."""
    t1 = time.time()
    quantize_causal_lm(model, torch.randint(0, 128000, (1, 256), device=DEV), "w4a16", progress=False)
    wq = weight_bytes(model)
    print(f"model quantized to W4A16 (SVDQuant module): {wq / GB:.2f} GB in {time.time() - t1:.0f}s", flush=True)
    small = {name: decode_only(model, args.contexts[0], args, **opts) for name, opts in VARIANTS.items()}
    print(f"W4A16 weights, decode only at N={args.contexts[0]}: {small}", flush=True)
    found = capacity_search(model, CAPACITY_LAYOUTS, args.capacity, args)
    print(f"\nCapacity, run ({total / GB:.1f} GB GPU, W4A16 weights {wq / GB:.2f} GB, synthetic cache contents, "
          f"graph decode steps):\n| layout | largest N run (of {args.capacity}) | decode ms/tok | KV GB | peak GB "
          f"| logits finite |\n|---|---|---|---|---|---|")
    for name, (n, r) in found.items():
        print(f"| {name} | {n:,} | {r['decode']:.2f} | {r['kv'] / GB:.2f} | {r['peak'] / GB:.1f} | {r['finite']} |")


@torch.no_grad()
def decode_profile(model, n: int, steps: int = 5, top: int = 14, **opts) -> None:
    """GPU kernel time per decode token by kernel name (torch.profiler over eager steps, which run the kernels
    of the graph; synthetic cache)."""
    cache = DuoCache.from_model(model, max_cache_len=n + SLACK, static=True, **opts)
    fill_synthetic(model, cache, n)
    dec = GraphedDecoder(model, cache, n, use_graph=False)
    tok = torch.ones(1, 1, dtype=torch.long, device=DEV)
    for _ in range(3):
        dec(tok)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            dec(tok)
        torch.cuda.synchronize()
    kernels = [(e.key, e.device_time_total, e.count) for e in prof.key_averages()]
    kernels = sorted((k for k in kernels if k[1] > 0), key=lambda k: -k[1])
    total = sum(k[1] for k in kernels) / steps
    print(f"\nkernel time per token, N={n} {opts or 'bf16 KV'}: {total / 1e3:.2f} ms in "
          f"{sum(k[2] for k in kernels) // steps} kernels\n| kernel | us/token | calls/token |\n|---|---|---|")
    for name, us, count in kernels[:top]:
        print(f"| {name[:70]} | {us / steps:.0f} | {count // steps} |")
    del dec, cache
    torch.cuda.empty_cache()


def w4_decode(model, args) -> None:
    """Decode only at --decode-contexts with bf16 weights, then with the same model's linears quantized to W4A16
    in place (one token -> the INT4 GEMV): full vs Duo at each KV precision, same weights within a table; with
    --profile, kernel times of full and Duo at the first context."""
    def rows():
        return {n: {name: decode_only(model, n, args, **opts) for name, opts in VARIANTS.items()}
                for n in args.decode_contexts}

    def profiles():
        if args.profile:
            for opts in (VARIANTS["full"], VARIANTS["duo"]):
                decode_profile(model, args.decode_contexts[0], **opts)
    print("\nbf16 weights:")
    print_decode_only(rows())
    profiles()
    quantize_causal_lm(model, torch.randint(0, 128000, (1, 256), device=DEV), "w4a16", progress=False)
    print(f"\nW4A16 weights (SVDQuant module, {weight_bytes(model) / GB:.2f} GB):")
    print_decode_only(rows())
    profiles()


def identification_time(model, n: int, steps: int = 3) -> dict:
    """Seconds at n tokens (random ids, target = the last 64 tokens): one gate-training step (forward + backward,
    activation checkpointing; mean of ``steps`` after one warm-up step; the paper trains 2000) and one
    training-free scoring pass (score_heads: one forward computing full and streaming attention per layer)."""
    ids = torch.randint(0, 128000, (1, n), device=DEV)
    target = torch.zeros(1, n, dtype=torch.bool, device=DEV)
    target[:, -64:] = True
    cfg = IdentifyConfig(steps=1, sink=SINK, recent=RECENT, chunk=1024)
    out = {}
    for name, fn in {"gate_step_s": lambda: identify(model, lambda step: (ids, target), cfg, progress=False),
                     "score_pass_s": lambda: score_heads(model, [(ids, target)], SINK, RECENT, chunk=1024)}.items():
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
        out[name] = (time.perf_counter() - t0) / steps
        print(f"  N={n} {name}: {out[name]:.2f}", flush=True)  # partial results survive a call's time limit
    out["gate_2000_steps_min"] = out["gate_step_s"] * 2000 / 60
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--steps", type=int, default=30, help="timed decode steps (median)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--prefill-reps", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=32768)
    ap.add_argument("--profile-contexts", type=int, nargs="+", default=[131072, 262144],
                    help="contexts of the one-layer attention profile (prefill bound projection)")
    ap.add_argument("--decode-contexts", type=int, nargs="*", default=[262144, 524288],
                    help="decode-only contexts (synthetic cache contents, no prefill)")
    ap.add_argument("--capacity", type=int, nargs="*", default=[2_000_000, 2_100_000, 2_200_000, 2_300_000, 2_400_000,
                                                                 3_300_000, 4_000_000, 4_200_000, 4_300_000,
                                                                 4_400_000, 4_500_000, 4_600_000],
                    help="contexts tried with 4-bit weights + INT4 KV, synthetic cache")
    ap.add_argument("--profile", action="store_true", help="w4-decode: kernel times per token (torch.profiler)")
    ap.add_argument("--w4a16", action="store_true", help="long-prefill: run again with the linears quantized to W4A16")
    ap.add_argument("--fuse-norms", action="store_true", help="one-launch RMSNorms (fuse_rms_norms) in every variant")
    ap.add_argument("--only", choices=["sweep", "chunk-attn", "decode", "w4-decode", "capacity", "long-prefill",
                                       "identify-time"],
                    help="run one part: the decode-kernel sweep (at --contexts), decode only (at --decode-contexts), "
                         "bf16 vs W4A16 weights decode only, the capacity run, or chunked prefill full vs Duo at "
                         "--contexts in --chunk-token chunks, or identification time (gate step vs scoring pass) "
                         "at --contexts")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.only == "chunk-attn":
        for n in args.contexts:
            chunk_attention_probe(n, args.chunk)
        return
    if args.only == "sweep":
        for n in args.contexts:
            print(f"N={n}")
            print_sweep(decode_kernel_sweep(n, DECODE_SWEEP))
        return
    cfg = llama3_8b_config(max(args.contexts + args.decode_contexts + args.capacity) + 4096)
    t0 = time.time()
    with torch.device(DEV):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()
    if args.fuse_norms:
        print(f"fused RMSNorms: {fuse_rms_norms(model)}", flush=True)
    weights_bf16 = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"{torch.cuda.get_device_name()} | model {weights_bf16 / GB:.2f} GB bf16, built in {time.time() - t0:.0f}s",
          flush=True)
    rng = np.random.default_rng(0)
    mask = np.stack([rng.permutation(np.arange(cfg.num_key_value_heads) < cfg.num_key_value_heads // 2)
                     for _ in range(cfg.num_hidden_layers)])  # 50% retrieval heads, 4 of 8 per layer

    if args.only == "identify-time":
        for n in args.contexts:
            print(f"N={n} identification: {identification_time(model, n)}", flush=True)
        return
    if args.only == "decode":
        duo = apply_duo(model, mask, SINK, RECENT)
        print_decode_only({n: {name: decode_only(duo, n, args, **opts) for name, opts in VARIANTS.items()}
                           for n in args.decode_contexts})
        return
    if args.only == "w4-decode":
        w4_decode(apply_duo(model, mask, SINK, RECENT), args)
        return
    if args.only == "long-prefill":
        duo = apply_duo(model, mask, SINK, RECENT)
        long_prefill(duo, args.contexts, args.chunk)
        if args.w4a16:
            quantize_causal_lm(duo, torch.randint(0, 128000, (1, 256), device=DEV), "w4a16", progress=False)
            print(f"\nW4A16 weights (SVDQuant module, {weight_bytes(duo) / GB:.2f} GB):", flush=True)
            long_prefill(duo, args.contexts, args.chunk)
        return
    if args.only == "capacity":
        capacity_run(apply_duo(model, mask, SINK, RECENT), args, torch.cuda.mem_get_info()[1])
        return
    check = correctness(model, mask)  # applies DuoAttention (in place) after the reference pass
    print(f"correctness (rel. L2 of final hidden states, 2K tokens): {check}", flush=True)
    try:
        gcheck = graph_check(model)
    except Exception as err:  # reported in the table header line; decode timings fall back to eager steps
        gcheck, GRAPHS["on"] = f"GRAPH CAPTURE FAILED, decode timed eagerly: {type(err).__name__}: {err}"[:300], False
    print(f"graph replay vs eager decode (rel. L2 of logits): {gcheck}", flush=True)
    rows, sdpa = {}, {}
    for i, n in enumerate(args.contexts):
        rows[n] = {}
        for name, opts in VARIANTS.items():
            quant = "kv_bits" in opts
            rows[n][name] = bench_variant(model, n, args, warm=i == 0 or name == "duo",
                                          reps=1 if quant else args.prefill_reps, eager=not quant, **opts)
            torch.cuda.empty_cache()
            print(f"{name} N={n}: {rows[n][name]} ({time.time() - t0:.0f}s)", flush=True)
    prof = {n: attention_profile(n) for n in sorted({max(args.contexts), *args.profile_contexts})}
    print(f"attention profile: {prof}", flush=True)
    sweep = decode_kernel_sweep(max(args.contexts), DECODE_SWEEP)
    print(f"decode kernel sweep (config, ms of {SWEEP_CASES}): {sweep}", flush=True)
    chunk = chunked(model, max(args.contexts), args.chunk, 2 * args.chunk)
    print(f"chunked prefill: {chunk} ({time.time() - t0:.0f}s)", flush=True)
    for n in args.contexts:  # last: a failed graph capture must not cost the measurements above
        try:
            sdpa[n] = f"{bench_sdpa_static(model, n, args):.2f}"
        except Exception as err:  # reported, not hidden: transformers' path may not capture
            sdpa[n] = f"failed: {type(err).__name__}: {str(err)[:120]}"
        torch.cuda.empty_cache()
        print(f"transformers SDPA + StaticCache graph decode N={n}: {sdpa[n]}", flush=True)

    decode_rows = {n: {name: decode_only(model, n, args, **opts) for name, opts in VARIANTS.items()}
                   for n in args.decode_contexts}
    print(f"decode only: {decode_rows} ({time.time() - t0:.0f}s)", flush=True)

    w4 = int4_weight_bytes(model)
    total = torch.cuda.mem_get_info()[1]
    n0 = args.contexts[0]
    workspace = rows[n0]["duo"]["peak_prefill"] - weights_bf16 - rows[n0]["duo"]["kv"]
    cap_rows = [(wname, name, int((total - wbytes - workspace - const) / per_tok))
                for wname, wbytes in (("bf16", weights_bf16), ("int4", w4))
                for name, (per_tok, const) in bytes_per_token(model).items()]
    info = (f"{total / GB:.1f} GB GPU; computed from measured cache bytes, not run; weights bf16 "
            f"{weights_bf16 / GB:.2f} GB, int4 {w4 / GB:.2f} GB; workspace {workspace / GB:.2f} GB = peak of a "
            f"{n0}-token Duo prefill minus weights and cache")
    print_tables(rows, sdpa, cap_rows, check, gcheck, prof, chunk, info)
    print_decode_only(decode_rows)
    print_sweep(sweep)
    if args.capacity:  # last: quantizes the model's weights in place
        capacity_run(model, args, total)

if __name__ == "__main__":
    main()
