"""From text files to training batches: token shards on disk, deterministic random windows.

Preparing a corpus tokenizes it once and stores the ids as one flat binary file, ``tokens.bin``
(uint16 when the vocabulary fits, else uint32), plus ``meta.json`` describing it. Files are read
in chunks of about 1 MB cut at newlines (``data.files.iter_file_chunks``), so the corpus never has
to fit in memory, and in binary, so bytes that are not valid UTF-8 survive tokenization. Both files
are written atomically: an interrupted preparation leaves no tokens.bin without its meta.json. As in nanoGPT, the last
``val_fraction`` of the tokens (10% by default) is the validation split.

Training reads ``tokens.bin`` through a read-only memory map and samples random windows:
``x = tokens[i:i+T]`` is the input and ``y = tokens[i+1:i+T+1]`` the next-token targets. The
offsets of batch number ``step`` come from a random generator seeded with ``[seed, step]``, so a
run resumed from a checkpoint at step k sees exactly the batches an uninterrupted run would have,
and data-parallel ranks split each global batch between them without overlap.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from nanoseek.data.files import atomic_write, atomic_write_text, check_input_file, iter_file_chunks
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.errors import NanoseekError

TOKENS_FILENAME = "tokens.bin"
META_FILENAME = "meta.json"
META_FORMAT = "nanoseek-tokens"
SPLITS = ("train", "val")
_BYTE_COUNT_CHUNK = 1 << 22


# ----------------------------------------------------------------------------- preparing


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id."""
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def _describe_sources(files: Sequence[str | os.PathLike]) -> list[dict]:
    if not files:
        raise NanoseekError("no corpus files given")
    sources = []
    for file in files:
        path = check_input_file(file, "corpus file")
        stat = path.stat()
        sources.append({"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return sources


def _cache_key(sources: list[dict], tokenizer: Tokenizer, val_fraction: float, chunk_bytes: int) -> dict:
    tokenizer_id = {"kind": tokenizer.name, "sha256": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size}
    return {"sources": sources, "tokenizer": tokenizer_id, "val_fraction": val_fraction, "chunk_bytes": chunk_bytes}


def _read_meta(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / META_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _cached_meta(out_dir: Path, key: dict) -> dict | None:
    """The existing meta.json if it was made from the same sources and settings."""
    meta = _read_meta(out_dir)
    if meta is None or any(meta.get(name) != value for name, value in key.items()):
        return None
    tokens = out_dir / TOKENS_FILENAME
    expected_size = meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize
    if not tokens.is_file() or tokens.stat().st_size != expected_size:
        return None
    return meta


def _write_tokens(sources: list[dict], tokenizer: Tokenizer, out: BinaryIO, dtype: np.dtype, chunk_bytes: int) -> int:
    """Tokenize each file chunk by chunk, appending ids to ``out``; returns the token count."""
    n_tokens = 0
    for source in sources:
        file_tokens = 0
        for chunk in iter_file_chunks(source["path"], chunk_bytes):
            ids = np.asarray(tokenizer.encode(chunk), dtype=dtype)
            out.write(ids.tobytes())
            file_tokens += len(ids)
        if file_tokens == 0:
            raise NanoseekError(f"corpus file {source['path']} is empty (0 tokens)")
        n_tokens += file_tokens
    return n_tokens


def count_bytes(tokens: np.ndarray, byte_lengths: np.ndarray) -> int:
    """Total bytes the tokens decode to, summed chunk by chunk (works on memmaps)."""
    total = 0
    for start in range(0, len(tokens), _BYTE_COUNT_CHUNK):
        total += int(byte_lengths[tokens[start : start + _BYTE_COUNT_CHUNK]].sum())
    return total


def _split_point(n_tokens: int, val_fraction: float, files: list[dict]) -> int:
    n_val = round(n_tokens * val_fraction)
    if n_tokens - n_val < 2 or (val_fraction > 0 and n_val < 2):
        names = ", ".join(source["path"] for source in files)
        raise NanoseekError(
            f"corpus ({names}) has only {n_tokens} tokens: too small for a train and a "
            f"validation split with val_fraction={val_fraction}"
        )
    return n_tokens - n_val


def prepare_corpus(
    files: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    tokenizer: Tokenizer,
    val_fraction: float = 0.1,
    chunk_bytes: int = 1 << 20,
) -> dict:
    """Tokenize text files into ``out_dir/tokens.bin`` + ``meta.json``; returns the meta.

    Reuses an existing preparation made from the same files (path, size, mtime), the same
    tokenizer (hash of its tokenizer.json) and the same settings.
    """
    if not 0 <= val_fraction < 1:
        raise NanoseekError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if chunk_bytes < 1:
        raise NanoseekError(f"chunk_bytes must be positive, got {chunk_bytes}")
    out = Path(out_dir)
    sources = _describe_sources(files)
    key = _cache_key(sources, tokenizer, val_fraction, chunk_bytes)
    cached = _cached_meta(out, key)
    if cached is not None:
        return cached
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILENAME).unlink(missing_ok=True)  # never leave a meta for other tokens
    dtype = token_dtype(tokenizer.vocab_size)
    with atomic_write(out / TOKENS_FILENAME, "wb") as handle:
        n_tokens = _write_tokens(sources, tokenizer, handle, dtype, chunk_bytes)
        val_start = _split_point(n_tokens, val_fraction, sources)
    tokens = np.memmap(out / TOKENS_FILENAME, dtype=dtype, mode="r", shape=(n_tokens,))
    byte_lengths = tokenizer.token_byte_lengths()
    meta = {
        "format": META_FORMAT,
        "version": 1,
        **key,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "n_tokens": n_tokens,
        "val_start": val_start,
        "train_tokens": val_start,
        "val_tokens": n_tokens - val_start,
        "train_bytes": count_bytes(tokens[:val_start], byte_lengths),
        "val_bytes": count_bytes(tokens[val_start:], byte_lengths),
    }
    del tokens
    atomic_write_text(out / META_FILENAME, json.dumps(meta, indent=1))
    return meta


# ----------------------------------------------------------------------------- reading


class TokenDataset:
    """A prepared corpus: read-only memmap of ``tokens.bin`` plus its meta."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.dir = Path(out_dir)
        meta = _read_meta(self.dir)
        if meta is None or meta.get("format") != META_FORMAT:
            raise NanoseekError(f"{self.dir / META_FILENAME} is missing or unreadable: prepare the corpus first")
        self.meta = meta
        path = self.dir / TOKENS_FILENAME
        dtype = np.dtype(meta["dtype"])
        expected = meta["n_tokens"] * dtype.itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise NanoseekError(f"{path} is missing or not {expected} bytes as {META_FILENAME} says: prepare again")
        self.tokens = np.memmap(path, dtype=dtype, mode="r", shape=(meta["n_tokens"],))

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def split(self, name: str) -> np.ndarray:
        """The "train" or "val" tokens (a view, nothing is read yet)."""
        val_start = self.meta["val_start"]
        if name == "train":
            return self.tokens[:val_start]
        if name == "val":
            return self.tokens[val_start:]
        raise NanoseekError(f"split {name!r} is unknown (valid: {', '.join(SPLITS)})")


# ----------------------------------------------------------------------------- batches


def _require_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise NanoseekError(f"{name} must be a positive integer, got {value!r}")


Batch = tuple[torch.Tensor, torch.Tensor]


def _windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> Batch:
    """Inputs and targets [len(starts), block_size] of the windows starting at ``starts``."""
    rows = np.asarray(tokens[starts[:, None] + np.arange(block_size + 1)], dtype=np.int64)
    inputs = torch.from_numpy(np.ascontiguousarray(rows[:, :-1]))
    targets = torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))
    return inputs, targets


class SeededStepLoader:
    """What every loader that draws batch `step` from (seed, step) alone shares: iteration and an
    exactly resumable state of two integers."""

    step: int
    seed: int

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        for name in ("step", "seed"):
            if not isinstance(state.get(name), (int, np.integer)) or state[name] < 0:
                raise NanoseekError(f"loader state needs a non-negative integer {name!r}, got {state!r}")
        self.step, self.seed = int(state["step"]), int(state["seed"])


class BatchLoader(SeededStepLoader):
    """Deterministic random windows; batch ``step`` depends only on (seed, step)."""

    def __init__(
        self, tokens: np.ndarray, batch_size: int, block_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        _require_positive(batch_size=batch_size, block_size=block_size, world_size=world_size)
        if not 0 <= rank < world_size:
            raise NanoseekError(f"rank must be in 0..{world_size - 1}, got {rank}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise NanoseekError(f"seed must be a non-negative integer, got {seed!r}")
        if len(tokens) <= block_size:
            raise NanoseekError(f"split has {len(tokens)} tokens, needs more than block_size={block_size}")
        self.tokens = tokens
        self.batch_size, self.block_size = batch_size, block_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.step = int(seed), 0

    def offsets(self, step: int) -> np.ndarray:
        """This rank's window starts for batch ``step``."""
        rng = np.random.default_rng([self.seed, step])
        global_starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size * self.world_size)
        return global_starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def next(self) -> Batch:
        """(x, y) int64 tensors [batch_size, block_size]; advances ``step``."""
        batch = _windows(self.tokens, self.offsets(self.step), self.block_size)
        self.step += 1
        return batch

    __next__ = next


def iter_eval_batches(
    tokens: np.ndarray, batch_size: int, block_size: int, max_batches: int | None = None
) -> Iterator[Batch]:
    """Non-overlapping windows over the whole split, in order, for full evaluation.

    Every token after the first is a target exactly once: full windows come in batches (the
    last batch may have fewer rows), and the leftover tail shorter than ``block_size`` comes
    last as a [1, tail] batch. Weight each batch by ``y.numel()`` when averaging losses.
    """
    _require_positive(batch_size=batch_size, block_size=block_size)
    if max_batches is not None:
        _require_positive(max_batches=max_batches)
    if len(tokens) < 2:
        raise NanoseekError(f"split has {len(tokens)} tokens, needs at least 2 to evaluate")
    n_windows, tail = divmod(len(tokens) - 1, block_size)
    n_batches = 0
    for first in range(0, n_windows, batch_size):
        if max_batches is not None and n_batches >= max_batches:
            return
        starts = np.arange(first, min(first + batch_size, n_windows)) * block_size
        yield _windows(tokens, starts, block_size)
        n_batches += 1
    if tail and (max_batches is None or n_batches < max_batches):
        yield _windows(tokens, np.array([n_windows * block_size]), tail)
