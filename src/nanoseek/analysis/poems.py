"""How regular a Chinese poem is: the verses of each line and their lengths in characters.

Regulated Tang verse (近體詩) has verses of 5 characters (五言) or 7 (七言), two to a line in the
bundled corpus, each closed by a punctuation mark: `秦川雄帝宅，函谷壯皇居。` is one line of two
5-character verses. A line counts as part of the poem when it ends in 。？！ (a title or a poet's
name does not); its verses are the pieces between the marks. The regularity of a text is the
fraction of its verses that have 5 or 7 characters.

    >>> report = poem_report("春望\\n杜甫\\n國破山河在，城春草木深。\\n感時花濺淚，恨別鳥驚心。\\n")
    >>> report.verse_lengths, report.regularity
    ([[5, 5], [5, 5]], 1.0)
    >>> poem_report("山中\\n空山不見人，但聞人語響響。\\n").regularity
    0.5
"""

from __future__ import annotations

import re
from dataclasses import dataclass

VERSE_MARKS = "，。？！；、：,.?!;"
LINE_ENDS = ("。", "？", "！")
REGULAR_LENGTHS = (5, 7)
_SPLIT = re.compile(f"[{re.escape(VERSE_MARKS)}]")


@dataclass
class PoemReport:
    lines: list[str]  # every line of the text
    verse_lengths: list[list[int]]  # per poem line (lines ending in 。？！), the characters of each verse
    regularity: float  # fraction of verses of 5 or 7 characters (0.0 when there is none)

    @property
    def verses(self) -> int:
        return sum(len(v) for v in self.verse_lengths)

    @property
    def regular_verses(self) -> int:
        return sum(n in REGULAR_LENGTHS for v in self.verse_lengths for n in v)


def is_poem_line(line: str) -> bool:
    return line.strip().endswith(LINE_ENDS)


def verse_lengths(line: str) -> list[int]:
    """Characters in each verse of a line (spaces not counted)."""
    return [len(piece.replace(" ", "").replace("\u3000", "")) for piece in _SPLIT.split(line.strip()) if piece.strip()]


def poem_report(text: str) -> PoemReport:
    lines = text.split("\n")
    lengths = [verse_lengths(line) for line in lines if is_poem_line(line)]
    verses = sum(len(v) for v in lengths)
    regular = sum(n in REGULAR_LENGTHS for v in lengths for n in v)
    return PoemReport(lines, lengths, regular / verses if verses else 0.0)


def annotate(text: str) -> str:
    """The text with each poem line's verse lengths in front (`5 5 | 國破山河在，城春草木深。`) and a
    last line with the count of regular verses."""
    report = poem_report(text)
    width = max(
        (len(" ".join(map(str, verse_lengths(line)))) for line in report.lines if is_poem_line(line)), default=0
    )
    out = []
    for line in report.lines:
        tag = " ".join(map(str, verse_lengths(line))) if is_poem_line(line) else ""
        out.append(f"{tag:>{width}} | {line}")
    out.append(
        f"{report.regular_verses} of {report.verses} verses have 5 or 7 characters ({report.regularity:.0%})"
        if report.verses
        else "no poem lines (lines ending in 。？！)"
    )
    return "\n".join(out)
