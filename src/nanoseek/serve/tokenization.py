"""The tokenizer over HTTP, as vLLM serves it: POST /tokenize, POST /detokenize, GET /tokenizer_info.

    /tokenize       {"prompt": str} or {"messages": [...]}  ->  {"count", "max_model_len", "tokens",
                    "token_strs"}: the ids /v1/completions (or /v1/chat/completions) feeds the model
    /detokenize     {"tokens": [int]}  ->  {"prompt": str}
    /tokenizer_info the tokenizer's configuration, as a tokenizer_config.json holds it
                    (tokenizer_class, bos/eos/pad token names, model_max_length, chat_template)

nanoseek adds no special token to a prompt (a text prompt is its text's tokens, and a special
token's name typed in a prompt stays text), so `add_special_tokens` changes nothing. One exception
lets clients look special ids up by name, as lm-evaluation-harness does: a /tokenize prompt that is
exactly one special token's name (as /tokenizer_info gives it) is that token's id.
"""

from __future__ import annotations

from nanoseek.serve.logprobs import TokenStrings, special_names
from nanoseek.serve.protocol import APIError, DetokenizeRequest, TokenizeRequest


def tokenizer_info(service) -> dict:
    tokenizer = service.tokenizer
    names = special_names(tokenizer)
    info = {
        "tokenizer_class": f"nanoseek.{type(tokenizer).__name__}",
        "bos_token": names[tokenizer.bos_id],
        "eos_token": names[tokenizer.eos_id],
        "pad_token": names[tokenizer.pad_id],
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "add_bos_token": False,
        "add_eos_token": False,
        "vocab_size": tokenizer.vocab_size,
        "model_max_length": service.context,
    }
    if service.template["template"]:
        info["chat_template"] = service.template["template"]
    return info


def install_tokenizer_routes(app, service) -> None:
    names = {name: token_id for token_id, name in special_names(service.tokenizer).items()}
    strings = TokenStrings(service.tokenizer)

    def check_model(name: str | None) -> None:
        if name is not None:
            service.check_model(name)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt (a text) or messages (a chat), not both", "prompt")
        if body.messages is not None:
            role = {"developer": "system"}
            messages = [{"role": role.get(m.role, m.role), "content": m.text()} for m in body.messages]
            text = await service.chat_template.render(messages, body.add_generation_prompt)  # off the event loop
            ids = service.tokenizer.encode(text)
        elif body.prompt in names:
            ids = [names[body.prompt]]
        else:
            ids = service.tokenizer.encode(body.prompt)
        return {
            "count": len(ids),
            "max_model_len": service.context,
            "tokens": ids,
            "token_strs": [strings(i) for i in ids] if body.return_token_strs else None,
        }

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        size = service.tokenizer.vocab_size
        bad = [i for i in body.tokens if not 0 <= i < size]
        if bad:
            raise APIError(400, f"tokens holds ids outside 0..{size - 1}: {bad[:5]}", "tokens")
        return {"prompt": service.tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def get_tokenizer_info():
        return tokenizer_info(service)
