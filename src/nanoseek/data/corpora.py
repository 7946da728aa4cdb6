"""The corpora bundled with the package, by name: `--data tang` trains on the Tang poems wherever
nanoseek is installed. A path that exists always wins over a name.

    >>> corpus_path("shakespeare") == str(CORPORA["shakespeare"])
    True
    >>> corpus_path("notes.txt")      # not a name: a path, as given
    'notes.txt'
"""

from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPORA = {
    "shakespeare": HERE / "tinyshakespeare.txt",  # tiny Shakespeare, 1.1 MB of English plays
    "tang": HERE / "tang_poems.txt",  # 18,008 Tang poems (traditional characters), 1.5M characters
}


def corpus_path(name_or_path: str | os.PathLike) -> str:
    """The bundled file a corpus name stands for, else the path unchanged."""
    text = os.fspath(name_or_path)
    if text in CORPORA and not Path(text).exists():
        return str(CORPORA[text])
    return text
