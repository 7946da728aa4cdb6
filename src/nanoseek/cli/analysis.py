"""`nanoseek embed` and `nanoseek inspect`: sentence vectors and pictures of a trained model."""

from __future__ import annotations

import json
import sys

from nanoseek.analysis import plot_attention, plot_fusion
from nanoseek.analysis.embed import embed
from nanoseek.analysis.figures import font_note
from nanoseek.cli.common import Command, add_checkpoint_args, load, reject_extra, split_overrides
from nanoseek.data.files import read_utf8
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
        texts += [line for line in read_utf8(args.file, "--file").splitlines() if line.strip()]
    if not texts:
        raise NanoseekError("give --text TEXT (repeatable) or --file FILE (one text per line)")
    model, tok, _ = load(args)
    for text, vector in zip(texts, embed(model, tok, texts)):
        print(json.dumps({"text": text, "embedding": [round(x, 6) for x in vector.tolist()]}))
    return 0


INSPECT_EPILOG = (
    "--out names a file (NAME.png, .svg, .pdf, .jpg) or a folder (one that exists, ends in '/', or has no suffix), "
    "which gets attention.png or fusion.png. attention: --model.sliding_window=N, --model.index_topk=N or "
    "--model.nsa_topn=N draw the layer as if it used N, with the same weights (a window longer than a short "
    "prompt allows every earlier key; the figure says so)."
)


def add_inspect_arguments(ins) -> None:
    ins.epilog = INSPECT_EPILOG
    ins.add_argument("what", help="fusion | attention")
    add_checkpoint_args(ins, device=False)
    ins.add_argument("--prompt", required=True, help="the text whose attention or fusion weights are drawn")
    ins.add_argument("--layer", type=int, default=0, help="attention: which layer")
    ins.add_argument("--out", help="a PNG path or a folder (default: attention.png / fusion.png here)")


def run_inspect(args, extra) -> int:
    if args.what not in INSPECT_KINDS:
        raise NanoseekError(f"inspect {args.what!r}: choose one of: {', '.join(INSPECT_KINDS)}")
    changes = model_overrides(split_overrides(extra))
    if changes and args.what != "attention":
        raise NanoseekError("--model.* overrides apply to inspect attention only")
    if not args.prompt:
        raise NanoseekError("--prompt is empty; give the text whose weights are drawn")
    model, tok, _ = load(args)
    if args.what == "attention":
        out, pic = plot_attention(model, tok, args.prompt, args.layer, args.out, changes)
        if pic.note:
            print(f"note: layer {args.layer} ({pic.kind}): {pic.note}", file=sys.stderr)
        if font_note(args.prompt):
            print(f"note: {font_note(args.prompt)}", file=sys.stderr)
        print(json.dumps({"inspect": "attention", "layer": args.layer, "kind": pic.kind, "out": str(out)}))
        return 0
    out, _ = plot_fusion(model, tok, args.prompt, args.out)
    print(json.dumps({"inspect": args.what, "fusion": model.config.fusion, "out": str(out)}))
    return 0


def model_overrides(overrides: dict) -> dict:
    """{"model.sliding_window": 8} -> {"sliding_window": 8}; other sections are errors."""
    changes = {}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section != "model" or "." in name:
            raise NanoseekError(f"--{key}: inspect takes only --model.FIELD=VALUE overrides")
        changes[name] = value
    return changes


COMMANDS = [
    Command("embed", "sentence vectors (scalar mix of all layers, mean-pooled)", add_embed_arguments, run_embed),
    Command("inspect", "pictures of a trained model (fusion weights, attention)", add_inspect_arguments, run_inspect),
]
