"""The quality anchor: nanoGPT's CPU recipe on the bundled corpus, measured on this machine.

Trains `nanoseek.bench.reference_gpt.GPT` exactly as nanoGPT's shakespeare_char CPU command does (4 layers, 4 heads,
width 128, context 64, batch 12, AdamW lr 1e-3 betas (0.9, 0.99), wd 0.1, 100 warmup iters, cosine
to 1e-4 over 2000 iters, grad clip 1, dropout 0, fp32) on nanoseek's char-level tokens of
tinyshakespeare (same 90/10 split, vocabulary of the 65 corpus characters), and reports the wall
time and the validation loss estimated as nanoGPT does (mean over 20 random batches). The default
`nanoseek train` run is then compared at the same wall-clock budget.

    python benchmarks/nanogpt_recipe.py --threads 2 --iters 2000

Like nanoGPT's train.py it estimates the train and val losses (20 batches each) every 250 iterations and at
the end, inside the timed run. It prints JSON lines: one per estimate ("eval"), one when training is done
("trained": what a user of nanoGPT waits for), then the loss on the whole held-out split in non-overlapping
64-token windows ("held_out", untimed: the measure `nanoseek eval` takes of a nanoseek run; `--losses-out`
keeps each char's loss, so a comparison can score exactly the bytes another run holds out).
`benchmarks/default_vs_nanogpt.py` runs it beside the default `nanoseek train` at equal wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import nanoseek.bench.reference_gpt as reference_gpt


def char_splits():
    from nanoseek.data import BUNDLED_CORPUS
    from nanoseek.data.shards import TokenDataset, prepare_corpus
    from nanoseek.data.tokenizer import CharTokenizer

    tok = CharTokenizer.train([BUNDLED_CORPUS.read_text()])
    out = Path(tempfile.mkdtemp())
    prepare_corpus([str(BUNDLED_CORPUS)], out, tok)
    data = TokenDataset(out)
    return np.asarray(data.split("train"), dtype=np.int64), np.asarray(data.split("val"), dtype=np.int64)


def batch(data, block, size, gen):
    ix = torch.randint(len(data) - block, (size,), generator=gen)
    x = torch.stack([torch.from_numpy(data[i : i + block]) for i in ix.tolist()])
    y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block]) for i in ix.tolist()])
    return x, y


def lr_at(it, lr=1e-3, min_lr=1e-4, warmup=100, decay=2000):
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    ratio = min((it - warmup) / (decay - warmup), 1.0)
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (lr - min_lr)


@torch.no_grad()
def estimate(model, data, block, gen, iters=20, size=12):
    model.eval()
    losses = [model(*batch(data, block, size, gen))[1].item() for _ in range(iters)]
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def held_out(model, data, block):
    """The loss (nats) of every char of the split after the first, in order, in non-overlapping windows."""
    from nanoseek.data.shards import iter_eval_batches

    model.eval()
    losses = []
    for x, y in iter_eval_batches(data, 64, block):
        logits, _ = model(x, y)
        losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none"))
    return torch.cat(losses).numpy()


def emit(record):
    print(json.dumps(record), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-interval", type=int, default=250, help="iterations between loss estimates (nanoGPT's)")
    p.add_argument("--losses-out", help="write the held-out loss of every char (nats, float32 .npy) here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(1337)
    ref = reference_gpt
    train, val = char_splits()
    model = ref.GPT(ref.GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128, dropout=0.0))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99))
    gen = torch.Generator().manual_seed(1337)
    t0 = time.perf_counter()
    for it in range(args.iters + 1):
        if it % args.eval_interval == 0 or it == args.iters:  # nanoGPT estimates both splits, 20 batches each
            estimate(model, train, 64, gen)
            val_loss = estimate(model, val, 64, gen)
            emit({"event": "eval", "iter": it, "time": time.time(), "val_loss": round(val_loss, 4)})
        if it == args.iters:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(it, decay=args.iters)
        _, loss = model(*batch(train, 64, 12, gen))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    emit(
        {
            "event": "trained",
            "time": time.time(),
            **{
                "bench": "nanogpt_recipe",
                "impl": "reference",
                "iters": args.iters,
                "seconds": round(seconds, 1),
                "tokens_per_s": round(args.iters * 12 * 64 / seconds),
                "val_loss": round(val_loss, 4),
                "val_bits_per_byte": round(val_loss / math.log(2), 4),
                "threads": args.threads,
                "torch": torch.__version__,
            },
        }
    )
    losses = held_out(model, val, 64)
    if args.losses_out:
        np.save(args.losses_out, losses.astype(np.float32))
    loss = float(losses.mean())
    emit({"event": "held_out", "val_loss": round(loss, 4), "val_bits_per_byte": round(loss / math.log(2), 4)})


if __name__ == "__main__":
    main()
