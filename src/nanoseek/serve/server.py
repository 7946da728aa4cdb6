"""Run the OpenAI-compatible app (app.py) on uvicorn until Ctrl-C.

Listening beyond loopback without an API key is allowed but warned about: anyone who can reach the
address can use the model.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys

import uvicorn

from nanoseek.serve.app import create_app
from nanoseek.serve.seq2seq import create_seq2seq_app
from nanoseek.serve.transport import JSONErrorProtocol, listen_socket


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_open(host: str, api_key: str | None) -> None:
    """A warning on stderr when `host` is reachable beyond this machine and no API key is set."""
    if not is_loopback(host) and not api_key:
        print(
            f"warning: listening on {host} without an API key: anyone who can reach this "
            f"address can use the model (set --api-key or NANOSEEK_API_KEY)",
            file=sys.stderr,
        )


def build_app(model, tokenizer, name: str, compile: bool, prefix_cache_bytes: int, engine_process: bool, **options):
    """(the app serving `model`, whether it decodes compiled, its prefix cache's bytes, whether its
    engine has a process of its own). An encoder-decoder is served by serve/seq2seq.py, whose beam
    search has neither the compiled step, the prefix cache nor the engine process: all are off
    there, whatever was asked."""
    if model.config.architecture == "encoder_decoder":
        return create_seq2seq_app(model, tokenizer, name, **options), False, 0, False
    app = create_app(
        model,
        tokenizer,
        name,
        compile=compile,
        prefix_cache_bytes=prefix_cache_bytes,
        engine_process=engine_process,
        **options,
    )
    return app, compile, prefix_cache_bytes, engine_process


def serve(
    model,
    tokenizer,
    name: str,
    folder=None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 16,
    max_queue: int = 64,
    max_tokens: int | None = None,
    max_body_bytes: int = 1 << 20,
    sock: socket.socket | None = None,
    compile: bool = False,
    prefix_cache_bytes: int = 0,
    engine_process: bool = False,
) -> None:
    """Serve `model` as `name` on http://host:port (blocks until the server stops); `sock`: that address,
    already bound (by `listen_socket`, before the model loaded). An encoder-decoder model is served by
    serve/seq2seq.py."""
    sock = sock or listen_socket(host, port)
    try:
        app, compile, prefix_cache_bytes, engine_process = build_app(
            model,
            tokenizer,
            name,
            compile,
            prefix_cache_bytes,
            engine_process,
            folder=folder,
            api_key=api_key,
            max_batch=max_batch,
            max_queue=max_queue,
            max_tokens_limit=max_tokens,
            max_body_bytes=max_body_bytes,
        )
    except BaseException:
        sock.close()
        raise
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cache = f"{prefix_cache_bytes / 2**20:g} MiB" if prefix_cache_bytes else "off"
    print(
        f"serving {name} on http://{host}:{port} (max batch {max_batch}, "
        f"queue {max_queue}, API key {'on' if api_key else 'off'}, "
        f"decode {'compiled' if compile else 'eager'}, prefix cache {cache}, "
        f"engine {'in its own process' if engine_process else 'on a thread'})",
        file=sys.stderr,
        flush=True,
    )
    if compile:
        print(
            "compiling the decode step and prefill before the first request: minutes the first time on a small CPU, "
            "seconds once torch has cached it (--no-compile skips it)",
            file=sys.stderr,
            flush=True,
        )
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5, http=JSONErrorProtocol
    )
    uvicorn.Server(config).run(sockets=[sock])
