"""Fast identification (training-free ``score_heads``) vs gate training on a tiny retrieval LM: overlap of the
chosen retrieval heads and passkey accuracy at 0.25 / 0.5 / 0.75 streaming heads (CPU).

    python scripts/compare_identification.py                                    # the shipped tiny LM
    python scripts/compare_identification.py --model quantduo/assets/tiny_lm_seed1 --context 192   # the second

Measured (2026-12-06, shared 2-core CPU, gate training in the reference's two-way form; overlap: fraction of the
gate-trained retrieval heads the scores also choose; accuracy: passkey accuracy with the gate-trained / the scored
heads at 0.25 / 0.5 / 0.75):

    model (prompt tokens)   settings                       gates    scores   overlap 0.25/0.5/0.75   accuracy
    tiny_lm (512)           defaults (150 steps, 24)       44.6 s   0.1 s    0.92 / 0.88 / 0.75      1/1/0.96 / 1/0.96/0.96
    tiny_lm_seed1 (192)     --context 192 --threads 1      2.9 s    0.1 s    0.75 / 0.75 / 0.50      1.0 / 1.0

Full attention 1.0 and streaming only 0.0 on both models (the tiny_lm gate time was taken beside another job).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaForCausalLM

from quantduo.duo import demo
from quantduo.duo.demo import duo_accuracy
from quantduo.duo.evaluate import passkey_accuracy
from quantduo.duo.patterns import DuoPattern, save_pattern
from quantduo.models import tiny_lm

SPARSITIES = (0.25, 0.5, 0.75)


def compare(model, context: int, identify_context: int, steps: int, n_eval: int) -> tuple[dict, DuoPattern]:
    """{"train_s", "score_s", "full", sparsity: {"overlap", "gates", "scores"}} (overlap: fraction of the
    gate-trained retrieval heads the scores also choose) and the gate-trained pattern."""
    t0 = time.time()
    trained = demo.tiny_identify(model, steps, progress=False, context=identify_context)
    t1 = time.time()
    scored = demo.tiny_score(model, context=identify_context)
    t2 = time.time()
    samples = demo.eval_samples(n_eval, context=context)
    res = {"train_s": round(t1 - t0, 1), "score_s": round(t2 - t1, 1), "full": passkey_accuracy(model, samples)}
    for sp in SPARSITIES:
        rt, rs = trained.binarize(sp), scored.binarize(sp)
        res[sp] = {"overlap": float((rt & rs).sum() / max(1, rt.sum())), "gates": duo_accuracy(model, rt, samples),
                   "scores": duo_accuracy(model, rs, samples)}
    res["streaming"] = duo_accuracy(model, np.zeros_like(rt), samples)
    return res, trained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=tiny_lm.ASSET_DIR)
    ap.add_argument("--context", type=int, default=tiny_lm.EVAL_CONTEXT, help="evaluation prompt length")
    ap.add_argument("--identify-context", type=int, default=None, help="default: min(256, --context)")
    ap.add_argument("--steps", type=int, default=150, help="gate-training steps")
    ap.add_argument("--n-eval", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pattern-out", type=Path, default=None, help="also save the gate-trained pattern here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").eval()
    res, trained = compare(model, args.context, args.identify_context or min(256, args.context), args.steps,
                           args.n_eval)
    print(json.dumps(res, indent=1))
    if args.pattern_out is not None:
        save_pattern(trained, args.pattern_out, {"command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
