"""Reading text files in chunks, and writing files and folders so that no half-written one is ever seen.

Reading: `iter_file_chunks` yields the bytes of a file in chunks of about `chunk_bytes`, cut after a
newline that sits between two non-space bytes when the chunk's second half has one (no BPE pre-token
crosses such a newline), else after any newline, else before the last UTF-8 character that might be
incomplete. A chunk therefore never ends inside a character, and decoding the chunks one by one gives
the same text as decoding the whole file. `iter_text_chunks` is the same, decoded.

    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "t.txt"
    >>> _ = path.write_text("秦🙂" * 4, encoding="utf-8")
    >>> [c.decode() for c in iter_file_chunks(path, 5)]  # 3- and 4-byte characters, never split
    ['秦', '🙂', '秦🙂', '秦', '🙂秦', '🙂']

Writing: `atomic_write(path)` hands out a file beside `path`; on success it is flushed, fsynced and
renamed over `path` (then the folder is fsynced), on an exception it is removed. `publish_dir(final)`
does the same for a folder: it hands out an empty sibling folder, and on success fsyncs every file in
it and renames it to `final` (a folder already there is swapped out, so there is never a moment
without a complete one). Temporaries are named `.NAME.<random>.tmp`, beside their target.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from nanoseek.errors import NanoseekError

# A newline between two non-space bytes: no BPE pre-token crosses it.
_SAFE_NEWLINE = re.compile(rb"\S\n(?=\S)")


# ----------------------------------------------------------------------------- reading


def check_input_file(path: str | os.PathLike, what: str) -> Path:
    """A file the user named: it exists, is a file (a folder is called a folder) and can be opened."""
    path = Path(path)
    if path.is_dir():
        raise NanoseekError(f"{what} {path} is a folder, not a file")
    if not path.exists():
        raise NanoseekError(f"{what} {path} does not exist")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise NanoseekError(f"{what} {path} cannot be read ({e.strerror or e})") from None
    return path


def read_utf8(path: str | os.PathLike, what: str) -> str:
    """The text of a UTF-8 file the user named; a file that is not UTF-8 is refused naming the byte."""
    path = check_input_file(path, what)
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise NanoseekError(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def _cut_point(buffer: bytes) -> int:
    """Where to end a chunk: after a safe newline, else any newline, else a character boundary.

    Only the second half of the buffer is searched for newlines, so chunks stay near the
    requested size. The fallback cuts before the last (possibly incomplete) UTF-8 character.
    """
    half = len(buffer) // 2
    last_safe = None
    for match in _SAFE_NEWLINE.finditer(buffer, half):
        last_safe = match
    if last_safe is not None:
        return last_safe.end()
    newline = buffer.rfind(b"\n", half)
    if newline >= 0:
        return newline + 1
    cut = len(buffer)
    while cut > len(buffer) - 4 and cut > 0 and 0x80 <= buffer[cut - 1] < 0xC0:
        cut -= 1  # step back over UTF-8 continuation bytes
    if cut > 0 and buffer[cut - 1] >= 0xC0:
        cut -= 1  # and the lead byte of the character they continue
    return cut  # 0 (one incomplete character so far): read more before cutting


def iter_file_chunks(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """The bytes of a file in chunks of about `chunk_bytes`, cut between lines or characters."""
    with open(path, "rb") as handle:
        leftover = b""
        while block := handle.read(chunk_bytes):
            buffer = leftover + block
            cut = _cut_point(buffer)
            leftover = buffer[cut:]
            if cut:
                yield buffer[:cut]
        if leftover:
            yield leftover


def iter_text_chunks(
    files: Sequence[str | os.PathLike], chunk_bytes: int = 1 << 20, errors: str = "strict"
) -> Iterator[str]:
    """The text of each file in turn, in chunks of about `chunk_bytes` bytes, decoded as UTF-8.

    `errors` is the codec's: "replace" shows invalid bytes as U+FFFD, "surrogateescape" keeps them
    as U+DC80..U+DCFF. Line endings are kept as they are on disk."""
    for file in files:
        for chunk in iter_file_chunks(file, chunk_bytes):
            yield chunk.decode("utf-8", errors)


def iter_text_head(
    files: Sequence[str | os.PathLike], fraction: float, chunk_bytes: int = 1 << 20, errors: str = "strict"
) -> Iterator[str]:
    """`iter_text_chunks` of the first `fraction` of the files' bytes, taken in order as one text: what
    a tokenizer may learn from when the last 1 - fraction is held out for validation."""
    left = int(sum(os.path.getsize(f) for f in files) * fraction)
    for file in files:
        for chunk in iter_file_chunks(file, chunk_bytes):
            if left <= 0:
                return
            yield chunk[:left].decode("utf-8", errors)
            left -= len(chunk)


# ----------------------------------------------------------------------------- writing


def _sibling(path: Path, tag: str = "") -> Path:
    """A fresh hidden name beside `path` (prune the `.NAME.*` of interrupted writes by that prefix)."""
    return path.with_name(f".{path.name}.{tag}{secrets.token_hex(4)}.tmp")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):  # files before the folders that hold them
        if path.is_dir():
            fsync_dir(path)
        else:
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(root)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """`with atomic_write(path, "wb") as f: ...`: `path` is replaced whole on success, untouched on error."""
    path = Path(path)
    tmp = _sibling(path)
    binary = "b" in mode
    try:
        with open(
            tmp, mode.replace("w", "x"), encoding=None if binary else encoding, newline=None if binary else ""
        ) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` (UTF-8) atomically and durably."""
    with atomic_write(path) as handle:
        handle.write(text)


@contextmanager
def publish_dir(final: str | os.PathLike):
    """`with publish_dir(final) as tmp: <write files into tmp>`: `final` appears complete, or not at all.

    A folder already at `final` is replaced (renamed aside, the new one renamed in, the old removed);
    if the swap itself fails the old folder is put back."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            trash = _sibling(final, "old-")
            final.rename(trash)
            try:
                tmp.rename(final)
            except BaseException:
                trash.rename(final)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
