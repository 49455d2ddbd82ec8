"""DuoAttention device benchmark: Llama-3-8B architecture (random bf16 weights) on one GPU.

    PYTHONUNBUFFERED=1 python3 benchmarks/duo.py [--contexts 32768 65536 131072]

Measures, per context length N: prefill latency (single pass over N tokens; full attention =
SDPA flash causal, DuoAttention = flash for retrieval heads + block-sparse flex_attention for
streaming heads, writing a DuoCache), decode latency per token (full = SDPA + transformers
StaticCache; Duo = DuoCache), KV-cache bytes and peak memory; then checks Duo against a dense
gated reference on GPU and computes the largest context that fits (bf16 / 4-bit weights,
bf16 / INT4 KV, with and without DuoAttention). Timings: CUDA events, warm-up, median.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache  # noqa: E402

from quantduo.duo.cache import DuoCache  # noqa: E402
from quantduo.duo.deploy import apply_duo  # noqa: E402
from quantduo.duo.identify import gated_model  # noqa: E402
from quantduo.duo.kvquant import bytes_per_element  # noqa: E402

GB = 1e9
SINK, RECENT = 64, 256


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


def cache_bytes(cache) -> int:
    if isinstance(cache, DuoCache):
        return cache.memory_bytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def decode_ms(model, cache, steps: int, warmup: int) -> list[float]:
    tok = torch.ones(1, 1, dtype=torch.long, device="cuda")
    return cuda_ms(lambda: model(input_ids=tok, past_key_values=cache, use_cache=True), warmup, steps)


@torch.no_grad()
def bench_full(model, n: int, args) -> dict:
    ids = torch.randint(0, 128000, (1, n), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    pre = cuda_ms(lambda: model.model(input_ids=ids, use_cache=False), 0, args.prefill_reps)
    peak_prefill = torch.cuda.max_memory_allocated()
    cache = StaticCache(config=model.config, max_cache_len=n + args.steps + args.warmup + 8)
    for s in range(0, n, 8192):  # fill (untimed): chunked prefill into the static cache
        model.model(input_ids=ids[:, s:s + 8192], past_key_values=cache, use_cache=True)
    torch.cuda.reset_peak_memory_stats()
    dec = decode_ms(model, cache, args.steps, args.warmup)
    res = dict(prefill=statistics.median(pre), decode=statistics.median(dec), kv=cache_bytes(cache),
               peak_prefill=peak_prefill, peak_decode=torch.cuda.max_memory_allocated())
    return res


@torch.no_grad()
def bench_duo(model, n: int, args) -> dict:
    ids = torch.randint(0, 128000, (1, n), device="cuda")
    cache = DuoCache.from_model(model, max_cache_len=n + args.steps + args.warmup + 8)

    def prefill():
        cache.reset()
        model.model(input_ids=ids, past_key_values=cache, use_cache=True)

    prefill()  # compiles flex_attention / block masks for this shape
    torch.cuda.reset_peak_memory_stats()
    pre = cuda_ms(prefill, 0, args.prefill_reps)
    peak_prefill = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    dec = decode_ms(model, cache, args.steps, args.warmup)
    res = dict(prefill=statistics.median(pre), decode=statistics.median(dec), kv=cache_bytes(cache),
               peak_prefill=peak_prefill, peak_decode=torch.cuda.max_memory_allocated())
    return res


@torch.no_grad()
def correctness(model, mask: np.ndarray, n: int = 2048) -> dict:
    """Relative L2 error of DuoCache chunked prefill + decode vs the dense gated reference (binary gates),
    and of full attention vs that reference (shows the check is sensitive)."""
    ids = torch.randint(0, 128000, (1, n), device="cuda")
    with gated_model(model, torch.tensor(mask, dtype=torch.float32, device="cuda"), SINK, RECENT, chunk=512):
        ref = model.model(input_ids=ids, use_cache=False).last_hidden_state.float()
    full = model.model(input_ids=ids, use_cache=False).last_hidden_state.float()
    apply_duo(model, mask, SINK, RECENT)
    cache = DuoCache.from_model(model)
    outs = [model.model(input_ids=ids[:, a:b], past_key_values=cache, use_cache=True).last_hidden_state
            for a, b in ((0, 1024), (1024, n - 16))]
    outs += [model.model(input_ids=ids[:, i:i + 1], past_key_values=cache, use_cache=True).last_hidden_state
             for i in range(n - 16, n)]
    duo = torch.cat(outs, 1).float()
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    return {"duo_vs_ref": rel(duo, ref), "full_vs_ref": rel(full, ref),
            "duo_vs_ref_decode": rel(duo[:, -16:], ref[:, -16:])}


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


def capacity(cfg, total: int, workspace: int, weights: dict, retrieval_frac: float) -> list[tuple]:
    """Largest context (tokens) for each (weights, KV precision, attention) setting."""
    d, layers, kv = cfg.head_dim, cfg.num_hidden_layers, cfg.num_key_value_heads
    rows = []
    for wname, wbytes in weights.items():
        for kvname, elem in (("bf16", 2.0), ("int4", bytes_per_element(4, 128))):
            for duo in (False, True):
                per_tok = 2 * layers * kv * d * elem * (retrieval_frac if duo else 1.0)
                const = 2 * layers * kv * (1 - retrieval_frac) * (SINK + RECENT) * d * elem if duo else 0
                rows.append((wname, kvname, "duo50" if duo else "full",
                             int((total - wbytes - workspace - const) / per_tok)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 65536, 131072])
    ap.add_argument("--steps", type=int, default=30, help="timed decode steps (median)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--prefill-reps", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = llama3_8b_config(max(args.contexts) + 4096)
    t0 = time.time()
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()
    weights_bf16 = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"{torch.cuda.get_device_name()} | model {weights_bf16 / GB:.2f} GB bf16, built in {time.time() - t0:.0f}s",
          flush=True)
    rng = np.random.default_rng(0)
    mask = np.stack([rng.permutation(np.arange(cfg.num_key_value_heads) < cfg.num_key_value_heads // 2)
                     for _ in range(cfg.num_hidden_layers)])  # 50% retrieval heads, 4 of 8 per layer

    full = {}
    for n in args.contexts:
        full[n] = bench_full(model, n, args)
        torch.cuda.empty_cache()  # the cache of this context is gone with bench_full's frame
        print(f"full N={n}: {full[n]}", flush=True)
    check = correctness(model, mask)  # applies DuoAttention (in place) after the reference pass
    print(f"correctness (rel. L2 of final hidden states, 2K tokens): {check}", flush=True)
    duo = {}
    for n in args.contexts:
        duo[n] = bench_duo(model, n, args)
        torch.cuda.empty_cache()
        print(f"duo  N={n}: {duo[n]}", flush=True)

    w4 = int4_weight_bytes(model)
    total = torch.cuda.mem_get_info()[1]
    n0 = args.contexts[0]
    workspace = duo[n0]["peak_prefill"] - weights_bf16 - duo[n0]["kv"]
    caps = capacity(cfg, total, workspace, {"bf16": weights_bf16, "int4": w4}, mask.mean())

    print("\n| N | prefill full ms | prefill duo ms | speedup | decode full ms/tok | decode duo ms/tok | speedup "
          "| KV full GB | KV duo GB | ratio | peak full GB | peak duo GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.contexts:
        f, d = full[n], duo[n]
        print(f"| {n} | {f['prefill']:.0f} | {d['prefill']:.0f} | {f['prefill'] / d['prefill']:.2f}x "
              f"| {f['decode']:.2f} | {d['decode']:.2f} | {f['decode'] / d['decode']:.2f}x "
              f"| {f['kv'] / GB:.2f} | {d['kv'] / GB:.2f} | {f['kv'] / d['kv']:.2f}x "
              f"| {max(f['peak_prefill'], f['peak_decode']) / GB:.1f} | {max(d['peak_prefill'], d['peak_decode']) / GB:.1f} |")
    print(f"\nGPU correctness (Duo vs dense gated reference): rel L2 {check['duo_vs_ref']:.4f} "
          f"(decode tokens {check['duo_vs_ref_decode']:.4f}); full attention vs same reference {check['full_vs_ref']:.4f}")
    print(f"\nCapacity on this GPU ({total / GB:.1f} GB; computed, not run): weights bf16 {weights_bf16 / GB:.2f} GB, "
          f"int4 {w4 / GB:.2f} GB; workspace {workspace / GB:.2f} GB (measured: Duo prefill of a {n0}-token chunk)")
    print("| weights | KV | attention | max context (tokens) |\n|---|---|---|---|")
    for w, kvp, att, tokens in caps:
        print(f"| {w} | {kvp} | {att} | {tokens:,} |")


if __name__ == "__main__":
    main()
