"""Chat prompts: render a list of messages into the text a model continues.

A checkpoint folder's `tokenizer_config.json` may carry a Jinja `chat_template` (as HF checkpoints
do). It is rendered in Jinja's immutable sandbox: templates cannot reach Python internals, files or
the network. Models without a template (e.g. nanoseek's own char-level demo) get a plain transcript:

    User: Hello
    Assistant:

    >>> render_chat([{"role": "user", "content": "Hi"}])
    'User: Hi\\nAssistant:'
"""

from __future__ import annotations

import json
from pathlib import Path

from nanoseek.errors import NanoseekError

ROLES = ("system", "user", "assistant")


def load_chat_template(folder: str | Path | None) -> dict:
    """{"template": str | None, "bos_token": str, "eos_token": str} from tokenizer_config.json."""
    info = {"template": None, "bos_token": "", "eos_token": ""}
    if folder is None:
        return info
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return info
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise NanoseekError(f"{path} is not valid JSON ({e})") from None
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    info["template"] = template
    for key in ("bos_token", "eos_token"):
        value = cfg.get(key) or ""
        info[key] = value.get("content", "") if isinstance(value, dict) else value
    return info


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
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise NanoseekError("this checkpoint has a chat template; rendering it needs jinja2 "
                            "(pip install 'nanoseek[hf]')") from None

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template["template"]).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=template.get("bos_token", ""), eos_token=template.get("eos_token", ""))
    except TemplateError as e:
        raise NanoseekError(f"chat template failed: {e}") from None
