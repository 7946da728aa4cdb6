"""Sequence-to-sequence pair tasks: their texts and splits, their tokens, and batches for either architecture.

A pair task gives (source, target) texts: `couplets` (data/couplets.py; first line -> second line of a Tang
couplet) or the synthetic `copy`, `reverse`, `sort` (data/synthetic.py). The pairs are tokenized once; batches
are drawn as the language-model windows are (data/shards.py): batch `step` holds the pairs a generator seeded
with (seed, step) picks, so a resumed run sees the batches an uninterrupted one would, and the loader's state
is two integers.

One batch, in the layout of the model that reads it (x = source tokens, y = target tokens):

    encoder_decoder:  source   x_1 .. x_m                  right-padded with <pad>              (B, S)
                      input    <bos> y_1 .. y_n            the target shifted right, padded      (B, T)
                      targets  y_1 .. y_n <eos>            -1 on padding                         (B, T)
    decoder:          input    x_1 .. x_m <bos> y_1 .. y_n                                       (B, T)
                      targets  -1 .. -1 y_1 .. y_n <eos>   the loss is on the answer only        (B, T)

In the decoder-only layout <bos> is the separator ("the answer starts here"): the model reads the first line
and writes the second, the same job the encoder-decoder does, with one stack instead of two.
`data.seq_len` bounds each training sequence: the source and the shifted target each (encoder_decoder), or
the whole x <bos> y (decoder); longer pairs are left out of training and of the validation loss.

    >>> from nanoseek.data.tokenizer import CharTokenizer
    >>> tok = CharTokenizer("abc")
    >>> source, inputs, targets = encoder_decoder_batch([([0, 1], [2]), ([0], [1, 2])], tok)
    >>> source.tolist(), inputs.tolist(), targets.tolist()
    ([[0, 1], [0, 5]], [[3, 2, 5], [3, 1, 2]], [[2, 4, -1], [1, 2, 4]])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanoseek.data.corpora import CORPORA, corpus_path
from nanoseek.data.couplets import couplet_split
from nanoseek.data.files import atomic_write_text
from nanoseek.data.shards import SeededStepLoader
from nanoseek.data.synthetic import SYNTHETIC_TASKS, synthetic_split
from nanoseek.data.tokenizer import CharTokenizer, Tokenizer, load_tokenizer, train_tokenizer
from nanoseek.errors import NanoseekError

PAIR_TASKS = ("couplets", *SYNTHETIC_TASKS)
LAYOUTS = ("encoder_decoder", "decoder")
MAX_SYNTHETIC_LENGTH = 16

TextPair = tuple[str, str]
IdPair = tuple[list[int], list[int]]


# ------------------------------------------------------------------------------------ texts and tokens


def pair_texts(task: str, files: Sequence[str], val_fraction: float, seq_len: int) -> tuple[list, list]:
    """(training, held-out) text pairs of `task`. Couplets come from the poem `files` (default: the bundled
    Tang poems, `tang`); the synthetic tasks make their own, sources up to (seq_len - 1) // 2 digits (so
    x <bos> y fits either layout)."""
    if task == "couplets":
        return couplet_split([corpus_path(f) for f in files] or [str(CORPORA["tang"])], val_fraction)
    if task not in SYNTHETIC_TASKS:
        raise NanoseekError(f"data.task={task!r} is not a pair task; choose one of: {', '.join(PAIR_TASKS)}")
    if files:
        raise NanoseekError(f"data.task={task!r} generates its own pairs: drop --data / data.path")
    max_length = min(MAX_SYNTHETIC_LENGTH, (seq_len - 1) // 2)
    if max_length < 1:
        raise NanoseekError(f"data.seq_len={seq_len} is too short for data.task={task!r}: use 3 or more")
    return synthetic_split(task, max_length)


def pair_tokenizer(kind: str, texts: Sequence[TextPair], vocab_size: int, work_dir: Path) -> Tokenizer:
    """A tokenizer for the pairs: "char" (their characters), "bpe" (trained on them, one pair per line),
    or the tokenizer.json at path `kind`."""
    if kind == "char":
        return CharTokenizer.train(s for pair in texts for s in pair)
    if kind == "bpe":
        corpus = Path(work_dir) / "pairs.txt"
        corpus.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(corpus, "".join(f"{a}\n{b}\n" for a, b in texts))
        return train_tokenizer("bpe", [corpus], vocab_size)
    return load_tokenizer(kind)


def encode_texts(tok: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """tok.encode of each text; a char tokenizer that knows every character encodes them all in one call."""
    if isinstance(tok, CharTokenizer):
        ids = tok.encode("".join(texts))
        lengths = [len(t) for t in texts]
        if len(ids) == sum(lengths):  # one id per character: no byte fallback
            ends = np.cumsum(lengths).tolist()
            return [ids[lo:hi] for lo, hi in zip([0, *ends[:-1]], ends)]
    return [tok.encode(t) for t in texts]


def encode_pairs(tok: Tokenizer, pairs: Sequence[TextPair]) -> list[IdPair]:
    ids = encode_texts(tok, [text for pair in pairs for text in pair])
    return list(zip(ids[0::2], ids[1::2]))


def fits(pair: IdPair, layout: str, seq_len: int) -> bool:
    src, tgt = pair
    if layout == "decoder":
        return len(src) + 1 + len(tgt) <= seq_len
    return len(src) <= seq_len and len(tgt) + 1 <= seq_len


# ------------------------------------------------------------------------------------ batches


def pad_rows(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Right-pad rows of ids to the longest: (B, max length) int64."""
    out = np.full((len(rows), max(len(r) for r in rows)), value, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)


def encoder_decoder_batch(pairs: Sequence[IdPair], tok: Tokenizer) -> tuple[torch.Tensor, ...]:
    """(source, decoder input, targets) of the encoder-decoder layout (module docstring)."""
    source = pad_rows([s for s, _ in pairs], tok.pad_id)
    inputs = pad_rows([[tok.bos_id, *t] for _, t in pairs], tok.pad_id)
    targets = pad_rows([[*t, tok.eos_id] for _, t in pairs], -1)
    return source, inputs, targets


def decoder_batch(pairs: Sequence[IdPair], tok: Tokenizer) -> tuple[torch.Tensor, ...]:
    """(input, targets) of the decoder-only layout: x <bos> y, loss on y <eos> only."""
    inputs = pad_rows([[*s, tok.bos_id, *t] for s, t in pairs], tok.pad_id)
    targets = pad_rows([[-1] * len(s) + [*t, tok.eos_id] for s, t in pairs], -1)
    return inputs, targets


COLLATE: dict[str, Callable] = {"encoder_decoder": encoder_decoder_batch, "decoder": decoder_batch}


class PairLoader(SeededStepLoader):
    """Batches of random pairs; batch `step` depends only on (seed, step), as `BatchLoader`'s windows do."""

    def __init__(
        self, pairs: Sequence[IdPair], batch_size: int, collate: Callable, seed: int, rank: int = 0, world_size: int = 1
    ):
        if not pairs:
            raise NanoseekError("no training pairs fit data.seq_len")
        self.pairs, self.batch_size, self.collate = pairs, batch_size, collate
        self.rank, self.world_size = rank, world_size
        self.seed, self.step = int(seed), 0

    def indices(self, step: int) -> np.ndarray:
        """This rank's pair indices for batch `step`."""
        rng = np.random.default_rng([self.seed, step])
        chosen = rng.integers(0, len(self.pairs), size=self.batch_size * self.world_size)
        return chosen[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def next(self) -> tuple[torch.Tensor, ...]:
        batch = self.collate([self.pairs[i] for i in self.indices(self.step)])
        self.step += 1
        return batch

    __next__ = next


# ------------------------------------------------------------------------------------ a task, ready to train


@dataclass
class PairData:
    """A pair task tokenized for one layout: training pairs and held-out pairs (ids that fit `seq_len`), and
    the held-out texts (all of them, for decoding)."""

    task: str
    layout: str
    tokenizer: Tokenizer
    train: list[IdPair]
    val: list[IdPair]
    val_text: list[TextPair]
    dropped: int = 0  # training pairs longer than seq_len

    @classmethod
    def build(cls, task: str, layout: str, tok: Tokenizer, texts: tuple[list, list], seq_len: int) -> PairData:
        train_all, val_all = encode_pairs(tok, texts[0]), encode_pairs(tok, texts[1])
        train = [p for p in train_all if fits(p, layout, seq_len)]
        val = [p for p in val_all if fits(p, layout, seq_len)]
        if not val:
            raise NanoseekError(f"data.task={task!r}: no held-out pair fits data.seq_len={seq_len}")
        return cls(task, layout, tok, train, val, list(texts[1]), len(train_all) - len(train))

    def loader(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> PairLoader:
        return PairLoader(self.train, batch_size, self.collate, seed, rank, world_size)

    def collate(self, pairs: Sequence[IdPair]) -> tuple[torch.Tensor, ...]:
        return COLLATE[self.layout](pairs, self.tokenizer)

    def eval_batches(self, batch_size: int, batches: int | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
        """The held-out pairs in order, `batch_size` at a time (the first `batches` batches, or all)."""
        stop = len(self.val) if batches is None else min(len(self.val), batches * batch_size)
        for lo in range(0, stop, batch_size):
            yield self.collate(self.val[lo : min(lo + batch_size, stop)])


def load_pair_data(
    task: str,
    layout: str,
    files: Sequence[str],
    val_fraction: float,
    seq_len: int,
    tokenizer: Tokenizer | str,
    vocab_size: int = 2048,
    work_dir: Path | None = None,
) -> PairData:
    """A pair task, ready to train: its texts split, a tokenizer (a loaded one, or of kind "char" / "bpe" /
    a tokenizer.json path, made from the texts), its ids in `layout`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}; choose one of {LAYOUTS}")
    texts = pair_texts(task, files, val_fraction, seq_len)
    tok = (
        tokenizer
        if isinstance(tokenizer, Tokenizer)
        else pair_tokenizer(tokenizer, texts[0] + texts[1], vocab_size, Path(work_dir or "."))
    )
    return PairData.build(task, layout, tok, texts, seq_len)
