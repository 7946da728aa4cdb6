"""`nanoseek train`, `nanoseek ablate` and `nanoseek tokenizer train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from nanoseek.cli.common import Command, reject_extra, split_overrides
from nanoseek.config import build_train_config
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.errors import NanoseekError
from nanoseek.train.ablate import ablate
from nanoseek.train.loop import TrainingDiverged, train


def add_train_arguments(t) -> None:
    t.add_argument("config", nargs="?", help="a TOML or JSON config file")
    t.add_argument("--preset", help="named model config (see `nanoseek info --preset`)")
    t.add_argument("--data", nargs="+", help="text files to train on (default: bundled tiny Shakespeare)")
    t.add_argument("--out", help="run directory (default runs/default)")
    t.add_argument("--max-steps", type=int)
    t.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    t.add_argument("--nproc", type=int, help="launch N processes with torchrun (DDP unless --dist.strategy=fsdp)")


def run_train(args, extra) -> int:
    if args.nproc and args.nproc > 1:
        return launch_torchrun(args.nproc)
    overrides = split_overrides(extra)
    if args.data:
        overrides["data.path"] = args.data
    if args.out:
        overrides["out"] = args.out
    if args.max_steps is not None:
        overrides["train.max_steps"] = args.max_steps
    cfg = build_train_config(args.config, args.preset, overrides)
    try:
        summary = train(cfg, resume=args.resume)
    except TrainingDiverged as e:
        print(f"nanoseek: {e}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    print(json.dumps(summary))
    if summary.get("stopped_by") == "interrupt":
        print(
            f"interrupted: checkpoint saved; continue with: nanoseek train --out {cfg.out} --resume "
            f"(plus the same arguments)",
            file=sys.stderr,
        )
    return 0


def torchrun_argv(argv: list[str], nproc: int) -> list[str]:
    """`nanoseek train --nproc N ...` -> the torchrun command running `nanoseek train ...` on N processes."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    if not any(a.startswith("--dist.strategy") for a in rest):
        rest.append("--dist.strategy=ddp")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "nanoseek",
        *rest,
    ]


def launch_torchrun(nproc: int) -> int:
    """Run this same command under torchrun (DDP by default), one torch thread per process unless set."""
    cmd = torchrun_argv(sys.argv[1:], nproc)
    print("launching: " + " ".join(cmd[2:]), file=sys.stderr)
    return subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def add_ablate_arguments(ab) -> None:
    ab.add_argument("--variant", action="append", help="preset or a,b overrides; NAME:spec to name it")
    ab.add_argument("--preset", help="base preset for every variant")
    ab.add_argument("--out", default="runs/ablate")


def run_ablate(args, extra) -> int:
    common = list(extra)
    if args.preset:
        common = ["--preset", args.preset, *common]
    report = ablate(args.variant or [], common, args.out)
    print(report.read_text(), end="")
    return 0


def add_tokenizer_arguments(tk) -> None:
    tk_sub = tk.add_subparsers(dest="tokenizer_command", required=True)
    tt = tk_sub.add_parser("train", help="train a tokenizer and write tokenizer.json")
    tt.add_argument("files", nargs="+")
    tt.add_argument("--vocab-size", type=int, default=2048)
    tt.add_argument("--kind", default="bpe", help="bpe (byte-level BPE) or char")
    tt.add_argument("--out", default="tokenizer.json")


def run_tokenizer(args, extra) -> int:
    reject_extra(extra)
    for f in args.files:
        if not Path(f).is_file():
            raise NanoseekError(f"data file {f} does not exist")
    tok = train_tokenizer(args.kind, args.files, args.vocab_size)
    path = tok.save(args.out)
    print(json.dumps({"tokenizer": args.kind, "vocab_size": tok.vocab_size, "out": str(path)}))
    return 0


COMMANDS = [
    Command("train", "train a model (no arguments: the demo on the bundled corpus)", add_train_arguments, run_train),
    Command("ablate", "train variants at equal budget; a table and a plot", add_ablate_arguments, run_ablate),
    Command("tokenizer", "tokenizer tools", add_tokenizer_arguments, run_tokenizer),
]
