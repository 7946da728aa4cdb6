"""Chinese couplets from Tang poems: given the first line of a couplet, write the matching second line.

A Tang regulated poem is written in couplets (聯): two lines of the same length whose characters answer
each other one by one, in tone, part of speech and meaning (秦川雄帝宅 / 函谷壯皇居). The poems file
(the bundled `tang_poems.txt`, from the chinese-poetry project's 全唐詩; `--data tang`) holds one poem per
block, blocks separated by a blank line: a title line, an author line, then one line per couplet, e.g.
`秦川雄帝宅，函谷壯皇居。`.

A body line is a couplet pair when it is exactly two clauses, the first ended by ，？！ or ；, the second by
。？！ or ；, of equal length (3 characters or more) and made only of CJK characters (lines with the corpus's
markers of lost characters, □ [..] {..}, are left out). Source = first clause, target = second, without
punctuation.

The held-out split is by poem, never by line: the couplets of one poem sit on one side. `val_fraction` of
the poems, drawn by a fixed-seed permutation (the same split for every run), are held out. The anthology
repeats some poems and stock lines, so a held-out pair whose first line also opens a training pair is
dropped: the held-out score measures writing, not recall. Held-out pairs come in a fixed shuffled order,
so the first N of them are a random sample.

    >>> couplet_pairs(["秦川雄帝宅，函谷壯皇居。", "長安道，人無衣，馬無草。", "何如肆轍跡？萬里賞瑤池。"])
    [('秦川雄帝宅', '函谷壯皇居'), ('何如肆轍跡', '萬里賞瑤池')]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nanoseek.errors import NanoseekError

SPLIT_SEED = 0  # the held-out poems are the same for every run
MIN_LENGTH = 3
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_COUPLET = re.compile(rf"([{_CJK}]+)[，？！；]([{_CJK}]+)[。？！；]")

Pair = tuple[str, str]


def read_poems(paths: Sequence[str | Path]) -> list[list[str]]:
    """The body lines (title and author dropped) of every poem block in the files, in order."""
    poems = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise NanoseekError(f"poems file {path} does not exist")
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        for block in re.split(r"\n\s*\n", text.strip("\n")):
            lines = [line.strip() for line in block.split("\n")]
            poems.append(lines[2:])
    return poems


def couplet_pairs(lines: Sequence[str]) -> list[Pair]:
    """The (first line, second line) couplets among a poem's body lines."""
    pairs = []
    for line in lines:
        m = _COUPLET.fullmatch(line)
        if m and len(m[1]) == len(m[2]) >= MIN_LENGTH:
            pairs.append((m[1], m[2]))
    return pairs


def held_out_poems(n_poems: int, val_fraction: float) -> set[int]:
    """Indices of the held-out poems: the first val_fraction of a fixed permutation."""
    order = np.random.default_rng(SPLIT_SEED).permutation(n_poems)
    return set(order[: round(n_poems * val_fraction)].tolist())


def couplet_split(paths: Sequence[str | Path], val_fraction: float) -> tuple[list[Pair], list[Pair]]:
    """(training pairs in file order, held-out pairs in a fixed shuffled order), split by poem."""
    poems = read_poems(paths)
    held_out = held_out_poems(len(poems), val_fraction)
    train, val = [], []
    for i, lines in enumerate(poems):
        (val if i in held_out else train).extend(couplet_pairs(lines))
    seen = {src for src, _ in train}
    val = [pair for pair in val if pair[0] not in seen]
    if not train:
        names = ", ".join(map(str, paths))
        raise NanoseekError(
            f"no couplets found in {names}: expected poem blocks (title, author, then lines such as "
            "'秦川雄帝宅，函谷壯皇居。') separated by blank lines"
        )
    order = np.random.default_rng(SPLIT_SEED).permutation(len(val))
    return train, [val[i] for i in order]
