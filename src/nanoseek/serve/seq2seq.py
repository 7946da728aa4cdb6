"""The HTTP API of an encoder-decoder checkpoint: POST /v1/completions with the source as the prompt.

A sequence-to-sequence model answers a source with its target, found by beam search (generation/beam.py),
so the completions route maps OpenAI's fields onto it:
- `prompt`: the source (a string, a list of strings, or token ids); the reply's `text` is its target;
- `best_of`: the beam size (default: the server's `--beam`), `n` <= best_of: the n best hypotheses of the
  beam, best first; `max_tokens`: the longest target (default 2 x the source + 10);
- `temperature` and `top_p` are accepted and have no effect (the search is deterministic); `stop` cuts the
  target at the first stop string; `stream`, `echo`, `suffix`, `logprobs`, `response_format`, penalties
  and `logit_bias` are refused with a 400 that names them.
Chat and embeddings do not fit a model that translates one text into another: /v1/chat/completions,
/v1/embeddings and the chat page answer a 400 saying so. /health and /v1/models are as for decoder-only
models, and the API key and body-size guard is the same (`app.Guard`).

One request decodes at a time (the model is not re-entrant); up to `max_queue` more wait, beyond that 429.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

from fastapi import FastAPI

from nanoseek.errors import NanoseekError
from nanoseek.generation.seq2seq import search, target_room
from nanoseek.serve.app import Guard, install_error_handlers
from nanoseek.serve.protocol import APIError, ChatRequest, CompletionRequest, EmbeddingRequest, Sampling, prompt_list

NOT_A_CHAT_MODEL = (
    "this server runs an encoder-decoder (sequence-to-sequence) model, which has no {what}: "
    "POST /v1/completions with the source text as the prompt"
)


class Seq2SeqService:
    """The model, its tokenizer and the limits, with one decoding at a time and a bounded wait."""

    def __init__(
        self,
        model,
        tokenizer,
        name: str,
        beam: int,
        length_penalty: float,
        max_batch: int,
        max_queue: int,
        max_tokens_limit: int | None,
    ):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.beam, self.length_penalty, self.max_batch = beam, length_penalty, max_batch
        self.context = model.config.max_position_embeddings
        self.max_queue, self.max_tokens_limit = max_queue, max_tokens_limit or self.context
        self.created = int(time.time())
        self.lock, self.waiting, self.count_lock = threading.Lock(), 0, threading.Lock()

    def encode(self, prompt) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, "prompt is empty; give the source text", "prompt")
        vocab = self.model.config.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise APIError(400, f"prompt has token ids outside 0..{vocab - 1}", "prompt")
        try:
            target_room(self.model, len(ids), None)
        except NanoseekError as e:
            raise APIError(400, f"prompt: {e}", "prompt", "context_length_exceeded") from None
        return ids

    def decode(self, sources: list[list[int]], beam: int, max_tokens: int | None):
        """The hypotheses of every source, waiting for the model if another request holds it."""
        with self.count_lock:
            if self.waiting >= self.max_queue + 1:
                raise APIError(429, "the server is busy; retry later", None, "rate_limit_exceeded", "rate_limit_error")
            self.waiting += 1
        try:
            with self.lock:
                return search(
                    self.model, self.tokenizer, sources, beam, self.length_penalty, max_tokens, self.max_batch
                )
        finally:
            with self.count_lock:
                self.waiting -= 1


def check_options(body: CompletionRequest) -> None:
    """Refuse what a deterministic search cannot honour (temperature and top_p are accepted and unused)."""
    Sampling.unsupported(body)  # penalties, logit_bias
    format_type = body.response_format.type if body.response_format is not None else "text"
    asked = {
        "stream": body.stream,
        "echo": body.echo,
        "suffix": body.suffix,
        "logprobs": body.logprobs is not None,
        "response_format": format_type != "text",
    }
    for name, value in asked.items():
        if value:
            raise APIError(400, f"{name} is not supported by an encoder-decoder model", name, "unsupported_parameter")
    if body.max_tokens == 0:
        raise APIError(400, "max_tokens must be >= 1", "max_tokens")


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stops if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def create_seq2seq_app(
    model,
    tokenizer,
    model_name: str,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 32,
    max_tokens_limit: int | None = None,
    max_body_bytes: int = 1 << 20,
    folder=None,
    beam: int = 4,
    length_penalty: float = 0.6,
):
    """The ASGI app serving an encoder-decoder `model` as `model_name` (arguments as `app.create_app`'s;
    `max_batch` sources decode together, each with `beam` beams unless a request's best_of says otherwise)."""
    service = Seq2SeqService(model, tokenizer, model_name, beam, length_penalty, max_batch, max_queue, max_tokens_limit)
    app = FastAPI(title="nanoseek", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    install_error_handlers(app)

    def card() -> dict:
        return {
            "id": service.name,
            "object": "model",
            "created": service.created,
            "owned_by": "nanoseek",
            "context_length": service.context,
        }

    def check_model(name: str) -> None:
        if name != service.name:
            raise APIError(
                404, f"model {name!r} does not exist; this server serves {service.name!r}", "model", "model_not_found"
            )

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.name, "architecture": "encoder_decoder", "waiting": service.waiting}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        check_model(name)
        return card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        check_options(body)
        beam = body.best_of or max(service.beam, body.n)
        if body.n > beam:
            raise APIError(400, f"n={body.n} is more than the beam (best_of={beam}) holds", "n")
        if body.max_tokens is not None and body.max_tokens > service.max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens={body.max_tokens} is over this server's limit of {service.max_tokens_limit}",
                "max_tokens",
            )
        sources = [service.encode(p) for p in prompt_list(body.prompt)]
        if not sources:
            raise APIError(400, "prompt is an empty list; give at least one source", "prompt")
        found = await asyncio.to_thread(service.decode, sources, beam, body.max_tokens)
        choices, completion_tokens = [], 0
        for p, (ids, hyps) in enumerate(zip(sources, found)):
            room = target_room(service.model, len(ids), body.max_tokens)
            for j, hyp in enumerate(hyps[: body.n]):
                text, stopped = cut_at_stop(tokenizer.decode(hyp.tokens), body.stop)
                finish = "length" if len(hyp.tokens) >= room and not stopped else "stop"
                choices.append({"index": p * body.n + j, "text": text, "logprobs": None, "finish_reason": finish})
                completion_tokens += len(hyp.tokens)
        prompt_tokens = sum(len(s) for s in sources)
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": service.name,
            "system_fingerprint": None,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        raise APIError(400, NOT_A_CHAT_MODEL.format(what="chat"), "messages", "unsupported_endpoint")

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        raise APIError(400, NOT_A_CHAT_MODEL.format(what="embeddings"), None, "unsupported_endpoint")

    @app.get("/")
    async def chat_page():
        raise APIError(400, NOT_A_CHAT_MODEL.format(what="chat page"), None, "unsupported_endpoint")

    return Guard(app, api_key, max_body_bytes)
