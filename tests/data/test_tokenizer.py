"""Tokenizers: lossless round trips, special tokens, save/load, streaming decode."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

import nanoseek.data.tokenizer as tokenizer_module
from nanoseek.data import BUNDLED_CORPUS
from nanoseek.data.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    bytes_to_unicode,
    load_tokenizer,
    train_tokenizer,
)
from nanoseek.errors import NanoseekError
from nanoseek.generation.streaming import Detokenizer

ENGLISH = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than "
    "to famish?\n"
)
CHINESE = "帝京篇十首 一\n太宗皇帝\n秦川雄帝宅，函谷壯皇居。\n綺殿千尋起，離宮百雉餘。\n"
SAMPLES = [
    "",
    "hello world",
    ENGLISH,
    "秦川雄帝宅，函谷壯皇居。",
    "🙂🚀 mixed 中文 and ASCII\r\n\ttabs  and   spaces\n\n",
    "\x00\x01 control \x7f bytes",
]
INVALID_BYTES = [b"\xff\xfe abc \xe4\xb8", b"\x80", b"\xed\xa0\x80 surrogate", b"ok\xc3", "秦🙂".encode()[:-1]]
SHAKESPEARE = BUNDLED_CORPUS


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(ENGLISH * 20 + CHINESE * 10, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def char_tokenizer(corpus_file) -> CharTokenizer:
    return train_tokenizer("char", [corpus_file])


@pytest.fixture(scope="module")
def bpe_tokenizer(corpus_file) -> BPETokenizer:
    return train_tokenizer("bpe", [corpus_file], vocab_size=320)


@pytest.fixture(params=["char", "bpe"])
def tokenizer(request, char_tokenizer, bpe_tokenizer) -> Tokenizer:
    return char_tokenizer if request.param == "char" else bpe_tokenizer


# ----------------------------------------------------------------------------- both kinds


@pytest.mark.parametrize("text", SAMPLES)
def test_str_round_trip_gives_utf8_bytes(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode_bytes(ids) == text.encode("utf-8")
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("data", INVALID_BYTES)
def test_invalid_utf8_bytes_round_trip_exactly(tokenizer, data):
    assert tokenizer.decode_bytes(tokenizer.encode(data)) == data


def test_random_bytes_round_trip(tokenizer):
    data = np.random.default_rng(0).integers(0, 256, size=3000, dtype=np.uint8).tobytes()
    assert tokenizer.decode_bytes(tokenizer.encode(data)) == data


def test_lone_surrogate_in_str_keeps_its_surrogatepass_bytes(tokenizer):
    text = "a\ud800b"
    assert tokenizer.decode_bytes(tokenizer.encode(text)) == text.encode("utf-8", "surrogatepass")


def test_special_token_text_in_user_text_stays_text(tokenizer):
    text = "say <|bos|> then <|eos|> and <|pad|>"
    ids = tokenizer.encode(text)
    assert not set(ids) & set(tokenizer.special_ids)
    assert tokenizer.decode(ids) == text


def test_special_ids_are_distinct_and_decode_to_nothing(tokenizer):
    specials = tokenizer.special_ids
    assert len(set(specials)) == 3
    assert all(0 <= i < tokenizer.vocab_size for i in specials)
    assert tokenizer.decode_bytes(list(specials)) == b""
    assert all(tokenizer.token_byte_lengths()[i] == 0 for i in specials)


def test_bos_eos_flags_wrap_the_ids(tokenizer):
    ids = tokenizer.encode("hi", bos=True, eos=True)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert ids[1:-1] == tokenizer.encode("hi")
    assert tokenizer.decode(ids) == "hi"


def test_token_byte_lengths_sum_to_text_bytes(tokenizer):
    lengths = tokenizer.token_byte_lengths()
    assert lengths.shape == (tokenizer.vocab_size,) and lengths.dtype == np.int64
    for text in SAMPLES:
        ids = tokenizer.encode(text, bos=True, eos=True)
        assert lengths[ids].sum() == len(text.encode("utf-8"))


def test_save_load_round_trip_encodes_identically(tokenizer, tmp_path):
    written = tokenizer.save(tmp_path)
    assert written == tmp_path / "tokenizer.json"
    for path in (tmp_path, written):
        loaded = load_tokenizer(path)
        assert type(loaded) is type(tokenizer) and loaded.name == tokenizer.name
        assert loaded.vocab_size == tokenizer.vocab_size
        assert loaded.special_ids == tokenizer.special_ids
        assert loaded.fingerprint() == tokenizer.fingerprint()
        for text in [*SAMPLES, *INVALID_BYTES]:
            assert loaded.encode(text) == tokenizer.encode(text)


def test_detokenizer_emits_only_whole_characters(tokenizer):
    text = "秦🙂"
    ids = tokenizer.encode(text)
    assert len(ids) > 2  # multi-byte characters split over several tokens
    decoder = Detokenizer(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.finish()]
    assert "".join(pieces) == text
    assert all(piece in ("", "秦", "🙂") for piece in pieces)


def test_detokenizer_finish_replaces_incomplete_tail(tokenizer):
    decoder = Detokenizer(tokenizer)
    emitted = "".join(decoder.push(i) for i in tokenizer.encode(b"a" + "秦".encode()[:2]))
    assert emitted == "a" and decoder.finish() == "\ufffd"


def test_encode_batch_matches_encode(tokenizer):
    texts = [*SAMPLES, *INVALID_BYTES]
    assert tokenizer.encode_batch(texts, eos=True) == [tokenizer.encode(t, eos=True) for t in texts]


def test_decode_rejects_ids_outside_vocab(tokenizer):
    for bad in (-1, tokenizer.vocab_size):
        with pytest.raises(NanoseekError, match="outside the vocabulary"):
            tokenizer.decode([0, bad])


def test_decode_accepts_numpy_ids(tokenizer):
    ids = tokenizer.encode("秦 hello")
    assert tokenizer.decode(np.array(ids)) == "秦 hello"


# ----------------------------------------------------------------------------- char


def test_char_vocab_is_corpus_chars_then_specials_then_bytes(char_tokenizer):
    chars = char_tokenizer.chars
    assert list(chars) == sorted(set(ENGLISH + CHINESE))
    assert char_tokenizer.encode(chars) == list(range(len(chars)))
    assert char_tokenizer.special_ids == (len(chars), len(chars) + 1, len(chars) + 2)
    assert char_tokenizer.vocab_size == len(chars) + 3 + 256


def test_char_unknown_character_uses_byte_fallback(char_tokenizer):
    byte_base = len(char_tokenizer.chars) + 3
    assert char_tokenizer.encode("🙂") == [byte_base + b for b in "🙂".encode()]
    assert char_tokenizer.encode("a🙂a")[1:-1] == char_tokenizer.encode("🙂")


def test_char_saved_json_format(char_tokenizer, tmp_path):
    content = json.loads(char_tokenizer.save(tmp_path / "t.json").read_text(encoding="utf-8"))
    assert content["type"] == "nanoseek-char" and content["version"] == 1
    assert content["chars"] == char_tokenizer.chars
    assert content["special_tokens"] == {
        "<|bos|>": char_tokenizer.bos_id,
        "<|eos|>": char_tokenizer.eos_id,
        "<|pad|>": char_tokenizer.pad_id,
    }


def test_char_tiny_shakespeare_has_65_chars_and_encodes_fast():
    tokenizer = train_tokenizer("char", [SHAKESPEARE])
    assert len(tokenizer.chars) == 65 and tokenizer.vocab_size == 65 + 3 + 256
    text = SHAKESPEARE.read_text(encoding="utf-8")
    start = time.perf_counter()
    ids = tokenizer.encode(text)
    assert time.perf_counter() - start < 1.0
    assert len(ids) == len(text) and max(ids) == 64


# ----------------------------------------------------------------------------- bpe


def test_bpe_vocab_and_specials(bpe_tokenizer):
    assert bpe_tokenizer.vocab_size == 320
    assert bpe_tokenizer.special_ids == (0, 1, 2)
    assert len(bpe_tokenizer.encode(ENGLISH)) < len(ENGLISH.encode()) / 2  # merges learned


def test_bpe_file_is_a_standard_hf_tokenizer(bpe_tokenizer, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(bpe_tokenizer.save(tmp_path)))
    assert hf.encode(ENGLISH + CHINESE, add_special_tokens=False).ids == bpe_tokenizer.encode(ENGLISH + CHINESE)


def test_bpe_long_text_parallel_path_matches_whole_encode(bpe_tokenizer):
    text = (ENGLISH + CHINESE + "  indented\n\tline \n") * 600  # > 64K chars
    assert len(text) > tokenizer_module._PARALLEL_MIN_CHARS
    whole = bpe_tokenizer._hf.encode(text, add_special_tokens=False).ids
    assert bpe_tokenizer.encode(text) == whole


def test_byte_table_is_a_bijection_onto_printable_chars():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"
    assert all(c.isprintable() and not c.isspace() for c in table.values())


def _save_foreign_tokenizer(path: Path, corpus_file: Path) -> Path:
    """A DeepSeek-style byte-level BPE: other special names, no pad, a non-special added token."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train([str(corpus_file)], trainer)
    hf.add_tokens(["<think>"])
    hf.save(str(path))
    return path


def test_foreign_bpe_special_names_and_pad_fallback(corpus_file, tmp_path):
    tokenizer = load_tokenizer(_save_foreign_tokenizer(tmp_path / "tokenizer.json", corpus_file))
    assert isinstance(tokenizer, BPETokenizer)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 1)
    text = "<think>秦</think> <｜end▁of▁sentence｜>"
    ids = tokenizer.encode(text)
    assert tokenizer.eos_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.token_byte_lengths()[ids].sum() == len(text.encode())


def test_non_byte_level_tokenizer_is_rejected(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    hf = HFTokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(NanoseekError, match="byte-level"):
        load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------- errors


def test_train_rejects_unknown_kind(corpus_file):
    with pytest.raises(NanoseekError, match="kind 'wordpiece'.*char, bpe"):
        train_tokenizer("wordpiece", [corpus_file])


@pytest.mark.parametrize("vocab_size", [None, 258])
def test_train_bpe_rejects_small_vocab(corpus_file, vocab_size):
    with pytest.raises(NanoseekError, match="vocab_size"):
        train_tokenizer("bpe", [corpus_file], vocab_size)


def test_train_rejects_missing_file(tmp_path):
    with pytest.raises(NanoseekError, match="nope.txt"):
        train_tokenizer("char", [tmp_path / "nope.txt"])


def test_load_rejects_missing_and_corrupt_files(tmp_path):
    with pytest.raises(NanoseekError, match="does not exist"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(NanoseekError, match=str(bad)):
        load_tokenizer(bad)
    bad.write_text('{"type": "something-else"}', encoding="utf-8")
    with pytest.raises(NanoseekError, match="neither"):
        load_tokenizer(bad)
    bad.write_text('{"type": "nanoseek-char", "version": 1, "chars": "aa"}', encoding="utf-8")
    with pytest.raises(NanoseekError, match="distinct"):
        load_tokenizer(bad)


def test_bpe_merges_never_see_the_held_out_tail(tmp_path):
    """The tail held out for validation teaches the BPE nothing: a word only it holds gets no token."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 400 + "zyxwvu " * 100)  # the tail: ~18% of the bytes
    seen = train_tokenizer("bpe", [corpus], vocab_size=300)
    held_out = train_tokenizer("bpe", [corpus], vocab_size=300, holdout_fraction=0.2)
    assert len(seen.encode("zyxwvu")) == 1
    assert len(held_out.encode("zyxwvu")) > 1
    assert len(held_out.encode("the cat sat")) == len(seen.encode("the cat sat"))


def test_the_head_of_the_files_is_the_fraction_of_their_bytes(tmp_path):
    from nanoseek.data.files import iter_text_head

    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    files[0].write_text("a" * 60)
    files[1].write_text("b" * 40)
    assert "".join(iter_text_head(files, 0.9, chunk_bytes=7)) == "a" * 60 + "b" * 30
    assert "".join(iter_text_head(files, 1.0)) == "a" * 60 + "b" * 40
