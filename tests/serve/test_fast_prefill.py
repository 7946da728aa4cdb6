"""The server's compiled prefill: the logits and cache entries of the eager prefill, no padding in
the engine's rows, and None (the caller prefills eagerly) where no compiled window fits."""

from __future__ import annotations

import pytest
import torch
from test_engine import tiny_model

from nanoseek.generation.steps import prefill
from nanoseek.serve.fast_prefill import FastPrefill, supports_padding

CONTEXT = 64  # tiny_model's: windows of 24 starting at 0, 24 and 40 (the last clamped: it overlaps)


@pytest.fixture(scope="module")
def fast():
    model = tiny_model("deepseek-v3-tiny")
    fast = FastPrefill(model, CONTEXT, window=24)
    with torch.inference_mode():
        fast.warm_up()
    return fast


def rows(model, n: int = 2) -> list:
    """Engine caches of n rows, every entry a sentinel (what the prefill did not write shows)."""
    cache = model.make_cache(n, CONTEXT)
    for c in cache:
        c.key.fill_(7.0)
    return cache


@pytest.mark.parametrize("length,begin", [(3, 0), (24, 0), (45, 0), (60, 0), (64, 0), (45, 32), (50, 16), (41, 40)])
def test_compiled_windows_fill_a_row_as_the_eager_prefill(fast, length, begin):
    """Prompts within one window, across two or all three (the last two overlap), up to the
    context; after a restored prefix of `begin` positions (as the prefix cache leaves a row), also
    ones that are not a window start."""
    model = fast.model
    assert fast.starts == [0, 24, 40] and fast.limit == CONTEXT
    prompt = torch.randint(0, 100, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    with torch.inference_mode():
        reference = model.make_cache(1, CONTEXT)
        want = prefill(model, torch.tensor([prompt]), reference)
        cache = rows(model)
        row = [c.rows(1, 2) for c in cache]
        if begin:
            prefill(model, torch.tensor([prompt[:begin]]), row)
        got = fast(prompt, begin, row)
    assert got is not None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for c, r in zip(cache, reference):
        torch.testing.assert_close(c.key[1, :length], r.key[0, :length], rtol=1e-5, atol=1e-5)
        assert (c.key[1, length:] == 7.0).all() and (c.key[0] == 7.0).all()  # no padding, no other row


def test_only_caches_that_mask_by_position_take_padded_windows():
    assert supports_padding(tiny_model("deepseek-v3-tiny").make_cache(1, 8))
    assert supports_padding(tiny_model("llama-tiny").make_cache(1, 8))
    nsa = tiny_model("llama-tiny", sparse="nsa", nsa_block=4, nsa_topn=3, sliding_window=6)
    assert not supports_padding(nsa.make_cache(1, 8))


def test_what_no_window_fits_is_left_to_the_eager_prefill(fast):
    """None, nothing written: a prompt longer than the windows reach, nothing left to prefill, and
    a call that would need a graph the warm-up did not build, after which the compiled prefill
    stays off (one warning, not one per request). Runs last: it turns the fixture's prefill off."""
    model = fast.model
    short = FastPrefill(model, CONTEXT, window=24, windows=1)  # one window: prompts up to 24 positions
    short.ready = True  # (never compiled: these calls return before any window runs)
    cache = rows(model)
    row = [c.rows(0, 1) for c in cache]
    with torch.inference_mode():
        assert short(list(range(30)), 0, row) is None  # longer than the windows reach
        assert short([1, 2, 3], 3, row) is None  # nothing left to prefill
    with torch.no_grad():  # the warm-up ran under inference mode: its graphs' guards fail here
        assert fast([1, 2, 3], 0, row) is None
    assert not fast.ready
    with torch.inference_mode():
        assert fast([1, 2, 3], 0, row) is None  # off for good
    assert all((c.key == 7.0).all() for c in cache)  # nothing written
