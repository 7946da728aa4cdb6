"""A real `nanoseek serve` process on a free loopback port, for the server's end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

CONTEXT = 96
# the tests check behaviour, not speed: no compile at start-up (a later --compile wins); the engine in its own
# process, as `serve` runs it on two cores or more, whatever this machine has (a later --no-engine-process wins)
SERVE_FLAGS = ("--no-compile", "--engine-process")
KEY = "sk-test-0123456789"
ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,:!?\n'éü日本"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, ckpt: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOSEEK_API_KEY": ""}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nanoseek",
                "serve",
                str(ckpt),
                "--port",
                str(self.port),
                "--threads",
                "1",
                *SERVE_FLAGS,
                *args,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("server did not start in 90 s")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
