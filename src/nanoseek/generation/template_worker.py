"""The chat-template worker: a separate Python process that renders Jinja chat templates in Jinja's
immutable sandbox, one request per line on stdin, one reply per line on stdout (JSON):

    request: {"template": str, "variables": {...}, "max_chars": int, "seconds": float}
    reply:   {"text": str} | {"error": str}

It runs as a script (`python template_worker.py`), imports nothing from nanoseek, and limits its own
address space, so a template that loops for hours, recurses without end or builds a huge string
costs this process only: the parent (template_sandbox.py) waits for a reply with a deadline and kills
the worker when it passes. Should the parent itself die meanwhile, an alarm set a little past the
deadline (SIGALRM's default action ends the process, even inside a long C call) ends the worker.
"""

import json
import os
import signal
import sys

# Run as a script, this folder leads sys.path: take it off, so no module here shadows one jinja2 needs.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

MEMORY_HEADROOM = 1 << 30  # bytes of address space beyond what the worker holds once started
CACHED_TEMPLATES = 8


class TemplateRaised(Exception):
    """The template called raise_exception(message) (HF templates do, e.g. for roles out of order)."""


def raise_exception(message):
    raise TemplateRaised(message)


def limit_memory() -> None:
    """Cap this process's address space at its current size plus MEMORY_HEADROOM (where supported)."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = size + MEMORY_HEADROOM
        if hard == resource.RLIM_INFINITY or limit < hard:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, OSError, ValueError):
        pass  # not Linux: the parent's deadline still bounds the time


def render(environment, compiled: dict, request: dict) -> dict:
    source = request["template"]
    template = compiled.get(source)
    if template is None:
        template = environment.from_string(source)
        if len(compiled) >= CACHED_TEMPLATES:
            compiled.clear()
        compiled[source] = template
    pieces, size, limit = [], 0, request["max_chars"]
    for piece in template.generate(**request["variables"]):
        size += len(piece)
        if size > limit:
            return {"error": f"its output is longer than {limit} characters"}
        pieces.append(piece)
    return {"text": "".join(pieces)}


def alarm(seconds: float) -> None:
    """End this process `seconds` from now (0: cancel), where the platform has interval timers."""
    if hasattr(signal, "setitimer"):
        signal.setitimer(signal.ITIMER_REAL, seconds)


def reply_to(environment, compiled: dict, line: str) -> dict:
    from jinja2.exceptions import TemplateSyntaxError

    try:
        request = json.loads(line)
        alarm(request["seconds"] + 1.0)
        return render(environment, compiled, request)
    except TemplateRaised as e:
        return {"error": str(e)}
    except TemplateSyntaxError as e:
        return {"error": f"syntax error on line {e.lineno}: {e.message}"}
    except RecursionError:
        return {"error": "it recurses too deeply"}
    except MemoryError:
        return {"error": "it needs more memory than a template may use"}
    except Exception as e:  # anything a template can raise ends this render, not the worker
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        alarm(0)


def main() -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    compiled: dict = {}
    limit_memory()
    sys.stdout.write('{"ready": true}\n')
    sys.stdout.flush()
    for line in sys.stdin:
        sys.stdout.write(json.dumps(reply_to(environment, compiled, line)) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
