"""Log-probabilities of tokens, for `logprobs`/`echo` (completions) and `logprobs`/`top_logprobs` (chat).

The log-probability of token x at position t is the model's own distribution, before temperature,
top-p or a response_format mask change it (vLLM's "raw" logprobs):

    logprob_t(x) = log_softmax(logits_{t-1})[x]        logits_{t-1}: the model's output at position t-1

computed in fp32. A prompt's first token has no context, so its logprob is None (null). Each
recorded position keeps the chosen token's logprob and the N most likely tokens with theirs;
`completion_logprobs` and `chat_logprobs` lay them out in the legacy completions shape
(`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) and in OpenAI's chat shape
(`content: [{token, logprob, bytes, top_logprobs}]`).

A token's text is its bytes decoded as UTF-8; a token that is not whole UTF-8 on its own (a byte
of a multi-byte character) is written with \\x escapes, so that different tokens get different
strings; special tokens are written by their names (`<|eos|>`).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20  # top-N per position, as vLLM's default limit
FLOOR = -9999.0  # JSON has no -inf: a logprob of -inf is sent as this (as vLLM and OpenAI do)


@dataclass
class TokenLogprob:
    """One position: the token, its logprob (None for a prompt's first token), the top-N, best first."""

    id: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


def position_logprobs(logits: torch.Tensor, chosen: list[int], top_n: int) -> list[TokenLogprob]:
    """Rows of `logits` (R, V) and the token chosen at each row -> one TokenLogprob per row."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(chosen, device=lp.device).unsqueeze(-1)
    chosen_lp = lp.gather(-1, ids)[:, 0].tolist()
    top_n = min(top_n, lp.shape[-1])
    if top_n:
        values, indices = lp.topk(top_n, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    else:
        tops = [[] for _ in chosen]
    return [TokenLogprob(c, v, t) for c, v, t in zip(chosen, chosen_lp, tops)]


def prefill_with_prompt_logprobs(model, ids: list[int], cache: list, top_n: int):
    """Prefill `ids` into `cache` keeping every position's logits: (the last logits (1, V), the
    prompt's TokenLogprobs, the first with logprob None)."""
    tokens = torch.tensor([ids], device=next(model.parameters()).device)
    logits = model(tokens, cache=cache, start=0).logits[0]  # (P, V)
    entries = [TokenLogprob(ids[0], None)] + position_logprobs(logits[:-1], ids[1:], top_n)
    return logits[-1:], entries


# ---------------------------------------------------------------------------- token strings


def special_names(tokenizer) -> dict[int, str]:
    """Special token id -> its name, as the tokenizer file spells it."""
    from nanoseek.data.tokenizer import SPECIAL_TOKENS

    hf = getattr(tokenizer, "_hf", None)  # a BPE tokenizer's own names (a checkpoint may use others)
    names = {}
    for name, token_id in zip(SPECIAL_TOKENS, (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)):
        names.setdefault(token_id, (hf.id_to_token(token_id) if hf is not None else None) or name)
    return names


class TokenStrings:
    """Token id -> the string a response shows for it (cached)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.specials = special_names(tokenizer)
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            if token_id in self.specials:
                text = self.specials[token_id]
            elif token_id >= self.tokenizer.vocab_size:  # a model's padded vocabulary
                text = f"<|unused_{token_id}|>"
            else:
                text = self.tokenizer.decode_bytes([token_id]).decode("utf-8", "backslashreplace")
            self.cache[token_id] = text
        return text

    def raw_bytes(self, token_id: int) -> list[int]:
        """The token's own bytes (a special token's: its name's)."""
        if token_id in self.specials or token_id >= self.tokenizer.vocab_size:
            return list(self(token_id).encode("utf-8"))
        return list(self.tokenizer.decode_bytes([token_id]))


def clamp(logprob: float) -> float:
    return max(logprob, FLOOR)


# ---------------------------------------------------------------------------- response shapes


class TextOffsets:
    """Character offsets of tokens in the text they decode to: a token's offset is the number of
    whole characters before its first byte (a token inside a multi-byte character gets that
    character's offset)."""

    def __init__(self, tokenizer, start: int = 0):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.chars = start

    def push(self, token_id: int) -> int:
        offset = self.chars
        if token_id < self.tokenizer.vocab_size:
            self.chars += len(self.utf8.decode(self.tokenizer.decode_bytes([token_id])))
        return offset


def completion_logprobs(entries: list[TokenLogprob], strings: TokenStrings, offsets: TextOffsets) -> dict:
    """The legacy completions `logprobs` object. `top_logprobs[i]` maps token strings to logprobs:
    the chosen token and the top-N (tokens with the same string keep the larger logprob)."""
    out = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for e in entries:
        out["tokens"].append(strings(e.id))
        out["text_offset"].append(offsets.push(e.id))
        if e.logprob is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(clamp(e.logprob))
        top: dict[str, float] = {}
        for token_id, lp in [(e.id, e.logprob), *e.top]:
            key = strings(token_id)
            top[key] = max(top.get(key, FLOOR), clamp(lp))
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(entries: list[TokenLogprob], strings: TokenStrings, top_n: int) -> dict:
    """OpenAI's chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}], "refusal"}."""

    def item(token_id: int, lp: float) -> dict:
        return {"token": strings(token_id), "logprob": clamp(lp), "bytes": strings.raw_bytes(token_id)}

    content = [{**item(e.id, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top[:top_n]]} for e in entries]
    return {"content": content, "refusal": None}
