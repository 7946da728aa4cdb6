"""Synthetic sequence-to-sequence tasks over digit strings, for tests and first experiments.

    copy:     3141 -> 3141
    reverse:  3141 -> 1413
    sort:     3141 -> 1134

Sources are random digit strings, their lengths uniform in 1..max_length. A fixed seed per task makes the
same pairs on every run; held-out strings that also occur in the training set are dropped.

    >>> synthetic_target("reverse", "3141"), synthetic_target("sort", "3141")
    ('1413', '1134')
"""

from __future__ import annotations

import numpy as np

SYNTHETIC_TASKS = ("copy", "reverse", "sort")
ALPHABET = "0123456789"
TRAIN_PAIRS, VAL_PAIRS = 20_000, 500

Pair = tuple[str, str]


def synthetic_target(task: str, source: str) -> str:
    if task == "copy":
        return source
    if task == "reverse":
        return source[::-1]
    if task == "sort":
        return "".join(sorted(source))
    raise ValueError(f"task {task!r} is not one of {SYNTHETIC_TASKS}")


def random_strings(rng: np.random.Generator, n: int, max_length: int) -> list[str]:
    lengths = rng.integers(1, max_length + 1, size=n)
    digits = np.array(list(ALPHABET))[rng.integers(0, len(ALPHABET), size=(n, max_length))]
    return ["".join(row[:k]) for row, k in zip(digits.tolist(), lengths.tolist())]


def synthetic_split(task: str, max_length: int) -> tuple[list[Pair], list[Pair]]:
    """(training pairs, held-out pairs) of `task`, sources up to `max_length` digits."""
    rng = np.random.default_rng([SYNTHETIC_TASKS.index(task), max_length])
    train = random_strings(rng, TRAIN_PAIRS, max_length)
    seen = set(train)
    val = [s for s in random_strings(rng, VAL_PAIRS, max_length) if s not in seen]
    return [(s, synthetic_target(task, s)) for s in train], [(s, synthetic_target(task, s)) for s in val]
