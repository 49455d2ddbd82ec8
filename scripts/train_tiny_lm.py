"""Train the tiny DuoAttention demo LM (reproducible: seeded; the shipped weights came from `--device cuda`).

    python scripts/train_tiny_lm.py [--steps N] [--out quantduo/assets/tiny_lm]
    # the second, smaller model (quantduo/assets/tiny_lm_seed1, for scripts/compare_identification.py): 545 s on
    # one CPU thread; with the default head_dim (hidden / 8 = 8) it stayed at passkey 0.28 after 10000 steps
    python scripts/train_tiny_lm.py --seed 1 --hidden 64 --head-dim 16 --context 96 192 --eval-context 192 \
        --batch 8 --steps 12000 --threads 1 --out quantduo/assets/tiny_lm_seed1

The task (quantduo.models.tiny_lm) mixes Markov filler text (local skill) with passkeys that
are asked for at the end of the context (long-range retrieval). Writes config.json and
model.safetensors (fp16 to stay small) into --out.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from quantduo.duo.data import make_bos_sample
from quantduo.models import tiny_lm


def batch(hay, rng, batch_size: int, context_len: int):
    """input ids [B, T] int64 and target mask [B, T] bool (positions predicting answers)."""
    max_keys = max(1, min(6, (context_len - 16) // 20))
    samples = [make_bos_sample(hay, tiny_lm.encode, tiny_lm.BOS_ID, context_len,
                               int(rng.integers(1, max_keys + 1)), rng)
               for _ in range(batch_size)]
    return torch.stack([s.input_ids for s in samples]), torch.stack([s.answer_mask() for s in samples])


def curriculum_length(rng, progress: float, context=tiny_lm.TRAIN_CONTEXT) -> int:
    """Context length: grows from 48 tokens to the full ``context`` (lo, hi) range over the first 60% of
    training."""
    lo, hi = context
    top = int(48 + (hi - 48) * min(1.0, progress / 0.6))
    return int(rng.integers(min(lo, top) // 2, top + 1))


def loss_fn(model, ids, target):
    """Next-token cross-entropy on all tokens plus the mean over answer tokens (emphasised)."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    mask = target[:, :-1].reshape(-1).float()
    return ce.mean() + (ce * mask).sum() / mask.sum(), (ce * mask).sum() / mask.sum()


@torch.no_grad()
def passkey_accuracy(model, hay, rng, n: int = 32, context: int = tiny_lm.EVAL_CONTEXT) -> float:
    """Fraction of questions (at ``context`` tokens) whose whole passkey is predicted greedily (teacher forcing)."""
    ok = 0
    for _ in range(n):
        s = make_bos_sample(hay, tiny_lm.encode, tiny_lm.BOS_ID, context, 4, rng, min_distance=64)
        pred = model(input_ids=s.input_ids[None].to(model.device)).logits[0].argmax(-1).cpu()
        p, a = s.questions[0]
        ok += bool((pred[p - 1:p - 1 + len(a)] == torch.tensor(a)).all())
    return ok / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=9000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the shipped weights: cuda, 208 s on one H200)")
    ap.add_argument("--out", type=Path, default=tiny_lm.ASSET_DIR)
    ap.add_argument("--hidden", type=int, default=128, help="hidden size (8 query / 4 KV heads, MLP 3x)")
    ap.add_argument("--head-dim", type=int, default=None,
                    help="default hidden / 8; RoPE turns all but the slowest pairs of a head's dims with position, "
                         "so matching a key name over the context needs enough of them (8 were too few)")
    ap.add_argument("--context", type=int, nargs=2, default=tiny_lm.TRAIN_CONTEXT, help="training context range")
    ap.add_argument("--eval-context", type=int, default=tiny_lm.EVAL_CONTEXT)
    ap.add_argument("--minutes", type=float, default=None, help="stop training after this wall time")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    hay = tiny_lm.haystack_ids(seed=args.seed, n_words=200_000)
    cfg = tiny_lm.llama_config(attn_implementation="sdpa", hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                               head_dim=args.head_dim or args.hidden // 8)
    model = LlamaForCausalLM(cfg).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    t0 = time.time()
    for step in range(args.steps):
        if args.minutes is not None and time.time() - t0 > 60 * args.minutes:
            print(f"stopped at step {step} after {args.minutes} minutes", flush=True)
            break
        ids, target = batch(hay, rng, args.batch, curriculum_length(rng, step / args.steps, args.context))
        loss, ans = loss_fn(model, ids.to(args.device), target.to(args.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d} loss {loss.item():.3f} answer-loss {ans.item():.3f} {time.time() - t0:.0f}s",
                  flush=True)
    model.eval()
    acc = passkey_accuracy(model, hay, np.random.default_rng(args.seed + 1), context=args.eval_context)
    print(f"passkey accuracy at {args.eval_context} tokens: {acc:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    model.to("cpu", torch.float16).save_pretrained(args.out)
    print(f"saved to {args.out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
