"""How commands fail: argparse mistakes, file-system refusals and Ctrl-C are one line each, and
`info` reads a config without building or loading the model."""

from __future__ import annotations

import errno
import json
import os
import signal
import threading

import pytest

import nanoseek.data.tokenizer as tokenizer_module
from nanoseek.cli import main
from nanoseek.config import ModelConfig
from nanoseek.data.tokenizer import run_interruptibly
from nanoseek.io.hf import config_to_hf


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_an_argparse_mistake_is_one_line_and_exit_2(capsys):
    assert main(["sample", "ckpt", "--max-new-tokens", "abc"]) == 2
    assert "--max-new-tokens" in one_line_error(capsys)
    assert main(["bench", "train", "--steps", "x"]) == 2
    assert "--steps" in one_line_error(capsys)


def test_info_reads_a_huge_config_without_its_weights(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(ModelConfig.from_preset("deepseek-v3"))))
    assert main(["info", str(tmp_path), "--json"]) == 0  # a 671B-parameter model: only its config.json is there
    assert json.loads(capsys.readouterr().out)["params_total"] > 6e11


def test_a_full_disk_while_writing_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n" * 20)

    def disk_full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(tokenizer_module, "atomic_write_text", disk_full)
    out = tmp_path / "tok.json"
    assert main(["tokenizer", "train", str(corpus), "--kind", "char", "--out", str(out)]) == 2
    err = one_line_error(capsys)
    assert "No space left on device" in err and "tok.json" in err


def test_a_read_only_output_folder_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(os, "mkdir", read_only)
    assert main(["train", "--preset", "gpt2-tiny", "--out", str(tmp_path / "run")]) == 2
    assert "Read-only file system" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_ctrl_c_reaches_the_caller_while_the_work_runs_on():
    """A Ctrl-C during BPE training (Rust, no signal checks) interrupts the caller, not after training.

    Python's own SIGINT handler is put in place for the test: `interrupt_main` calls whatever handler the
    process holds, and this test is about the waiting, not about the handlers other code installed."""
    release = threading.Event()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Timer(0.2, lambda: __import__("_thread").interrupt_main()).start()
        with pytest.raises(KeyboardInterrupt):
            run_interruptibly(release.wait, 20)  # the work would block for 20 s
        assert not release.is_set()
    finally:
        release.set()
        signal.signal(signal.SIGINT, previous)


def test_the_result_and_the_errors_of_the_work_come_back():
    assert run_interruptibly(sum, [1, 2, 3]) == 6
    with pytest.raises(ZeroDivisionError):
        run_interruptibly(lambda: 1 / 0)
