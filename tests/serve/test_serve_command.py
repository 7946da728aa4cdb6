"""`nanoseek serve` with an address or a size it cannot use: one line and exit 2, before or instead of
loading the model, never uvicorn's exit 3 or an allocator traceback."""

from __future__ import annotations

import socket

import pytest
import torch
from serving import free_port

from nanoseek import ModelConfig, Transformer
from nanoseek.cli import main
from nanoseek.errors import NanoseekError
from nanoseek.serve.engine import Engine, cache_bytes_per_row, check_cache_fits


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def serve(checkpoint, *args) -> int:
    return main(["serve", str(checkpoint), "--threads", str(torch.get_num_threads()), *args])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--port", "70000"], "--port=70000 must be an integer in [1, 65535]"),
        (["--port", "0"], "--port=0 must be an integer in [1, 65535]"),
        (["--host", "no-such-host.invalid"], "--host='no-such-host.invalid' is not an address"),
        (["--host", "a\x00b"], "is not an address"),
        (["--host", "192.0.2.1"], "cannot listen on 192.0.2.1:"),  # a documentation address: not this machine
        (["--max-batch", "100000000"], "--max-batch=100000000: serving 100000000 sequences needs about"),
    ],
)
def test_unusable_addresses_and_sizes_are_one_line(checkpoint, args, message, capsys):
    port = [] if "--port" in args else ["--port", str(free_port())]
    assert serve(checkpoint, *args, *port) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("nanoseek: error:"), err


def test_a_port_in_use_is_one_line(checkpoint, busy_port, capsys):
    assert serve(checkpoint, "--port", str(busy_port)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"cannot listen on 127.0.0.1:{busy_port}" in err and "another server" in err


def test_the_cache_estimate_is_what_the_engine_allocates():
    model = Transformer(ModelConfig.from_preset("deepseek-v3-tiny").replace(max_position_embeddings=64))
    engine = Engine(model, tokenizer=None, max_batch=3)
    allocated = sum(
        t.numel() * t.element_size()
        for layer in engine.cache
        for value in vars(layer).values()
        for t in (value.values() if isinstance(value, dict) else [value])
        if isinstance(t, torch.Tensor)
    )
    assert allocated == 3 * cache_bytes_per_row(model, 64)
    with pytest.raises(NanoseekError, match="lower --max-batch"):
        check_cache_fits(model, 10**12, 64, torch.device("cpu"))
