"""Sampling never produces NaN probabilities: tiny temperatures act as greedy, and any logits (NaN,
+-inf, huge) with any temperature, top-k and top-p give a finite distribution summing to 1."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek import ModelConfig, Transformer
from nanoseek.cli import main
from nanoseek.data.tokenizer import CharTokenizer
from nanoseek.errors import NanoseekError
from nanoseek.generation import SamplingOptions
from nanoseek.generation.sampling import Sampler, next_token_probs, sample_next, sample_rows

TINY_TEMPERATURES = [1e-40, 1e-300, 5e-324, 1e-45, 0.0]


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
def test_tiny_temperatures_act_as_greedy(temperature):
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 5
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        picked = sample_next(logits, temperature, generator=gen)
        assert torch.equal(picked, logits.argmax(dim=-1))


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
def test_tiny_temperatures_with_top_k_top_p_and_penalty(temperature):
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9999], [3.0, 3.5, -2.0, 0.0]])
    seen = torch.tensor([[1], [1]])  # the penalty halves the positive leader of each row
    picked = sample_next(logits, temperature, 3, 0.9, recent_tokens=seen, repetition_penalty=2.0)
    assert picked.tolist() == [3, 0]


@pytest.mark.parametrize(
    "logits,allowed",
    [
        ([[float("nan"), 1.0, float("-inf")]], {1}),  # NaN is never drawn
        ([[float("nan")] * 3], {0, 1, 2}),  # nothing usable: uniform
        ([[float("-inf")] * 3], {0, 1, 2}),
        ([[1.0, float("inf"), 2.0, float("inf")]], {1, 3}),  # +inf is certain
        ([[3e38, -3e38, 1.0]], {0}),  # the shift overflows to -inf, never to NaN
    ],
)
@pytest.mark.parametrize("temperature", [0.0, 1e-40, 1.0, 1e30])
def test_non_finite_logits_give_a_valid_token(logits, allowed, temperature):
    logits = torch.tensor(logits)
    for seed in range(4):
        picked = sample_next(logits, temperature, generator=torch.Generator().manual_seed(seed))
        assert picked.item() in allowed


finite_or_not = st.floats(allow_nan=True, allow_infinity=True, width=32)


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(st.lists(finite_or_not, min_size=5, max_size=5), min_size=1, max_size=3),
    temperature=st.one_of(
        st.sampled_from([5e-324, 1e-300, 1e-40, 1e300, math.inf, math.nan]),
        st.floats(min_value=0, exclude_min=True, allow_infinity=False),
    ),
    top_k=st.one_of(st.none(), st.integers(1, 7)),
    top_p=st.one_of(st.none(), st.floats(min_value=0, max_value=1, exclude_min=True)),
)
def test_probabilities_are_always_a_distribution(rows, temperature, top_k, top_p):
    logits = torch.tensor(rows, dtype=torch.float32)
    probs = next_token_probs(logits, temperature, top_k, top_p)
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(rows)), atol=1e-5, rtol=0)
    picked = torch.multinomial(probs, 1).squeeze(-1)
    assert (probs.gather(-1, picked[:, None]) > 0).all()


@settings(max_examples=100, deadline=None)
@given(
    rows=st.lists(st.lists(finite_or_not, min_size=4, max_size=4), min_size=2, max_size=2),
    temperature=st.sampled_from([0.0, 5e-324, 1e-40, 0.7, 1.0]),
    penalty=st.sampled_from([1.0, 1e-30, 2.0, 1e30]),
)
def test_sample_rows_never_fails(rows, temperature, penalty):
    opts = SamplingOptions(temperature=temperature, repetition_penalty=penalty, seed=1)
    samplers = [Sampler(opts, torch.device("cpu")) for _ in rows]
    seen = [torch.tensor([[0, 1]]) for _ in rows]
    tokens = sample_rows(torch.tensor(rows), samplers, seen)
    assert all(0 <= t < 4 for t in tokens)


@pytest.mark.parametrize(
    "options", [dict(temperature=math.nan), dict(temperature=math.inf), dict(repetition_penalty=math.nan)]
)
def test_non_finite_options_are_refused(options):
    with pytest.raises(NanoseekError, match="finite"):
        SamplingOptions(**options).validate()


@pytest.fixture(scope="module")
def char_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("sampling") / "tiny"
    tok = CharTokenizer.train(["abcdefgh ij\n"])
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("llama-tiny").replace(vocab_size=tok.vocab_size, max_position_embeddings=32)
    Transformer(cfg).save_pretrained(path)
    tok.save(path)
    return path


@pytest.mark.parametrize("temperature", ["1e-40", "5e-324"])
def test_sample_and_chat_commands_take_a_tiny_temperature(char_checkpoint, temperature, capsys, monkeypatch):
    ckpt = str(char_checkpoint)
    args = ["--temperature", temperature, "--max-new-tokens", "5", "--seed", "1"]
    assert main(["sample", ckpt, "--prompt", "ab", *args]) == 0
    tiny = capsys.readouterr().out
    assert main(["sample", ckpt, "--prompt", "ab", "--temperature", "0", "--max-new-tokens", "5"]) == 0
    assert tiny == capsys.readouterr().out  # greedy
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", ckpt, *args]) == 0
    assert capsys.readouterr().out.strip() is not None


def test_sample_rows_draws_what_each_sampler_draws_alone():
    """The batched draw of rows sharing their options equals each row's own multinomial draw, seeded
    generators and the global one alike, over many steps (the generators advance alike too)."""
    options = [
        SamplingOptions(temperature=0.8, seed=1),
        SamplingOptions(temperature=0.8, seed=2),
        SamplingOptions(temperature=0.8),  # the global generator
        SamplingOptions(temperature=1.3, top_p=0.9, seed=3),
        SamplingOptions(temperature=1.3, top_p=0.9, seed=4),
        SamplingOptions(temperature=0.7, top_k=5, seed=5),
        SamplingOptions(temperature=0.9, repetition_penalty=1.2, seed=6),  # drawn alone
        SamplingOptions(temperature=0),
    ]
    batched = [Sampler(o, torch.device("cpu")) for o in options]
    alone = [Sampler(o, torch.device("cpu")) for o in options]
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        logits = torch.randn(len(options), 50, generator=g) * 3
        seen = [torch.randint(0, 50, (1, 6), generator=g) for _ in options]
        torch.manual_seed(7)
        got = sample_rows(logits, batched, seen)
        torch.manual_seed(7)
        want = [int(s(logits[i : i + 1], seen[i])[0]) for i, s in enumerate(alone)]
        assert got == want


@pytest.mark.parametrize("temperature", [0.8, 0.0])
def test_sample_rows_of_one_kind_draw_what_each_sampler_draws_alone(temperature):
    """Every row with the same options (one batch of all rows, or all greedy: no rows gathered)."""
    options = [SamplingOptions(temperature=temperature, seed=i) for i in range(6)]
    batched = [Sampler(o, torch.device("cpu")) for o in options]
    alone = [Sampler(o, torch.device("cpu")) for o in options]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(len(options), 50, generator=g) * 3
        assert sample_rows(logits, batched) == [int(s(logits[i : i + 1])[0]) for i, s in enumerate(alone)]
