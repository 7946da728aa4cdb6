"""Sampling: logits (B, V) -> the next token ids (B,), batched, in this order:

    unknown ids: -inf for ids past the tokenizer's vocabulary (a model may pad its vocabulary)
    repetition penalty (CTRL): for tokens already seen, l -> l / r if l > 0 else l * r
    finite logits: NaN -> -inf (never drawn); a row holding +inf draws among its +inf entries
    temperature 0: argmax (greedy)
    l -> (l - max l) / T;  top-k: keep the k largest;  top-p (nucleus): keep the smallest set of
    most likely tokens whose total probability is >= p (the most likely token always stays)
    x ~ Multinomial(softmax(l)), drawn from a local `torch.Generator` when a seed is given.

Whatever the logits and options, the probabilities are finite, >= 0 and sum to 1: after the shift
the most likely token sits at exactly 0, so the softmax has a term exp(0) = 1 in every row, and a
tiny temperature (1e-40, 5e-324: below float32's smallest normal number, where l / T would
overflow or divide by zero) is clamped to that smallest normal, which leaves all the mass on the
most likely tokens: it acts as greedy. A row with no finite logit at all is drawn uniformly.

`Sampler` holds one sequence's (or one batch's) options and seeded generator; the token loop,
the server engine and speculative decoding all sample through it.

    >>> sampler = Sampler(SamplingOptions(temperature=0), torch.device("cpu"))
    >>> sampler(torch.tensor([[0.1, 2.0, -1.0]])).tolist()
    [1]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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


# below this, l / T overflows float32 (or T itself rounds to 0): such temperatures act as this one
MIN_TEMPERATURE = torch.finfo(torch.float32).tiny


def finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits with a finite maximum in every row: NaN -> -inf; a row holding +inf keeps only its +inf
    entries (as 0, the rest -inf); a row of only -inf (or NaN) becomes all 0 (uniform)."""
    if bool(logits.isfinite().all()):  # the usual case: one check instead of four passes
        return logits
    logits = logits.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    has_posinf = (logits == float("inf")).any(dim=-1, keepdim=True)
    if has_posinf.any():
        certain = torch.where(logits == float("inf"), 0.0, float("-inf"))
        logits = torch.where(has_posinf, certain, logits)
    nothing = (logits == float("-inf")).all(dim=-1, keepdim=True)
    if nothing.any():
        logits = logits.masked_fill(nothing, 0.0)
    return logits


def next_token_probs(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The sampling distribution (B, V) of float logits (B, V) at temperature > 0, after top-k and top-p:
    always finite, >= 0, each row summing to 1 (see the module docstring)."""
    logits = finite_logits(logits)
    shifted = logits - logits.amax(dim=-1, keepdim=True)  # max exactly 0, the rest <= 0 or -inf
    scaled = shifted / (temperature if temperature > MIN_TEMPERATURE else MIN_TEMPERATURE)  # nan: MIN too
    scaled = scaled.nan_to_num(nan=float("-inf"))  # -inf / inf
    if top_k is not None:
        scaled = top_k_filter(scaled, top_k)
    if top_p is not None and top_p < 1.0:
        scaled = top_p_filter(scaled, top_p)
    return torch.softmax(scaled, dim=-1)


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
        return finite_logits(logits).argmax(dim=-1)
    probs = next_token_probs(logits, temperature, top_k, top_p)
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
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise NanoseekError(f"temperature={self.temperature} must be a finite number >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise NanoseekError(f"top_k={self.top_k} must be >= 1 (or None for no limit)")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise NanoseekError(f"top_p={self.top_p} must be in (0, 1]")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise NanoseekError(f"repetition_penalty={self.repetition_penalty} must be a finite number > 0 (1 = off)")

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
    logits: torch.Tensor,
    samplers: Sequence[Sampler],
    seen: Sequence[torch.Tensor | None] | None = None,
    on_error: Callable[[int, Exception], None] | None = None,
) -> list[int | None]:
    """One token per row of `logits` (B, V), row i by `samplers[i]` (seen ids `seen[i]`, (1, T)):
    the greedy rows in one argmax; the sampled rows that share temperature, top-k and top-p (and
    have no repetition penalty) in one batch, each drawn with its own generator (`exponential_like`, row by row);
    the others one by one. Every row gets the token its sampler would draw alone (tested). The rows share the
    first sampler's tokenizer (one server, one tokenizer). With `on_error`, a row whose sampling
    raises gets None and `on_error(i, error)`; the other rows (and their generators) are untouched
    by it."""
    if not samplers:
        return []
    masked = mask_unknown_ids(logits, samplers[0].tokenizer)
    tokens: list[int | None] = [None] * len(samplers)
    greedy = [i for i, sampler in enumerate(samplers) if sampler.greedy]
    if greedy:  # one argmax (of every row when all are greedy: no gather)
        rows = masked if len(greedy) == len(samplers) else masked[greedy]
        for i, token in zip(greedy, finite_logits(rows.float()).argmax(-1).tolist()):
            tokens[i] = token
    batches: dict[tuple, list[int]] = {}
    alone = []
    for i, sampler in enumerate(samplers):
        o = sampler.options
        if sampler.greedy:
            continue
        if o.repetition_penalty == 1.0 and o.temperature > 0:
            batches.setdefault((o.temperature, o.top_k, o.top_p), []).append(i)
        else:
            alone.append(i)

    def failed(i: int, error: Exception) -> None:
        if on_error is None:
            raise error
        on_error(i, error)
        tokens[i] = None

    for (temperature, top_k, top_p), rows in batches.items():
        try:
            batch = masked if len(rows) == len(samplers) else masked[rows]
            probs = next_token_probs(batch.float(), temperature, top_k, top_p)
        except Exception:  # nothing drawn yet: let each row meet its own trouble alone
            alone += rows
            continue
        noise = torch.empty_like(probs)  # row j: its Exp(1) draws, from the row's own generator
        kept = []
        for j, (i, row) in enumerate(zip(rows, noise)):
            try:
                row.exponential_(1, generator=samplers[i].generator)
                kept.append(j)
            except Exception as e:
                failed(i, e)
        if kept:
            every = len(kept) == len(rows)
            drawn = (probs / noise if every else probs[kept] / noise[kept]).argmax(-1).tolist()
            for j, token in zip(kept, drawn):
                tokens[rows[j]] = token
    for i in sorted(alone):
        try:
            tokens[i] = int(samplers[i](logits[i : i + 1], None if seen is None else seen[i])[0])
        except Exception as e:
            failed(i, e)
    return tokens


def exponential_like(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """q ~ Exp(1) shaped like one row of probabilities, from `generator`. For one sample,
    `torch.multinomial(p, 1, generator=g)` is argmax_x p_x / q_x with q drawn exactly so (the
    Gumbel-max trick, exponentiated), so dividing a batch of rows by each row's own q and taking the
    argmax draws, row by row, the token multinomial would (tested)."""
    return torch.empty_like(probs).exponential_(1, generator=generator)
