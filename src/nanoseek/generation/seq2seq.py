"""From a source text to its target text, with either architecture: greedy or beam search (beam.py).

An encoder-decoder encodes the source once, projects it to every layer's cross-attention keys and values
once, and then decodes from <bos> against its self-attention cache. A decoder-only model trained on the
pair layout of data/pairs.py reads `source <bos>` as its prompt (prefilled once) and writes the target after
it. Both end a target at <eos>. Each is a `beam.Decoder` over rows = sources x beams; beam search moves the
self-attention cache rows with the hypotheses they belong to (`select_rows` of model/kv_cache.py).

`translate` batches sources of one token length together (a decoder-only prompt then needs no padding;
an encoder-decoder would take padded sources through its key mask just as well).

    >>> from nanoseek.config import ModelConfig
    >>> from nanoseek.data.tokenizer import CharTokenizer
    >>> from nanoseek.model import make_model
    >>> tok = CharTokenizer("0123456789")
    >>> model = make_model(ModelConfig.from_preset("vaswani-tiny-ed", vocab_size=tok.vocab_size)).eval()
    >>> len(translate(model, tok, ["3141", "59"], beam_size=2, max_new_tokens=3))
    2
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nanoseek.data.pairs import encode_texts
from nanoseek.errors import NanoseekError
from nanoseek.generation.beam import Hypothesis, beam_search, greedy_search
from nanoseek.generation.steps import decode_step, prefill


def is_encoder_decoder(model) -> bool:
    return getattr(model.config, "architecture", "decoder") == "encoder_decoder"


class EncoderDecoderSteps:
    """beam.Decoder over an encoder-decoder: `rows` rows per source, decoding from <bos> at position 0."""

    def __init__(
        self,
        model,
        source_ids: torch.Tensor,
        rows: int,
        max_len: int,
        bos_id: int,
        source_mask: torch.Tensor | None = None,
    ):
        self.model = model
        memory = model.encode(source_ids, source_mask)
        self.memory = memory.repeat_rows(rows) if rows > 1 else memory
        n = source_ids.shape[0] * rows
        self.cache = model.make_cache(n, max_len)
        self.bos = torch.full((n, 1), bos_id, dtype=torch.long, device=source_ids.device)
        self.pos = 0

    def first(self) -> torch.Tensor:
        return self.model(None, self.bos, memory=self.memory, cache=self.cache, start=0).logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.pos += 1
        return self.model(None, tokens[:, None], memory=self.memory, cache=self.cache, start=self.pos).logits[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        for layer_cache in self.cache:  # the memory is the same for every row of a source: it stays
            layer_cache.select_rows(index)


class DecoderOnlySteps:
    """beam.Decoder over a decoder-only model: prompts (B, P) of one length, `rows` rows per prompt."""

    def __init__(self, model, prompt_ids: torch.Tensor, rows: int, max_len: int):
        self.model = model
        self.prompt = prompt_ids.repeat_interleave(rows, dim=0)
        self.cache = model.make_cache(self.prompt.shape[0], prompt_ids.shape[1] + max_len)
        self.pos = prompt_ids.shape[1] - 1

    def first(self) -> torch.Tensor:
        return prefill(self.model, self.prompt, self.cache)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.pos += 1
        return decode_step(self.model, tokens[:, None], self.cache, self.pos)

    def reorder(self, index: torch.Tensor) -> None:
        for layer_cache in self.cache:
            layer_cache.select_rows(index)


def make_decoder(model, tok, source_ids: torch.Tensor, rows: int, max_len: int):
    """The beam.Decoder of `model` for sources (B, S) of one length."""
    if is_encoder_decoder(model):
        return EncoderDecoderSteps(model, source_ids, rows, max_len, tok.bos_id)
    sep = torch.full((source_ids.shape[0], 1), tok.bos_id, dtype=torch.long, device=source_ids.device)
    return DecoderOnlySteps(model, torch.cat([source_ids, sep], dim=1), rows, max_len)


def target_room(model, source_len: int, max_new_tokens: int | None) -> int:
    """Tokens a target may have: `max_new_tokens` (default 2 * source + 10), within the model's context."""
    context = model.config.max_position_embeddings
    room = context if is_encoder_decoder(model) else context - source_len - 1
    if source_len > context or room < 1:
        raise NanoseekError(f"a source of {source_len} tokens does not fit the model's context of {context} tokens")
    return min(room, max_new_tokens or 2 * source_len + 10)


@torch.no_grad()
def search(
    model,
    tok,
    sources: Sequence[Sequence[int]],
    beam_size: int = 1,
    length_penalty: float = 0.6,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
) -> list[list[Hypothesis]]:
    """Each source's finished hypotheses, best first: the greedy one (log P not computed: nan) when beam_size
    is 1, else beam search's."""
    if beam_size < 1:
        raise NanoseekError(f"beam size {beam_size} must be >= 1")
    if any(len(s) == 0 for s in sources):
        raise NanoseekError("a source is empty: give at least one token")
    device = next(model.parameters()).device
    by_length: dict[int, list[int]] = {}
    for i, s in enumerate(sources):
        by_length.setdefault(len(s), []).append(i)
    out: list[list[Hypothesis]] = [[] for _ in sources]
    for length, members in sorted(by_length.items()):
        max_len = target_room(model, length, max_new_tokens)
        for lo in range(0, len(members), batch_size):
            chunk = members[lo : lo + batch_size]
            ids = torch.tensor([list(sources[i]) for i in chunk], dtype=torch.long, device=device)
            decoder = make_decoder(model, tok, ids, beam_size, max_len)
            if beam_size == 1:
                found = [
                    [Hypothesis(t, float("nan"), float("nan"))]
                    for t in greedy_search(decoder, len(chunk), tok.eos_id, max_len)
                ]
            else:
                found = beam_search(decoder, len(chunk), beam_size, tok.eos_id, max_len, length_penalty)
            for i, hyps in zip(chunk, found):
                out[i] = hyps
    return out


def translate_ids(
    model,
    tok,
    sources: Sequence[Sequence[int]],
    beam_size: int = 1,
    length_penalty: float = 0.6,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
) -> list[list[int]]:
    """The best target ids of each source: greedy when beam_size is 1, else beam search."""
    found = search(model, tok, sources, beam_size, length_penalty, max_new_tokens, batch_size)
    return [hyps[0].tokens for hyps in found]


def translate(
    model,
    tok,
    sources: Sequence[str],
    beam_size: int = 1,
    length_penalty: float = 0.6,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
) -> list[str]:
    """The best target text of each source text (see `translate_ids`)."""
    ids = encode_texts(tok, list(sources))
    return [
        tok.decode(t) for t in translate_ids(model, tok, ids, beam_size, length_penalty, max_new_tokens, batch_size)
    ]
