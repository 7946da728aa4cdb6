"""Every bad command line in `cli_cases.CASES` ends the same way: exit status 2, one line on stderr
naming what is wrong, no traceback, and not one file of the working folder created, changed or
removed. The cases run in-process (fast); a few run as real processes to prove the exit status."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_cases import CASES  # noqa: E402
from workspace import build_workspace  # noqa: E402

from nanoseek.cli import main

SRC = Path(__file__).resolve().parents[2] / "src"
MEMORY_LIMIT = str(4 << 30)  # the memory check judges every case against 4 GiB, whatever this machine has


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("cli") / "ws")


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under `root`: size and modification time of files, folders by name."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            state[os.path.relpath(os.path.join(folder, name), root)] = ("dir",)
        for name in files:
            stat = os.stat(os.path.join(folder, name))
            state[os.path.relpath(os.path.join(folder, name), root)] = (stat.st_size, stat.st_mtime_ns)
    return state


def run_in_process(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own exits
        return e.code if isinstance(e.code, int) else 1
    finally:
        torch.set_num_threads(1)  # a command may set it


def check_one_line(err: str, names: str) -> None:
    assert "Traceback" not in err, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0], f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert names.lower() in err.lower(), f"the error should name {names!r}: {err}"


@pytest.mark.timeout(120)  # a case that wrongly starts training or serving ends as a failure
@pytest.mark.parametrize("command, names", CASES, ids=[c or "<empty>" for c, _ in CASES])
def test_bad_command_line_exits_2_with_one_line(command, names, workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("NANOSEEK_MEMORY_LIMIT", MEMORY_LIMIT)
    before = snapshot(workspace)
    status = run_in_process(shlex.split(command))
    err = capsys.readouterr().err
    assert status == 2, f"exit {status}:\n{err}"
    check_one_line(err, names)
    assert snapshot(workspace) == before, "the command changed the working folder"


def test_the_corpus_is_large_and_covers_every_command():
    from nanoseek.cli import COMMANDS

    assert len(CASES) >= 150
    assert len(set(c for c, _ in CASES)) == len(CASES), "a case is listed twice"
    used = {shlex.split(c)[0] for c, _ in CASES if c}
    assert set(COMMANDS) <= used, f"no case for {set(COMMANDS) - used}"


PROCESS_CASES = ["train --optim.lr=NaN", "info hf_layers", "sample st_deep", "tokenizer train files"]


def test_real_processes_exit_2(workspace):
    """The exit status a shell sees (the cases run side by side: each pays for importing torch)."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "NANOSEEK_MEMORY_LIMIT": MEMORY_LIMIT}
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "nanoseek", *shlex.split(command)],
            cwd=workspace,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in PROCESS_CASES
    ]
    for command, run in zip(PROCESS_CASES, runs):
        _, err = run.communicate(timeout=300)
        assert run.returncode == 2, f"{command}: exit {run.returncode}\n{err}"
        check_one_line(err, "")
