"""The `nanoseek` command: one subcommand per verb, each a plain function.

    nanoseek train [CONFIG.toml] [--preset NAME] [--data PATH ...] [--out DIR] [--max-steps N]
                   [--resume] [--section.field=VALUE ...]
    nanoseek sample CKPT --prompt TEXT [--max-new-tokens N --temperature T --top-k K --top-p P --seed S]
    nanoseek eval CKPT [--data PATH]
    nanoseek info (CKPT | --preset NAME)
    nanoseek tokenizer train --vocab-size N [--kind bpe|char] --out FILE FILE...
    nanoseek bench WHAT ...

Bad input (NanoseekError) prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from nanoseek.config import build_train_config, parse_value
from nanoseek.errors import NanoseekError


# ------------------------------------------------------------------------------------ train


def split_overrides(extra: list[str]) -> dict:
    """`--a.b=v` -> {"a.b": parsed v}; anything else is an error."""
    overrides = {}
    for arg in extra:
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise NanoseekError(f"unrecognized argument {arg!r}; overrides look like --section.field=VALUE")
        if "=" not in arg:
            raise NanoseekError(f"override {arg!r} has no value; write it as {arg}=VALUE")
        key, value = arg[2:].split("=", 1)
        overrides[key] = parse_value(value)
    return overrides


def cmd_train(args, extra) -> int:
    from nanoseek.train.loop import TrainingDiverged, train

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
        print(f"interrupted: checkpoint saved; continue with: nanoseek train --out {cfg.out} --resume "
              f"(plus the same arguments)", file=sys.stderr)
    return 0


def launch_torchrun(nproc: int) -> int:
    """`nanoseek train --nproc N ...` = `torchrun --nproc-per-node N -m nanoseek train ...` (DDP by default)."""
    import subprocess

    argv = sys.argv[1:]
    rest, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        rest.append(arg)
    if not any(a.startswith("--dist.strategy") for a in rest):
        rest.append("--dist.strategy=ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "nanoseek", *rest]
    print("launching: " + " ".join(cmd[2:]), file=sys.stderr)
    return subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


# ------------------------------------------------------------------------------------ sample


def load_checkpoint_on(path, trust_pickle: bool = False, device: str = "cpu"):
    """`nanoseek.io.load_checkpoint` on the `--device` given: (model, tokenizer, folder)."""
    from nanoseek.device import resolve_device
    from nanoseek.io import load_checkpoint

    return load_checkpoint(path, trust_pickle=trust_pickle, device=resolve_device(device, where="--device"))


def load_model_and_tokenizer(path, trust_pickle: bool = False, device: str = "cpu"):
    model, tok, _ = load_checkpoint_on(path, trust_pickle, device)
    return model, tok


def cmd_sample(args, extra) -> int:
    from nanoseek.generation.streaming import stream_past_context

    if extra:
        raise NanoseekError(f"unrecognized argument {extra[0]!r}")
    if args.speculative and (args.compile or args.compile_prefill):
        raise NanoseekError("--speculative decodes eagerly (its draft-and-verify steps change shape); "
                            "drop --compile / --compile-prefill")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tok = load_model_and_tokenizer(args.ckpt, args.trust_pickle, args.device)
    prompt = args.prompt if args.prompt is not None else "\n"
    pieces = stream_past_context(model, tok, prompt, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                 repetition_penalty=args.repetition_penalty, stop=args.stop or None,
                                 compile=args.compile, compile_prefill=args.compile_prefill)  # checks the prompt
    if args.speculative:
        return sample_speculative(model, tok, prompt, args.max_new_tokens)
    sys.stdout.write(prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def sample_speculative(model, tok, prompt: str, max_new: int) -> int:
    """Greedy decoding with the MTP module drafting; prints acceptance and speed on stderr."""
    from nanoseek.generation.speculative import compare_with_greedy

    text, report = compare_with_greedy(model, tok, prompt, max_new)
    print(prompt + text)
    print(json.dumps(report), file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------ eval / info


def cmd_eval(args, extra) -> int:
    from nanoseek.train.evaluate import evaluate_checkpoint

    if extra:
        raise NanoseekError(f"unrecognized argument {extra[0]!r}")
    model, tok, folder = load_checkpoint_on(args.ckpt, args.trust_pickle, args.device)
    print(json.dumps(evaluate_checkpoint(model, tok, folder, args.data, args.seq_len, args.batch_size,
                                         args.max_batches)))
    return 0


def cmd_info(args, extra) -> int:
    from nanoseek.config import ModelConfig
    from nanoseek.model import model_info

    if extra:
        raise NanoseekError(f"unrecognized argument {extra[0]!r}")
    if args.preset:
        config = ModelConfig.from_preset(args.preset)
        source = {"preset": args.preset}
    elif args.ckpt:
        from nanoseek.io import load_checkpoint

        model, _, folder = load_checkpoint(args.ckpt, trust_pickle=args.trust_pickle, tokenizer=False)
        config, source = model.config, {"checkpoint": str(folder)}
    else:
        raise NanoseekError("give a checkpoint path or --preset NAME")
    info = {**source, **model_info(config, args.seq_len),
            "config": {k: v for k, v in config.to_dict().items()}}
    print(json.dumps(info))
    return 0


# ------------------------------------------------------------------------------------ tokenizer


def cmd_tokenizer(args, extra) -> int:
    from nanoseek.data.tokenizer import train_tokenizer

    if extra:
        raise NanoseekError(f"unrecognized argument {extra[0]!r}")
    for f in args.files:
        if not Path(f).is_file():
            raise NanoseekError(f"data file {f} does not exist")
    tok = train_tokenizer(args.kind, args.files, args.vocab_size)
    path = tok.save(args.out)
    print(json.dumps({"tokenizer": args.kind, "vocab_size": tok.vocab_size, "out": str(path)}))
    return 0


def cmd_bench(args, extra) -> int:
    from nanoseek.bench import run_bench

    return run_bench([args.what, *extra])


# ------------------------------------------------------------------------------------ chat / convert


def cmd_serve(args, extra) -> int:
    """Serve a checkpoint over HTTP until Ctrl-C."""
    import ipaddress
    import logging
    import os

    if extra:
        raise NanoseekError(f"unrecognized argument {extra[0]!r}")
    try:
        import uvicorn

        from nanoseek.serve.app import create_app
    except ImportError as e:
        raise NanoseekError(f"serving needs the serve extra (pip install 'nanoseek[serve]'): {e}") from None
    for name in ("port", "max_batch", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise NanoseekError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.max_queue < 0 or (args.max_tokens is not None and args.max_tokens < 1):
        raise NanoseekError("--max-queue must be >= 0 and --max-tokens >= 1")
    import torch

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    api_key = args.api_key or os.environ.get("NANOSEEK_API_KEY") or None
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not api_key:
        print(f"warning: listening on {args.host} without an API key: anyone who can reach this "
              f"address can use the model (set --api-key or NANOSEEK_API_KEY)", file=sys.stderr)
    model, tok, folder = load_checkpoint_on(args.ckpt, args.trust_pickle, args.device)
    name = args.model_name or Path(args.ckpt).resolve().name
    app = create_app(model, tok, name, folder=folder, api_key=api_key, max_batch=args.max_batch, max_queue=args.max_queue,
                     max_tokens_limit=args.max_tokens, max_body_bytes=args.max_body_bytes)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(f"serving {name} on http://{args.host}:{args.port} (max batch {args.max_batch}, "
          f"queue {args.max_queue}, API key {'on' if api_key else 'off'})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0


def cmd_chat(args, extra) -> int:
    """Interactive chat on stdin/stdout; the checkpoint's chat template when it has one."""
    from nanoseek.generation.chat import Chat, MessageTooLong

    if extra:
        raise NanoseekError(f"unrecognized argument {extra[0]!r}")
    model, tok, folder = load_checkpoint_on(args.ckpt, args.trust_pickle, args.device)
    chat = Chat(model, tok, system=args.system, max_new_tokens=args.max_new_tokens, folder=folder,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                compile=args.compile, compile_prefill=args.compile_prefill)
    print("chat: type a message and press Enter (Ctrl-D to quit)", file=sys.stderr)
    for line in sys.stdin:
        text = line.strip()
        if not text:
            continue
        try:
            for piece in chat.reply(text):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except MessageTooLong:
            print("(message too long for the model's context)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
    return 0


def cmd_convert(args, extra) -> int:
    from nanoseek.io import convert

    if extra:
        raise NanoseekError(f"unrecognized argument {extra[0]!r}")
    out = convert(args.src, args.dst, args.to, args.dtype, args.trust_pickle)
    print(json.dumps({"converted": str(args.src), "to": args.to, "out": str(out)}))
    return 0


# ------------------------------------------------------------------------------------ fusion tools


def cmd_embed(args, extra) -> int:
    from nanoseek.analysis.embed import embed

    if extra:
        raise NanoseekError(f"unrecognized argument {extra[0]!r}")
    texts = list(args.text or [])
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise NanoseekError(f"--file {path} does not exist")
        texts += [line for line in path.read_text().splitlines() if line.strip()]
    if not texts:
        raise NanoseekError("give --text TEXT (repeatable) or --file FILE (one text per line)")
    model, tok = load_model_and_tokenizer(args.ckpt, args.trust_pickle)
    for text, vector in zip(texts, embed(model, tok, texts)):
        print(json.dumps({"text": text, "embedding": [round(x, 6) for x in vector.tolist()]}))
    return 0


def cmd_inspect(args, extra) -> int:
    from nanoseek.analysis.inspect import plot_attention, plot_fusion

    if extra:
        raise NanoseekError(f"unrecognized argument {extra[0]!r}")
    if args.what not in ("fusion", "attention"):
        raise NanoseekError(f"inspect {args.what!r}: choose one of: fusion, attention")
    model, tok = load_model_and_tokenizer(args.ckpt, args.trust_pickle)
    if args.what == "attention":
        out = plot_attention(model, tok, args.prompt, args.layer, args.out or "attention.png")
        print(json.dumps({"inspect": "attention", "layer": args.layer,
                          "kind": model.config.layer_sparse(args.layer), "out": str(out)}))
        return 0
    out = plot_fusion(model, tok, args.prompt, args.out or "fusion.png")
    print(json.dumps({"inspect": args.what, "fusion": model.config.fusion, "out": str(out)}))
    return 0


def cmd_ablate(args, extra) -> int:
    from nanoseek.train.ablate import ablate

    common = list(extra)
    if args.preset:
        common = ["--preset", args.preset, *common]
    report = ablate(args.variant or [], common, args.out)
    print(report.read_text(), end="")
    return 0


# ------------------------------------------------------------------------------------ parser


def add_compile_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", action="store_true",
                        help="compiled static-shape decode step: ~25 s to compile, then ~4-6x faster per token")
    parser.add_argument("--compile-prefill", action="store_true",
                        help="prompt prefill under torch.compile with dynamic shapes (one graph for every prompt "
                             "length; the first compile takes ~20 s to minutes; pays off for long prompts)")


def add_trust_pickle(parser: argparse.ArgumentParser):
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow a pickle-based pytorch_model.bin (loaded with weights_only=True)")


def build_parser() -> argparse.ArgumentParser:
    from nanoseek.device import add_device_arg

    p = argparse.ArgumentParser(prog="nanoseek", description="Train, evaluate and run DeepSeek-style models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (no arguments: the demo on the bundled corpus)")
    t.add_argument("config", nargs="?", help="a TOML or JSON config file")
    t.add_argument("--preset", help="named model config (see `nanoseek info --preset`)")
    t.add_argument("--data", nargs="+", help="text files to train on (default: bundled tiny Shakespeare)")
    t.add_argument("--out", help="run directory (default runs/default)")
    t.add_argument("--max-steps", type=int)
    t.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    t.add_argument("--nproc", type=int, help="launch N processes with torchrun (DDP unless --dist.strategy=fsdp)")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="generate text from a checkpoint")
    add_trust_pickle(s)
    s.add_argument("ckpt")
    s.add_argument("--prompt")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--seed", type=int)
    s.add_argument("--stop", action="append", help="stop string (repeatable)")
    s.add_argument("--threads", type=int)
    s.add_argument("--speculative", action="store_true",
                   help="greedy decoding with the MTP module as drafter (prints acceptance and speedup)")
    add_compile_args(s)
    add_device_arg(s)
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("eval", help="loss, perplexity and bits per byte on held-out text")
    add_trust_pickle(e)
    e.add_argument("ckpt")
    e.add_argument("--data", help="evaluate on this whole file (default: the training corpus's val split)")
    e.add_argument("--seq-len", type=int)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--max-batches", type=int)
    add_device_arg(e)
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("info", help="parameters, FLOPs per token and KV-cache bytes per token")
    add_trust_pickle(i)
    i.add_argument("ckpt", nargs="?")
    i.add_argument("--preset")
    i.add_argument("--seq-len", type=int, help="context length for the FLOPs estimate")
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("chat", help="chat with a checkpoint on the terminal")
    add_trust_pickle(c)
    c.add_argument("ckpt")
    c.add_argument("--system", help="a system message")
    c.add_argument("--max-new-tokens", type=int, default=200)
    c.add_argument("--temperature", type=float, default=0.7)
    c.add_argument("--top-k", type=int)
    c.add_argument("--top-p", type=float, default=0.95)
    c.add_argument("--seed", type=int)
    add_compile_args(c)
    add_device_arg(c)
    c.set_defaults(func=cmd_chat)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with a chat page")
    add_trust_pickle(sv)
    sv.add_argument("ckpt")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: env NANOSEEK_API_KEY)")
    sv.add_argument("--model-name", help="the model id clients send (default: the checkpoint folder's name)")
    sv.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (KV-cache rows)")
    sv.add_argument("--max-queue", type=int, default=64, help="sequences waiting for a row; beyond: 429")
    sv.add_argument("--max-tokens", type=int, help="largest max_tokens a request may ask (default: the context)")
    sv.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    sv.add_argument("--threads", type=int, help="torch threads (default: cores - 1, leaving one core to "
                    "the HTTP loop; on 2 cores this doubles throughput under load)")
    add_device_arg(sv)
    sv.set_defaults(func=cmd_serve)

    cv = sub.add_parser("convert", help="convert a checkpoint between nanoseek and Hugging Face formats")
    add_trust_pickle(cv)
    cv.add_argument("src")
    cv.add_argument("dst")
    cv.add_argument("--to", choices=("hf", "nanoseek"), required=True)
    cv.add_argument("--dtype", choices=("float32", "bfloat16"))
    cv.set_defaults(func=cmd_convert)

    em = sub.add_parser("embed", help="sentence vectors (scalar mix of all layers, mean-pooled)")
    em.add_argument("ckpt")
    em.add_argument("--text", action="append")
    em.add_argument("--file")
    add_trust_pickle(em)
    em.set_defaults(func=cmd_embed)

    ins = sub.add_parser("inspect", help="pictures of a trained model (fusion weights, attention)")
    ins.add_argument("what", help="fusion | attention")
    ins.add_argument("ckpt")
    ins.add_argument("--prompt", required=True)
    ins.add_argument("--layer", type=int, default=0, help="attention: which layer")
    ins.add_argument("--out", help="PNG path (default: fusion.png / attention.png)")
    add_trust_pickle(ins)
    ins.set_defaults(func=cmd_inspect)

    ab = sub.add_parser("ablate", help="train variants at equal budget; a table and a plot")
    ab.add_argument("--variant", action="append", help="preset or a,b overrides; NAME:spec to name it")
    ab.add_argument("--preset", help="base preset for every variant")
    ab.add_argument("--out", default="runs/ablate")
    ab.set_defaults(func=cmd_ablate)

    tk = sub.add_parser("tokenizer", help="tokenizer tools")
    tk_sub = tk.add_subparsers(dest="tokenizer_command", required=True)
    tt = tk_sub.add_parser("train", help="train a tokenizer and write tokenizer.json")
    tt.add_argument("files", nargs="+")
    tt.add_argument("--vocab-size", type=int, default=2048)
    tt.add_argument("--kind", default="bpe", help="bpe (byte-level BPE) or char")
    tt.add_argument("--out", default="tokenizer.json")
    tt.set_defaults(func=cmd_tokenizer)

    b = sub.add_parser("bench", help="benchmarks (JSON lines)", add_help=False)
    b.add_argument("what")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        return args.func(args, extra)
    except NanoseekError as e:
        print(f"nanoseek: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nanoseek: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
