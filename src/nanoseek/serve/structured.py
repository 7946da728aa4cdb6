"""Structured output: `response_format` JSON by constrained decoding (xgrammar).

    {"type": "json_object"}                                  any JSON object
    {"type": "json_schema", "json_schema": {"schema": {...}}} JSON valid under the schema

The schema becomes a grammar (xgrammar compiles JSON Schema to a context-free grammar over the
tokenizer's vocabulary: each token is matched by its bytes, so the char tokenizer's byte-fallback
tokens and byte-level BPE tokens both work). While decoding, each constrained row's logits get

    logits[x] = -inf   for every token x the grammar cannot accept next

before sampling, and the sampled token advances the row's matcher. End-of-text is allowed only
where the JSON is complete, so a reply that ends is valid JSON whatever the model.

A weak model may never end it (a random one writes strings without end), and a reply cut by
max_tokens would be unfinished JSON. So when the tokens left (max_tokens or the context, whichever
ends first) come down to what closing takes (open strings, objects and arrays, counted as the
JSON is written, plus a margin), the constraint steers: of the tokens the grammar accepts, it keeps
the first of '"' inside a string, of end-of-text, '}', ']', '0', '"' outside (close what is open,
write the shortest value) and masks the rest. A reply closed that way is valid JSON but shortened by the budget: its
finish_reason is "length".
The output is compact (no whitespace between tokens: "," and ":" separators), and tokens holding
a control character (U+0000..U+001F) are never allowed: JSON needs none (strings escape them).

Schema keywords the grammar enforces are accepted; annotations (title, description, ...) are
ignored; any other keyword (not, oneOf, uniqueItems, if/then/else, ...) is refused with a 400 that
names each one and where it is, rather than generating output the schema would reject.
"""

from __future__ import annotations

import json
import os
import threading

import torch

from nanoseek.serve.protocol import APIError

# keywords the grammar enforces (multipleOf: integers only; allOf: one subschema only)
ENFORCED = {
    "type", "enum", "const", "anyOf", "allOf", "$ref", "$defs", "definitions",
    "properties", "required", "additionalProperties", "patternProperties", "propertyNames",
    "minProperties", "maxProperties",
    "items", "prefixItems", "minItems", "maxItems",
    "minLength", "maxLength", "pattern", "format",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
}  # fmt: skip
ANNOTATIONS = {
    "$schema", "$id", "$comment", "title", "description", "default", "examples",
    "deprecated", "readOnly", "writeOnly", "contentMediaType",
}  # fmt: skip
FORMATS = {"date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uri", "uuid"}
TYPES = {"string", "integer", "number", "boolean", "null", "object", "array"}
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")  # name -> subschema
SCHEMA_LISTS = ("anyOf", "allOf", "prefixItems")
SCHEMA_VALUES = ("additionalProperties", "items", "propertyNames")
CLOSERS = ("}", "]", "0", '"')  # steering to an end outside strings: close, else the shortest value
CLOSING_MARGIN = 4  # tokens beyond the open brackets: a key's ':' and value, the end-of-text token


def refused_features(schema, where: str = "#") -> list[str]:
    """Each keyword of `schema` (and its subschemas) the grammar cannot enforce, as 'keyword at path'."""
    if isinstance(schema, bool):
        return []
    if not isinstance(schema, dict):
        return [f"a non-object schema at {where}"]
    found = []
    for key, value in schema.items():
        if key not in ENFORCED and key not in ANNOTATIONS:
            found.append(f"'{key}' at {where}")
        elif key == "format" and value not in FORMATS:
            found.append(f"format {value!r} at {where} (enforced formats: {', '.join(sorted(FORMATS))})")
        elif key == "multipleOf" and schema.get("type") != "integer":
            found.append(f"'multipleOf' on a non-integer at {where}")
        elif key == "allOf" and (not isinstance(value, list) or len(value) != 1):
            found.append(f"'allOf' with {len(value) if isinstance(value, list) else 'no'} subschemas at {where}")
        elif key == "type":
            types = value if isinstance(value, list) else [value]
            found += [f"type {t!r} at {where}" for t in types if t not in TYPES]
    for key in SCHEMA_MAPS:
        for name, sub in (schema.get(key) or {}).items() if isinstance(schema.get(key), dict) else ():
            found += refused_features(sub, f"{where}/{key}/{name}")
    for key in SCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key) or []):
            found += refused_features(sub, f"{where}/{key}/{i}")
    for key in SCHEMA_VALUES:
        if key in schema:
            sub = schema[key]
            subs = sub if isinstance(sub, list) else [sub]  # items as a list: draft-4 tuples
            for i, s in enumerate(subs):
                found += refused_features(s, f"{where}/{key}" + (f"/{i}" if isinstance(sub, list) else ""))
    return found


def inline_single_allof(schema):
    """{"allOf": [S], ...annotations} -> S merged with the rest (what pydantic writes for a described
    field); the grammar compiler does not read allOf."""
    if isinstance(schema, list):
        return [inline_single_allof(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: inline_single_allof(sub) for name, sub in value.items()}
        elif key in SCHEMA_LISTS or key in SCHEMA_VALUES:
            out[key] = inline_single_allof(value)
        else:
            out[key] = value
    if "allOf" in out and len(out["allOf"]) == 1 and isinstance(out["allOf"][0], dict):
        (only,) = out.pop("allOf")
        out = {**only, **out}
    return out


def json_schema_of(response_format) -> dict | None:
    """The schema a response_format asks for ({"type": "object"} for json_object), None for text."""
    kind = response_format.type
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    spec = response_format.json_schema or {}
    schema = spec.get("schema", spec.get("json_schema")) if isinstance(spec, dict) else None
    if not isinstance(schema, (dict, bool)):
        raise APIError(400, "response_format.json_schema.schema is required: a JSON Schema object", "response_format")
    refused = refused_features(schema)
    if refused:
        raise APIError(
            400,
            "response_format: the JSON schema uses features that constrained decoding cannot enforce: "
            + "; ".join(refused),
            "response_format",
            "unsupported_schema",
        )
    return inline_single_allof(schema) if isinstance(schema, dict) else {}


class StructuredOutput:
    """One server's grammar machinery: the vocabulary as xgrammar sees it and a grammar compiler
    (with its cache of compiled schemas)."""

    def __init__(self, tokenizer, vocab_size: int):
        try:
            import xgrammar
        except ImportError as e:
            raise APIError(
                400,
                f"response_format needs the xgrammar package (pip install 'nanoseek[serve]'): {e}",
                "response_format",
                "unsupported_parameter",
            ) from None
        self.xgr = xgrammar
        vocab = [tokenizer.decode_bytes([i]) for i in range(tokenizer.vocab_size)]
        self.info = xgrammar.TokenizerInfo(
            vocab, vocab_type=xgrammar.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=[tokenizer.eos_id]
        )
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=min(8, os.cpu_count() or 1))
        self.vocab_size = vocab_size
        self.control = torch.zeros(vocab_size, dtype=torch.bool)
        self.control[[i for i, b in enumerate(vocab) if any(c < 0x20 for c in b)]] = True
        closers = [tokenizer.encode(c) for c in CLOSERS]
        self.closers = [tokenizer.eos_id] + [ids[0] for ids in closers if len(ids) == 1]
        self.quote = self.closers[-1:]  # inside a string, only '"' ends it
        self.token_bytes = vocab
        self.lock = threading.Lock()

    def compile(self, schema: dict):
        """The compiled grammar of `schema` (400 naming the problem if xgrammar refuses it)."""
        try:
            with self.lock:
                return self.compiler.compile_json_schema(
                    json.dumps(schema), any_whitespace=False, separators=(",", ":"), strict_mode=True
                )
        except Exception as e:  # xgrammar raises RuntimeError/ValueError with its parser's message
            message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise APIError(
                400, f"response_format: the JSON schema cannot be compiled: {message}", "response_format"
            ) from None

    def constraint(self, compiled) -> Constraint:
        return Constraint(self, compiled)


class Constraint:
    """One sequence's grammar state: masks its logits, advances with each sampled token."""

    def __init__(self, structured: StructuredOutput, compiled):
        xgr = structured.xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, structured.vocab_size)
        self.control = structured.control
        self.vocab_size = structured.vocab_size
        self.closers, self.quote, self.token_bytes = structured.closers, structured.quote, structured.token_bytes
        self.shifts = torch.arange(32, dtype=torch.int32)
        self.depth, self.in_string, self.escaped = 0, False, False  # what closing the JSON takes
        self.steered = False

    def closing_cost(self) -> int:
        """Tokens that closing the JSON written so far takes, at most (one per open bracket or string)."""
        return self.depth + self.in_string + CLOSING_MARGIN

    def track(self, token: int) -> None:
        """Follow strings and brackets through the token's bytes."""
        data = self.token_bytes[token] if token < len(self.token_bytes) else b""
        for c in data:
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == 0x5C:  # backslash
                    self.escaped = True
                elif c == 0x22:  # quote
                    self.in_string = False
            elif c == 0x22:
                self.in_string = True
            elif c in (0x7B, 0x5B):  # { [
                self.depth += 1
            elif c in (0x7D, 0x5D):  # } ]
                self.depth -= 1

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens the grammar accepts next (control-character tokens excluded)."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        bits = (self.bitmask[0].unsqueeze(-1) >> self.shifts) & 1  # bit j of word w: token 32w + j
        allowed = bits.flatten()[: self.vocab_size].bool()
        without_control = allowed & ~self.control
        return without_control if without_control.any() else allowed

    def mask(self, logits: torch.Tensor, tokens_left: int | None = None) -> torch.Tensor:
        """logits (V,) with -inf for the tokens the grammar does not accept next (and, with few
        `tokens_left`, for all but the first closer it accepts)."""
        allowed = self.allowed()
        if tokens_left is not None and tokens_left <= self.closing_cost():
            closer = next((t for t in (self.quote if self.in_string else self.closers) if allowed[t]), None)
            if closer is not None:
                allowed = torch.zeros_like(allowed)
                allowed[closer] = True
                self.steered = True
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        if not self.matcher.is_terminated():
            self.matcher.accept_token(int(token))
            self.track(int(token))
