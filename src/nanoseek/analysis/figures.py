"""What the pictures share: where `--out` writes, token labels people can read, fonts for any script,
and writing a figure whole or not at all.

`--out` names a file or a folder, as the user means it:

    >>> image_path("plots/", "attention.png").as_posix(), image_path("a.png", "attention.png").as_posix()
    ('plots/attention.png', 'a.png')
    >>> image_path("plots/run1", "fusion.png").as_posix()    # no image suffix: a folder
    'plots/run1/fusion.png'
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path

from nanoseek.data.files import atomic_write
from nanoseek.errors import NanoseekError

IMAGE_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg")
MAX_LABELS = 64  # tick labels per axis before they are thinned to every k-th token

# fonts tried after matplotlib's default, glyph by glyph, for the scripts it lacks (the first installed wins)
FALLBACK_FONTS = (
    "Noto Sans CJK SC",
    "Noto Sans CJK TC",
    "Noto Sans CJK JP",
    "Source Han Sans SC",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "Droid Sans Fallback",
    "AR PL UMing CN",
    "PingFang SC",
    "Microsoft YaHei",
    "SimHei",
    "Arial Unicode MS",
)
VISIBLE = {" ": "␣", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def image_path(out: str | os.PathLike | None, default_name: str) -> Path:
    """The file `--out` means: a path ending in an image suffix is the file; an existing folder, a
    path ending in '/', or a name without a suffix is a folder that gets `default_name`."""
    if out is None or str(out) == "":
        return Path(default_name)
    text = os.fspath(out)
    path = Path(text)
    if text.endswith(("/", os.sep)) or path.is_dir():
        return path / default_name
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return path
    if path.suffix:
        raise NanoseekError(
            f"--out {text}: {path.suffix!r} is not an image type; end the name in one of "
            f"{', '.join(IMAGE_SUFFIXES)}, or give a folder"
        )
    if path.exists():
        raise NanoseekError(f"--out {text} is a file without an image suffix; give NAME.png or a folder")
    return path / default_name


def save_figure(fig, out: Path, dpi: int = 120) -> Path:
    """Write a finished figure to `out` (its folders made), whole or not at all, and close it."""
    import matplotlib.pyplot as plt

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(out, "wb") as handle:
            fig.savefig(handle, dpi=dpi, format=out.suffix.lstrip(".").lower().replace("jpeg", "jpg"))
    except OSError as e:
        raise NanoseekError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    finally:
        plt.close(fig)
    return out


def pyplot():
    """matplotlib.pyplot on the file-only backend, with fonts that cover the labels' scripts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fallbacks = installed_fallback_fonts()
    if fallbacks:  # a list of families: matplotlib takes each glyph from the first that has it
        plt.rcParams["font.family"] = ["sans-serif", *fallbacks]
    return plt


@lru_cache(maxsize=1)
def installed_fallback_fonts() -> tuple[str, ...]:
    import logging

    from matplotlib import font_manager

    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)  # a font without a "normal" weight
    names = {f.name for f in font_manager.fontManager.ttflist}
    return tuple(name for name in FALLBACK_FONTS if name in names)


@lru_cache(maxsize=4096)
def drawable(char: str) -> bool:
    """True when some font matplotlib will use has a glyph for `char`."""
    from matplotlib import font_manager

    families = ["DejaVu Sans", *installed_fallback_fonts()]
    for family in families:
        try:
            path = font_manager.findfont(family, fallback_to_default=False)
        except ValueError:
            continue
        if font_manager.get_font(path).get_char_index(ord(char)):
            return True
    return False


def visible(text: str) -> str:
    """A token as a tick label: spaces and newlines shown, characters no font has as U+XXXX."""
    shown = "".join(VISIBLE.get(c, c) for c in text)
    return "".join(c if c.isascii() or drawable(c) else f"U+{ord(c):04X}" for c in shown) or "∅"


def font_note(text: str) -> str:
    """A hint when some characters of `text` have no installed font (their labels read U+XXXX)."""
    if all(c.isascii() or drawable(c) for c in text):
        return ""
    return (
        "no installed font draws some of the prompt's characters (labelled U+XXXX); install one that does "
        "(for Chinese, e.g. Noto Sans CJK or WenQuanYi Zen Hei) and delete matplotlib's font cache "
        "(~/.cache/matplotlib/fontlist-*.json)"
    )


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    return [visible(tokenizer.decode([i])) for i in ids]


def thinned_ticks(n: int, max_labels: int = MAX_LABELS) -> tuple[list[int], int]:
    """(positions to label, the step between them): every position up to `max_labels`, else every k-th."""
    step = max(1, math.ceil(n / max_labels))
    return list(range(0, n, step)), step


def label_axis(ax, axis: str, labels: list[str], name: str) -> None:
    """Put token labels (thinned past MAX_LABELS) on the x or y axis of `ax`, and the axis name."""
    ticks, step = thinned_ticks(len(labels))
    if step > 1:
        name += f" (one label per {step} tokens)"
    size = 8 if len(ticks) <= 40 else 6.5
    if axis == "x":
        ax.set_xticks(ticks, [labels[i] for i in ticks], fontsize=size, rotation=90)
        ax.set_xlabel(name)
    else:
        ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=size)
        ax.set_ylabel(name)
