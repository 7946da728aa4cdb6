"""Corpus preparation, memmapped splits, deterministic resumable batches."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from nanoseek.data.shards import (
    BatchLoader,
    TokenDataset,
    iter_eval_batches,
    iter_file_chunks,
    prepare_corpus,
    token_dtype,
)
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.errors import NanoseekError

LINES = [
    "First Citizen:",
    "Before we proceed any further, hear me speak.",
    "",
    "秦川雄帝宅，函谷壯皇居。🙂🚀",
    "  indented line\twith tab",
    "All: Speak, speak.",
]
CORPUS_BYTES = ("\n".join(LINES * 40) + "\n").encode() + b"\xff\xfe raw \xe4\xb8 bytes\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_bytes(CORPUS_BYTES)
    return path


@pytest.fixture(scope="module")
def char_tokenizer(corpus):
    return train_tokenizer("char", [corpus])


@pytest.fixture(scope="module")
def bpe_tokenizer(corpus):
    return train_tokenizer("bpe", [corpus], vocab_size=300)


def _all_tokens(out_dir) -> np.ndarray:
    return np.asarray(TokenDataset(out_dir).tokens)


# ----------------------------------------------------------------------------- reading chunks


@pytest.mark.parametrize("chunk_bytes", [1, 7, 100, 1 << 20])
def test_file_chunks_cover_the_file_and_end_between_characters(corpus, chunk_bytes):
    chunks = list(iter_file_chunks(corpus, chunk_bytes))
    assert b"".join(chunks) == CORPUS_BYTES
    for chunk in chunks[1:]:
        assert not 0x80 <= chunk[0] < 0xC0  # never starts inside a UTF-8 character


def test_file_chunks_without_newlines_cut_at_character_boundaries(tmp_path):
    path = tmp_path / "one_line.txt"
    path.write_text("秦🙂" * 200, encoding="utf-8")
    chunks = list(iter_file_chunks(path, 50))
    assert len(chunks) > 1 and b"".join(chunks) == path.read_bytes()
    assert all(chunk.decode("utf-8") for chunk in chunks)


# ----------------------------------------------------------------------------- prepare


def test_prepare_writes_tokens_and_meta(corpus, char_tokenizer, tmp_path):
    meta = prepare_corpus([corpus], tmp_path, char_tokenizer, chunk_bytes=200)
    tokens = _all_tokens(tmp_path)
    assert tokens.dtype == np.uint16 and meta["dtype"] == "uint16"
    assert tokens.tolist() == char_tokenizer.encode(CORPUS_BYTES)
    n_tokens = len(tokens)
    assert meta["n_tokens"] == n_tokens and meta["vocab_size"] == char_tokenizer.vocab_size
    assert meta["val_start"] == n_tokens - round(n_tokens * 0.1)
    assert meta["train_bytes"] + meta["val_bytes"] == len(CORPUS_BYTES)
    assert meta["tokenizer"]["kind"] == "char"
    assert meta["sources"][0]["size"] == len(CORPUS_BYTES)
    assert not list(tmp_path.glob("*.tmp"))


def test_bpe_prepare_is_lossless_across_small_chunks(corpus, bpe_tokenizer, tmp_path):
    meta = prepare_corpus([corpus], tmp_path, bpe_tokenizer, chunk_bytes=300)
    assert bpe_tokenizer.decode_bytes(_all_tokens(tmp_path)) == CORPUS_BYTES
    assert meta["tokenizer"]["kind"] == "bpe"
    assert meta["train_bytes"] + meta["val_bytes"] == len(CORPUS_BYTES)


def test_several_files_are_concatenated(corpus, char_tokenizer, tmp_path):
    second = tmp_path / "second.txt"
    second.write_text("秦川 speak\n" * 30, encoding="utf-8")
    prepare_corpus([corpus, second], tmp_path / "out", char_tokenizer)
    expected = char_tokenizer.encode(CORPUS_BYTES) + char_tokenizer.encode(second.read_bytes())
    assert _all_tokens(tmp_path / "out").tolist() == expected


def test_val_split_is_the_last_tenth(corpus, char_tokenizer, tmp_path):
    prepare_corpus([corpus], tmp_path, char_tokenizer)
    dataset = TokenDataset(tmp_path)
    train, val = dataset.split("train"), dataset.split("val")
    assert np.array_equal(np.concatenate([train, val]), dataset.tokens)
    assert len(val) == round(len(dataset.tokens) * 0.1)
    lengths = char_tokenizer.token_byte_lengths()
    assert dataset.meta["val_bytes"] == lengths[val].sum()
    assert dataset.vocab_size == char_tokenizer.vocab_size
    with pytest.raises(ValueError):
        train[0] = 1  # read-only memmap
    with pytest.raises(NanoseekError, match="'test'.*train, val"):
        dataset.split("test")


def test_prepare_is_cached_until_source_changes(corpus, char_tokenizer, tmp_path, monkeypatch):
    source = tmp_path / "source.txt"
    source.write_bytes(CORPUS_BYTES)
    first = prepare_corpus([source], tmp_path / "out", char_tokenizer)

    def fail_encode(*args, **kwargs):
        raise AssertionError("re-tokenized a cached corpus")

    monkeypatch.setattr(char_tokenizer, "encode", fail_encode)
    assert prepare_corpus([source], tmp_path / "out", char_tokenizer) == first
    monkeypatch.undo()
    source.write_bytes(CORPUS_BYTES * 2)
    os.utime(source, ns=(1, 1))
    second = prepare_corpus([source], tmp_path / "out", char_tokenizer)
    assert second["n_tokens"] == 2 * first["n_tokens"]


def test_prepare_redone_for_another_tokenizer(corpus, char_tokenizer, bpe_tokenizer, tmp_path):
    prepare_corpus([corpus], tmp_path, char_tokenizer)
    meta = prepare_corpus([corpus], tmp_path, bpe_tokenizer)
    assert meta["tokenizer"]["kind"] == "bpe"
    assert bpe_tokenizer.decode_bytes(_all_tokens(tmp_path)) == CORPUS_BYTES


def test_token_dtype_widens_for_big_vocabularies():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_prepare_rejects_missing_file(char_tokenizer, tmp_path):
    with pytest.raises(NanoseekError, match="missing.txt"):
        prepare_corpus([tmp_path / "missing.txt"], tmp_path / "out", char_tokenizer)


def test_prepare_rejects_empty_file(corpus, char_tokenizer, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(NanoseekError, match="empty.txt.*empty"):
        prepare_corpus([corpus, empty], tmp_path / "out", char_tokenizer)
    assert not (tmp_path / "out" / "meta.json").exists()
    assert not list((tmp_path / "out").glob("*.tmp"))


@pytest.mark.parametrize("val_fraction", [-0.1, 1.0])
def test_prepare_rejects_bad_val_fraction(corpus, char_tokenizer, tmp_path, val_fraction):
    with pytest.raises(NanoseekError, match="val_fraction"):
        prepare_corpus([corpus], tmp_path, char_tokenizer, val_fraction=val_fraction)


def test_prepare_rejects_corpus_too_small_to_split(char_tokenizer, tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Speak", encoding="utf-8")
    with pytest.raises(NanoseekError, match="tiny.txt.*only 5 tokens"):
        prepare_corpus([tiny], tmp_path / "out", char_tokenizer)


def test_dataset_without_meta_is_an_error(tmp_path):
    with pytest.raises(NanoseekError, match="meta.json"):
        TokenDataset(tmp_path)


# ----------------------------------------------------------------------------- batches

TOKENS = np.arange(1000, dtype=np.uint16)


def test_batches_are_shifted_windows():
    x, y = BatchLoader(TOKENS, batch_size=4, block_size=8, seed=0).next()
    assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # tokens are 0..999, so targets are inputs + 1
    assert torch.equal(x, x[:, :1] + torch.arange(8))  # contiguous windows
    assert int(y.max()) <= 999


def test_loader_is_deterministic_and_seed_dependent():
    first, second = (BatchLoader(TOKENS, 4, 8, seed=1) for _ in range(2))
    for _ in range(3):
        assert torch.equal(first.next()[0], second.next()[0])
    assert not torch.equal(BatchLoader(TOKENS, 4, 8, seed=2).next()[0], BatchLoader(TOKENS, 4, 8, seed=1).next()[0])


def test_loader_state_restores_exact_batches():
    loader = BatchLoader(TOKENS, 4, 8, seed=3)
    for _ in range(3):
        loader.next()
    state = loader.state_dict()
    assert state == {"step": 3, "seed": 3}
    expected = [loader.next() for _ in range(2)]
    restored = BatchLoader(TOKENS, 4, 8, seed=99)
    restored.load_state_dict(state)
    for x, y in expected:
        got_x, got_y = restored.next()
        assert torch.equal(got_x, x) and torch.equal(got_y, y)


def test_ranks_split_the_global_batch():
    single = BatchLoader(TOKENS, batch_size=6, block_size=8, seed=5)
    ranks = [BatchLoader(TOKENS, batch_size=3, block_size=8, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(2):
        x, _ = single.next()
        assert torch.equal(torch.cat([loader.next()[0] for loader in ranks]), x)


def test_loader_rejects_too_short_split_and_bad_rank():
    with pytest.raises(NanoseekError, match="8 tokens.*block_size=8"):
        BatchLoader(TOKENS[:8], 2, 8, seed=0)
    with pytest.raises(NanoseekError, match="rank"):
        BatchLoader(TOKENS, 2, 8, seed=0, rank=2, world_size=2)
    with pytest.raises(NanoseekError, match="batch_size"):
        BatchLoader(TOKENS, 0, 8, seed=0)


def test_loader_reads_a_memmapped_split(corpus, char_tokenizer, tmp_path):
    prepare_corpus([corpus], tmp_path, char_tokenizer)
    train = TokenDataset(tmp_path).split("train")
    x, y = BatchLoader(train, 2, 16, seed=0).next()
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < char_tokenizer.vocab_size


def test_eval_batches_cover_every_target_once():
    tokens = np.arange(103, dtype=np.uint16)
    batches = list(iter_eval_batches(tokens, batch_size=4, block_size=10))
    assert [tuple(x.shape) for x, _ in batches] == [(4, 10), (4, 10), (2, 10), (1, 2)]
    assert torch.cat([y.flatten() for _, y in batches]).tolist() == list(range(1, 103))
    assert all(torch.equal(y, x + 1) for x, y in batches)
    assert len(list(iter_eval_batches(tokens, 4, 10, max_batches=2))) == 2
