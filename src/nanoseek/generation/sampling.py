"""Sampling: logits (B, V) -> the next token ids (B,), batched, in this order:

    unknown ids: -inf for ids past the tokenizer's vocabulary (a model may pad its vocabulary)
    repetition penalty (CTRL): for tokens already seen, l -> l / r if l > 0 else l * r
    temperature 0: argmax (greedy)
    l -> l / T;  top-k: keep the k largest;  top-p (nucleus): keep the smallest set of most
    likely tokens whose total probability is >= p (the most likely token always stays)
    x ~ Multinomial(softmax(l)), drawn from a local `torch.Generator` when a seed is given.

`Sampler` holds one sequence's (or one batch's) options and seeded generator; the token loop,
the server engine and speculative decoding all sample through it.

    >>> sampler = Sampler(SamplingOptions(temperature=0), torch.device("cpu"))
    >>> sampler(torch.tensor([[0.1, 2.0, -1.0]])).tolist()
    [1]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nanoseek.errors import NanoseekError


def apply_repetition_penalty(logits: torch.Tensor, recent_tokens: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """CTRL penalty: divide positive logits of seen tokens by `penalty`, multiply negative ones."""
    if penalty == 1.0 or recent_tokens is None or recent_tokens.numel() == 0:
        return logits
    seen = logits.gather(-1, recent_tokens)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, recent_tokens, seen)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf."""
    k = min(k, logits.shape[-1])
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability sums to >= p; -inf the rest."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False  # the most likely token always stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    recent_tokens: torch.Tensor | None = None,
    repetition_penalty: float = 1.0,
) -> torch.Tensor:
    """Next token ids (B,) int64 from logits (B, V); temperature 0 is greedy."""
    logits = apply_repetition_penalty(logits.float(), recent_tokens, repetition_penalty)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def mask_unknown_ids(logits: torch.Tensor, tokenizer) -> torch.Tensor:
    """-inf for ids at or past the tokenizer's vocabulary (a model may pad its vocabulary)."""
    size = getattr(tokenizer, "vocab_size", None)
    if isinstance(size, int) and size < logits.shape[-1]:
        logits = logits.clone()
        logits[..., size:] = float("-inf")
    return logits


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        if self.temperature < 0:
            raise NanoseekError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise NanoseekError(f"top_k={self.top_k} must be >= 1 (or None for no limit)")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise NanoseekError(f"top_p={self.top_p} must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise NanoseekError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 = off)")

    def make_generator(self, device: torch.device) -> torch.Generator | None:
        """A local generator seeded with `seed`; None (the global RNG) when there is no seed."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


class Sampler:
    """Logits -> next token for one sequence, or a batch of rows sharing its options: the options
    (validated here), their seeded generator, and the tokenizer whose unknown ids are never sampled."""

    def __init__(self, options: SamplingOptions, device: torch.device, tokenizer=None):
        options.validate()
        self.options = options
        self.tokenizer = tokenizer
        self.generator = options.make_generator(device)

    @property
    def greedy(self) -> bool:
        """Whether the choice is the argmax of the masked logits, whatever was seen before."""
        return self.options.temperature == 0 and self.options.repetition_penalty == 1.0

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """Next ids (B,) from logits (B, V); `seen` (B, T): the ids the repetition penalty acts on."""
        if self.tokenizer is not None:
            logits = mask_unknown_ids(logits, self.tokenizer)
        o = self.options
        return sample_next(
            logits,
            o.temperature,
            o.top_k,
            o.top_p,
            self.generator,
            recent_tokens=seen,
            repetition_penalty=o.repetition_penalty,
        )


def sample_rows(
    logits: torch.Tensor, samplers: Sequence[Sampler], seen: Sequence[torch.Tensor | None] | None = None
) -> list[int]:
    """One token per row of `logits` (B, V), row i by `samplers[i]` (seen ids `seen[i]`, (1, T)):
    the greedy rows in one argmax, the others each with its own options and generator. The rows
    share the first sampler's tokenizer (one server, one tokenizer)."""
    if not samplers:
        return []
    tokens = mask_unknown_ids(logits, samplers[0].tokenizer).argmax(dim=-1).tolist()
    for i, sampler in enumerate(samplers):
        if not sampler.greedy:
            tokens[i] = int(sampler(logits[i : i + 1], None if seen is None else seen[i])[0])
    return tokens
