"""Every shell command of README.md runs as pasted, in order, in one fresh folder.

The commands run in this process (`nanoseek.cli.main`; ablate's variants too, which `nanoseek
ablate` starts as processes of their own: tests/train/test_ablate.py runs that path) with tiny
budgets appended (later flags win: fewer steps, short windows, a few new tokens); the ones that need
minutes, a download, a GPU pair or a server that runs until Ctrl-C are skipped, each with its reason
in `SKIP`. A README command that matches no rule runs as it is.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import types
from pathlib import Path

import pytest

from nanoseek.cli import main
from nanoseek.data import BUNDLED_CORPUS

README = Path(__file__).resolve().parents[1] / "README.md"

# a README command holding this text is not run here: why, and where it is tested instead
SKIP = {
    "make ": "sets up .venv and trains for minutes (CI runs make)",
    "--nproc": "launches torchrun (tests/parallel runs the 2-process paths)",
    "/models/": "needs a downloaded Hugging Face checkpoint (tests/io converts tiny ones)",
    "nanoseek serve": "a server that runs until Ctrl-C (tests/serve drives it)",
    "bench serve": "minutes of load on a started server (tests/bench)",
    "--compile": "compiles for tens of seconds (tests/generation checks compiled decoding)",
}


def tiny_budget(argv: list[str]) -> list[str]:
    """The flags appended to a README command so that it finishes in a second or two."""
    command = argv[0] if argv[0] != "bench" else f"bench {argv[1]}"
    if command in ("train", "ablate"):
        asked = next((int(v) for k, v in zip(argv, argv[1:]) if k == "--max-steps"), 2000)
        return [
            "--max-steps", str(max(5, asked // 1000)), "--max-seconds", "0", "--max-tokens", "0",
            "--data.seq_len=32", "--train.batch_size=2", "--eval.batches=1", "--eval.batch_size=2",
            "--log.progress=false", "--log.plot=false", "--checkpoint.every=1", "--threads", "1",
        ]  # fmt: skip
    return {
        "sample": ["--max-new-tokens", "8"],
        "chat": ["--max-new-tokens", "8"],
        "eval": ["--max-batches", "2"],
        "bench train": ["--steps", "1", "--warmup", "0", "--rounds", "1", "--peak-seconds", "0.05"],
        "bench attention": ["--seq", "64", "--repeats", "1"],
        "bench decode-kinds": ["--context", "64", "--new-tokens", "2", "--kinds", "dense,hca"],
    }.get(command, [])


def in_this_process(cmd: list[str], stdout=None, env=None) -> subprocess.CompletedProcess:
    """`python -m nanoseek ARGS` (an ablation's variant) run by this process's `main`."""
    with contextlib.redirect_stdout(stdout):
        return subprocess.CompletedProcess(cmd, main(cmd[3:]))


def readme_commands() -> list[str]:
    """The lines of README.md's ```bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        commands += [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return commands


def case(command: str):
    reason = next((why for text, why in SKIP.items() if text in command), None)
    return pytest.param(command, marks=pytest.mark.skip(reason=reason) if reason else (), id=command[:60])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The folder the README's commands run in, with the user's own corpus they name."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / "my_corpus.txt").write_bytes(BUNDLED_CORPUS.read_bytes()[:20_000])
    return folder


@pytest.mark.parametrize("command", [case(c) for c in readme_commands()])
def test_readme_command_runs_as_pasted(command, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("KEY", "readme-key")
    words = shlex.split(command, comments=True)
    assert words[0] == "nanoseek", f"a README shell line that is no nanoseek command: {command!r}"
    target = None
    if ">" in words:  # `nanoseek config ... > my_run.toml`
        words, target = words[: words.index(">")], words[words.index(">") + 1]
    argv = words[1:] + tiny_budget(words[1:])
    if argv[0] == "chat":
        monkeypatch.setattr("sys.stdin", io.StringIO("Good morrow\n/exit\n"))
    # ablate's own `subprocess` only: patching subprocess.run itself would reach everything else that runs
    # a command meanwhile (torch's check for ninja before building a C++ kernel, which then failed)
    monkeypatch.setattr("nanoseek.train.ablate.subprocess", types.SimpleNamespace(run=in_this_process))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(argv)
    assert status == 0, f"`{command}` exited with {status}"
    if target:
        Path(target).write_text(out.getvalue())
