"""`nanoseek serve`: a checkpoint behind the OpenAI-compatible HTTP API until Ctrl-C."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from nanoseek.cli.common import Command, add_checkpoint_args, load, reject_extra
from nanoseek.errors import NanoseekError


def add_serve_arguments(sv) -> None:
    add_checkpoint_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port")
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: env NANOSEEK_API_KEY)")
    sv.add_argument("--model-name", help="the model id clients send (default: the checkpoint folder's name)")
    sv.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (KV-cache rows)")
    sv.add_argument("--max-queue", type=int, default=64, help="sequences waiting for a row; beyond: 429")
    sv.add_argument("--max-tokens", type=int, help="largest max_tokens a request may ask (default: the context)")
    sv.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    sv.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode with the compiled step, compiled for every padded batch size before the first request "
        "(default on: several times faster decoding; --no-compile starts at once)",
    )
    sv.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=512,
        help="memory for the KV blocks of earlier prompts, reused by prompts that start the same way "
        "(default 512; 0 turns the prefix cache off)",
    )
    sv.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the engine in a process of its own, so that streaming answers never hold up its steps "
        "(default: on for a model on the CPU with two or more cores)",
    )
    sv.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: cores - 1, leaving one core to "
        "the HTTP loop; on 2 cores this doubles throughput under load)",
    )


def check_limits(args) -> None:
    for name in ("port", "max_batch", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise NanoseekError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.port > 65535:
        raise NanoseekError(f"--port={args.port} must be a TCP port, 1..65535")
    if args.max_queue < 0 or (args.max_tokens is not None and args.max_tokens < 1):
        raise NanoseekError("--max-queue must be >= 0 and --max-tokens >= 1")
    if not 0 <= args.prefix_cache_mb < float("inf"):  # also refuses nan
        raise NanoseekError(f"--prefix-cache-mb={args.prefix_cache_mb} must be >= 0 (0 turns the cache off)")


def check_cache_fits(args) -> None:
    """The weights and a KV cache of --max-batch rows of the whole context fit in memory (the engine
    allocates that cache at start), judged from the checkpoint's config before anything loads."""
    from nanoseek.config.memory import check_memory
    from nanoseek.io import read_model_config
    from nanoseek.model.transformer import kv_cache_bytes_per_token

    config, _ = read_model_config(args.ckpt)
    check_memory(
        config,
        f"serving {args.max_batch} sequences",
        bytes_per_param=2,
        kv_cache_tokens=args.max_batch * config.max_position_embeddings,
        kv_bytes_per_token=kv_cache_bytes_per_token(config, dtype_bytes=2),
        flag=f"--max-batch={args.max_batch}",
    )


def default_engine_process(model) -> bool:
    """The engine in its own process for a model on the CPU with two cores or more (measured there;
    on a GPU the engine thread mostly waits on the device, with the GIL released)."""
    return next(model.parameters()).device.type == "cpu" and (os.cpu_count() or 1) >= 2


def run_serve(args, extra) -> int:
    reject_extra(extra)
    try:
        from nanoseek.serve.server import serve, warn_if_open
        from nanoseek.serve.transport import listen_socket
    except ImportError as e:
        raise NanoseekError(f"serving needs the serve extra (pip install 'nanoseek[serve]'): {e}") from None
    check_limits(args)
    check_cache_fits(args)
    api_key = args.api_key or os.environ.get("NANOSEEK_API_KEY") or None
    warn_if_open(args.host, api_key)  # before the model loads, which can take minutes
    sock = listen_socket(args.host, args.port)  # a port in use or a bad host: an error now, not after loading
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    model, tok, folder = load(args, encoder_decoder=True)
    serve(
        model,
        tok,
        name=args.model_name or Path(args.ckpt).resolve().name,
        folder=folder,
        host=args.host,
        port=args.port,
        api_key=api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_tokens=args.max_tokens,
        max_body_bytes=args.max_body_bytes,
        compile=args.compile,
        prefix_cache_bytes=int(args.prefix_cache_mb * 2**20),
        engine_process=default_engine_process(model) if args.engine_process is None else args.engine_process,
        sock=sock,
    )
    return 0


COMMANDS = [Command("serve", "an OpenAI-compatible HTTP server with a chat page", add_serve_arguments, run_serve)]
