"""Fixtures of the server tests: one tiny checkpoint and one server process for the whole folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from serving import ALPHABET, CONTEXT, Server  # noqa: E402

from nanoseek import ModelConfig, Transformer  # noqa: E402
from nanoseek.data.tokenizer import CharTokenizer, load_tokenizer  # noqa: E402
from nanoseek.io import load_model  # noqa: E402


@pytest.fixture(scope="package")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "tiny-chat"
    tok = CharTokenizer.train([ALPHABET])
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("deepseek-v3-tiny").replace(
        vocab_size=tok.vocab_size, max_position_embeddings=CONTEXT
    )
    Transformer(cfg).save_pretrained(path)
    tok.save(path)
    return path


@pytest.fixture(scope="package")
def server(checkpoint):
    s = Server(checkpoint, "--max-batch", "2", "--max-queue", "2", "--max-body-bytes", "20000")
    yield s
    s.stop()


@pytest.fixture(scope="package")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="package")
def local(checkpoint):
    """The same model and tokenizer in this process: what the server must reproduce."""
    return load_model(checkpoint), load_tokenizer(checkpoint / "tokenizer.json")
