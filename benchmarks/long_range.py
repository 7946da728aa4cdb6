"""Long-range quality: copy a random 1K-token sequence from 1K tokens back, dense vs each sparse kind.

Each training / test sequence is a random run R of N distinct tokens (out of a vocabulary of 2N)
followed by R again:

    r1 r2 ... rN | r1 r2 ... rN                 (2N tokens; N = 1024 -> 2,048 tokens)

Only the second copy is scored (loss and accuracy, N - 1 targets per sequence): to predict r_{j+1}
after r_j, a model must find r_j N tokens back and copy its successor, the job of an induction head
(a previous-token head in layer 1, a matching head in layer 2). Chance is 1 / 2N. The same small
model (2 layers, width 128, 4 heads) trains for the same number of steps in each attention kind:

    dense      full causal MLA (the MLA baseline)
    sliding    MLA, a window of 256 keys: the copy is 1,024 tokens back, out of reach by design
    dsa        MLA + lightning indexer, 128 keys per query; the first --warmup-fraction of the steps
               are the dense warm-up (only the indexer learns, from the dense attention), then sparse
    dense-mha  MHA (4 heads of 32) with full attention, NSA's baseline
    nsa        MHA + NSA: blocks of 32, 8 selected blocks per query block, window 256
    dense-v4   DeepSeek-V4 attention (one shared K=V head of 64, sinks) with no window
    csa        V4 + window 128 + compressed entries (rate 4), the indexer picks 64 per query
    hca        V4 + window 128 + every compressed entry (rate 128)

    python benchmarks/long_range.py [--steps 300] [--kinds dense,sliding,...] [--threads 2]

Prints one JSON line per kind: accuracy over 8 fresh sequences, steps, seconds per step, final loss.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from nanoseek import ModelConfig, Transformer

KINDS = ("dense", "sliding", "dsa", "dense-mha", "nsa", "dense-v4", "csa", "hca")


def make_batch(batch: int, n: int, g: torch.Generator):
    run = torch.rand(batch, 2 * n, generator=g).argsort(dim=1)[:, :n]  # n distinct tokens of 2n
    seq = torch.cat([run, run], dim=1)
    x, y = seq[:, :-1], seq[:, 1:].clone()
    y[:, :n] = -1  # score the second copy only
    return x, y


def config(kind: str, n: int) -> ModelConfig:
    base = dict(vocab_size=2 * n, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=256, max_position_embeddings=2 * n, ffn="swiglu", attention="mla",
                q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
    if kind == "sliding":
        base.update(sparse="sliding", sliding_window=256)
    if kind == "dsa":
        base.update(sparse="dsa", index_topk=128, index_n_heads=4, index_head_dim=32)
    if kind in ("nsa", "dense-mha"):
        base.update(attention="mha", rope_interleave=False)
    if kind == "nsa":
        base.update(sparse="nsa", nsa_block=32, nsa_topn=8, sliding_window=256)
    if kind in ("dense-v4", "csa", "hca"):
        base.update(attention="v4", head_dim=64, qk_rope_head_dim=16, o_groups=2, o_lora_rank=64,
                    sparse="dense" if kind == "dense-v4" else kind, sliding_window=128, compress_rate_csa=4,
                    compress_rate_hca=128, index_topk=64, index_n_heads=4, index_head_dim=32)
    return ModelConfig(**base)


@torch.no_grad()
def accuracy(model, n: int, batches: int = 4, batch: int = 2) -> float:
    model.eval()
    g = torch.Generator().manual_seed(12345)
    hits = total = 0
    for _ in range(batches):
        x, y = make_batch(batch, n, g)
        pred = model(x).logits.argmax(-1)
        hits += int(((pred == y) & (y >= 0)).sum())
        total += int((y >= 0).sum())
    model.train()
    return hits / total


def run(kind: str, steps: int, n: int, batch: int, lr: float, warmup_fraction: float) -> dict:
    torch.manual_seed(0)
    model = Transformer(config(kind, n)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(0)
    warmup = int(warmup_fraction * steps) if kind in ("dsa", "csa") else 0
    start, loss = time.perf_counter(), float("nan")
    for step in range(steps):
        model.set_dsa_warmup(step < warmup)
        for group in opt.param_groups:  # linear warm-up, then constant
            group["lr"] = lr * min(1.0, (step + 1) / 30)
        x, y = make_batch(batch, n, g)
        out = model(x, targets=y)
        total = out.loss + sum(v for v in out.aux.values() if v.requires_grad)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.after_optimizer_step(update_bias=step >= warmup)
        loss = out.loss.item()
    model.set_dsa_warmup(False)
    wall = time.perf_counter() - start
    return {"bench": "long_range", "kind": kind, "seq": 2 * n, "accuracy": round(accuracy(model, n), 4),
            "chance": round(1 / (2 * n), 5), "steps": steps, "batch": batch, "seconds_per_step": round(wall / steps, 3),
            "final_train_loss": round(loss, 4), "threads": torch.get_num_threads()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per kind")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--n", type=int, default=1024, help="length of the random run (sequence = 2n)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup-fraction", type=float, default=0.3, help="dsa/csa: dense warm-up share")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for kind in args.kinds.split(","):
        if kind not in KINDS:
            parser.error(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
        print(json.dumps(run(kind, args.steps, args.n, args.batch, args.lr, args.warmup_fraction)), flush=True)


if __name__ == "__main__":
    main()
