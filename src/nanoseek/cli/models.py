"""`nanoseek eval`, `nanoseek info`, `nanoseek convert` and `nanoseek average`: a checkpoint's quality, size
and format, and the average of a run's last checkpoints."""

from __future__ import annotations

import json
import sys

from nanoseek.cli.common import Command, add_checkpoint_args, add_trust_pickle, load, reject_extra
from nanoseek.config import ModelConfig
from nanoseek.config.presets import PRESETS
from nanoseek.errors import NanoseekError
from nanoseek.io import convert
from nanoseek.io.average import average_checkpoints
from nanoseek.model import model_info
from nanoseek.train.evaluate import evaluate_checkpoint
from nanoseek.train.evaluate_pairs import checkpoint_task, evaluate_pair_checkpoint


def add_eval_arguments(e) -> None:
    add_checkpoint_args(e)
    e.add_argument("--data", help="evaluate on this whole file (default: the training corpus's val split)")
    e.add_argument("--seq-len", type=int, help="window length (default: the run's, else min(context, 1024))")
    e.add_argument("--batch-size", type=int, default=16, help="windows per forward")
    e.add_argument("--max-batches", type=int, help="stop after this many batches (default: the whole text)")
    pairs = e.add_argument_group("sequence-to-sequence checkpoints (data.task=couplets, copy, reverse, sort)")
    pairs.add_argument("--beam", type=int, default=4, help="beam size (1 = greedy)")
    pairs.add_argument("--length-penalty", type=float, default=0.6, help="GNMT's alpha of the beam score")
    pairs.add_argument("--max-sentences", type=int, default=1000, help="held-out pairs to decode (0 = all)")
    pairs.add_argument("--samples", type=int, default=0, help="print this many (source, output, reference) on stderr")


def run_eval(args, extra) -> int:
    reject_extra(extra)
    model, tok, folder = load(args, encoder_decoder=True)
    if checkpoint_task(folder) != "lm" or model.config.architecture == "encoder_decoder":
        return run_eval_pairs(args, model, tok, folder)
    print(
        json.dumps(evaluate_checkpoint(model, tok, folder, args.data, args.seq_len, args.batch_size, args.max_batches))
    )
    return 0


def run_eval_pairs(args, model, tok, folder) -> int:
    """BLEU, chrF, exact-length rate and loss on the run's held-out pairs (one JSON object); samples on stderr."""
    for name in ("beam", "batch_size"):
        if getattr(args, name) < 1:
            raise NanoseekError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.max_sentences < 0 or args.samples < 0:
        raise NanoseekError("--max-sentences and --samples must be >= 0")
    scores, rows = evaluate_pair_checkpoint(
        model, tok, folder, args.data, args.max_sentences or None, args.beam, args.length_penalty, args.batch_size
    )
    for source, reference, output in rows[: args.samples]:
        print(f"{source} -> {output}    (reference: {reference})", file=sys.stderr)
    print(json.dumps(scores, ensure_ascii=False))
    return 0


def add_info_arguments(i) -> None:
    i.add_argument("ckpt", nargs="?", help="a checkpoint folder, a run folder or an HF folder")
    i.add_argument("--preset", help="a named config instead of a checkpoint")
    i.add_argument("--seq-len", type=int, help="context length for the FLOPs estimate")
    add_trust_pickle(i)


def run_info(args, extra) -> int:
    reject_extra(extra)
    if args.preset:
        config, source = ModelConfig.from_preset(args.preset), {"preset": args.preset}
    elif args.ckpt:
        model, _, folder = load(args, tokenizer=False, encoder_decoder=True)
        config, source = model.config, {"checkpoint": str(folder)}
    else:
        raise NanoseekError("give a checkpoint path or --preset NAME")
    print(json.dumps({**source, **model_info(config, args.seq_len), "config": config.to_dict()}))
    return 0


def human_count(n: int) -> str:
    """1234567 -> '1.23M' (K, M, B)."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def preset_rows() -> list[dict]:
    """Every preset: its parameters (total, active per token) and its kinds, from `model_info`."""
    rows = []
    for name in sorted(PRESETS):
        config = ModelConfig.from_preset(name)
        info = model_info(config)
        rows.append({
            "preset": name, "params_total": info["params_total"], "params_active": info["params_active"],
            "attention": config.attention, "sparse": config.layer_sparse(0), "ffn": config.ffn,
            "context": config.max_position_embeddings,
        })  # fmt: skip
    return rows


def add_presets_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object per preset instead of a table")


def run_presets(args, extra) -> int:
    reject_extra(extra)
    rows = preset_rows()
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    header = ("preset", "params", "active", "attention", "sparse", "ffn", "context")
    table = [header] + [
        (r["preset"], human_count(r["params_total"]), human_count(r["params_active"]), r["attention"],
         r["sparse"], r["ffn"], str(r["context"]))
        for r in rows
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print("\nparams count every weight but the MTP modules; active: those one token uses (MoE: its experts only).")
    return 0


def add_convert_arguments(cv) -> None:
    cv.add_argument("src", help="a checkpoint, run or HF folder")
    cv.add_argument("dst", help="the new folder (must not exist or be empty)")
    cv.add_argument("--to", choices=("hf", "nanoseek"), required=True)
    cv.add_argument("--dtype", choices=("float32", "bfloat16"))
    cv.add_argument(
        "--drop-mtp",
        action="store_true",
        help="--to hf: leave DeepSeek's MTP layers out (kept by default, as DeepSeek's checkpoints keep them)",
    )
    add_trust_pickle(cv)


def run_convert(args, extra) -> int:
    reject_extra(extra)
    out = convert(args.src, args.dst, args.to, args.dtype, args.trust_pickle, args.drop_mtp)
    print(json.dumps({"converted": str(args.src), "to": args.to, "out": str(out)}))
    return 0


def add_average_arguments(av) -> None:
    av.add_argument("run_dir", metavar="RUN", help="a run folder (its checkpoints/)")
    av.add_argument("--last", type=int, default=5, help="average this many of the newest checkpoints")
    av.add_argument("--out", help="the new checkpoint folder (default RUN/average-last-K)")


def run_average(args, extra) -> int:
    reject_extra(extra)
    out = average_checkpoints(args.run_dir, args.last, args.out)
    print(json.dumps({"averaged": args.last, "run": str(args.run_dir), "out": str(out)}))
    return 0


COMMANDS = [
    Command("presets", "the named model configs: parameters, kinds, context", add_presets_arguments, run_presets),
    Command("eval", "loss, perplexity and bits per byte on held-out text", add_eval_arguments, run_eval),
    Command("info", "parameters, FLOPs per token and KV-cache bytes per token", add_info_arguments, run_info),
    Command(
        "convert", "convert a checkpoint between nanoseek and Hugging Face formats", add_convert_arguments, run_convert
    ),
    Command(
        "average",
        "average the weights of a run's last K checkpoints into a new one",
        add_average_arguments,
        run_average,
    ),
]
