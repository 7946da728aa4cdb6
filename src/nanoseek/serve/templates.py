"""The served model's chat template: loaded once, rendered off the event loop, its failures a 422.

A template is part of the checkpoint, not of the request, so when it is malformed (tokenizer_config.json
that is not UTF-8, not an object, a chat_template that is not a string) the server still starts and
serves completions and embeddings; chat requests get a 422 naming the file. Rendering runs in the
bounded worker of nanoseek.generation.template_sandbox, awaited from a thread: a template that loops
or grows without end costs its request RENDER_SECONDS and a 422, while /health, the engine and every
other request go on.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from nanoseek.errors import NanoseekError
from nanoseek.generation.chat import load_chat_template, render_chat
from nanoseek.generation.template_sandbox import ChatTemplateError
from nanoseek.serve.protocol import APIError

log = logging.getLogger("nanoseek.serve")


def template_error(source: str, detail: str) -> APIError:
    return APIError(422, f"the model's chat template ({source}) {detail}", "messages", "chat_template_error")


class ServedTemplate:
    def __init__(self, folder):
        self.error: str | None = None
        self.source = "tokenizer_config.json"  # the file's name only: no server paths to clients
        try:
            self.info = load_chat_template(folder)
            self.source = Path(self.info["source"]).name
        except NanoseekError as e:  # the server starts; chat requests are refused with this
            log.warning("chat requests will be refused: %s", e)
            self.info = {"template": None, "bos_token": "", "eos_token": ""}
            self.error = str(e).replace(str(Path(folder)) + os.sep, "") if folder else str(e)

    async def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt for `messages`; 422 when the template is broken or fails, 400 for bad messages."""
        if self.error:
            raise template_error(self.source, f"cannot be used: {self.error}")
        try:
            return await asyncio.to_thread(render_chat, messages, self.info, add_generation_prompt)
        except ChatTemplateError as e:
            raise template_error(self.source, f"failed: {e.detail}") from None
        except NanoseekError as e:
            raise APIError(400, str(e), "messages") from None
