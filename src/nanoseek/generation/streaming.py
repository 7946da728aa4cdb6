"""Text out of token ids: the one incremental detokenizer, stop strings, and text streams.

`Detokenizer` is the only place where token ids become text while generating (`TextStream`, the
server engine, `nanoseek sample` and `chat`, speculative decoding's text): token bytes go through an
incremental UTF-8 decoder (a character split over tokens waits for its last byte), and the last
`len(longest stop string) - 1` characters are held back until no stop string can start in them.
It also owns the finishing rule of a text sequence:

    "stop"    the tokenizer's eos arrived, or a stop string appeared (the text ends before it)
    "length"  `max_tokens` ids were pushed, or `finish()` was called before anything stopped it

    >>> from nanoseek import ModelConfig, Transformer
    >>> from nanoseek.data.tokenizer import CharTokenizer
    >>> tokenizer = CharTokenizer.train(["ROMEO: a rose by any other name"])
    >>> model = Transformer(ModelConfig.from_preset("gpt2-tiny").replace(vocab_size=tokenizer.vocab_size)).eval()
    >>> text, reason = complete(model, tokenizer, "ROMEO:", max_new_tokens=8, temperature=0)
    >>> reason
    'length'
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence

import torch

from nanoseek.errors import NanoseekError
from nanoseek.generation.compiled import DecodeOptions
from nanoseek.generation.loop import TokenLoop, as_batch, model_device, stop_id_list
from nanoseek.generation.sampling import SamplingOptions


class StopStringFilter:
    """Passes text through, holding back what could still become the start of a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add `text`; return (text proven safe, whether a stop string was found)."""
        self.pending += text
        cut = self._first_stop()
        if cut is not None:
            safe, self.pending = self.pending[:cut], ""
            return safe, True
        keep = len(self.pending) - self.hold
        if keep <= 0:
            return "", False
        safe, self.pending = self.pending[:keep], self.pending[keep:]
        return safe, False

    def flush(self) -> str:
        rest, self.pending = self.pending, ""
        return rest

    def _first_stop(self) -> int | None:
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else None


def check_stop_strings(stop: Sequence[str] | str | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if any(not isinstance(s, str) or not s for s in stops):
        raise NanoseekError(f"stop strings must be non-empty strings, got {stops!r}")
    return stops


class Detokenizer:
    """Token ids in, safe text out: never half a UTF-8 character, never a stop string.

    `push(id)` returns the text that became safe; the push that finishes the sequence (eos, a stop
    string, or the `max_tokens`-th id) also returns everything held back, and later pushes return
    "". `finish()` returns what is still held back (an incomplete character becomes
    U+FFFD) and sets `finish_reason` to "length" if nothing stopped the sequence. `tokens` counts
    the ids pushed until the sequence finished (the eos or stop-completing one included).
    """

    def __init__(self, tokenizer, stops: Sequence[str] = (), max_tokens: int | None = None):
        self.tokenizer = tokenizer
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop_filter = StopStringFilter(stops)
        self.max_tokens = max_tokens
        self.tokens = 0
        self.finish_reason: str | None = None

    def push(self, token_id: int) -> str:
        if self.finish_reason:
            return ""
        token_id = int(token_id)
        self.tokens += 1
        if token_id == self.eos_id:
            self.finish_reason = "stop"
            return self._drain()
        safe, stopped = self.stop_filter.push(self.utf8.decode(self.tokenizer.decode_bytes([token_id])))
        if stopped:
            self.finish_reason = "stop"
        elif self.max_tokens is not None and self.tokens >= self.max_tokens:
            self.finish_reason = "length"
            safe += self._drain()
        return safe

    def finish(self) -> str:
        if self.finish_reason:  # the finishing push drained everything
            return ""
        self.finish_reason = "length"
        return self._drain()

    def _drain(self) -> str:
        safe, stopped = self.stop_filter.push(self.utf8.decode(b"", final=True))
        if stopped:
            self.finish_reason = "stop"
            return safe
        return safe + self.stop_filter.flush()


class TextStream:
    """Iterate to get the completion of `prompt` as text pieces, as tokens are produced.

    Never yields half a UTF-8 character, nor a stop string or anything after it. When iteration
    ends, `finish_reason` is "stop" (eos or a stop string) or "length" (max_new_tokens reached) and
    `completion_tokens` counts the tokens sampled (the eos or stop-completing token included).
    `compile`, `compile_prefill`, `direct_calls` and `cuda_graphs` are `generate`'s.
    """

    def __init__(
        self,
        model,
        tokenizer,
        prompt: str,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        compile: bool = False,
        compile_prefill: bool = False,
        direct_calls: bool = True,
        cuda_graphs: bool = True,
    ):
        self.tokenizer = tokenizer
        self.stops = check_stop_strings(stop)
        prompt_ids = tokenizer.encode(prompt)
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        ids, _ = as_batch(prompt_ids, model_device(model, torch.device("cpu")))
        options = SamplingOptions(temperature, top_k, top_p, repetition_penalty, seed)
        self._loop = TokenLoop(
            model,
            ids,
            max_new_tokens,
            options,
            stop_id_list(tokenizer.eos_id, None),
            compile=compile,
            tokenizer=tokenizer,
            compile_prefill=compile_prefill,
            decode_options=DecodeOptions(direct_calls, cuda_graphs),
        )
        self._text = Detokenizer(tokenizer, self.stops, max_tokens=max_new_tokens)
        self._pieces = self._generate_pieces()

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop early; the model goes back to its previous train/eval mode."""
        self._pieces.close()

    def _generate_pieces(self) -> Iterator[str]:
        text = self._text
        tokens = iter(self._loop)
        try:
            for token in tokens:
                piece = text.push(token[0])
                self.completion_tokens = text.tokens
                if piece:
                    yield piece
                if text.finish_reason:
                    break
        finally:
            tokens.close()
        rest = text.finish()
        self.finish_reason = text.finish_reason
        if rest:
            yield rest


def complete(model, tokenizer, prompt: str, **options) -> tuple[str, str]:
    """The whole completion of `prompt` and its finish reason ("stop" or "length")."""
    stream = TextStream(model, tokenizer, prompt, **options)
    text = "".join(stream)
    return text, stream.finish_reason


def stream_past_context(
    model, tokenizer, prompt: str, max_new_tokens: int = 128, seed: int | None = None, **options
) -> Iterator[str]:
    """The text continuing `prompt`, `max_new_tokens` tokens of it even past the model's context.

    `TextStream` chunks: while the context has room, one stream; once it is full, generation starts
    again from the most recent half of the context (the text so far, re-encoded), so each chunk
    sees at most `context // 2` tokens of what came before. Chunk k is seeded with `seed + k`.
    It ends after `max_new_tokens` tokens or at the first "stop" (eos or a stop string in `options`).
    The prompt is checked (not empty, shorter than the context) here, before the first piece.
    """
    limit = model.config.max_position_embeddings
    n_prompt = len(tokenizer.encode(prompt))
    if n_prompt == 0:
        raise NanoseekError("the prompt is empty; give at least one character")
    if n_prompt >= limit:
        raise NanoseekError(f"the prompt is {n_prompt} tokens; the model's context is {limit} tokens")
    return _chunks(model, tokenizer, prompt, max_new_tokens, seed, limit, options)


def _chunks(
    model, tokenizer, prompt: str, max_new_tokens: int, seed: int | None, limit: int, options: dict
) -> Iterator[str]:
    context, remaining, chunk = prompt, max_new_tokens, 0
    while remaining > 0:
        ids = tokenizer.encode(context)
        if chunk and len(ids) > limit // 2:
            context = tokenizer.decode(ids[-(limit // 2) :])
            ids = tokenizer.encode(context)
        stream = TextStream(
            model,
            tokenizer,
            context,
            max_new_tokens=min(remaining, limit - len(ids)),
            seed=None if seed is None else seed + chunk,
            **options,
        )
        for piece in stream:
            context += piece
            yield piece
        remaining -= stream.completion_tokens
        chunk += 1
        if stream.finish_reason == "stop":
            return
