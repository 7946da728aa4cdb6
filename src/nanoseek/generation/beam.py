"""Greedy decoding and beam search over any model that scores the next token of many rows at once.

A `Decoder` (the protocol below) holds a model's state for N rows (its KV cache, an encoder's memory)
and returns the next-token logits of every row: `first()` before any token is chosen, `step(tokens)` after
feeding the tokens chosen. Beam search also calls `reorder(index)`: row i continues row index[i]'s
hypothesis, whose cache it takes over. generation/seq2seq.py has the decoders of both architectures.

Beam search, batched: B sources with K beams each are the B*K rows of one decoder, so each step is one
model call. A hypothesis Y is scored with the length penalty of Wu et al. 2016 (GNMT):

    score(Y) = log P(Y | X) / lp(Y),   lp(Y) = ((5 + |Y|) / 6)^alpha     (|Y| counts <eos>; alpha = 0: none)

Each step extends every live hypothesis by every token (K x V candidates per source) and keeps the 2K best
by log P; those among the K best that end in <eos> join the source's finished list (as in fairseq; so K = 1
is greedy), the best K others live on. A source is
done when it has K finished hypotheses and no live one can still beat the K-th best of them: log P only
falls as a hypothesis grows, so a live one's best reachable score is log P / lp at the length where lp is
largest (max_len for alpha > 0). With that bound the search is exact once K covers every hypothesis (the
tests check it against brute force). At max_len the live hypotheses are finished as they stand.

Greedy decoding takes the argmax at every step: beam search with K = 1 and alpha = 0 returns the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class Decoder(Protocol):
    def first(self) -> torch.Tensor:
        """Logits (N, V) of every row's first token."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens (N,), one per row; logits (N, V) of the next."""

    def reorder(self, index: torch.Tensor) -> None:
        """Row i continues from row index[i]'s state."""


@dataclass
class Hypothesis:
    tokens: list[int]  # without <eos>
    log_prob: float
    score: float  # log_prob / lp(length)


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's lp(Y) = ((5 + |Y|) / 6)^alpha."""
    return ((5 + length) / 6) ** alpha


@torch.no_grad()
def greedy_search(decoder: Decoder, batch: int, eos_id: int, max_len: int) -> list[list[int]]:
    """The argmax token at every step, for `batch` rows, until each has written <eos> or max_len tokens;
    the tokens before <eos>."""
    logits, done, chosen = decoder.first(), None, []
    for t in range(max_len):
        token = logits.argmax(-1)
        if done is not None:
            token = torch.where(done, eos_id, token)  # an ended row keeps writing <eos>, which is dropped
        chosen.append(token)
        done = token == eos_id if done is None else done | (token == eos_id)
        if bool(done.all()) or t == max_len - 1:
            break
        logits = decoder.step(token)
    rows = torch.stack(chosen, dim=1).tolist()
    return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


@torch.no_grad()
def beam_search(
    decoder: Decoder, batch: int, beam_size: int, eos_id: int, max_len: int, alpha: float = 0.6
) -> list[list[Hypothesis]]:
    """For each of `batch` sources (rows b*K .. b*K + K-1 of `decoder`), its finished hypotheses, best first."""
    k = beam_size
    logits = decoder.first()
    device = logits.device
    log_probs = torch.zeros(batch, k, device=device)
    log_probs[:, 1:] = float("-inf")  # the K rows of a source start equal: expand only the first
    history = torch.zeros(batch, k, 0, dtype=torch.long, device=device)
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    done = [False] * batch
    for length in range(1, max_len + 1):
        vocab = logits.shape[-1]
        candidates = (log_probs[:, :, None] + torch.log_softmax(logits.float(), -1).view(batch, k, vocab)).view(
            batch, -1
        )
        top, index = candidates.topk(min(2 * k, candidates.shape[1]), dim=1)
        beams, tokens = index // vocab, index % vocab
        next_lp = torch.full((batch, k), float("-inf"), device=device)
        next_beam = torch.zeros(batch, k, dtype=torch.long, device=device)
        next_token = torch.full((batch, k), eos_id, dtype=torch.long, device=device)
        top_l, beams_l, tokens_l = top.tolist(), beams.tolist(), tokens.tolist()
        for b in range(batch):
            if done[b]:
                continue
            alive = 0
            for rank, (lp, beam, token) in enumerate(zip(top_l[b], beams_l[b], tokens_l[b])):
                if lp == float("-inf"):
                    break
                if token == eos_id:
                    if rank >= k:  # as fairseq: an <eos> below the K best candidates is not a hypothesis yet
                        continue
                    prefix = history[b, beam].tolist()
                    finished[b].append(Hypothesis(prefix, lp, lp / length_penalty(length, alpha)))
                elif alive < k:
                    next_lp[b, alive], next_beam[b, alive], next_token[b, alive] = lp, beam, token
                    alive += 1
            done[b] = alive == 0 or cannot_improve(finished[b], next_lp[b, 0].item(), k, length, max_len, alpha)
        history = torch.cat(
            [history.gather(1, next_beam[:, :, None].expand(-1, -1, length - 1)), next_token[:, :, None]], dim=2
        )
        if all(done) or length == max_len:
            break
        decoder.reorder((torch.arange(batch, device=device)[:, None] * k + next_beam).view(-1))
        log_probs = next_lp
        logits = decoder.step(next_token.view(-1))
    for b in range(batch):  # hypotheses still alive at max_len end there
        if not done[b]:
            for lp, tokens in zip(next_lp[b].tolist(), history[b].tolist()):
                if lp > float("-inf"):
                    finished[b].append(Hypothesis(tokens, lp, lp / length_penalty(max_len, alpha)))
    return [sorted(hyps, key=lambda h: -h.score) for hyps in finished]


def cannot_improve(
    finished: list[Hypothesis], best_alive: float, k: int, length: int, max_len: int, alpha: float
) -> bool:
    """Whether a source has K finished hypotheses that no live one (log P <= best_alive, length > `length`)
    can beat."""
    if len(finished) < k:
        return False
    kth = sorted(h.score for h in finished)[-k]
    largest_lp = max(length_penalty(length + 1, alpha), length_penalty(max_len, alpha))
    return best_alive / largest_lp <= kth
