"""Fixtures shared by the whole suite. Folder-specific ones live in that folder's conftest.py."""

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
