"""Chat: render a list of messages into the text a model continues, keep a history that fits the
context, and stream the replies (`Chat`, what `nanoseek chat` runs).

A checkpoint folder's `tokenizer_config.json` may carry a Jinja `chat_template` (as HF checkpoints
do; transformers 5 writes it to `chat_template.jinja`). It is rendered in Jinja's immutable sandbox,
in a worker process with a time and size budget (template_sandbox.py): templates cannot reach Python
internals, files or the network, nor hold up the caller; a template that fails or runs past its
budget raises ChatTemplateError (a NanoseekError). Models without a template (e.g. nanoseek's own
char-level demo) get a plain transcript:

    User: Hello
    Assistant:

    >>> render_chat([{"role": "user", "content": "Hi"}])
    'User: Hi\\nAssistant:'

History trimming: when the rendered prompt plus the reply's `max_new_tokens` would not fit the
model's context, the oldest user/assistant exchange is dropped (a system message stays, the roles
keep alternating) until it fits or only the newest message is left. A reply longer than the room
left slides past the context as `sample` does (`stream_past_context`: it goes on from the most
recent half of the context).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

from nanoseek.errors import NanoseekError
from nanoseek.generation.streaming import stream_past_context
from nanoseek.generation.template_sandbox import render_template

ROLES = ("system", "user", "assistant")


def load_chat_template(folder: str | Path | None) -> dict:
    """{"template": str | None, "bos_token": str, "eos_token": str, "source": path} from the folder's
    tokenizer_config.json (or chat_template.jinja beside it); NanoseekError (one line naming the file
    and the field) when one is malformed."""
    info = {"template": None, "bos_token": "", "eos_token": "", "source": "tokenizer_config.json"}
    if folder is None:
        return info
    path = Path(folder) / "tokenizer_config.json"
    jinja = Path(folder) / "chat_template.jinja"  # where transformers 5 saves it
    cfg = _read_json_object(path) if path.is_file() else {}
    template = _template_source(path, cfg.get("chat_template"))
    info["source"] = str(path)
    if template is None and jinja.is_file():
        template, info["source"] = _read_text(jinja), str(jinja)
    info["template"] = template
    for key in ("bos_token", "eos_token"):
        value = cfg.get(key) or ""
        value = value.get("content", "") if isinstance(value, dict) else value
        if not isinstance(value, str):
            raise NanoseekError(f"{path}: {key} must be a string or {{content: string}}, not {type(value).__name__}")
        info[key] = value
    return info


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise NanoseekError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise NanoseekError(f"{path} is not UTF-8 text (byte {e.start})") from None


def _read_json_object(path: Path) -> dict:
    text = _read_text(path)
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise NanoseekError(f"{path} is not valid JSON ({e})") from None
    except RecursionError:
        raise NanoseekError(f"{path} is nested too deeply") from None
    if not isinstance(cfg, dict):
        raise NanoseekError(f"{path} must hold a JSON object, not a {type(cfg).__name__}")
    return cfg


def _template_source(path: Path, template) -> str | None:
    """The template text: a string, or the "default" one of a list of {name, template} (HF's form)."""
    if isinstance(template, list):
        if not all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in template):
            raise NanoseekError(f"{path}: chat_template as a list must hold {{name, template: string}} objects")
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is not None and not isinstance(template, str):
        raise NanoseekError(
            f"{path}: chat_template must be a string or a list of {{name, template}}, not {type(template).__name__}"
        )
    return template or None


def check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise NanoseekError("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise NanoseekError(f"messages[{i}] must be {{role: one of {', '.join(ROLES)}, content: string}}")
    return messages


def render_chat(messages: list[dict], template: dict | None = None, add_generation_prompt: bool = True) -> str:
    messages = check_messages(messages)
    if template and template.get("template"):
        return _render_jinja(template, messages, add_generation_prompt)
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    if add_generation_prompt:
        lines.append("Assistant:")
    return "\n".join(lines)


def _render_jinja(template: dict, messages: list[dict], add_generation_prompt: bool) -> str:
    """The checkpoint's template in the sandboxed, time- and size-bounded worker (template_sandbox.py)."""
    variables = {
        "messages": messages,
        "add_generation_prompt": add_generation_prompt,
        "bos_token": template.get("bos_token", ""),
        "eos_token": template.get("eos_token", ""),
    }
    return render_template(template["template"], variables, template.get("source", "tokenizer_config.json"))


def trim_history(
    messages: list[dict],
    render: Callable[[list[dict]], str],
    count: Callable[[str], int],
    max_new_tokens: int,
    context: int,
) -> tuple[str, int]:
    """Drop the oldest exchanges of `messages` (in place) until the prompt leaves `max_new_tokens` of
    `context`, or only the system message and the newest message are left. Returns the prompt and
    the room left for the reply (< 1: the newest message alone does not fit)."""
    first = 1 if messages and messages[0]["role"] == "system" else 0
    prompt = render(messages)
    while count(prompt) + max_new_tokens > context and len(messages) > first + 1:
        del messages[first : first + 2]  # the oldest user/assistant exchange: roles keep alternating
        prompt = render(messages)
    return prompt, context - count(prompt)


class MessageTooLong(NanoseekError):
    """The newest message alone leaves no room for a reply in the model's context."""


class Chat:
    """A conversation with `model`: `reply(text)` streams the assistant's answer as text pieces and
    records both turns; `reset()` forgets them (the system message stays). The checkpoint's chat
    template when it has one; otherwise the plain transcript, with "\\nUser:" as a stop string.
    `options` go to the text stream (temperature, top_k, top_p, seed, compile, ...). `folder` is the
    checkpoint folder the chat template is read from (None: no template)."""

    def __init__(
        self,
        model,
        tokenizer,
        system: str | None = None,
        max_new_tokens: int = 256,
        folder: str | Path | None = None,
        **options,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.template = load_chat_template(folder)
        self.stops = None if self.template["template"] else ["\nUser:"]
        self.system = system
        self.messages: list[dict] = []
        self.reset()
        self.max_new_tokens = max_new_tokens
        self.options = options

    def reset(self) -> None:
        """Forget the conversation; keep the system message."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str) -> Iterator[str]:
        """Stream the reply to the user's `text`; MessageTooLong (the message forgotten, the history
        as it was) when it does not fit the context even after the history was trimmed."""
        messages = [*self.messages, {"role": "user", "content": text}]
        prompt, room = trim_history(
            messages,
            lambda m: render_chat(m, self.template),
            lambda t: len(self.tokenizer.encode(t)),
            self.max_new_tokens,
            self.model.config.max_position_embeddings,
        )
        if room < 1:
            raise MessageTooLong("message too long for the model's context")
        self.messages = messages
        options = dict(self.options)
        seed = options.pop("seed", None)
        stream = stream_past_context(
            self.model, self.tokenizer, prompt, self.max_new_tokens, seed, stop=self.stops, **options
        )
        pieces = []
        for piece in stream:
            pieces.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})
