"""Chunked reading of text files and atomic writes of files and folders (nanoseek.data.files)."""

from __future__ import annotations

import pytest

from nanoseek.data.files import atomic_write, atomic_write_text, iter_file_chunks, iter_text_chunks, publish_dir

TEXT = "ab秦\n🙂é\n" * 7 + "no newline: 函谷壯皇居🚀"


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 7, 64])
def test_text_chunks_split_between_characters(tmp_path, chunk_bytes):
    path = tmp_path / "t.txt"
    path.write_bytes(TEXT.encode())
    chunks = list(iter_text_chunks([path], chunk_bytes))  # strict: a split character would raise
    assert "".join(chunks) == TEXT and len(chunks) > 1


def test_text_chunks_of_invalid_utf8_equal_decoding_the_whole_file(tmp_path):
    raw = b"ok \xff\xfe then \xe4\xb8 cut\n" * 5 + "秦🙂".encode() * 3 + b"\xf0\x9f"
    path = tmp_path / "raw.txt"
    path.write_bytes(raw)
    for errors in ("replace", "surrogateescape"):
        for chunk_bytes in (1, 3, 10):
            assert "".join(iter_text_chunks([path], chunk_bytes, errors)) == raw.decode("utf-8", errors)


def test_text_chunks_follow_the_files_in_order_and_keep_line_endings(tmp_path):
    (tmp_path / "a").write_bytes(b"one\r\ntwo\n")
    (tmp_path / "b").write_bytes("三\n".encode())
    assert "".join(iter_text_chunks([tmp_path / "a", tmp_path / "b"], 4)) == "one\r\ntwo\n三\n"


def test_file_chunks_prefer_a_newline_between_words(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"aaaa\n bbbb\ncccc")
    assert list(iter_file_chunks(path, 15)) == [b"aaaa\n bbbb\n", b"cccc"]


# ----------------------------------------------------------------------------- writing a file


def test_atomic_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "LATEST"
    atomic_write_text(path, "old\n")
    atomic_write_text(path, "new 秦\n")
    assert path.read_text(encoding="utf-8") == "new 秦\n" and leftovers(tmp_path) == []


def test_atomic_write_that_raises_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_write(path, "wb") as handle:
            handle.write(b"half a fi")
            raise OSError("disk full")
    assert path.read_text() == "old" and leftovers(tmp_path) == []


def test_atomic_write_that_raises_creates_nothing(tmp_path):
    with pytest.raises(ValueError):
        with atomic_write(tmp_path / "new.txt") as handle:
            handle.write("partial")
            raise ValueError("bad content")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- publishing a folder


def test_publish_dir_appears_complete(tmp_path):
    final = tmp_path / "ckpt"
    with publish_dir(final) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"\0" * 8)
        assert not final.exists()  # nothing is visible before the end
    assert sorted(p.name for p in final.rglob("*")) == ["config.json", "sub", "w.bin"]
    assert leftovers(tmp_path) == []


def test_publish_dir_swaps_out_an_existing_folder(tmp_path):
    final = tmp_path / "step-0000007"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with publish_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new.txt"] and leftovers(tmp_path) == []


def test_publish_dir_that_raises_keeps_the_old_folder_and_no_temporary(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "keep.txt").write_text("keep")
    with pytest.raises(OSError):
        with publish_dir(final) as tmp:
            (tmp / "half.bin").write_bytes(b"\1")
            raise OSError("disk full")
    assert [p.name for p in final.iterdir()] == ["keep.txt"] and leftovers(tmp_path) == []
