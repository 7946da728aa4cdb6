"""Fixtures shared by the whole suite. Folder-specific ones live in that folder's conftest.py."""

import importlib.util
from pathlib import Path

import pytest
import torch

from nanoseek.data import BUNDLED_CORPUS

# Two cores: a test runner that spawns a second thread pool stalls at every barrier.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> str:
    """A file with the first 60 KB of the bundled tiny Shakespeare (training tests), as a path string."""
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_bytes(BUNDLED_CORPUS.read_bytes()[:60_000])
    return str(path)


POEM_CHARS = "天地日月山水風雲花鳥春秋江河松竹金玉石田"


def poem_block(i: int) -> str:
    """A poem block (title, author, two couplets) whose couplets are unique to poem i (i < 400)."""
    a, b = POEM_CHARS[i % 20], POEM_CHARS[(i // 20) % 20]
    return f"題{i}\n作者\n{a}{b}一二三，{b}{a}四五六。\n{a}{b}七八九，{b}{a}十百千。"


@pytest.fixture
def poems_file(tmp_path_factory):
    """200 poems in the Tang poems file's format: 400 five-character couplets."""
    path = tmp_path_factory.mktemp("poems") / "poems.txt"
    path.write_text("\n\n".join(poem_block(i) for i in range(200)) + "\n", encoding="utf-8")
    return path


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(name="load_benchmark")
def load_benchmark_fixture():
    """`load_benchmark("NAME")`: benchmarks/NAME.py (outside the package) as a module."""

    def load_benchmark(name: str):
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load_benchmark
