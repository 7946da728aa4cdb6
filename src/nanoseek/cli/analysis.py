"""`nanoseek embed` and `nanoseek inspect`: sentence vectors and pictures of a trained model."""

from __future__ import annotations

import json
from pathlib import Path

from nanoseek.analysis.embed import embed
from nanoseek.analysis.inspect import plot_attention, plot_fusion
from nanoseek.cli.common import Command, add_checkpoint_args, load, reject_extra
from nanoseek.errors import NanoseekError

INSPECT_KINDS = ("fusion", "attention")


def add_embed_arguments(em) -> None:
    add_checkpoint_args(em, device=False)
    em.add_argument("--text", action="append", help="a text to embed (repeatable)")
    em.add_argument("--file", help="a file of texts, one per line")


def run_embed(args, extra) -> int:
    reject_extra(extra)
    texts = list(args.text or [])
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise NanoseekError(f"--file {path} does not exist")
        texts += [line for line in path.read_text().splitlines() if line.strip()]
    if not texts:
        raise NanoseekError("give --text TEXT (repeatable) or --file FILE (one text per line)")
    model, tok, _ = load(args)
    for text, vector in zip(texts, embed(model, tok, texts)):
        print(json.dumps({"text": text, "embedding": [round(x, 6) for x in vector.tolist()]}))
    return 0


def add_inspect_arguments(ins) -> None:
    ins.add_argument("what", help="fusion | attention")
    add_checkpoint_args(ins, device=False)
    ins.add_argument("--prompt", required=True, help="the text whose attention or fusion weights are drawn")
    ins.add_argument("--layer", type=int, default=0, help="attention: which layer")
    ins.add_argument("--out", help="PNG path (default: fusion.png / attention.png)")


def run_inspect(args, extra) -> int:
    reject_extra(extra)
    if args.what not in INSPECT_KINDS:
        raise NanoseekError(f"inspect {args.what!r}: choose one of: {', '.join(INSPECT_KINDS)}")
    model, tok, _ = load(args)
    if args.what == "attention":
        out = plot_attention(model, tok, args.prompt, args.layer, args.out or "attention.png")
        print(
            json.dumps(
                {
                    "inspect": "attention",
                    "layer": args.layer,
                    "kind": model.config.layer_sparse(args.layer),
                    "out": str(out),
                }
            )
        )
        return 0
    out = plot_fusion(model, tok, args.prompt, args.out or "fusion.png")
    print(json.dumps({"inspect": args.what, "fusion": model.config.fusion, "out": str(out)}))
    return 0


COMMANDS = [
    Command("embed", "sentence vectors (scalar mix of all layers, mean-pooled)", add_embed_arguments, run_embed),
    Command("inspect", "pictures of a trained model (fusion weights, attention)", add_inspect_arguments, run_inspect),
]
