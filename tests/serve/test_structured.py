"""response_format: constrained decoding makes every reply valid JSON under the schema, whatever the model."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("xgrammar")
httpx = pytest.importorskip("httpx")

from nanoseek.serve.protocol import APIError, ResponseFormat  # noqa: E402
from nanoseek.serve.structured import (  # noqa: E402
    StructuredOutput,
    inline_single_allof,
    json_schema_of,
    refused_features,
)

SCHEMA = {  # its longest reply is 67 tokens (4 characters of 4 byte tokens in the name), so 70 always fit
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 4, "description": "who"},
        "age": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "null"}]},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age", "ok", "tags"],
    "additionalProperties": False,
}


def valid(value, schema=SCHEMA) -> bool:
    """Validation by jsonschema where it is installed, else by this check of the keywords SCHEMA uses."""
    try:
        import jsonschema
    except ImportError:
        return small_check(value, schema)
    return jsonschema.Draft202012Validator(schema).is_valid(value)


def small_check(v, s) -> bool:
    if "anyOf" in s:
        return any(small_check(v, sub) for sub in s["anyOf"])
    if "const" in s:
        return v == s["const"]
    if "enum" in s:
        return v in s["enum"]
    kind = s["type"]
    if kind == "null":
        return v is None
    if kind == "boolean":
        return isinstance(v, bool)
    if kind == "integer":
        return isinstance(v, int) and not isinstance(v, bool) and s["minimum"] <= v <= s["maximum"]
    if kind == "string":
        return isinstance(v, str) and len(v) <= s["maxLength"]
    if kind == "array":
        return isinstance(v, list) and len(v) <= s["maxItems"] and all(small_check(x, s["items"]) for x in v)
    props = s["properties"]
    return (
        isinstance(v, dict)
        and set(s["required"]) <= set(v) <= set(props)
        and all(small_check(x, props[k]) for k, x in v.items())
    )


# ---------------------------------------------------------------------------- the schema check


def test_unenforceable_keywords_are_named_with_their_place():
    schema = {
        "type": "object",
        "properties": {"a": {"type": "array", "uniqueItems": True}, "b": {"not": {"type": "string"}}},
        "if": {"required": ["a"]},
        "$defs": {"n": {"type": "number", "multipleOf": 0.5}},
    }
    found = refused_features(schema)
    assert found == [
        "'if' at #",
        "'uniqueItems' at #/properties/a",
        "'not' at #/properties/b",
        "'multipleOf' on a non-integer at #/$defs/n",
    ]
    assert refused_features(SCHEMA) == []
    with pytest.raises(APIError) as err:
        json_schema_of(ResponseFormat(type="json_schema", json_schema={"name": "x", "schema": schema}))
    assert err.value.status == 400 and "uniqueItems" in err.value.message and "#/properties/b" in err.value.message


def test_a_single_allof_is_inlined():
    schema = {"properties": {"x": {"allOf": [{"$ref": "#/$defs/X"}], "description": "d"}}}
    assert inline_single_allof(schema) == {"properties": {"x": {"$ref": "#/$defs/X", "description": "d"}}}
    assert refused_features({"allOf": [{"type": "string"}, {"maxLength": 2}]}) == ["'allOf' with 2 subschemas at #"]


# ---------------------------------------------------------------------------- the constraint, any tokenizer


def constrained_text(structured, compiled, tokenizer, seed: int, budget: int) -> str:
    """Sample from random logits under the constraint, as the engine does."""
    constraint = structured.constraint(compiled)
    g = torch.Generator().manual_seed(seed)
    ids = []
    for left in range(budget, 0, -1):
        logits = constraint.mask(torch.randn(structured.vocab_size, generator=g) * 3, left)
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
        constraint.accept(token)
        if token == tokenizer.eos_id:
            break
        ids.append(token)
    return tokenizer.decode(ids)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_random_logits_always_give_valid_json(kind, tmp_path):
    from nanoseek.data.tokenizer import BPETokenizer, CharTokenizer

    text = 'The {"name": "Ann", "tags": ["red"]} of 12 cats, true or null.\n' * 20
    if kind == "char":
        tokenizer = CharTokenizer.train([text])
    else:
        (tmp_path / "corpus.txt").write_text(text)
        tokenizer = BPETokenizer.train([str(tmp_path / "corpus.txt")], vocab_size=300)
    structured = StructuredOutput(tokenizer, tokenizer.vocab_size + 7)  # a padded model vocabulary
    schema_grammar = structured.compile(SCHEMA)
    object_grammar = structured.compile({"type": "object"})
    for seed in range(10):
        assert valid(json.loads(constrained_text(structured, schema_grammar, tokenizer, seed, 80)))
        assert isinstance(json.loads(constrained_text(structured, object_grammar, tokenizer, seed, 40)), dict)


# ---------------------------------------------------------------------------- a random model


def test_twenty_schema_replies_from_a_random_model_all_validate(local):
    """20 sampled replies (20 seeds) decoded together by the engine, each under the schema."""
    import threading

    from nanoseek.generation import SamplingOptions
    from nanoseek.serve.engine import Engine, Sequence

    model, tokenizer = local
    structured = StructuredOutput(tokenizer, model.config.vocab_size)
    compiled = structured.compile(SCHEMA)
    engine = Engine(model, tokenizer, max_batch=20, max_queue=0)
    texts, done = [[] for _ in range(20)], [threading.Event() for _ in range(20)]

    def emit(i):
        return lambda e: (texts[i].append(e.text), e.finish_reason and done[i].set())

    prompt = tokenizer.encode("User: Who?\nAssistant:")
    seqs = [Sequence(prompt, 70, SamplingOptions(seed=seed), emit(seed), index=seed) for seed in range(20)]
    for seq in seqs:
        seq.constraint = structured.constraint(compiled)
    engine.start()
    try:
        engine.submit(seqs)
        assert all(d.wait(120) for d in done)
    finally:
        engine.stop()
    replies = ["".join(t) for t in texts]
    assert len(set(replies)) == 20
    assert all(valid(json.loads(reply)) for reply in replies)


# ---------------------------------------------------------------------------- over HTTP


def test_schema_replies_over_http(server):
    body = {
        "model": "tiny-chat",
        "messages": [{"role": "user", "content": "Who?"}],
        "max_tokens": 70,
        "n": 4,
        "seed": 3,
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
    }
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert all(valid(json.loads(c["message"]["content"])) for c in r.json()["choices"])


def test_json_object_mode_and_refusals(server):
    body = {"model": "tiny-chat", "prompt": "{", "max_tokens": 30, "n": 4, "seed": 7}
    r = httpx.post(
        server.url + "/v1/completions", json={**body, "response_format": {"type": "json_object"}}, timeout=120
    )
    assert all(isinstance(json.loads(c["text"]), dict) for c in r.json()["choices"])
    bad = {"type": "json_schema", "json_schema": {"schema": {"type": "array", "contains": {"const": 1}}}}
    r = httpx.post(server.url + "/v1/completions", json={**body, "response_format": bad}, timeout=30)
    assert r.status_code == 400 and "'contains' at #" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "response_format"
    bad = {"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "(?<=a)b"}}}
    r = httpx.post(server.url + "/v1/completions", json={**body, "response_format": bad}, timeout=30)
    assert r.status_code == 400 and "cannot be compiled" in r.json()["error"]["message"]
