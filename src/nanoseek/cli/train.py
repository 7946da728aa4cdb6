"""`nanoseek train`, `nanoseek ablate` and `nanoseek tokenizer train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from nanoseek.cli.common import (
    THREADS_HELP,
    Command,
    add_json_arg,
    aligned,
    check_output_path,
    reject_extra,
    split_overrides,
)
from nanoseek.config import TrainConfig, build_resume_config, build_train_config, saved_run_config
from nanoseek.config.memory import TRAIN_BYTES_PER_PARAM, check_memory
from nanoseek.data import corpus_path
from nanoseek.data.files import check_input_file
from nanoseek.data.tokenizer import TOKENIZER_KINDS, load_tokenizer, train_tokenizer
from nanoseek.device import DEVICE_CHOICES
from nanoseek.errors import NanoseekError
from nanoseek.train.ablate import ablate
from nanoseek.train.loop import TrainingDiverged, train

OVERRIDES_HELP = (
    "Any config field can be set as --section.field=VALUE (JSON where it parses, else a string), e.g. "
    "--optim.lr=3e-4 --model.hidden_size=256 --train.max_seconds=60; `nanoseek config --preset NAME` "
    "lists every field with its value and meaning. `nanoseek presets` lists the presets."
)

# flag -> the TrainConfig field it sets (the same as --FIELD=VALUE)
RUN_FLAGS = {
    "max_steps": "train.max_steps",
    "max_tokens": "train.max_tokens",
    "max_seconds": "train.max_seconds",
    "threads": "train.threads",
    "device": "train.device",
    "dtype": "train.dtype",
    "compile": "train.compile",
}


def add_run_flags(t) -> None:
    """The options `train` and `ablate` share with the other commands, each = a --train.FIELD override."""
    t.add_argument(
        "--max-steps", type=int, help="stop after N optimizer steps (= --train.max_steps; default: the preset's)"
    )
    t.add_argument("--max-tokens", type=int, help="stop after N training tokens (= --train.max_tokens; 0 = no limit)")
    t.add_argument(
        "--max-seconds",
        type=float,
        help="wall-clock budget of the whole command: tokenizer, tokenizing, training, evaluations and the "
        "final checkpoint and evaluation (= --train.max_seconds; default: the preset's)",
    )
    t.add_argument("--threads", type=int, help=THREADS_HELP + " (= --train.threads)")
    t.add_argument("--device", help=f"{DEVICE_CHOICES} (= --train.device; default auto: a CUDA GPU if torch sees one)")
    t.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "auto"),
        help="compute dtype (= --train.dtype; auto: bfloat16 where the device has native bf16 matmuls)",
    )
    t.add_argument(
        "--compile", action="store_const", const=True, help="train a torch.compile'd model (= --train.compile=true)"
    )


def flag_overrides(args) -> dict:
    """The run flags given on the command line, as overrides."""
    return {field: getattr(args, flag) for flag, field in RUN_FLAGS.items() if getattr(args, flag) is not None}


def add_train_arguments(t) -> None:
    t.epilog = OVERRIDES_HELP
    t.add_argument("config", nargs="?", help="a TOML or JSON config file")
    t.add_argument("--preset", help="named model config (list them with `nanoseek presets`)")
    t.add_argument(
        "--data",
        nargs="+",
        help="text files to train on, or a bundled corpus by name: shakespeare (the default), tang (Tang poems)",
    )
    t.add_argument("--out", help="run directory, one run per folder (default runs/default)")
    add_run_flags(t)
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run directory's latest checkpoint, with the run's saved config (flags may change "
        "budgets and cadences, not the model)",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in --out even though it holds one: deletes that run's files first (without this, "
        "a folder holding a run is an error)",
    )
    t.add_argument("--nproc", type=int, help="launch N processes with torchrun (DDP unless --dist.strategy=fsdp)")
    add_json_arg(t, "the final summary")


def run_train(args, extra) -> int:
    if args.nproc and args.nproc > 1:
        return launch_torchrun(args.nproc)
    overrides = split_overrides(extra)
    if args.data:
        overrides["data.path"] = args.data
    if args.out:
        overrides["out"] = args.out
    overrides.update(flag_overrides(args))
    out = args.out or TrainConfig.out
    if args.resume and not (args.config or args.preset) and saved_run_config(out):
        overrides.pop("out", None)
        cfg = build_resume_config(out, overrides)  # the run's own config: no need to repeat its arguments
    else:
        cfg = build_train_config(args.config, args.preset, overrides)
    check_train_inputs(cfg)
    try:
        summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except TrainingDiverged as e:
        print(f"nanoseek: {e}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    print(json.dumps(summary) if args.json else summary_lines(summary, cfg.out, cfg.data.task != "lm"))
    if summary.get("stopped_by") == "interrupt":
        print(
            f"interrupted: checkpoint saved; continue with: nanoseek train --out {cfg.out} --resume",
            file=sys.stderr,
        )
    return 0


def check_train_inputs(cfg: TrainConfig) -> None:
    """What a run reads and writes, checked before it writes anything: the data files and the
    tokenizer file exist, the run folder can be made, and the model fits in memory."""
    for f in cfg.data.path:
        if check_input_file(corpus_path(f), "data file").stat().st_size == 0:
            raise NanoseekError(f"data file {f} is empty")
    if cfg.data.tokenizer not in TOKENIZER_KINDS:
        load_tokenizer(cfg.data.tokenizer)
    check_output_path(cfg.out, "--out")
    world = int(os.environ.get("WORLD_SIZE", "1")) if cfg.dist.strategy == "fsdp" else 1
    check_memory(
        cfg.model,
        "training",
        TRAIN_BYTES_PER_PARAM / world,
        batch_tokens=cfg.train.batch_size * cfg.data.seq_len,
        flag=f"train.batch_size={cfg.train.batch_size}",
        limit=device_memory(cfg.train.device),
    )


def device_memory(device: str) -> int | None:
    """Free memory of the GPU a run trains on (None: the CPU, whose memory check_memory reads itself)."""
    import torch

    from nanoseek.device import resolve_device

    resolved = resolve_device(device, where="train.device")
    if resolved.type != "cuda":
        return None
    return torch.cuda.mem_get_info(resolved)[0]


def summary_lines(summary: dict, out: str, pairs: bool = False) -> str:
    """A finished run in a few aligned lines (`--json`: the summary.json object on one line)."""
    rows = [
        ("stopped", f"after {summary['step']:,} steps, {summary['tokens']:,} tokens, {summary['elapsed_s']:.0f} s"
                    f" ({summary.get('stopped_by', '?')})"),
    ]  # fmt: skip
    if "val_loss" in summary:
        rows.append((
            "validation",
            f"loss {summary['val_loss']:.4f}, perplexity {summary['val_perplexity']:.2f}, "
            f"{summary['val_bits_per_byte']:.3f} bits/byte",
        ))  # fmt: skip
    rows += [
        ("checkpoint", str(summary.get("checkpoint", ""))),
        ("run folder", f"{out} (metrics.jsonl, loss.png, summary.json)"),
        ("next", f"nanoseek sample {out} --source TEXT" if pairs else f"nanoseek sample {out} --prompt TEXT"),
    ]
    return aligned(rows)


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
    ab.epilog = OVERRIDES_HELP + " Overrides and flags apply to every variant."
    ab.add_argument(
        "--variant", action="append", help="a preset, or a,b overrides like model.fusion=dwa; NAME:spec to name it"
    )
    ab.add_argument("--preset", help="base preset for every variant")
    ab.add_argument("--data", nargs="+", help="text files every variant trains on (default: bundled tiny Shakespeare)")
    ab.add_argument("--out", default="runs/ablate", help="folder of the variants' runs and the report")
    add_run_flags(ab)
    add_json_arg(ab, "the table")


def run_ablate(args, extra) -> int:
    common = {**split_overrides(extra), **flag_overrides(args)}
    if args.data:
        common["data.path"] = args.data
    check_output_path(args.out, "--out")
    report = ablate(args.variant or [], common, args.out, preset=args.preset)
    if args.json:
        for row in json.loads((report.parent / "ablation.json").read_text())["variants"]:
            print(json.dumps(row))
    else:
        print(report.read_text(), end="")
    return 0


def add_tokenizer_arguments(tk) -> None:
    tk_sub = tk.add_subparsers(dest="tokenizer_command", required=True)
    tt = tk_sub.add_parser("train", help="train a tokenizer and write tokenizer.json")
    tt.add_argument("files", nargs="+", help="text files to learn the vocabulary from")
    tt.add_argument("--vocab-size", type=int, default=2048, help="tokens in the vocabulary (bpe)")
    tt.add_argument("--kind", default="bpe", help="bpe (byte-level BPE) or char")
    tt.add_argument("--out", default="tokenizer.json", help="where to write the tokenizer")
    add_json_arg(tt)


def run_tokenizer(args, extra) -> int:
    reject_extra(extra)
    for f in args.files:
        check_input_file(f, "data file")
    out = Path(args.out)
    if out.is_file() and out.suffix != ".json":
        raise NanoseekError(f"--out {out} is a file that is not a .json; give a .json path or a folder")
    check_output_path(out, "--out", folder=out.is_dir() or out.suffix != ".json")
    tok = train_tokenizer(args.kind, args.files, args.vocab_size)
    path = tok.save(args.out)
    if args.json:
        print(json.dumps({"tokenizer": args.kind, "vocab_size": tok.vocab_size, "out": str(path)}))
    else:
        print(f"{args.kind} tokenizer, {tok.vocab_size:,} tokens -> {path} (use it with --data.tokenizer={path})")
    return 0


COMMANDS = [
    Command("train", "train a model (no arguments: the demo on the bundled corpus)", add_train_arguments, run_train),
    Command("ablate", "train variants at equal budget; a table and a plot", add_ablate_arguments, run_ablate),
    Command("tokenizer", "tokenizer tools", add_tokenizer_arguments, run_tokenizer),
]
