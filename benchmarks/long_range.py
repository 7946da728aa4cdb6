"""Long-range quality: key-value retrieval across 1K+ tokens at 2K, dense vs each sparse kind.

A sequence of 2N tokens (N = 1024) holds filler tokens (64 kinds) and, at random positions in its
first quarter, four key-value facts written as one token each: value v (of 16) of key a (of 4) is
token 64 + 16a + v. The second half is all queries: token 128 + a asks for key a's value, and the
target at that position is the fact token of key a. Every second-half position is scored (N
targets per sequence); the answer lies 512 to 2,047 tokens back. Chance is 1/16 (1/64 for a model
that has not learned which fact belongs to which key). The same small model (2 layers, width 128,
4 heads) trains for the same number of steps in each attention kind, 4,096 tokens per step, on a
length curriculum (sequences of N/8 tokens for 40% of the steps, N/2 for 30%, then 2N; the scored
model is the last one, tested at 2N). The windows (32) are shorter than the first phase's distances
(facts to queries: 32 to 127 tokens), so from the first step a sparse kind must reach back through
its long-range path:

    dense      full causal MLA (the MLA baseline)
    sliding    MLA, a window of 32 keys: two layers relay at most 62 tokens, the answer is at least
               513 back at 2N; out of reach by design
    dsa        MLA + lightning indexer, 128 keys per query; the first --warmup-fraction of the steps
               train densely (the whole model, the indexer by its KL loss beside it: there is no
               trained dense model to start from, as V3.2 had), then sparse
    dense-mha  MHA (4 heads of 32) with full attention, NSA's baseline
    nsa        MHA + NSA: blocks of 32, 8 selected blocks per query block, window 32
    dense-v4   DeepSeek-V4 attention (one shared K=V head of 64, sinks) with no window
    csa        V4 + window 32 + compressed entries (rate 4), the indexer picks 64 per query
               (dense first, as dsa: every visible entry)
    hca        V4 + window 32 + every compressed entry (rate 128)

    python benchmarks/long_range.py [--steps 200] [--kinds dense,sliding,...] [--threads 2]

Prints one JSON line per kind: accuracy over 8 fresh sequences, steps, seconds per step, final loss.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from nanoseek import ModelConfig, Transformer

KINDS = ("dense", "sliding", "dsa", "dense-mha", "nsa", "dense-v4", "csa", "hca")


FILLER, KEYS, VALUES = 64, 4, 16
VOCAB = FILLER + KEYS * VALUES + KEYS


def make_batch(batch: int, n: int, g: torch.Generator):
    x = torch.randint(0, FILLER, (batch, 2 * n), generator=g)
    values = torch.randint(0, VALUES, (batch, KEYS), generator=g)
    facts = FILLER + VALUES * torch.arange(KEYS) + values  # (B, KEYS) fact tokens
    where = torch.rand(batch, n // 2, generator=g).argsort(dim=1)[:, :KEYS]  # distinct, first quarter
    x.scatter_(1, where, facts)
    asked = torch.randint(0, KEYS, (batch, n), generator=g)
    x[:, n:] = FILLER + KEYS * VALUES + asked
    y = torch.full_like(x, -1)
    y[:, n:] = facts.gather(1, asked)
    return x, y


def config(kind: str, n: int) -> ModelConfig:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=2 * n,
        ffn="swiglu",
        attention="mla",
        q_lora_rank=64,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
    )
    if kind == "sliding":
        base.update(sparse="sliding", sliding_window=32)
    if kind == "dsa":
        base.update(sparse="dsa", index_topk=128, index_n_heads=4, index_head_dim=32)
    if kind in ("nsa", "dense-mha"):
        base.update(attention="mha", rope_interleave=False)
    if kind == "nsa":
        base.update(sparse="nsa", nsa_block=32, nsa_topn=8, sliding_window=32)
    if kind in ("dense-v4", "csa", "hca"):
        base.update(
            attention="v4",
            head_dim=64,
            qk_rope_head_dim=16,
            o_groups=2,
            o_lora_rank=64,
            sparse="dense" if kind == "dense-v4" else kind,
            sliding_window=32,
            compress_rate_csa=4,
            compress_rate_hca=128,
            index_topk=64,
            index_n_heads=4,
            index_head_dim=32,
        )
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


def curriculum(step: int, steps: int, n: int) -> int:
    """Half-length n/16 for the first 40% of the steps, n/4 for the next 30%, then n."""
    if step < 0.4 * steps:
        return max(8, n // 16)
    return max(8, n // 4) if step < 0.7 * steps else n


def run(kind: str, steps: int, n: int, tokens: int, lr: float, warmup_fraction: float) -> dict:
    torch.manual_seed(0)
    model = Transformer(config(kind, n)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(0)
    warmup = int(warmup_fraction * steps) if kind in ("dsa", "csa") else 0
    start, loss = time.perf_counter(), float("nan")
    for step in range(steps):
        model.set_dsa_warmup(step < warmup, freeze_model=False)  # from scratch: all of it trains densely
        for group in opt.param_groups:  # linear warm-up, then constant
            group["lr"] = lr * min(1.0, (step + 1) / 30)
        length = curriculum(step, steps, n)
        x, y = make_batch(max(1, tokens // (2 * length)), length, g)
        out = model(x, targets=y)
        total = out.loss + sum(v for v in out.aux.values() if v.requires_grad)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.update_balance_bias(out.expert_load)
        loss = out.loss.item()
    model.set_dsa_warmup(False)
    wall = time.perf_counter() - start
    return {
        "bench": "long_range",
        "kind": kind,
        "seq": 2 * n,
        "accuracy": round(accuracy(model, n), 4),
        "chance": round(1 / VALUES, 4),
        "steps": steps,
        "tokens_per_step": tokens,
        "seconds_per_step": round(wall / steps, 3),
        "final_train_loss": round(loss, 4),
        "threads": torch.get_num_threads(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps per kind")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--n", type=int, default=1024, help="half the sequence length")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch = tokens / length)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup-fraction", type=float, default=0.5, help="dsa/csa: dense warm-up share")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for kind in args.kinds.split(","):
        if kind not in KINDS:
            parser.error(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
        print(json.dumps(run(kind, args.steps, args.n, args.tokens, args.lr, args.warmup_fraction)), flush=True)


if __name__ == "__main__":
    main()
