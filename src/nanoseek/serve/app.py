"""The OpenAI-compatible HTTP API over the continuous-batching engine (FastAPI + uvicorn).

Routes: GET /health (no key), GET /v1/models, POST /v1/completions, POST /v1/chat/completions,
POST /v1/embeddings, POST /tokenize, POST /detokenize, GET /tokenizer_info (tokenization.py),
GET /metrics (metrics.py), GET / (the chat page). Streaming answers are server-sent events in OpenAI's
chunk format ending with `data: [DONE]`. Completions take `echo` and `logprobs`, chat `logprobs` and
`top_logprobs` (logprobs.py); both take `response_format` JSON (structured.py). Text reaches the
client only in whole UTF-8 characters (the engine's Detokenizer), so a multi-byte character is never
split across chunks.

Guarantees:
- every error the client can cause is a 4xx with {"error": {"message", "type", "param", "code"}};
- with an API key, every route but /health needs `Authorization: Bearer KEY` (or HTTP Basic with
  KEY as the password, so a browser can open the chat page); keys are compared in constant time;
- bodies above `max_body_bytes` are refused (413) before they are read;
- the engine refuses work beyond max_batch + max_queue sequences (an embeddings request counts as
  one): 429, never an unbounded queue;
- a client that goes away has its sequences cancelled and their cache rows freed;
- a request that fails in the engine ends alone (engine.py); a chat template renders off the event
  loop with a time budget and fails as a 422 (templates.py); embeddings take turns with decode steps
  (embeddings.py); unparsable HTTP is answered in the same JSON shape (transport.py).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager
from functools import partial
from importlib import resources

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.generation.sampling import SamplingOptions
from nanoseek.serve.embeddings import check_inputs, embed_ids, embed_in_turns
from nanoseek.serve.engine import Engine, EngineUnavailable, QueueFull, Sequence
from nanoseek.serve.engine_process import EngineProcess
from nanoseek.serve.handoff import make_emitter
from nanoseek.serve.logprobs import TextOffsets, TokenStrings, chat_logprobs, completion_logprobs
from nanoseek.serve.metrics import CONTENT_TYPE, ServerMetrics
from nanoseek.serve.protocol import APIError, ChatRequest, CompletionRequest, EmbeddingRequest, prompt_list
from nanoseek.serve.structured import StructuredOutput, json_schema_of
from nanoseek.serve.templates import ServedTemplate
from nanoseek.serve.tokenization import install_tokenizer_routes

log = logging.getLogger("nanoseek.serve")
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DISCONNECT_POLL_S = 0.25


def error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Basic realm="nanoseek"'} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


# ---------------------------------------------------------------------------- the ASGI guard


class Guard:
    """API key and body size, checked before routing (so no handler ever sees a bad request)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes
        self.key = os.fsencode(api_key) if api_key else b""  # the bytes a client sends: UTF-8 (as given on argv)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        raw_authorization = next((v for k, v in scope["headers"] if k.lower() == b"authorization"), b"")
        if self.api_key and scope["path"] != "/health" and not self.authorized(raw_authorization):
            err = APIError(
                401, "missing or incorrect API key: send 'Authorization: Bearer <key>'", None, "invalid_api_key"
            )
            return await error_response(err)(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            err = APIError(
                413,
                f"request body of {length} bytes is over the limit of {self.max_body} bytes",
                None,
                "request_too_large",
            )
            return await error_response(err)(scope, receive, send)
        await self.app(scope, self.limited(receive), send)

    def authorized(self, header: bytes) -> bool:
        """Whether the Authorization header carries the key, compared as bytes in constant time (a
        non-ASCII key travels as its UTF-8 bytes, which a latin-1 or ASCII round trip would change)."""
        scheme, _, value = header.strip().partition(b" ")
        if scheme.lower() == b"basic":
            try:
                value = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
            except ValueError:
                return False
        elif scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(value.strip(), self.key)

    def limited(self, receive):
        seen = 0

        async def receive_limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:  # an HTTPException, which FastAPI's body parsing passes on as it is
                raise HTTPException(413, f"request body is over the limit of {self.max_body} bytes")
            return message

        return receive_limited


# ---------------------------------------------------------------------------- the service


class Service:
    """What the routes share: the model's name and context, the tokenizer, the engine, limits."""

    def __init__(self, model, tokenizer, model_name: str, engine: Engine, max_tokens_limit: int, folder=None):
        self.model, self.tokenizer, self.name, self.engine = model, tokenizer, model_name, engine
        self.context = model.config.max_position_embeddings
        self.max_tokens_limit = max_tokens_limit
        self.chat_template = ServedTemplate(folder)  # the checkpoint folder's tokenizer_config.json, if any
        self.template = self.chat_template.info
        self.created = int(time.time())
        self.strings = TokenStrings(tokenizer)
        self.structured: StructuredOutput | None = None  # built at the first response_format request
        self.structured_lock = threading.Lock()

    async def grammar(self, response_format):
        """A factory of per-choice constraints for `response_format`, or None (plain text)."""
        schema = json_schema_of(response_format) if response_format is not None else None
        if schema is None:
            return None

        def compile_schema():
            with self.structured_lock:
                if self.structured is None:
                    self.structured = StructuredOutput(self.tokenizer, self.model.config.vocab_size)
            return self.structured.compile(schema)

        compiled = await asyncio.to_thread(compile_schema)
        make = partial(self.structured.constraint, compiled)
        make.schema = schema  # an engine process compiles its own grammar from it
        return make

    def check_model(self, name: str) -> None:
        if name != self.name:
            raise APIError(
                404, f"model {name!r} does not exist; this server serves {self.name!r}", "model", "model_not_found"
            )

    def encode(self, prompt, param: str = "prompt") -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, f"{param} is empty; give at least one token", param)
        vocab = self.model.config.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise APIError(400, f"{param} has token ids outside 0..{vocab - 1}", param)
        if len(ids) >= self.context:
            raise APIError(
                400,
                f"{param} is {len(ids)} tokens; the context is {self.context} tokens "
                f"and at least one must be left for the reply",
                param,
                "context_length_exceeded",
            )
        return ids

    def max_tokens(self, asked: int | None, prompts: list[list[int]], default: int | None) -> int:
        """The tokens a request generates: what it asks, up to the server's limit. Past the context
        generation slides (the engine keeps the recent half); unasked, it stops where the context ends."""
        if not prompts:
            raise APIError(400, "prompt is an empty list; give at least one prompt", "prompt")
        room = self.context - max(len(p) for p in prompts)
        if asked is None:
            return min(room, self.max_tokens_limit, default or room)
        if asked > self.max_tokens_limit:
            raise APIError(
                400, f"max_tokens={asked} is over this server's limit of {self.max_tokens_limit}", "max_tokens"
            )
        return asked

    def sequences(
        self, body, prompts: list[list[int]], max_tokens: int, stops: list[str], emit, logprobs, echo, grammar
    ) -> list[Sequence]:
        seqs = []
        for p, ids in enumerate(prompts):
            for j in range(body.n):
                index = p * body.n + j
                seed = None if body.seed is None else body.seed + index
                opts = SamplingOptions(temperature=body.temperature, top_p=body.top_p, seed=seed)
                seq = Sequence(ids, max_tokens, opts, emit, stops, index, logprobs=logprobs)
                seq.echo_logprobs = echo and logprobs is not None
                # a grammar matcher here only where the engine runs in this process
                own = grammar and not self.engine.builds_grammars
                seq.constraint = grammar() if own else None
                seq.schema = grammar.schema if grammar else None
                seqs.append(seq)
        return seqs


async def next_event(queue: asyncio.Queue, request: Request):
    """The next engine event, or None once the client has gone away.

    One `queue.get()` task is awaited across the disconnect polls (asyncio.wait, not wait_for:
    on Python 3.11 a wait_for that times out just as the item arrives drops the item). An event
    already waiting is taken at once: under load most are, and a task per token would cost more."""
    if not queue.empty():
        return queue.get_nowait()
    getter = asyncio.ensure_future(queue.get())
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
            if done:
                return getter.result()
            if await request.is_disconnected():
                return None
    finally:
        if not getter.done():
            getter.cancel()


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(obj) -> str:
    """One server-sent event. ASCII-only JSON: characters such as U+0085 or U+2028, which some
    clients' line splitters treat as line ends, travel as \\u escapes and cannot cut an event."""
    return f"data: {json.dumps(obj)}\n\n"


class Run:
    """One request's sequences in the engine, answered as one JSON body or as a stream."""

    def __init__(self, service: Service, request: Request, body, prompts, max_tokens, stops, chat: bool, grammar=None):
        self.service, self.request, self.body, self.chat = service, request, body, chat
        self.queue, emit = make_emitter()
        if chat:  # chat: logprobs true/false and top_logprobs N; completions: logprobs N (or null)
            self.logprobs = (body.top_logprobs or 0) if body.logprobs else None
            self.echo = False
        else:
            self.logprobs, self.echo = body.logprobs, body.echo
        self.seqs = service.sequences(body, prompts, max_tokens, stops, emit, self.logprobs, self.echo, grammar)
        self.echoed = [service.tokenizer.decode(s.prompt_ids) if self.echo else "" for s in self.seqs]
        self.offsets = [TextOffsets(service.tokenizer) for _ in self.seqs]
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.id = completion_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        try:
            service.engine.submit(self.seqs)
        except QueueFull as e:
            raise APIError(429, f"{e}; retry later", None, "rate_limit_exceeded", "rate_limit_error") from None
        except EngineUnavailable as e:
            raise APIError(503, str(e), type="server_error") from None

    def usage(self, completion_tokens: int) -> dict:
        """OpenAI's usage; `cached_tokens`: prompt tokens the prefix cache held (each prompt's first
        choice: the others reuse that one's blocks, as `prompt_tokens` counts each prompt once)."""
        cached = sum(s.cached_tokens for s in self.seqs[:: self.body.n])
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def choice(self, index: int, text: str, finish_reason, delta: bool, entries=None) -> dict:
        logprobs = None
        if self.logprobs is not None and entries is not None:
            strings = self.service.strings
            if self.chat:
                logprobs = chat_logprobs(entries, strings, self.logprobs)
            else:
                logprobs = completion_logprobs(entries, strings, self.offsets[index])
        if not self.chat:
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        key = "delta" if delta else "message"
        message = {"content": text} if delta else {"role": "assistant", "content": text}
        if delta and finish_reason and not text:
            message = {}
        return {"index": index, key: message, "logprobs": logprobs, "finish_reason": finish_reason}

    def envelope(self, choices: list, chunk: bool) -> dict:
        obj = self.object + (".chunk" if chunk and self.chat else "")
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.service.name,
            "system_fingerprint": None,
            "choices": choices,
        }

    async def events(self):
        """Engine events until every sequence has finished; cancels them all if the client leaves."""
        finished = 0
        try:
            while finished < len(self.seqs):
                event = await next_event(self.queue, self.request)
                if event is None:
                    return
                if event.error:
                    raise RuntimeError(event.error)
                finished += event.finish_reason is not None
                yield event
        finally:
            self.service.engine.cancel(self.seqs)

    async def answer(self) -> dict | None:
        texts = [[e] for e in self.echoed]
        entries = [[] for _ in self.seqs]
        reasons, tokens = [None] * len(self.seqs), [0] * len(self.seqs)
        async for event in self.events():
            texts[event.index].append(event.text)
            entries[event.index] += event.logprobs or []
            reasons[event.index] = event.finish_reason
            tokens[event.index] = event.completion_tokens
        text = ["".join(t) for t in texts]
        if self.chat:
            text = [t.lstrip() for t in text] if not self.service.template["template"] else text
        choices = [self.choice(i, text[i], reasons[i], False, entries[i]) for i in range(len(self.seqs))]
        return {**self.envelope(choices, chunk=False), "usage": self.usage(sum(tokens))}

    async def stream(self):
        tokens = [0] * len(self.seqs)
        started = [False] * len(self.seqs)
        if self.chat:
            for i in range(len(self.seqs)):
                first = {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                yield sse(self.envelope([first], chunk=True))
        echoed = list(self.echoed)  # sent with each choice's first chunk
        pending = []  # events' chunks not yet written: the ones already waiting go out in one write
        finished = 0
        try:
            async for event in self.events():
                i = event.index
                tokens[i] = event.completion_tokens
                text, echoed[i] = echoed[i] + event.text, ""
                if self.chat and not self.service.template["template"] and not started[i]:
                    text = text.lstrip()  # the plain transcript puts a space after "Assistant:"
                    started[i] = bool(text)
                if text or event.finish_reason or event.logprobs:
                    choice = self.choice(i, text, event.finish_reason, True, event.logprobs)
                    pending.append(sse(self.envelope([choice], True)))
                finished += event.finish_reason is not None
                if pending and self.queue.empty() and finished < len(self.seqs):  # the last: with [DONE]
                    yield "".join(pending)
                    pending = []
        except RuntimeError as e:
            error = {"message": str(e), "type": "server_error", "param": None, "code": None}
            yield "".join(pending) + sse({"error": error})
            return
        if self.body.include_usage():
            pending.append(sse({**self.envelope([], chunk=True), "usage": self.usage(sum(tokens))}))
        yield "".join(pending) + "data: [DONE]\n\n"


# ---------------------------------------------------------------------------- the app


def create_app(
    model,
    tokenizer,
    model_name: str,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 32,
    max_tokens_limit: int | None = None,
    max_body_bytes: int = 1 << 20,
    folder=None,
    compile: bool = False,
    prefix_cache_bytes: int = 0,
    engine_process: bool = False,
) -> FastAPI:
    """The app; `compile` and `prefix_cache_bytes` as `Engine` takes them (the decode step is
    compiled before the app answers its first request); `engine_process`: the engine runs in a
    process of its own (engine_process.py), else on a thread of this one."""
    metrics = ServerMetrics()
    kind = EngineProcess if engine_process else Engine
    engine = kind(
        model,
        tokenizer,
        max_batch=max_batch,
        max_queue=max_queue,
        observer=metrics,
        compile=compile,
        prefix_cache_bytes=prefix_cache_bytes,
    )
    metrics.watch(engine)
    context = model.config.max_position_embeddings
    service = Service(model, tokenizer, model_name, engine, max_tokens_limit or context, folder)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        await asyncio.to_thread(engine.ready.wait)  # the compiled step's warm-up, before any request
        if getattr(engine, "dead", None):
            raise RuntimeError(engine.dead)
        yield
        engine.stop()

    app = FastAPI(title="nanoseek", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    install_error_handlers(app)

    @app.get("/health")
    async def health():
        if getattr(engine, "dead", None):
            raise APIError(503, engine.dead, type="server_error")
        return {"status": "ok", "model": service.name, **engine.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(service)]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        service.check_model(name)
        return model_card(service)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        service.check_model(body.model)
        body.unsupported()
        prompts = [service.encode(p) for p in prompt_list(body.prompt)]
        max_tokens = service.max_tokens(body.max_tokens, prompts, DEFAULT_COMPLETION_TOKENS)
        grammar = await service.grammar(body.response_format)
        return await respond(Run(service, request, body, prompts, max_tokens, body.stop, False, grammar))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        service.check_model(body.model)
        body.unsupported()
        text = await service.chat_template.render(body.plain_messages())
        prompts = [service.encode(text, "messages")]
        max_tokens = service.max_tokens(body.max_completion_tokens or body.max_tokens, prompts, None)
        stops = list(body.stop) + ([] if service.template["template"] else ["\nUser:"])
        grammar = await service.grammar(body.response_format)
        return await respond(Run(service, request, body, prompts, max_tokens, stops, True, grammar))

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request):
        service.check_model(body.model)
        hidden = model.config.hidden_size
        if body.dimensions not in (None, hidden):
            raise APIError(
                400,
                f"dimensions={body.dimensions}: this model's embeddings have {hidden}",
                "dimensions",
                "unsupported_parameter",
            )
        inputs = [service.encode(x, "input") for x in prompt_list(body.input)]
        check_inputs(inputs)
        vectors = await embed_in_turns(engine, embed_ids, inputs, request.is_disconnected)
        if vectors is None:  # the client left
            return Response(status_code=499)
        data = [
            {"object": "embedding", "index": i, "embedding": encode_vector(v, body.encoding_format)}
            for i, v in enumerate(vectors)
        ]
        n = sum(len(x) for x in inputs)
        return {"object": "list", "data": data, "model": service.name, "usage": {"prompt_tokens": n, "total_tokens": n}}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    install_tokenizer_routes(app, service)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        page = resources.files("nanoseek.serve").joinpath("chat.html").read_text()
        return page.replace("{{MODEL}}", service.name)

    async def respond(run: Run):
        if run.body.stream:
            return StreamingResponse(
                run.stream(),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            return await run.answer()
        except RuntimeError as e:
            raise APIError(500, str(e), type="server_error") from None

    metrics.routes = {route.path for route in app.routes}
    return metrics.count_requests(Guard(app, api_key, max_body_bytes))


def model_card(service: Service) -> dict:
    return {
        "id": service.name,
        "object": "model",
        "created": service.created,
        "owned_by": "nanoseek",
        "context_length": service.context,
    }


def encode_vector(vector, encoding_format: str):
    if encoding_format == "base64":  # little-endian float32, as OpenAI's clients decode it
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.tolist()


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, err: APIError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, "the request body is not valid JSON", None, "invalid_json"))
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        detail = first.get("msg", "invalid request")
        if first.get("type") == "missing":
            detail = "is required"
        message = f"{param}: {detail}" if param else f"invalid request body: {detail}"
        return error_response(APIError(400, message, param, "invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err: StarletteHTTPException):
        code = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        message = str(err.detail)
        if message == "There was an error parsing the body":  # FastAPI's: not UTF-8, nested too deeply, ...
            message = "the request body could not be parsed: send UTF-8 JSON of reasonable depth and numbers"
        return error_response(APIError(err.status_code, message, None, code.get(err.status_code)))

    @app.exception_handler(Exception)
    async def server_error(request, err: Exception):
        log.exception("unhandled error")
        return error_response(APIError(500, "internal server error", None, None, "server_error"))
