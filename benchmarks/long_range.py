"""Long-range quality: multi-query key-value recall at 2K tokens, dense vs each sparse kind.

A sequence holds P key-value pairs (P distinct keys out of 512, values out of 64), then the same
P keys again in a shuffled order, each followed by its value:

    k1 v1 k2 v2 ... kP vP | k7 v7 k2 v2 ...          (4P tokens; P = 512 -> 2,048 tokens)

Only the values of the second half are scored (loss and accuracy): to predict one, a model must
find the earlier occurrence of its key anywhere in the first half, up to 2K tokens back. Chance is
1/64. The same small MLA model (2 layers, width 64, 4 heads) is trained for the same wall-clock
budget in each attention kind:

    dense    full causal attention
    sliding  a window of 256 keys: a pair more than 256 tokens back is out of reach by design
    dsa      the lightning indexer picks 128 keys per query; the first 30% of the budget is the
             dense warm-up (only the indexer learns from the dense attention), then sparse training
    nsa      NSA has its own key/value projections, so this one is an MHA model (4 heads of 16):
             blocks of 32, 8 selected blocks per query block, window 256
    dense-mha  the MHA model with full attention, NSA's baseline

    python benchmarks/long_range.py [--seconds 150] [--kinds dense,sliding,dsa] [--threads 2]

Prints one JSON line per kind: accuracy on 32 fresh sequences, steps, seconds per step.

Status (2026-11-30, 2-core VM): not yet a usable benchmark. Within minutes of training none of the
kinds learns the recall, not even dense attention on a 128-token version (928 steps, batch 16,
lr 1e-2: accuracy 2.3% against 1.6% chance). Induction-style recall needs far more samples than
this budget gives; see the issue note before relying on it.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from nanoseek import ModelConfig, Transformer

N_KEYS, N_VALUES = 64, 64


def make_batch(batch: int, pairs: int, g: torch.Generator):
    keys = torch.argsort(torch.rand(batch, N_KEYS, generator=g), dim=1)[:, :pairs] if pairs <= N_KEYS else \
        torch.randint(0, N_KEYS, (batch, pairs), generator=g)
    values = torch.randint(N_KEYS, N_KEYS + N_VALUES, (batch, pairs), generator=g)
    order = torch.argsort(torch.rand(batch, pairs, generator=g), dim=1)
    first = torch.stack([keys, values], -1).flatten(1)
    second = torch.stack([keys.gather(1, order), values.gather(1, order)], -1).flatten(1)
    seq = torch.cat([first, second], 1)
    x, y = seq[:, :-1], seq[:, 1:].clone()
    scored = torch.zeros_like(y, dtype=torch.bool)
    scored[:, 2 * pairs::2] = True  # targets that are second-half values
    y[~scored] = -1
    return x, y


def config(kind: str, seq: int) -> ModelConfig:
    base = dict(vocab_size=N_KEYS + N_VALUES, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=192, max_position_embeddings=seq, attention="mla", q_lora_rank=32,
                kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, ffn="swiglu")
    if kind in ("nsa", "dense-mha"):
        base.update(attention="mha", rope_interleave=False)
    if kind == "nsa":
        base.update(sparse="nsa", nsa_block=32, nsa_topn=8, sliding_window=256)
    if kind == "sliding":
        base.update(sparse="sliding", sliding_window=256)
    if kind == "dsa":
        base.update(sparse="dsa", index_topk=128, index_n_heads=4, index_head_dim=32)
    return ModelConfig(**base)


@torch.no_grad()
def accuracy(model, pairs: int, batches: int = 4, batch: int = 8) -> float:
    model.eval()
    g = torch.Generator().manual_seed(12345)
    hits = total = 0
    for _ in range(batches):
        x, y = make_batch(batch, pairs, g)
        pred = model(x).logits.argmax(-1)
        hits += int(((pred == y) & (y >= 0)).sum())
        total += int((y >= 0).sum())
    model.train()
    return hits / total


def run(kind: str, seconds: float, pairs: int, batch: int, lr: float) -> dict:
    torch.manual_seed(0)
    model = Transformer(config(kind, 4 * pairs)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    warmup_until = 0.3 * seconds if kind == "dsa" else 0.0
    start, steps, loss = time.perf_counter(), 0, float("nan")
    while (elapsed := time.perf_counter() - start) < seconds:
        model.set_dsa_warmup(elapsed < warmup_until)
        x, y = make_batch(batch, pairs, g)
        out = model(x, targets=y)
        total = out.loss + sum(v for v in out.aux.values() if v.requires_grad)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps += 1
        loss = out.loss.item()
    model.set_dsa_warmup(False)
    wall = time.perf_counter() - start
    return {"bench": "long_range", "kind": kind, "seq": 4 * pairs, "accuracy": round(accuracy(model, pairs), 4),
            "chance": round(1 / N_VALUES, 4), "steps": steps, "seconds_per_step": round(wall / steps, 3),
            "final_train_loss": round(loss, 4), "threads": torch.get_num_threads()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=150.0, help="training budget per kind")
    parser.add_argument("--kinds", default="dense,sliding,dsa,dense-mha,nsa")
    parser.add_argument("--pairs", type=int, default=512, help="pairs per half (sequence = 4 x pairs)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for kind in args.kinds.split(","):
        print(json.dumps(run(kind, args.seconds, args.pairs, args.batch, args.lr)), flush=True)


if __name__ == "__main__":
    main()
