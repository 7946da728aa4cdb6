"""Benchmark scripts live in benchmarks/, outside the package: tests load them by file name."""

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(name="load_benchmark")
def load_benchmark_fixture():
    """`load_benchmark("NAME")` in a test: benchmarks/NAME.py as a module."""
    return load_benchmark
