"""`nanoseek embed` and `nanoseek inspect`: sentence vectors and pictures of a trained model."""

from __future__ import annotations

import json
from pathlib import Path

from nanoseek.analysis.embed import embed
from nanoseek.analysis.inspect import plot_attention, plot_fusion
from nanoseek.cli.common import Command, add_checkpoint_args, check_output_path, load, reject_extra
from nanoseek.data.files import read_utf8
from nanoseek.errors import NanoseekError

INSPECT_KINDS = ("fusion", "attention")
PICTURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def add_embed_arguments(em) -> None:
    add_checkpoint_args(em, device=False)
    em.add_argument("--text", action="append", help="a text to embed (repeatable)")
    em.add_argument("--file", help="a file of texts, one per line")


def run_embed(args, extra) -> int:
    reject_extra(extra)
    texts = list(args.text or [])
    if args.file:
        texts += [line for line in read_utf8(args.file, "--file").splitlines() if line.strip()]
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
    ins.add_argument("--out", help="picture path, or a folder to draw into (default: fusion.png / attention.png)")


def picture_path(out: str | None, what: str) -> Path:
    """Where `inspect` draws: `--out` as given when it names a picture file, inside it when it is a
    folder (existing, or a path without a suffix), else `what`.png here."""
    if out is None:
        return Path(f"{what}.png")
    path = Path(out)
    if path.is_dir() or not path.suffix:
        path = path / f"{what}.png"
    if path.suffix.lower() not in PICTURE_SUFFIXES:
        raise NanoseekError(f"--out {out}: a picture is written as {', '.join(PICTURE_SUFFIXES)}")
    check_output_path(path, "--out", folder=False)
    return path


def run_inspect(args, extra) -> int:
    reject_extra(extra)
    if args.what not in INSPECT_KINDS:
        raise NanoseekError(f"inspect {args.what!r}: choose one of: {', '.join(INSPECT_KINDS)}")
    if not args.prompt:
        raise NanoseekError("--prompt is empty; give the text whose weights are drawn")
    out = picture_path(args.out, args.what)
    model, tok, _ = load(args)
    if args.what == "attention":
        layers = model.config.num_hidden_layers
        if not 0 <= args.layer < layers:
            raise NanoseekError(f"--layer={args.layer} must be in [0, {layers - 1}] (the model has {layers} layers)")
        out = plot_attention(model, tok, args.prompt, args.layer, out)
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
    out = plot_fusion(model, tok, args.prompt, out)
    print(json.dumps({"inspect": args.what, "fusion": model.config.fusion, "out": str(out)}))
    return 0


COMMANDS = [
    Command("embed", "sentence vectors (scalar mix of all layers, mean-pooled)", add_embed_arguments, run_embed),
    Command("inspect", "pictures of a trained model (fusion weights, attention)", add_inspect_arguments, run_inspect),
]
