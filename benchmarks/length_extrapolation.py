"""Length extrapolation: train at 256 tokens, evaluate the validation loss at 256, 1K and 4K tokens.

One small character-level model (tinyshakespeare, bundled; 3 layers, width 128, 4 heads, GELU,
LayerNorm) per position kind, trained on 256-token windows (150 steps of 8 windows, AdamW at 3e-3
with warm-up and cosine decay) with the same seed, steps and data order, then scored on non-overlapping windows of each
evaluation length taken from the held-out last 10% of the text (the same number of tokens at every
length; mean cross-entropy over every position of a window, in nats per character):

    alibi        distance bias -m_h (i - j), fixed slopes
    t5           learned bucketed distance bias (32 buckets, max distance 128)
    rope         rotary, unscaled at every length
    rope+yarn    the rope model's weights, evaluated under YaRN with factor = L / 256
                 (original_max_position_embeddings = 256); at 256 the same as rope
    sinusoidal   added sinusoidal table, embeddings scaled by sqrt(d) as in Vaswani et al.
    learned      added learned table; rows past 255 never trained, so at evaluation every position
                 >= 256 uses row 255 (clamped), reported as "learned (clamped)"

    python benchmarks/length_extrapolation.py [--steps 150] [--threads 2] [--out FILE.jsonl] [--plot FILE.png]

Prints (and writes to --out) one JSON line per kind and length: kind, train/eval length, val loss,
steps, training seconds. --plot draws val loss against evaluation length, one line per kind.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from nanoseek import ModelConfig, Transformer

CORPUS = Path(__file__).resolve().parents[1] / "src" / "nanoseek" / "data" / "tinyshakespeare.txt"
KINDS = ("alibi", "t5", "rope", "rope+yarn", "sinusoidal", "learned")
TRAINED = {"alibi": "alibi", "t5": "t5", "rope": "rope", "rope+yarn": "rope", "sinusoidal": "sinusoidal",
           "learned": "learned"}  # fmt: skip


def load_corpus() -> tuple[torch.Tensor, torch.Tensor, int]:
    text = CORPUS.read_text(encoding="utf-8")
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    return data[:split], data[split:], len(chars)


def config(position: str, vocab: int, args, eval_len: int | None = None) -> ModelConfig:
    cfg = dict(
        vocab_size=vocab,
        hidden_size=args.width,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.width,
        max_position_embeddings=max(args.eval_lens),
        position=position,
        attention="mha",
        ffn="gelu",
        norm="layernorm",
        rope_interleave=False,
        # the sinusoidal table has entries of size 1: Vaswani scales the embeddings by sqrt(d) to match it
        embedding_scale=position == "sinusoidal",
    )
    if eval_len is not None and eval_len > args.train_len:  # rope+yarn at evaluation
        cfg["rope_scaling"] = {
            "rope_type": "yarn",
            "factor": eval_len / args.train_len,
            "original_max_position_embeddings": args.train_len,
        }
    return ModelConfig(**cfg)


def train(position: str, train_data: torch.Tensor, vocab: int, args) -> tuple[Transformer, float]:
    torch.manual_seed(args.seed)
    model = Transformer(config(position, vocab, args))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(args.seed)
    warmup = max(1, args.steps // 10)
    began = time.perf_counter()
    model.train()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_data) - args.train_len - 1, (args.batch,), generator=g)
        x = torch.stack([train_data[s : s + args.train_len] for s in starts])
        y = torch.stack([train_data[s + 1 : s + 1 + args.train_len] for s in starts])
        loss = model(x, targets=y, return_logits=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model, time.perf_counter() - began


@torch.no_grad()
def val_loss(model: Transformer, val_data: torch.Tensor, length: int, eval_tokens: int) -> float:
    model.eval()
    n = max(1, min(eval_tokens // length, (len(val_data) - 1) // length))
    total = 0.0
    for i in range(n):
        chunk = val_data[i * length : i * length + length + 1]
        total += float(model(chunk[None, :-1], targets=chunk[None, 1:], return_logits=False).loss)
    return total / n


def eval_model(kind: str, trained: Transformer, vocab: int, length: int, args) -> Transformer:
    """The model a kind is scored with at `length`: the trained one, re-built under YaRN for rope+yarn,
    or with its position table clamped at the training length for learned."""
    if kind == "rope+yarn" and length > args.train_len:
        model = Transformer(config("rope", vocab, args, eval_len=length))
        model.load_state_dict(trained.state_dict())
        return model
    if kind == "learned":
        table = trained.pos_embed.weight.data
        table[args.train_len :] = table[args.train_len - 1]
    return trained


def plot(rows: list[dict], path: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in dict.fromkeys(r["kind"] for r in rows):
        mine = [r for r in rows if r["kind"] == kind]
        label = "learned (clamped)" if kind == "learned" else kind
        style = "--" if kind == "rope+yarn" else "-"
        ax.plot([r["eval_len"] for r in mine], [r["val_loss"] for r in mine], style, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(args.eval_lens, [str(n) for n in args.eval_lens])
    ax.set_xlabel(f"evaluation length (tokens; trained at {args.train_len})")
    ax.set_ylabel("validation loss (nats / char)")
    ax.set_title(f"Length extrapolation, char-level tinyshakespeare, {args.steps} steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--train-len", type=int, default=256)
    p.add_argument("--eval-lens", default="256,1024,4096")
    p.add_argument("--eval-tokens", type=int, default=8192, help="tokens scored at each length")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the JSON lines here")
    p.add_argument("--plot", default=None, help="PNG of val loss against evaluation length")
    args = p.parse_args(argv)
    args.kinds = args.kinds.split(",")
    args.eval_lens = [int(n) for n in args.eval_lens.split(",")]
    unknown = [k for k in args.kinds if k not in KINDS]
    if unknown:
        p.error(f"--kinds: unknown {unknown[0]!r}; choose from {', '.join(KINDS)}")
    return args


def main(argv=None) -> list[dict]:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    train_data, val_data, vocab = load_corpus()
    rows, trained = [], {}
    for kind in args.kinds:
        position = TRAINED[kind]
        if position not in trained:
            trained[position] = train(position, train_data, vocab, args)
        model, seconds = trained[position]
        for length in args.eval_lens:
            loss = val_loss(eval_model(kind, model, vocab, length, args), val_data, length, args.eval_tokens)
            row = dict(kind=kind, train_len=args.train_len, eval_len=length, val_loss=round(loss, 4))
            row.update(steps=args.steps, train_seconds=round(seconds, 1), threads=args.threads)
            if kind == "learned":
                row["note"] = f"positions >= {args.train_len} clamped to {args.train_len - 1}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if args.plot:
        plot(rows, args.plot, args)
    return rows


if __name__ == "__main__":
    main()
