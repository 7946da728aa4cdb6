"""Chat templates rendered with bounds: in Jinja's immutable sandbox, in a worker process
(template_worker.py), within RENDER_SECONDS and MAX_RENDER_CHARS.

The sandbox keeps a template away from Python internals, files and the network; the worker keeps it
away from the caller's time and memory. A template with a loop of 10^10 steps, endless recursion or
a gigabyte string is killed with its worker when the deadline passes (or fails on the worker's
memory cap), and the render raises ChatTemplateError; the next render starts a fresh worker. The
server's event loop, its engine and its other requests never wait for it.

One worker per process, started on the first render and shared by the threads that render (one
render at a time: a real template takes a millisecond).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from nanoseek.errors import NanoseekError

RENDER_SECONDS = 2.0  # a real chat template renders in about a millisecond
MAX_RENDER_CHARS = 4_000_000  # more than any context holds
START_SECONDS = 60.0  # starting Python and importing jinja2, on a busy machine
WORKER = Path(__file__).with_name("template_worker.py")


class ChatTemplateError(NanoseekError):
    """A chat template that cannot render these messages; `detail` says why, without the file name."""

    def __init__(self, source: str, detail: str):
        super().__init__(f"the chat template in {source} failed: {detail}")
        self.source, self.detail = source, detail


class TemplateWorker:
    def __init__(self, seconds: float = RENDER_SECONDS, max_chars: int = MAX_RENDER_CHARS):
        self.seconds, self.max_chars = seconds, max_chars
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.buffer = b""
        self.timed_out = False

    def render(self, template: str, variables: dict, source: str = "tokenizer_config.json") -> str:
        """The template's text for `variables` (JSON values); ChatTemplateError naming `source`."""
        request = {"template": template, "variables": variables, "max_chars": self.max_chars, "seconds": self.seconds}
        with self.lock:
            proc = self._started()
            try:
                proc.stdin.write(json.dumps(request).encode() + b"\n")
                proc.stdin.flush()
                line = self._read_line(time.monotonic() + self.seconds)
                reply = None if line is None else json.loads(line)
            except (OSError, ValueError):  # the worker died (memory cap) or said something broken
                reply = None
            if reply is None:
                self.stop()
                raise ChatTemplateError(source, self._why_stopped()) from None
        if "error" in reply:
            raise ChatTemplateError(source, reply["error"])
        return reply["text"]

    def _why_stopped(self) -> str:
        if self.timed_out:
            return f"it did not finish rendering within {self.seconds:g} s (stopped)"
        return "its worker stopped (out of memory?)"

    def _started(self) -> subprocess.Popen:
        if self.proc is not None and self.proc.poll() is None:
            return self.proc
        if importlib.util.find_spec("jinja2") is None:
            raise NanoseekError("this checkpoint has a chat template; rendering it needs jinja2 (pip install jinja2)")
        self.buffer = b""
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        if self._read_line(time.monotonic() + START_SECONDS) is None:
            self.stop()
            raise NanoseekError("the chat-template worker did not start")
        return self.proc

    def _read_line(self, deadline: float) -> str | None:
        """The worker's next line; None when it has ended or `deadline` passed (self.timed_out)."""
        self.timed_out = False
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.timed_out = True
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()

    def stop(self) -> None:
        """Kill the worker (a template that runs too long); the next render starts another."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout) if proc is not None else ():
            pipe.close()


_worker = TemplateWorker()
atexit.register(_worker.stop)


def render_template(template: str, variables: dict, source: str = "tokenizer_config.json") -> str:
    """Render `template` with `variables` in this process's shared, bounded worker."""
    return _worker.render(template, variables, source)
