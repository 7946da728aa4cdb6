"""`nanoseek eval`, `nanoseek info` and `nanoseek convert`: a checkpoint's quality, size and format."""

from __future__ import annotations

import json

from nanoseek.cli.common import Command, add_checkpoint_args, add_trust_pickle, load, reject_extra
from nanoseek.config import ModelConfig
from nanoseek.config.presets import PRESETS
from nanoseek.errors import NanoseekError
from nanoseek.io import convert
from nanoseek.model import model_info
from nanoseek.train.evaluate import evaluate_checkpoint


def add_eval_arguments(e) -> None:
    add_checkpoint_args(e)
    e.add_argument("--data", help="evaluate on this whole file (default: the training corpus's val split)")
    e.add_argument("--seq-len", type=int, help="window length (default: the run's, else min(context, 1024))")
    e.add_argument("--batch-size", type=int, default=16, help="windows per forward")
    e.add_argument("--max-batches", type=int, help="stop after this many batches (default: the whole text)")


def run_eval(args, extra) -> int:
    reject_extra(extra)
    model, tok, folder = load(args)
    print(
        json.dumps(evaluate_checkpoint(model, tok, folder, args.data, args.seq_len, args.batch_size, args.max_batches))
    )
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
        model, _, folder = load(args, tokenizer=False)
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


COMMANDS = [
    Command("presets", "the named model configs: parameters, kinds, context", add_presets_arguments, run_presets),
    Command("eval", "loss, perplexity and bits per byte on held-out text", add_eval_arguments, run_eval),
    Command("info", "parameters, FLOPs per token and KV-cache bytes per token", add_info_arguments, run_info),
    Command(
        "convert", "convert a checkpoint between nanoseek and Hugging Face formats", add_convert_arguments, run_convert
    ),
]
