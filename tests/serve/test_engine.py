"""Continuous batching: rows at different positions decode together exactly as they would alone."""

from __future__ import annotations

import threading

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.generation import SamplingOptions, generate
from nanoseek.serve.engine import Engine, Event, QueueFull, Sequence

VOCAB = 300


class ByteTokenizer:
    eos_id = None

    def encode(self, text):
        return list(text.encode())

    def decode_bytes(self, ids):  # every id prints as one ASCII letter
        return bytes(97 + i % 26 for i in ids)


def tiny_model(preset: str, **overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset).replace(vocab_size=VOCAB, max_position_embeddings=64, **overrides)
    return Transformer(cfg).eval()


class Collector:
    def __init__(self):
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, event: Event):
        self.events.append(event)
        if event.finish_reason or event.error:
            self.done.set()


def run_engine(model, prompts, max_tokens, max_batch=4, options=SamplingOptions(temperature=0)):
    engine = Engine(model, ByteTokenizer(), max_batch=max_batch, max_queue=16)
    # record the raw token ids by wrapping _accept
    tokens = {i: [] for i in range(len(prompts))}
    accept = engine._accept

    def recording_accept(seq, token):
        tokens[seq.index].append(token)
        return accept(seq, token)

    engine._accept = recording_accept
    collectors = [Collector() for _ in prompts]
    seqs = [Sequence(p, n, options, c, index=i) for i, (p, n, c) in enumerate(zip(prompts, max_tokens, collectors))]
    engine.start()
    try:
        engine.submit(seqs)
        for c in collectors:
            assert c.done.wait(30)
    finally:
        engine.stop()
    return tokens, collectors, engine


@pytest.mark.parametrize(
    "preset,overrides",
    [
        ("gpt2-tiny", {}),  # learned positions, MHA
        ("llama-tiny", {}),  # RoPE, GQA
        ("deepseek-v3-tiny", {}),  # MLA absorbed decode + MoE
        ("deepseek-v3-tiny", {"fusion": "mhc"}),  # residual streams
        ("llama-tiny", {"sparse": "sliding", "sliding_window": 4}),  # per-row windows
        ("deepseek-v32-tiny", {"index_topk": 5}),  # per-row DSA selection
        ("llama-tiny", {"sparse": "nsa", "nsa_block": 4, "nsa_topn": 3, "sliding_window": 6}),  # NSA rows
        ("deepseek-v4-tiny", {"index_n_heads": 8}),  # V4: CSA + HCA rows pooling their own windows, hash MoE
    ],
)
def test_batched_rows_match_generating_alone(preset, overrides):
    model = tiny_model(preset, **overrides)
    g = torch.Generator().manual_seed(1)
    lengths, max_tokens = [3, 11, 6, 17, 1, 9], [12, 5, 20, 8, 15, 10]
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]
    got, _, engine = run_engine(model, prompts, max_tokens, max_batch=3)  # 6 requests, 3 rows: joins and leaves
    for i, (p, n) in enumerate(zip(prompts, max_tokens)):
        alone = generate(model, p, max_new_tokens=n, temperature=0).tolist()
        assert got[i] == alone, f"request {i}"
    assert engine.stats()["running"] == 0


def sliding_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens by full recompute, keeping the recent half of the context once it is full."""
    context, window, out = model.config.max_position_embeddings, list(prompt), []
    with torch.no_grad():
        while len(out) < n:
            out.append(int(model(torch.tensor([window])).logits[0, -1].argmax()))
            window.append(out[-1])
            if len(window) > context:
                window = window[-(context // 2) :]
    return out


@pytest.mark.parametrize("preset", ["gpt2-tiny", "deepseek-v3-tiny"])
def test_a_row_past_the_context_slides_to_its_recent_half(preset):
    model = tiny_model(preset)  # context 64
    prompts, max_tokens = [[5, 6, 7] * 4, [9, 8]], [150, 20]  # the first slides twice, beside a short row
    got, collectors, _ = run_engine(model, prompts, max_tokens, max_batch=2)
    assert got[0] == sliding_greedy(model, prompts[0], 150)
    assert got[1] == generate(model, prompts[1], max_new_tokens=20, temperature=0).tolist()
    assert collectors[0].events[-1].finish_reason == "length" and collectors[0].events[-1].completion_tokens == 150


def test_finish_reasons_usage_and_stop_strings():
    model = tiny_model("gpt2-tiny")
    prompt = list(b"abc")
    alone = ByteTokenizer().decode_bytes(generate(model, prompt, max_new_tokens=12, temperature=0).tolist()).decode()
    stop = alone[4:6]
    engine = Engine(model, ByteTokenizer(), max_batch=2, max_queue=2).start()
    try:
        free, stopped = Collector(), Collector()
        engine.submit(
            [
                Sequence(prompt, 12, SamplingOptions(temperature=0), free, index=0),
                Sequence(prompt, 12, SamplingOptions(temperature=0), stopped, stops=[stop], index=1),
            ]
        )
        assert free.done.wait(30) and stopped.done.wait(30)
    finally:
        engine.stop()
    assert free.events[-1].finish_reason == "length" and free.events[-1].completion_tokens == 12
    assert stopped.events[-1].finish_reason == "stop"
    text = "".join(e.text for e in stopped.events)
    assert text == alone[: alone.find(stop)]
    assert "".join(e.text for e in free.events) == alone


def test_seeded_sampling_is_reproducible_and_independent_of_neighbours():
    model = tiny_model("llama-tiny")
    opts = SamplingOptions(temperature=1.0, top_p=0.9, seed=7)
    a, _, _ = run_engine(model, [[1, 2, 3]], [10], options=opts)
    b, _, _ = run_engine(model, [[1, 2, 3], [4, 5], [6]], [10, 10, 10], options=opts)
    assert a[0] == b[0]


def test_queue_is_bounded_and_cancel_frees_the_row():
    model = tiny_model("gpt2-tiny")
    engine = Engine(model, ByteTokenizer(), max_batch=1, max_queue=1)
    first, second = Collector(), Collector()
    engine.submit([Sequence([1], 60, SamplingOptions(temperature=0), first, index=0)])
    engine.submit([Sequence([2], 60, SamplingOptions(temperature=0), second, index=0)])
    with pytest.raises(QueueFull, match="limit 1 running \\+ 1 queued"):
        engine.submit([Sequence([3], 5, SamplingOptions(temperature=0), Collector())])
    engine.start()
    try:
        engine.cancel([engine.waiting[0]] if engine.waiting else [])
        assert second.done.wait(0.01) is False
        engine.cancel(list(engine.running) + list(engine.waiting))
        for _ in range(100):
            if engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0:
                break
            threading.Event().wait(0.05)
        assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0
        late = Collector()
        engine.submit([Sequence([4], 3, SamplingOptions(temperature=0), late)])
        assert late.done.wait(30) and late.events[-1].completion_tokens == 3
    finally:
        engine.stop()
    assert sum(len(c.events) for c in (first, second)) < 60  # cancelled before their 60 tokens


class SplitCharTokenizer:
    """Whatever the id, the next byte of "秦秦秦...": every character is split over three tokens."""

    eos_id = None

    def __init__(self):
        self.stream = "秦".encode() * 100
        self.at = 0

    def encode(self, text):
        return list(text.encode())

    def decode_bytes(self, ids):
        out = self.stream[self.at : self.at + len(ids)]
        self.at += len(ids)
        return out


def test_engine_text_goes_through_the_one_detokenizer():
    """A character split over tokens reaches the client whole, as in TextStream."""
    from nanoseek.generation.streaming import Detokenizer

    model = tiny_model("gpt2-tiny")
    engine = Engine(model, SplitCharTokenizer(), max_batch=1, max_queue=1)
    collector = Collector()
    seq = Sequence([1, 2, 3], 7, SamplingOptions(temperature=0), collector)
    engine.start()
    try:
        engine.submit([seq])
        assert collector.done.wait(30)
    finally:
        engine.stop()
    assert isinstance(seq.detok, Detokenizer)
    assert [e.text for e in collector.events] == ["秦", "秦", "\ufffd"]  # the 7th token: a cut character
    assert collector.events[-1].finish_reason == "length" and collector.events[-1].completion_tokens == 7


def test_engine_rows_sample_with_their_repetition_penalty():
    """Each row's Sampler applies its penalty over the row's prompt and output, as generate does."""
    model = tiny_model("llama-tiny")
    opts = SamplingOptions(temperature=0, repetition_penalty=1.8)
    got, _, _ = run_engine(model, [[5, 6, 7], [9]], [10, 6], options=opts)
    assert got[0] == generate(model, [5, 6, 7], max_new_tokens=10, temperature=0, repetition_penalty=1.8).tolist()
    assert got[1] == generate(model, [9], max_new_tokens=6, temperature=0, repetition_penalty=1.8).tolist()


def test_bad_options_fail_their_request_at_submit():
    from nanoseek.errors import NanoseekError

    engine = Engine(tiny_model("gpt2-tiny"), ByteTokenizer(), max_batch=1, max_queue=1)
    with pytest.raises(NanoseekError, match="top_p"):
        engine.submit([Sequence([1], 3, SamplingOptions(top_p=0.0), Collector())])
    assert engine.stats()["waiting"] == 0


@pytest.mark.parametrize(
    "preset,overrides,groups",
    [
        # dense caches: right-padded groups; the 40-token prompt would pad the three short ones past
        # twice their tokens, so it starts a new group, which one 2-token prompt joins (80 <= 2 x 42)
        ("llama-tiny", {}, [[0, 1, 2], [3, 4], [5]]),
        # NSA's block summaries must not see padding: only prompts of one length go together
        (
            "llama-tiny",
            {"sparse": "nsa", "nsa_block": 4, "nsa_topn": 3, "sliding_window": 6},
            [[0], [1, 2], [3], [4, 5]],
        ),
    ],
)
def test_requests_arriving_together_are_prefilled_in_groups(preset, overrides, groups, monkeypatch):
    """The waiting requests go into one batched prefill per group (in arrival order), and each
    decodes exactly as it would alone."""
    from nanoseek.serve import engine as engine_module

    model = tiny_model(preset, **overrides)
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], list(range(40)), [5, 5], [6, 6]]
    seen: list[list[int]] = []
    fill, fill_rows = engine_module.prefill, engine_module.prefill_rows

    def recording_prefill(model, ids, cache, start=0):
        seen.append([prompts.index(ids[0].tolist())])
        return fill(model, ids, cache, start)

    def recording_prefill_rows(model, rows, cache, start=0):
        seen.append([prompts.index(r) for r in rows])
        return fill_rows(model, rows, cache, start)

    monkeypatch.setattr(engine_module, "prefill", recording_prefill)
    monkeypatch.setattr(engine_module, "prefill_rows", recording_prefill_rows)
    got, _, _ = run_engine(model, prompts, [6] * len(prompts), max_batch=6)
    assert seen == groups
    for i, p in enumerate(prompts):
        assert got[i] == generate(model, p, max_new_tokens=6, temperature=0).tolist(), f"request {i}"
