"""Encoder-decoder vs decoder-only on Tang couplets, at equal parameters and equal wall time.

Both models get the same width, heads, feed-forward, norms, positions, dropout, optimizer, schedule, label
smoothing and batches of couplets, and the same number of training seconds. The encoder-decoder reads the
first line with its encoder and writes the second with its decoder; the decoder-only model reads
`first line <bos>` and writes the second line after it (its loss counts the second line only). Its depth is
chosen so that its non-embedding parameters come closest to the encoder-decoder's (the embeddings are the same).
Each trained model then decodes the first --sentences held-out couplets greedily and with beam search, and
is scored with BLEU, chrF, the exact-length rate and the exact-match rate (train/evaluate_pairs.py).

Outputs in --out: results.jsonl (one JSON object per model and decoding), seq2seq_compare.png (held-out
loss against training seconds; chrF, BLEU and exact-length rate per model and decoding), samples.txt
(the first --show held-out couplets with both models' beam outputs) and the two runs (encoder_decoder/,
decoder/).

    python benchmarks/seq2seq_compare.py --seconds 180 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

try:
    import nanoseek  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from nanoseek.bench.common import cpu_name
from nanoseek.config import ModelConfig, build_train_config, parse_value
from nanoseek.config.presets import get_run_defaults
from nanoseek.data.pairs import PairData, pair_texts
from nanoseek.io import load_checkpoint
from nanoseek.model import model_info
from nanoseek.train import loop
from nanoseek.train.evaluate_pairs import evaluate_pairs

ARCHITECTURES = ("encoder_decoder", "decoder")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="tang", help="the poems of --task couplets (default: the bundled Tang poems)")
    p.add_argument("--task", default="couplets", help="the pair task (couplets; copy, reverse, sort for a smoke run)")
    p.add_argument("--preset", default="vaswani-mini-ed", help="the encoder-decoder preset (and its run defaults)")
    p.add_argument("--seconds", type=float, default=180.0, help="training seconds of each model")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--eval-every", type=int, default=250, help="steps between held-out loss evaluations")
    p.add_argument("--sentences", type=int, default=1000, help="held-out couplets decoded per model and decoding")
    p.add_argument("--beam", type=int, default=4, help="beam size of the beam decoding")
    p.add_argument("--length-penalty", type=float, default=0.6, help="GNMT alpha of the beam decoding")
    p.add_argument("--show", type=int, default=10, help="held-out couplets written to samples.txt")
    p.add_argument("--out", default="benchmarks/out/seq2seq", help="output folder")
    p.add_argument("--override", action="append", default=[], help="extra KEY=VALUE config overrides for both runs")
    return p.parse_args(argv)


def run_overrides(args) -> dict:
    """What both runs share: the preset's recipe, this task, budget and cadence."""
    shared = {
        f"{section}.{k}": v for section, values in get_run_defaults(args.preset).items() for k, v in values.items()
    }
    shared.update({
        "data.task": args.task, "data.path": [args.data] if args.task == "couplets" else [],
        "train.max_seconds": args.seconds, "train.max_steps": 0, "train.threads": args.threads,
        "eval.every": args.eval_every, "checkpoint.every": 0, "log.progress": False, "log.every": 50, "log.plot": False,
    })  # fmt: skip
    for item in args.override:
        key, _, value = item.partition("=")
        shared[key] = parse_value(value)
    return shared


def decoder_twin(ed: ModelConfig) -> ModelConfig:
    """The decoder-only model with the encoder-decoder's parts and the depth whose non-embedding parameters
    come closest to the encoder-decoder's."""
    base = ed.replace(architecture="decoder", encoder_layers=None)
    size = lambda config: model_info(config)["params_active_non_embedding"]
    target = size(ed)
    depths = range(1, 4 * (ed.num_hidden_layers + ed.n_encoder_layers) + 1)
    best = min(depths, key=lambda n: abs(size(base.replace(num_hidden_layers=n)) - target))
    return base.replace(num_hidden_layers=best)


def configs(args, out: Path) -> dict:
    shared = run_overrides(args)
    ed = build_train_config(preset=args.preset, overrides={**shared, "out": str(out / "encoder_decoder")})
    twin = decoder_twin(ed.model)
    seq_len = 2 * ed.data.seq_len + 1  # first line <bos> second line
    dec_model = twin.replace(max_position_embeddings=max(twin.max_position_embeddings, seq_len))
    dec = build_train_config(preset=args.preset, overrides={
        **shared, **{f"model.{k}": v for k, v in dec_model.to_dict().items()}, "data.seq_len": seq_len,
        "out": str(out / "decoder"),
    })  # fmt: skip
    return {"encoder_decoder": ed, "decoder": dec}


def loss_curve(run: Path) -> list[tuple[float, float]]:
    """(training seconds, held-out loss) of each evaluation of a run."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    seconds = {r["step"]: r["elapsed_s"] for r in records if "elapsed_s" in r}
    curve = []
    for r in records:
        if "val_loss" in r:
            known = [s for s in seconds if s <= r["step"]]
            curve.append((seconds[max(known)] if known else 0.0, r["val_loss"]))
    return curve


def evaluate(args, arch: str, cfg, summary: dict) -> tuple[list[dict], list]:
    """The rows of results.jsonl of one trained model (greedy, then beam), and its beam outputs."""
    model, tok, _ = load_checkpoint(cfg.out)
    params = model.num_params()
    texts = pair_texts(args.task, cfg.data.path, cfg.data.val_fraction, cfg.data.seq_len)[1][: args.sentences]
    data = PairData.build(args.task, arch, tok, ([], texts), cfg.data.seq_len)
    rows, outputs = [], []
    for beam in (1, args.beam):
        t0 = time.perf_counter()
        scores, outputs = evaluate_pairs(model, tok, data, texts, beam, args.length_penalty)
        rows.append({
            "bench": "seq2seq_compare", "impl": "nanoseek", "architecture": arch,
            "decoding": "greedy" if beam == 1 else f"beam{beam}", **scores, "eval_seconds":
            round(time.perf_counter() - t0, 2), "train_seconds": summary["elapsed_s"], "train_steps": summary["step"],
            "train_tokens": summary["tokens"], "val_loss_end": summary.get("val_loss"), "params_total": params["total"],
            "params_non_embedding": params["active_non_embedding"], "layers": [model.config.n_encoder_layers,
            model.config.num_hidden_layers], "threads": args.threads, "cpu": cpu_name(), "torch": torch.__version__,
        })  # fmt: skip
    return rows, [(s, r, o) for (s, r), o in zip(texts, outputs)]


def plot(rows: list[dict], curves: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.4))
    names = {"encoder_decoder": "encoder-decoder", "decoder": "decoder-only"}
    for arch, curve in curves.items():
        if curve:
            axes[0].plot(*zip(*curve), "o-", label=names[arch], ms=3)
    axes[0].set(xlabel="training seconds", ylabel="held-out loss (nats / target token)", title="held-out loss")
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    decodings = sorted({r["decoding"] for r in rows}, key=lambda d: (d != "greedy", d))
    width = 0.8 / len(decodings)
    panels = ((axes[1], "chrf", "chrF"), (axes[2], "bleu", "BLEU"), (axes[3], "exact_length_rate", "exact-length rate"))
    for ax, metric, label in panels:
        for j, decoding in enumerate(decodings):
            values = [next(r[metric] for r in rows if r["architecture"] == a and r["decoding"] == decoding)
                      for a in ARCHITECTURES]  # fmt: skip
            bars = ax.bar([i + (j - (len(decodings) - 1) / 2) * width for i in range(len(ARCHITECTURES))], values,
                          width, label=decoding)  # fmt: skip
            ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks(range(len(ARCHITECTURES)), [names[a] for a in ARCHITECTURES])
        ax.set(ylabel=label, title=f"{label}, held-out pairs")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.25)  # room above the bars for the legend
        ax.grid(alpha=0.3, axis="y")
        ax.legend(loc="upper right", ncols=len(decodings))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    rows, curves, samples = [], {}, {}
    for arch, cfg in configs(args, out).items():
        print(f"training {arch} for {args.seconds:g} s -> {cfg.out}", file=sys.stderr)
        summary = loop.train(cfg, quiet=True, overwrite=True)
        found, samples[arch] = evaluate(args, arch, cfg, summary)
        for row in found:
            print(json.dumps(row, ensure_ascii=False), flush=True)
        rows += found
        curves[arch] = loss_curve(Path(cfg.out))
    (out / "results.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    title = (
        f"{args.task}: encoder-decoder vs decoder-only, {args.seconds:g} s of training each on {args.threads} "
        f"thread(s); {rows[0]['sentences']} held-out pairs, beam {args.beam}, alpha {args.length_penalty}"
    )
    plot(rows, curves, out / "seq2seq_compare.png", title)
    lines = [f"{s} -> {e}  |  {d}  (reference: {r})" for (s, r, e), (_, _, d) in
             zip(samples["encoder_decoder"][: args.show], samples["decoder"][: args.show])]  # fmt: skip
    (out / "samples.txt").write_text(
        "source -> encoder-decoder  |  decoder-only  (reference)\n" + "\n".join(lines) + "\n"
    )
    print(f"wrote {out / 'results.jsonl'}, {out / 'seq2seq_compare.png'}, {out / 'samples.txt'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
