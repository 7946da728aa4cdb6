"""Greedy decoding and beam search: exact on a brute-forceable toy, K = 1 is greedy, caches follow the beams."""

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from nanoseek.config import ModelConfig
from nanoseek.generation.beam import beam_search, greedy_search, length_penalty
from nanoseek.generation.seq2seq import make_decoder, translate_ids
from nanoseek.model import make_model

EOS = 2


class TableDecoder:
    """A toy model: the next-token log-probabilities depend on (the last token, the position) through a fixed
    random table, so every hypothesis's probability is known and the whole tree can be enumerated."""

    def __init__(self, rows: int, vocab: int = 3, max_len: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(max_len + 1, vocab + 1, vocab, generator=g) * 2  # [position, last token, next]
        self.vocab = vocab
        self.last = torch.full((rows,), vocab, dtype=torch.long)  # "vocab" = the start symbol
        self.pos = 0

    def first(self):
        return self.table[0, self.last]

    def step(self, tokens):
        self.pos += 1
        self.last = tokens
        return self.table[self.pos, self.last]

    def reorder(self, index):
        self.last = self.last[index]

    def log_prob(self, tokens: list[int]) -> float:
        last, total = self.vocab, 0.0
        for pos, t in enumerate(tokens):
            total += torch.log_softmax(self.table[pos, last], -1)[t].item()
            last = t
        return total


def brute_force_best(toy: TableDecoder, max_len: int, alpha: float) -> tuple[list[int], float]:
    """The highest score over every hypothesis: ending in <eos> within max_len tokens, or cut at max_len."""
    best = (None, -math.inf)
    for n in range(1, max_len + 1):
        for body in itertools.product([t for t in range(toy.vocab) if t != EOS], repeat=n - 1):
            for tokens in ([*body, EOS], *([[*body, t] for t in range(toy.vocab) if t != EOS] if n == max_len else [])):
                score = toy.log_prob(tokens) / length_penalty(n, alpha)
                kept = tokens[:-1] if tokens[-1] == EOS else tokens
                if score > best[1]:
                    best = (kept, score)
    return best


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
@pytest.mark.parametrize("seed", range(4))
def test_beam_search_returns_the_highest_scoring_hypothesis(alpha, seed):
    max_len = 4
    k = 32  # >= the 2^3 x 3 candidates of the last step: nothing is ever pruned
    (hyps,) = beam_search(TableDecoder(rows=k, max_len=max_len, seed=seed), 1, k, EOS, max_len, alpha)
    best = hyps[0]
    tokens, score = brute_force_best(TableDecoder(1, max_len=max_len, seed=seed), max_len, alpha)
    assert best.tokens == tokens
    assert best.score == pytest.approx(score, abs=1e-5)


def test_beam_hypotheses_are_sorted_and_scored_with_the_length_penalty():
    toy = TableDecoder(rows=3, seed=1)
    (hyps,) = beam_search(toy, 1, 3, EOS, 4, alpha=0.6)
    reference = TableDecoder(1, seed=1)
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    for h in hyps:
        length = len(h.tokens) + (len(h.tokens) < 4)  # <eos> counts, except for hypotheses cut at max_len
        ended = h.tokens + [EOS] if len(h.tokens) < 4 else h.tokens
        assert h.log_prob == pytest.approx(reference.log_prob(ended), abs=1e-5)
        assert h.score == pytest.approx(h.log_prob / ((5 + length) / 6) ** 0.6, abs=1e-6)


def test_length_penalty_is_gnmts():
    assert length_penalty(1, 0.6) == 1.0
    assert length_penalty(7, 1.0) == 2.0
    assert length_penalty(123, 0.0) == 1.0


def test_greedy_stops_at_eos_or_at_max_len():
    ends = TableDecoder(rows=1)
    ends.table[:] = -10
    ends.table[0, :, 1] = 0  # first token 1, then <eos>
    ends.table[1:, :, EOS] = 0
    assert greedy_search(ends, 1, EOS, max_len=4) == [[1]]
    never = TableDecoder(rows=1)
    never.table[:] = -10
    never.table[0, :, 1] = never.table[1:, :, 0] = 0  # 1, then 0 forever
    assert greedy_search(never, 1, EOS, max_len=4) == [[1, 0, 0, 0]]


@pytest.fixture(scope="module")
def models():
    """Random models of both architectures over 16 tokens (13 = <bos>, 14 = <eos>), with outputs that depend
    on the source (a wide initialization and a random untied head), and <eos> sometimes first."""
    tok = SimpleNamespace(bos_id=13, eos_id=14, pad_id=15)
    built = {}
    for arch, preset in (("encoder_decoder", "vaswani-tiny-ed"), ("decoder", "vaswani-tiny")):
        torch.manual_seed(0)
        cfg = ModelConfig.from_preset(preset, vocab_size=16, hidden_size=32, intermediate_size=64,
                                      tie_word_embeddings=False, initializer_range=0.3)  # fmt: skip
        model = make_model(cfg).eval()
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.5)
            model.lm_head.weight[tok.eos_id] *= 0.8
        built[arch] = model
    return tok, built


class Recompute:
    """A beam.Decoder without a cache: the model runs the whole prefix at every step (the oracle)."""

    def __init__(self, model, tok, source: torch.Tensor, rows: int):
        self.model, self.tok = model, tok
        self.source = source.repeat_interleave(rows, 0)
        start = torch.full((self.source.shape[0], 1), tok.bos_id)
        self.prefix = start if model.config.architecture == "encoder_decoder" else torch.cat([self.source, start], 1)

    def logits(self):
        if self.model.config.architecture == "encoder_decoder":
            return self.model(self.source, self.prefix).logits[:, -1]
        return self.model(self.prefix).logits[:, -1]

    def first(self):
        return self.logits()

    def step(self, tokens):
        self.prefix = torch.cat([self.prefix, tokens[:, None]], 1)
        return self.logits()

    def reorder(self, index):
        self.prefix = self.prefix[index]


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder"])
def test_cached_beams_equal_recomputed_beams(models, arch):
    tok, built = models
    model = built[arch]
    source = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    cached = beam_search(make_decoder(model, tok, source, 3, 6), 2, 3, tok.eos_id, 6, 0.6)
    oracle = beam_search(Recompute(model, tok, source, 3), 2, 3, tok.eos_id, 6, 0.6)
    for a, b in zip(cached, oracle):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-4)


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder"])
def test_beam_size_one_equals_greedy(models, arch):
    tok, built = models
    sources = [[1, 2, 3], [4, 5, 6], [7, 8, 9, 1], [2]]
    greedy = translate_ids(built[arch], tok, sources, beam_size=1, max_new_tokens=6)
    source = torch.tensor(sources[:2])
    one_beam = beam_search(make_decoder(built[arch], tok, source, 1, 6), 2, 1, tok.eos_id, 6, alpha=0.0)
    assert [h[0].tokens for h in one_beam] == greedy[:2]
    assert len({tuple(g) for g in greedy}) > 1  # the outputs depend on the source


def test_batched_sources_decode_as_each_alone(models):
    tok, built = models
    sources = [[1, 2, 3, 4], [9, 8], [5, 5, 5, 5], [0], [4, 3, 2, 1]]
    together = translate_ids(built["encoder_decoder"], tok, sources, beam_size=3, max_new_tokens=5)
    alone = [translate_ids(built["encoder_decoder"], tok, [s], beam_size=3, max_new_tokens=5)[0] for s in sources]
    assert together == alone
