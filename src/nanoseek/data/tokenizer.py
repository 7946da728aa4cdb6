"""Tokenizers: turn text into integer ids and back, without ever losing a byte.

A language model only sees integers. A tokenizer fixes the vocabulary: the list of pieces
(tokens) the text is cut into, each with an id. Two kinds live here, behind one interface:

* ``CharTokenizer`` — one token per character, like nanoGPT's ``shakespeare_char``. The vocabulary
  is the set of distinct characters of the training corpus (tiny Shakespeare: 65), followed by
  the three special tokens and 256 *byte-fallback* tokens. A character the corpus never showed
  (a Chinese character, an emoji) is spelled with the byte tokens of its UTF-8 encoding. In an HF
  export it is written in the HF ``tokenizers`` format (``to_hf_json_str``: a BPE vocabulary with
  byte fallback and no merges) and read back as the same char tokenizer.
* ``BPETokenizer`` — byte-level Byte-Pair Encoding, the scheme of GPT-2, Llama 3 and DeepSeek.
  Text is first viewed as UTF-8 bytes; training starts from the 256 single bytes and repeatedly
  merges the most frequent adjacent pair into a new token until the vocabulary is full. Training
  and encoding run in the HF ``tokenizers`` library; mapping tokens back to bytes is done here
  with the GPT-2 byte<->unicode table, so decoding never depends on a lossy text decoder.

Both are *lossless*: ``decode_bytes(encode(x))`` gives back the UTF-8 bytes of any ``str`` and
exactly the input for any ``bytes``, even invalid UTF-8. Internally, raw bytes that are not valid
UTF-8 travel as Python's "surrogateescape" characters U+DC80..U+DCFF and are encoded as single-byte
tokens. Special tokens (``<|bos|>``, ``<|eos|>``, ``<|pad|>``) can only be produced by asking for
them (``bos=True``/``eos=True``); the same text typed by a user is encoded as ordinary text.

``token_byte_lengths()`` tells how many bytes each token stands for; dividing a model's loss by
bytes instead of tokens gives bits-per-byte, a number comparable across tokenizers.
"""

from __future__ import annotations

import abc
import hashlib
import itertools
import json
import os
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from nanoseek.data.files import atomic_write_text, check_input_file, iter_text_chunks, iter_text_head
from nanoseek.errors import NanoseekError

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
TOKENIZER_FILENAME = "tokenizer.json"
CHAR_FORMAT = "nanoseek-char"
TOKENIZER_KINDS = ("char", "bpe")

# Names other tokenizers give to their begin/end/pad tokens, in order of preference.
BOS_ALIASES = (BOS_TOKEN, "<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<s>", "[BOS]", "<|endoftext|>")
EOS_ALIASES = (EOS_TOKEN, "<｜end▁of▁sentence｜>", "<|end_of_text|>", "</s>", "[EOS]", "<|endoftext|>")
PAD_ALIASES = (PAD_TOKEN, "<｜▁pad▁｜>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>")

_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPED_BYTES = re.compile("([\udc80-\udcff]+)")
# A newline between two non-space characters: no byte-level pre-token crosses it.
_SAFE_NEWLINE = re.compile(r"(?<=\S\n)(?=\S)")
_PARALLEL_MIN_CHARS = 1 << 16
_PARALLEL_PIECE_CHARS = 1 << 13


# ----------------------------------------------------------------------------- text helpers


def to_escaped_str(text: str | bytes) -> str:
    """Text as a str in which each byte that is not valid UTF-8 is a U+DC80..U+DCFF escape."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text).decode("utf-8", "surrogateescape")
    if not isinstance(text, str):
        raise TypeError(f"expected str or bytes to encode, got {type(text).__name__}")
    if _SURROGATE.search(text) is None:
        return text
    # Lone surrogates have no UTF-8 form; keep their "surrogatepass" bytes as raw bytes.
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "surrogateescape")


def escaped_to_bytes(text: str) -> bytes:
    """Inverse of ``to_escaped_str``: the exact bytes an escaped str stands for."""
    return text.encode("utf-8", "surrogateescape")


def split_at_safe_newlines(text: str, piece_chars: int) -> list[str]:
    """Cut text into pieces of about ``piece_chars`` at newlines no pre-token can cross."""
    pieces: list[str] = []
    start = 0
    while len(text) - start > piece_chars:
        match = _SAFE_NEWLINE.search(text, start + piece_chars)
        if match is None:
            break
        pieces.append(text[start : match.start()])
        start = match.start()
    pieces.append(text[start:])
    return pieces


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte->character table of byte-level BPE.

    Printable Latin-1 bytes stand for themselves; every other byte b (control characters,
    space, ...) is shifted to the character 256+n, n counting those bytes in order, so that every
    byte has a visible, non-whitespace character and token strings can be stored as JSON text.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return dict(sorted(table.items()))


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    """Inverse of ``bytes_to_unicode``."""
    return {char: b for b, char in bytes_to_unicode().items()}


def _ids_to_list(ids: Iterable[int]) -> list[int]:
    """Accept lists, tuples, numpy arrays and torch tensors of ids."""
    if hasattr(ids, "tolist"):
        flat = ids.tolist()
        return flat if isinstance(flat, list) else [flat]
    return [int(i) for i in ids]


# ----------------------------------------------------------------------------- interface


class Tokenizer(abc.ABC):
    """Common interface of all tokenizers; subclasses fill ``self._token_bytes``."""

    name: str
    bos_id: int
    eos_id: int
    pad_id: int
    _token_bytes: list[bytes]

    @property
    def vocab_size(self) -> int:
        """Number of ids; every id in ``range(vocab_size)`` can be decoded."""
        return len(self._token_bytes)

    @property
    def special_ids(self) -> tuple[int, int, int]:
        return (self.bos_id, self.eos_id, self.pad_id)

    @abc.abstractmethod
    def special_token_names(self) -> dict[str, str]:
        """{"bos_token", "eos_token", "pad_token"}: the strings of the special ids (as HF names them)."""

    @abc.abstractmethod
    def _encode_escaped(self, text: str) -> list[int]:
        """Ids of an escaped str (see ``to_escaped_str``), without special tokens."""

    @abc.abstractmethod
    def to_json_str(self) -> str:
        """The content ``save`` writes to tokenizer.json."""

    def encode(self, text: str | bytes, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens only where ``bos``/``eos`` ask for them."""
        ids = self._encode_escaped(to_escaped_str(text))
        return self._add_specials(ids, bos, eos)

    def encode_batch(self, texts: Sequence[str | bytes], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """``encode`` of each text (subclasses may run them in parallel)."""
        return [self.encode(text, bos=bos, eos=eos) for text in texts]

    def _add_specials(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes the ids stand for; special tokens produce none."""
        ids = _ids_to_list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise NanoseekError(f"token id {bad} is outside the vocabulary (valid ids: 0..{self.vocab_size - 1})")
        return b"".join(map(self._token_bytes.__getitem__, ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Decoded text; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        """int64 array [vocab_size]: bytes each token decodes to (0 for special tokens)."""
        return np.fromiter(map(len, self._token_bytes), dtype=np.int64, count=self.vocab_size)

    def fingerprint(self) -> str:
        """sha256 of the tokenizer.json content: equal fingerprints encode identically."""
        return hashlib.sha256(self.to_json_str().encode("utf-8")).hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json (into ``path`` if it is a directory or has no .json suffix)."""
        target = Path(path)
        if target.is_dir() or target.suffix != ".json":
            target = target / TOKENIZER_FILENAME
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, self.to_json_str())
        return target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


# ----------------------------------------------------------------------------- char-level


class CharTokenizer(Tokenizer):
    """One id per corpus character, then the specials, then 256 byte-fallback tokens."""

    name = "char"

    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars) or _SURROGATE.search(chars):
            raise NanoseekError("char tokenizer 'chars' must be distinct, non-surrogate characters")
        self.chars = "".join(sorted(chars))
        n_chars = len(self.chars)
        self.bos_id, self.eos_id, self.pad_id = n_chars, n_chars + 1, n_chars + 2
        self._byte_base = n_chars + len(SPECIAL_TOKENS)
        self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        self._token_bytes = (
            [c.encode("utf-8") for c in self.chars] + [b""] * len(SPECIAL_TOKENS) + [bytes([b]) for b in range(256)]
        )

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        """Vocabulary = the distinct characters of ``texts`` (escaped raw bytes are skipped)."""
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        chars = "".join(c for c in seen if not _SURROGATE.match(c))
        if not chars:
            raise NanoseekError("char tokenizer training text is empty: no characters to learn")
        return cls(chars)

    def special_token_names(self) -> dict[str, str]:
        return dict(zip(("bos_token", "eos_token", "pad_token"), SPECIAL_TOKENS))

    def _encode_escaped(self, text: str) -> list[int]:
        codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        ids = np.searchsorted(self._codepoints, codepoints).astype(np.int64)
        known = (
            self._codepoints[np.minimum(ids, len(self.chars) - 1)] == codepoints
            if len(self.chars)
            else np.zeros(len(codepoints), dtype=bool)
        )
        if known.all():
            return ids.tolist()
        return self._with_byte_fallback(text, ids, ~known).tolist()

    def _with_byte_fallback(self, text: str, ids: np.ndarray, unknown: np.ndarray) -> np.ndarray:
        """Replace each run of unknown characters by the byte tokens of its UTF-8 bytes."""
        edges = np.flatnonzero(np.diff(np.concatenate(([0], unknown.view(np.int8), [0]))))
        pieces, previous_end = [], 0
        for start, end in zip(edges[0::2].tolist(), edges[1::2].tolist()):
            raw = np.frombuffer(escaped_to_bytes(text[start:end]), dtype=np.uint8)
            pieces += [ids[previous_end:start], raw.astype(np.int64) + self._byte_base]
            previous_end = end
        pieces.append(ids[previous_end:])
        return np.concatenate(pieces)

    def to_json_str(self) -> str:
        specials = dict(zip(SPECIAL_TOKENS, self.special_ids))
        content = {
            "type": CHAR_FORMAT,
            "version": 1,
            "chars": self.chars,
            "special_tokens": specials,
            "byte_fallback_start": self._byte_base,
        }
        return json.dumps(content, ensure_ascii=False, indent=1)

    def to_hf_json_str(self) -> str:
        """The same tokenizer in the HF `tokenizers` format (what `AutoTokenizer` loads): a BPE model
        without merges over the same ids, whose `byte_fallback` spells an unknown character with the
        `<0xXX>` tokens of its UTF-8 bytes, decoded back by ByteFallback + Fuse. Encodes and decodes
        valid text exactly as this tokenizer does; `from_hf_content` reads it back."""
        from tokenizers import AddedToken, decoders, models
        from tokenizers import Tokenizer as HFTokenizer

        vocab = {c: i for i, c in enumerate(self.chars)}
        vocab.update(zip(SPECIAL_TOKENS, self.special_ids))
        vocab.update({f"<0x{b:02X}>": self._byte_base + b for b in range(256)})
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
        hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
        return hf.to_str(pretty=True)

    @classmethod
    def from_hf_content(cls, content: dict) -> CharTokenizer | None:
        """The char tokenizer an HF tokenizer.json written by `to_hf_json_str` holds (None if it is not one)."""
        model = content.get("model") or {}
        if not (model.get("type") == "BPE" and model.get("byte_fallback") and not model.get("merges")):
            return None
        by_id = sorted((i, t) for t, i in (model.get("vocab") or {}).items())
        tokens = [t for _, t in by_id]
        n = len(tokens) - len(SPECIAL_TOKENS) - 256
        layout = [f"<0x{b:02X}>" for b in range(256)]
        if (
            n < 1
            or [i for i, _ in by_id] != list(range(len(tokens)))
            or tokens[n : n + len(SPECIAL_TOKENS)] != list(SPECIAL_TOKENS)
            or tokens[n + len(SPECIAL_TOKENS) :] != layout
            or any(len(t) != 1 for t in tokens[:n])
            or "".join(sorted(tokens[:n])) != "".join(tokens[:n])
        ):
            return None
        return cls("".join(tokens[:n]))

    @classmethod
    def from_json(cls, content: dict, source: str) -> CharTokenizer:
        chars = content.get("chars")
        if content.get("version") != 1 or not isinstance(chars, str) or not chars or len(set(chars)) != len(chars):
            raise NanoseekError(
                f"{source}: char tokenizer needs 'version': 1 and a 'chars' string of distinct characters"
            )
        return cls(chars)


# ----------------------------------------------------------------------------- byte-level BPE


def _is_byte_level(node: object) -> bool:
    """True if a pre_tokenizer JSON node is, or contains, a ByteLevel step."""
    if isinstance(node, dict):
        if node.get("type") == "ByteLevel":
            return True
        return any(_is_byte_level(child) for child in node.get("pretokenizers", []))
    return False


def _find_token_id(hf_tokenizer, aliases: Sequence[str]) -> int | None:
    for alias in aliases:
        token_id = hf_tokenizer.token_to_id(alias)
        if token_id is not None:
            return token_id
    return None


class BPETokenizer(Tokenizer):
    """Byte-level BPE backed by an HF ``tokenizers.Tokenizer`` (ours or a checkpoint's)."""

    name = "bpe"

    def __init__(self, hf_tokenizer, source: str = "<memory>") -> None:
        config = json.loads(hf_tokenizer.to_str())
        if not _is_byte_level(config.get("pre_tokenizer")):
            raise NanoseekError(
                f"{source}: only byte-level BPE tokenizers are supported (pre_tokenizer must contain ByteLevel)"
            )
        self._hf = hf_tokenizer
        self._hf.no_truncation()
        self._hf.no_padding()
        self._hf.encode_special_tokens = True  # "<|eos|>" typed by a user stays text
        self._parallel_safe = config["pre_tokenizer"].get("type") == "ByteLevel" and config["pre_tokenizer"].get(
            "use_regex", True
        )
        self._token_bytes = self._build_token_bytes()
        self._byte_ids = self._build_byte_ids(source)
        self._find_special_ids(source)

    def _build_token_bytes(self) -> list[bytes]:
        char_to_byte = unicode_to_bytes()
        vocab = self._hf.get_vocab(with_added_tokens=False)
        added = self._hf.get_added_tokens_decoder()
        size = 1 + max([*vocab.values(), *added.keys()])
        table = [b""] * size
        for token, token_id in vocab.items():
            if all(c in char_to_byte for c in token):
                table[token_id] = bytes(char_to_byte[c] for c in token)
            else:
                table[token_id] = token.encode("utf-8")
        for token_id, added_token in added.items():
            table[token_id] = b"" if added_token.special else added_token.content.encode("utf-8")
        return table

    def _build_byte_ids(self, source: str) -> np.ndarray:
        ids = [self._hf.token_to_id(char) for char in bytes_to_unicode().values()]
        if None in ids:
            missing = ids.index(None)
            raise NanoseekError(f"{source}: byte-level vocabulary lacks the single-byte token for byte {missing}")
        return np.array(ids, dtype=np.int64)

    def _find_special_ids(self, source: str) -> None:
        eos_id = _find_token_id(self._hf, EOS_ALIASES)
        if eos_id is None:
            raise NanoseekError(f"{source}: no end-of-text token found (looked for {', '.join(EOS_ALIASES)})")
        bos_id = _find_token_id(self._hf, BOS_ALIASES)
        pad_id = _find_token_id(self._hf, PAD_ALIASES)
        self.eos_id = eos_id
        self.bos_id = eos_id if bos_id is None else bos_id
        self.pad_id = eos_id if pad_id is None else pad_id
        for token_id in self.special_ids:
            self._token_bytes[token_id] = b""

    @classmethod
    def train(
        cls, files: list[str], vocab_size: int, show_progress: bool = False, holdout_fraction: float = 0.0
    ) -> BPETokenizer:
        """Learn ``vocab_size - 3`` byte-level tokens (the 256 bytes and merges) from files, all but their
        last ``holdout_fraction`` of bytes (the validation text, which the merges then never saw)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        hf_tokenizer = HFTokenizer(models.BPE())
        hf_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf_tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            show_progress=show_progress,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        # invalid UTF-8 shows as U+FFFD: the byte tokens spell such bytes anyway
        chunks = iter_text_head(files, 1.0 - holdout_fraction, errors="replace")
        run_interruptibly(hf_tokenizer.train_from_iterator, chunks, trainer=trainer)
        return cls(hf_tokenizer, source="trained BPE tokenizer")

    @classmethod
    def from_json_str(cls, content: str, source: str) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            hf_tokenizer = HFTokenizer.from_str(content)
        except Exception as error:  # the Rust side raises plain Exception
            raise NanoseekError(f"{source}: not a valid HF tokenizer.json ({error})") from None
        return cls(hf_tokenizer, source=source)

    def special_token_names(self) -> dict[str, str]:
        ids = dict(zip(("bos_token", "eos_token", "pad_token"), self.special_ids))
        return {name: self._hf.id_to_token(token_id) for name, token_id in ids.items()}

    def _encode_escaped(self, text: str) -> list[int]:
        if not text:
            return []
        parts = _ESCAPED_BYTES.split(text)
        if len(parts) == 1:
            return self._encode_valid(text)
        ids: list[int] = []
        for index, part in enumerate(parts):
            if index % 2 == 0:
                ids += self._encode_valid(part) if part else []
            else:
                ids += self._byte_ids[np.frombuffer(escaped_to_bytes(part), np.uint8)].tolist()
        return ids

    def _encode_valid(self, text: str) -> list[int]:
        """Encode valid text; long text is cut at safe newlines and encoded in parallel."""
        if len(text) < _PARALLEL_MIN_CHARS or not self._parallel_safe:
            return self._hf.encode(text, add_special_tokens=False).ids
        pieces = split_at_safe_newlines(text, _PARALLEL_PIECE_CHARS)
        return list(itertools.chain.from_iterable(self._hf_encode_many(pieces)))

    def _hf_encode_many(self, texts: list[str]) -> Iterator[list[int]]:
        encode_batch = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)  # >= 0.21
        encodings = encode_batch(texts, add_special_tokens=False)
        return (encoding.ids for encoding in encodings)

    def encode_batch(self, texts: Sequence[str | bytes], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """Parallel ``encode`` of many texts (HF ``encode_batch``)."""
        escaped = [to_escaped_str(text) for text in texts]
        if any(_SURROGATE.search(text) for text in escaped):
            return super().encode_batch(texts, bos=bos, eos=eos)
        return [self._add_specials(ids, bos, eos) for ids in self._hf_encode_many(escaped)]

    def to_json_str(self) -> str:
        return self._hf.to_str(pretty=True)  # encode_special_tokens is not serialized


# ----------------------------------------------------------------------------- train / load


def run_interruptibly(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` in a worker thread, the caller waiting in short joins, so that Ctrl-C
    reaches the caller at once. HF's BPE trainer computes its merges in Rust, where no Python signal
    handler runs: called directly, a Ctrl-C would wait for the end of training. An interrupted
    worker is abandoned (a daemon thread: it ends with the process)."""
    outcome: dict = {}

    def work():
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - handed to the caller as it is
            outcome["error"] = error

    worker = threading.Thread(target=work, name="nanoseek-tokenizer-train", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _check_files_exist(files: Sequence[str | os.PathLike]) -> list[str]:
    if not files:
        raise NanoseekError("no training files given")
    return [str(check_input_file(file, "training file")) for file in files]


def train_tokenizer(
    kind: str, files: Sequence[str | os.PathLike], vocab_size: int | None = None, holdout_fraction: float = 0.0
) -> Tokenizer:
    """Train a "char" (``vocab_size`` ignored) or "bpe" tokenizer on text files; a bpe tokenizer learns its
    merges from all but the last ``holdout_fraction`` of the bytes (the char tokenizer's vocabulary is every
    character of the files: one unseen in training costs the model, not the tokenizer)."""
    if kind not in TOKENIZER_KINDS:
        raise NanoseekError(f"tokenizer kind {kind!r} is unknown (valid: {', '.join(TOKENIZER_KINDS)})")
    paths = _check_files_exist(files)
    if kind == "char":
        return CharTokenizer.train(iter_text_chunks(paths, errors="surrogateescape"))
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size is None or vocab_size < minimum:
        raise NanoseekError(
            f"vocab_size must be at least {minimum} for a bpe tokenizer (256 bytes + 3 special "
            f"tokens), got {vocab_size}"
        )
    return BPETokenizer.train(paths, vocab_size, holdout_fraction=holdout_fraction)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer.json (or a directory holding one) of either kind."""
    file = Path(path)
    if file.is_dir():
        file = file / TOKENIZER_FILENAME
    text = check_input_file(file, "tokenizer file").read_text(encoding="utf-8", errors="replace")
    try:
        content = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        raise NanoseekError(f"tokenizer file {file} is not valid JSON ({error})") from None
    if not isinstance(content, dict):
        raise NanoseekError(f"tokenizer file {file} must hold a JSON object")
    if content.get("type") == CHAR_FORMAT:
        return CharTokenizer.from_json(content, str(file))
    char = CharTokenizer.from_hf_content(content)  # a char tokenizer exported in the HF format
    if char is not None:
        return char
    model = content.get("model")
    if isinstance(model, dict) and model.get("type", "BPE") == "BPE" and "merges" in model:
        return BPETokenizer.from_json_str(text, str(file))
    raise NanoseekError(f"tokenizer file {file} is neither a nanoseek char tokenizer nor an HF BPE tokenizer.json")
