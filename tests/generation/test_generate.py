"""Generation: cached decoding matches full recompute, sampling filters, stopping, text streaming."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from nanoseek import ModelConfig, NanoseekError, Transformer
from nanoseek.generation.compiled import compiled_decoders, model_steps
from nanoseek.generation.loop import decode_step, generate, prefill
from nanoseek.generation.sampling import (
    apply_repetition_penalty,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from nanoseek.generation.streaming import TextStream, complete

EOS = 256  # the fake byte tokenizer: ids 0..255 are bytes, 256+ are special


class ByteTokenizer:
    eos_id = EOS

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids) -> bytes:
        return bytes(i for i in ids if i < 256)

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class ScriptedModel(nn.Module):
    """Emits a fixed token script per row after a prompt of `prompt_len` tokens, then EOS.

    The logits at absolute position q favour script[q + 1 - prompt_len] by a margin of 100.
    Records every forward call as (start, length) and every cache request's length.
    """

    def __init__(self, scripts: list[list[int]], prompt_len: int):
        super().__init__()
        self.config = ModelConfig.from_preset("gpt2-tiny", vocab_size=260, max_position_embeddings=256)
        self.scripts = scripts
        self.prompt_len = prompt_len
        self.calls: list[tuple[int, int]] = []
        self.cache_lengths: list[int] = []

    def make_cache(self, batch, max_len=None, dtype=None, device=None):
        self.cache_lengths.append(max_len)
        return [None] * self.config.num_hidden_layers

    def _next_token(self, row: int, position: int) -> int:
        script = self.scripts[row % len(self.scripts)]
        index = position + 1 - self.prompt_len
        return script[index] if 0 <= index < len(script) else EOS

    def forward(self, input_ids, targets=None, cache=None, start=0, last_only=False):
        batch, length = input_ids.shape
        self.calls.append((start, length))
        logits = torch.zeros(batch, length, self.config.vocab_size)
        for row in range(batch):
            for j in range(length):
                logits[row, j, self._next_token(row, start + j)] = 100.0
        return SimpleNamespace(logits=logits[:, -1:] if last_only else logits)


def scripted(text: str, prompt: str = "hi") -> ScriptedModel:
    return ScriptedModel([list(text.encode("utf-8"))], prompt_len=len(prompt.encode("utf-8")))


def tiny_model(preset: str = "gpt2-tiny") -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset(preset)).eval()


def argmax_by_recompute(model: Transformer, prompt: torch.Tensor, n: int) -> torch.Tensor:
    seq = prompt
    with torch.no_grad():
        for _ in range(n):
            next_id = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, next_id], dim=1)
    return seq[:, prompt.shape[1] :]


# ---------------------------------------------------------------------------- cache correctness


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny", "vaswani-tiny"])
def test_cached_logits_equal_full_recompute(preset):
    model = tiny_model(preset)
    seq = torch.randint(0, model.config.vocab_size, (2, 13))
    prompt_len = 7
    with torch.inference_mode():
        full = model(seq).logits
        cache = model.make_cache(2, seq.shape[1])
        step_logits = [prefill(model, seq[:, :prompt_len], cache)]
        for pos in range(prompt_len, seq.shape[1] - 1):
            step_logits.append(decode_step(model, seq[:, pos : pos + 1], cache, pos))
    assert len(step_logits) == 6  # prefill + 5 decode steps
    for i, logits in enumerate(step_logits):
        assert logits.shape == (2, model.config.vocab_size)
        assert (logits - full[:, prompt_len - 1 + i]).abs().max() < 1e-5


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_greedy_generate_equals_argmax_recompute(preset):
    model = tiny_model(preset)
    prompt = torch.randint(0, model.config.vocab_size, (2, 5))
    out = generate(model, prompt, max_new_tokens=8, temperature=0)
    assert out.shape == (2, 8) and out.dtype == torch.long
    assert torch.equal(out, argmax_by_recompute(model, prompt, 8))
    assert not out.is_inference()  # usable outside inference mode


def test_list_prompt_gives_1d_tensor():
    model = tiny_model()
    out = generate(model, [3, 1, 4, 1, 5], max_new_tokens=6, temperature=0)
    expected = argmax_by_recompute(model, torch.tensor([[3, 1, 4, 1, 5]]), 6)[0]
    assert out.shape == (6,) and torch.equal(out, expected)


# ---------------------------------------------------------------------------- sampling


def test_same_seed_same_tokens_different_seed_different():
    model = tiny_model()
    prompt = torch.randint(0, model.config.vocab_size, (1, 4))
    a = generate(model, prompt, max_new_tokens=8, temperature=1.0, seed=1)
    b = generate(model, prompt, max_new_tokens=8, temperature=1.0, seed=1)
    c = generate(model, prompt, max_new_tokens=8, temperature=1.0, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("options", [dict(top_k=1), dict(top_p=1e-6), dict(temperature=0.0)])
def test_degenerate_sampling_equals_greedy(options):
    model = tiny_model("llama-tiny")
    prompt = torch.randint(0, model.config.vocab_size, (2, 4))
    greedy = argmax_by_recompute(model, prompt, 8)
    out = generate(model, prompt, max_new_tokens=8, seed=3, **{"temperature": 1.0, **options})
    assert torch.equal(out, greedy)


def test_top_k_filter_keeps_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    kept = torch.isfinite(top_k_filter(logits, 2))
    assert kept.tolist() == [[False, True, False, True, False]]
    assert torch.isfinite(top_k_filter(logits, 99)).all()


def test_top_p_filter_keeps_smallest_nucleus():
    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()  # ranked: 1 (.5), 3 (.3), 0, 2
    assert torch.isfinite(top_p_filter(logits, 0.7)).tolist() == [[False, True, False, True]]
    assert torch.isfinite(top_p_filter(logits, 0.45)).tolist() == [[False, True, False, False]]
    for p in (1e-9, 0.0):  # the top token always stays
        assert torch.isfinite(top_p_filter(logits, p)).tolist() == [[False, True, False, False]]


def test_repetition_penalty_lowers_repeated_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5], [2.0, -1.0, 0.5]])
    seen = torch.tensor([[0, 1, 1], [2, 2, 2]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5], [2.0, -1.0, 0.25]]
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_repetition_penalty_changes_greedy_choice():
    logits = torch.tensor([[2.0, 1.5, 0.0], [2.0, 1.5, 0.0]])
    seen = torch.tensor([[0], [2]])
    picked = sample_next(logits, 0.0, None, None, None, recent_tokens=seen, repetition_penalty=2.0)
    assert picked.tolist() == [1, 0] and picked.dtype == torch.int64


def test_sample_next_batched_respects_top_k():
    gen = torch.Generator().manual_seed(0)
    logits = torch.zeros(4, 10)
    logits[:, 7] = 1.0
    logits[:, 2] = 1.0
    picks = torch.stack([sample_next(logits, 1.0, 2, None, gen) for _ in range(20)])
    assert picks.shape == (20, 4)
    assert set(picks.flatten().tolist()) == {2, 7}


@pytest.mark.parametrize(
    "options", [dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5), dict(repetition_penalty=0.0)]
)
def test_bad_sampling_options_raise(options):
    with pytest.raises(NanoseekError):
        generate(tiny_model(), [1, 2], max_new_tokens=2, **options)


# ---------------------------------------------------------------------------- lengths, modes, stops


def test_too_long_request_raises_with_the_numbers():
    model = tiny_model()
    with pytest.raises(NanoseekError) as err:
        generate(model, torch.zeros(1, 250, dtype=torch.long), max_new_tokens=10)
    message = str(err.value)
    assert "250" in message and "10" in message and "256" in message
    with pytest.raises(NanoseekError):
        generate(model, [], max_new_tokens=4)


def test_prefill_then_one_decode_per_token_in_an_exact_cache():
    model = scripted("abcdef")
    out = generate(model, [1, 2], max_new_tokens=4, temperature=0)
    assert out.tolist() == list(b"abcd")
    assert model.cache_lengths == [2 + 4]
    assert model.calls == [(0, 2), (2, 1), (3, 1), (4, 1)]


def test_model_mode_restored():
    model = tiny_model()
    model.train()
    generate(model, [1, 2, 3], max_new_tokens=3, temperature=0)
    assert model.training
    model.eval()
    generate(model, [1, 2, 3], max_new_tokens=3, temperature=0)
    assert not model.training


def test_eos_stops_each_row_and_the_batch_early():
    model = ScriptedModel([[5, EOS, 9, 9], [5, 6, 7, EOS]], prompt_len=2)  # row 0 pads with EOS
    out = generate(model, torch.ones(2, 2, dtype=torch.long), max_new_tokens=10, temperature=0, eos_id=EOS)
    assert out.tolist() == [[5, EOS, EOS, EOS], [5, 6, 7, EOS]]
    assert len(model.calls) == 4  # prefill + 3 decode steps, not 10
    no_eos = generate(model, torch.ones(2, 2, dtype=torch.long), max_new_tokens=10, temperature=0)
    assert no_eos.shape == (2, 10)


def test_stop_ids_end_generation():
    out = generate(scripted("abcdef"), [1, 2], max_new_tokens=10, temperature=0, stop_ids=[ord("c")])
    assert out.tolist() == list(b"abc")


# ---------------------------------------------------------------------------- text streaming


def stream(text: str, max_new_tokens: int = 64, **options) -> tuple[list[str], TextStream]:
    s = TextStream(scripted(text), ByteTokenizer(), "hi", max_new_tokens=max_new_tokens, temperature=0, **options)
    return list(s), s


def test_stream_stops_before_stop_string():
    pieces, s = stream("hello world. more", stop=["."])
    assert "".join(pieces) == "hello world"
    assert s.finish_reason == "stop"
    assert s.completion_tokens == len("hello world.")
    assert len(pieces) > 1  # streamed, not returned at the end


def test_stop_string_split_across_tokens():
    pieces, s = stream("hello world. more", stop=["wor", "zzz"])
    assert "".join(pieces) == "hello " and s.finish_reason == "stop"
    assert not any("w" in p for p in pieces)


def test_earliest_stop_string_wins():
    pieces, _ = stream("hello world", stop=["o", "lo w"])
    assert "".join(pieces) == "hell"  # "o" completes first; "lo w" never does
    pieces, _ = stream("hello world", stop=["ld", "world"])  # both complete with the "d"
    assert "".join(pieces) == "hello "


def test_stream_length_and_eos_reasons():
    pieces, s = stream("hello world", max_new_tokens=5, stop=["xyz"])
    assert "".join(pieces) == "hello" and s.finish_reason == "length" and s.completion_tokens == 5
    pieces, s = stream("hi!")  # the script ends in EOS
    assert "".join(pieces) == "hi!" and s.finish_reason == "stop" and s.completion_tokens == 4


def test_stream_never_yields_half_a_character():
    text = "秦🙂"
    pieces, s = stream(text)
    assert pieces == ["秦", "🙂"]
    assert all("\ufffd" not in p for p in pieces)
    pieces, _ = stream(text, stop=["abc"])
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    pieces, s = stream(text, stop=["🙂"])
    assert pieces == ["秦"] and s.finish_reason == "stop"


def test_complete_joins_the_stream():
    model = scripted("hello world. more")
    assert complete(model, ByteTokenizer(), "hi", temperature=0, stop=["."]) == ("hello world", "stop")
    text, reason = complete(model, ByteTokenizer(), "hi", max_new_tokens=3, temperature=1.0, seed=0)
    assert (text, reason) == ("hel", "length")


def test_closing_a_stream_restores_the_model_mode():
    model = scripted("hello world")
    model.train()
    s = TextStream(model, ByteTokenizer(), "hi", temperature=0)
    assert next(s) == "h" and not model.training
    s.close()
    assert model.training and math.isfinite(s.completion_tokens)


def test_compiled_static_decode_equals_eager_decode():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("deepseek-v3-tiny", max_position_embeddings=64)).eval()
    prompt = torch.randint(0, 128, (2, 7))
    eager = generate(model, prompt, max_new_tokens=12, temperature=0)
    compiled = generate(model, prompt, max_new_tokens=12, temperature=0, compile=True)
    assert torch.equal(compiled, eager)
    with torch._dynamo.config.patch(error_on_recompile=True):  # another length reuses the graph
        again = generate(model, prompt[:, :5], max_new_tokens=20, temperature=0, compile=True)
    assert torch.equal(again, generate(model, prompt[:, :5], max_new_tokens=20, temperature=0))


def test_compiled_decode_compiles_once_per_length_bucket(monkeypatch):
    """Batch 1: the step's token must not be a view of the history (its stride would change with
    the generation's length, and with it the graph); a longer generation gets the next bucket."""
    import importlib

    monkeypatch.setattr(importlib.import_module("nanoseek.generation.compiled"), "DECODE_CACHE_MIN", 16)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("deepseek-v3-tiny", max_position_embeddings=64)).eval()
    prompt = torch.randint(0, 128, (1, 6))
    first = generate(model, prompt, max_new_tokens=5, temperature=0, compile=True)  # 11 positions: 16
    assert torch.equal(first, generate(model, prompt, max_new_tokens=5, temperature=0))
    with torch._dynamo.config.patch(error_on_recompile=True):
        other = generate(model, prompt[:, :3], max_new_tokens=12, temperature=0, compile=True)  # 15: 16
    assert torch.equal(other, generate(model, prompt[:, :3], max_new_tokens=12, temperature=0))
    longer = generate(model, prompt[:, :3], max_new_tokens=30, temperature=0, compile=True)  # 33: 64
    assert torch.equal(longer, generate(model, prompt[:, :3], max_new_tokens=30, temperature=0))
    assert sorted(key[-1] for key in compiled_decoders(model)) == [16, 64]


def test_compiled_decode_runs_the_graph_entry_its_guards_choose():
    """After each generation's first (guarded) step the compiled decoder calls the dynamo cache
    entry whose guards pass directly: a generation under bf16 autocast gets the autocast graph, and
    the next one without autocast the fp32 graph again (not the most recent), each equal to eager."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("llama-tiny", max_position_embeddings=64)).eval()
    prompt = torch.randint(0, 128, (1, 6))
    plain = generate(model, prompt, max_new_tokens=10, temperature=0, compile=True)
    (decoder,) = compiled_decoders(model).values()
    assert decoder.direct.fn is not None  # the later steps ran without dynamo
    fp32_code = decoder.direct.fn.__code__
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = generate(model, prompt, max_new_tokens=10, temperature=0, compile=True)
        assert torch.equal(mixed, generate(model, prompt, max_new_tokens=10, temperature=0))
        with torch.inference_mode():  # the state the generation's steps run in
            assert decoder.direct.usable()
    assert decoder.direct.fn.__code__ is not fp32_code
    with torch.inference_mode():  # autocast is off again: a step now would go through dynamo
        assert not decoder.direct.usable()
    again = generate(model, prompt, max_new_tokens=10, temperature=0, compile=True)
    assert decoder.direct.fn.__code__ is fp32_code
    assert torch.equal(again, plain) and torch.equal(plain, generate(model, prompt, max_new_tokens=10, temperature=0))


def test_compiled_decode_without_direct_calls_equals_eager_and_direct():
    """direct_calls=False: the later steps go through dynamo with guards skipped; the same tokens as
    eager decoding and as the direct calls, greedy and seeded sampling alike, on the same decoder
    (each generation sets its options)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("llama-tiny", max_position_embeddings=64)).eval()
    prompt = torch.randint(0, 128, (2, 5))
    off = generate(model, prompt, max_new_tokens=9, temperature=0, compile=True, direct_calls=False)
    (decoder,) = compiled_decoders(model).values()
    assert decoder.direct is None and not decoder.options.direct_calls
    assert torch.equal(off, generate(model, prompt, max_new_tokens=9, temperature=0))
    on = generate(model, prompt, max_new_tokens=9, temperature=0, compile=True)
    assert decoder.direct is not None and decoder.direct.fn is not None  # the later steps ran direct
    assert torch.equal(on, off)
    sampled = {"max_new_tokens": 9, "temperature": 1.0, "top_k": 20, "seed": 3, "compile": True}
    assert torch.equal(generate(model, prompt, direct_calls=False, **sampled), generate(model, prompt, **sampled))


def test_decode_options_default_to_the_fast_paths_and_reach_the_loop():
    from nanoseek.generation.compiled import DecodeOptions

    assert DecodeOptions() == DecodeOptions(direct_calls=True, cuda_graphs=True)
    stream = TextStream(scripted("ok"), ByteTokenizer(), "hi", temperature=0, direct_calls=False, cuda_graphs=False)
    assert stream._loop.decode_options == DecodeOptions(direct_calls=False, cuda_graphs=False)
    assert "".join(stream) == "ok"


def test_generation_reads_no_environment_switches():
    """The decode switches are options: generation/ reads no environment variables."""
    from pathlib import Path

    from nanoseek import generation

    for source in Path(generation.__file__).parent.glob("*.py"):
        assert "os.environ" not in source.read_text() and "getenv" not in source.read_text(), source.name


def test_compiled_nsa_decode_is_one_graph_for_every_position():
    """NSA's per-row-position decode step has no host reads: one graph, called directly, the same
    tokens as eager decoding (with top-k block picks past the first blocks)."""
    torch.manual_seed(0)
    config = ModelConfig.from_preset(
        "llama-tiny", max_position_embeddings=64, sparse="nsa", nsa_block=4, nsa_topn=4, sliding_window=4
    )
    model = Transformer(config).eval()
    prompt = torch.randint(0, 128, (1, 9))
    compiled = generate(model, prompt, max_new_tokens=16, temperature=0, compile=True)
    (decoder,) = compiled_decoders(model).values()
    assert decoder.direct.fn is not None
    assert torch.equal(compiled, generate(model, prompt, max_new_tokens=16, temperature=0))
    with torch._dynamo.config.patch(error_on_recompile=True):  # other positions, same graph
        other = generate(model, prompt[:, :5], max_new_tokens=20, temperature=0, compile=True)
    assert torch.equal(other, generate(model, prompt[:, :5], max_new_tokens=20, temperature=0))


def test_a_copy_of_a_model_does_not_share_its_compiled_steps():
    """The compiled decoders and prefill close over their model: a deepcopy gets none and compiles
    (or reuses the cached graph) for itself, so it decodes with its own weights."""
    import copy

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("llama-tiny", max_position_embeddings=64)).eval()
    prompt = torch.randint(0, 128, (1, 6))
    original = generate(model, prompt, max_new_tokens=8, temperature=0, compile=True)
    twin = copy.deepcopy(model)
    assert not compiled_decoders(twin) and compiled_decoders(model)
    with torch.no_grad():
        twin.lm_head.weight.mul_(-1.0)
    changed = generate(twin, prompt, max_new_tokens=8, temperature=0, compile=True)
    assert torch.equal(changed, generate(twin, prompt, max_new_tokens=8, temperature=0))
    assert not torch.equal(changed, original)
    assert torch.equal(generate(model, prompt, max_new_tokens=8, temperature=0, compile=True), original)


def test_decode_cache_length_buckets():
    from nanoseek.generation.compiled import decode_cache_length

    assert [decode_cache_length(n, 4096) for n in (1, 256, 257, 1000, 1025)] == [256, 256, 512, 1024, 2048]
    assert decode_cache_length(3000, 2048) == 2048


def test_ids_past_the_tokenizer_vocabulary_are_never_sampled():
    from nanoseek.generation.sampling import mask_unknown_ids

    class Small:
        vocab_size = 5

    logits = torch.zeros(2, 8)
    logits[:, 6] = 10.0  # the model's favourite id is one the tokenizer does not have
    masked = mask_unknown_ids(logits, Small())
    assert masked.argmax(-1).tolist() == [0, 0] and torch.isinf(masked[:, 5:]).all()
    assert logits[0, 6] == 10.0  # the input is left alone


def test_matvec_linear_equals_linear():
    """The compiled few-row decode runs F.linear as multiply-and-reduce: same values, bias or not."""
    from nanoseek.generation.compiled import MatvecLinear

    torch.manual_seed(0)
    layer, plain = torch.nn.Linear(16, 5), torch.nn.Linear(16, 5, bias=False)
    for x in (torch.randn(16), torch.randn(3, 16), torch.randn(2, 1, 16)):
        with MatvecLinear():
            got, got_plain = layer(x), plain(x)
        torch.testing.assert_close(got, layer(x), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got_plain, plain(x), atol=1e-6, rtol=1e-5)
        assert got.shape == layer(x).shape
    many = torch.randn(9, 16)  # more rows than MATVEC_MAX_ROWS: left to F.linear (BLAS)
    with MatvecLinear():
        assert layer(many).grad_fn.name().startswith("Addmm")


def test_matvec_mode_runs_few_row_matmuls_as_multiply_and_reduce():
    """Attention over the cache in the compiled decode: (..., M, K) @ (..., K, N) with M small."""
    from nanoseek.generation.compiled import MATMUL_MAX_ROWS, MatvecLinear

    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 2, 8), torch.randn(2, 3, 10, 8)  # scores against a cache, batched
    p, v = torch.randn(2, 3, 2, 10), torch.randn(3, 10, 4)  # broadcast batch dims
    for a, b in ((q, k.transpose(-1, -2)), (p, v), (torch.randn(1, 8), torch.randn(8, 6))):
        a = a.requires_grad_()
        with MatvecLinear():
            got, got_op = torch.matmul(a, b), a @ b
        assert got.grad_fn.name().startswith("Sum")  # a product and a reduction, not a BLAS call
        assert got_op.grad_fn.name().startswith("Sum")
        torch.testing.assert_close(got, torch.matmul(a, b), atol=1e-6, rtol=1e-5)
    a, b = torch.randn(MATMUL_MAX_ROWS + 1, 8, requires_grad=True), torch.randn(8, 6)
    with MatvecLinear():  # more rows: left to BLAS
        assert torch.matmul(a, b).grad_fn.name().startswith("Mm")


def test_compiled_prefill_equals_eager_and_compiles_once():
    """generate(compile_prefill=True): the prompt goes through one dynamic-shape graph (a prompt of
    another length reuses it, no recompile) and the tokens equal eager prefill's."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("llama-tiny", max_position_embeddings=64)).eval()
    prompt = torch.randint(0, 128, (2, 9))
    eager = generate(model, prompt, max_new_tokens=4, temperature=0)
    assert torch.equal(generate(model, prompt, max_new_tokens=4, temperature=0, compile_prefill=True), eager)
    with torch._dynamo.config.patch(error_on_recompile=True):
        other = generate(model, prompt[:, :6], max_new_tokens=4, temperature=0, compile_prefill=True)
    assert torch.equal(other, generate(model, prompt[:, :6], max_new_tokens=4, temperature=0))
    assert "prefill" in model_steps(model)


# ---------------------------------------------------------------------------- the one detokenizer


def test_detokenizer_holds_a_character_split_over_tokens_until_its_last_byte():
    from nanoseek.generation.streaming import Detokenizer

    text = Detokenizer(ByteTokenizer())
    ids = list("a秦🙂".encode())  # 1 + 3 + 4 bytes, one token each
    pieces = [text.push(i) for i in ids]
    assert pieces == ["a", "", "", "秦", "", "", "", "🙂"]
    assert text.finish() == "" and text.finish_reason == "length" and text.tokens == len(ids)


def test_detokenizer_finishing_rule_eos_and_max_tokens():
    from nanoseek.generation.streaming import Detokenizer

    text = Detokenizer(ByteTokenizer(), stops=["xyz"], max_tokens=4)
    pieces = [text.push(i) for i in list(b"abxy") + [ord("z")]]
    assert pieces == ["", "", "a", "bxy", ""]  # 2 characters held back; the 4th id finishes and releases them
    assert text.finish_reason == "length" and text.tokens == 4
    eos = Detokenizer(ByteTokenizer())
    assert [eos.push(i) for i in ["秦".encode()[0], EOS, ord("a")]] == ["", "\ufffd", ""]
    assert eos.finish_reason == "stop" and eos.finish() == ""


def test_text_stream_uses_the_one_detokenizer():
    from nanoseek.generation.streaming import Detokenizer

    s = TextStream(scripted("é!"), ByteTokenizer(), "hi", temperature=0)
    assert list(s) == ["é", "!"] and isinstance(s._text, Detokenizer)


# ---------------------------------------------------------------------------- past the context


class LetterTokenizer:
    """26 ids, one lowercase letter each; no eos."""

    eos_id = None
    vocab_size = 26

    def encode(self, text):
        return [ord(c) - 97 for c in text]

    def decode_bytes(self, ids):
        return bytes(97 + i for i in ids)

    def decode(self, ids):
        return self.decode_bytes(ids).decode()


def test_stream_past_context_restarts_from_the_last_half_of_the_context():
    from nanoseek.generation.streaming import stream_past_context

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("gpt2-tiny", vocab_size=26, max_position_embeddings=16)).eval()
    tok = LetterTokenizer()
    text = "".join(stream_past_context(model, tok, "abc", max_new_tokens=40, temperature=0))
    assert len(text) == 40  # more tokens than the 16-position context holds
    first = generate(model, tok.encode("abc"), max_new_tokens=13, temperature=0).tolist()
    assert text[:13] == tok.decode(first)  # the prompt's own chunk fills the context
    restart = tok.encode(("abc" + text[:13])[-8:])  # then half the context is kept
    assert text[13:21] == tok.decode(generate(model, restart, max_new_tokens=8, temperature=0).tolist())


@pytest.mark.parametrize("prompt,match", [("", "empty"), ("a" * 16, "16 tokens")])
def test_stream_past_context_checks_the_prompt_before_the_first_piece(prompt, match):
    from nanoseek.generation.streaming import stream_past_context

    model = Transformer(ModelConfig.from_preset("gpt2-tiny", vocab_size=26, max_position_embeddings=16)).eval()
    with pytest.raises(NanoseekError, match=match):
        stream_past_context(model, LetterTokenizer(), prompt, max_new_tokens=4)


@pytest.mark.parametrize(
    "preset,overrides",
    [
        ("llama-tiny", {}),  # dense K/V
        ("deepseek-v3-tiny", {}),  # MLA's latent cache, MoE
        ("deepseek-v32-tiny", {"index_topk": 3}),  # DSA: the indexer's keys; ties go to the earliest key
        ("llama-tiny", {"sparse": "sliding", "sliding_window": 4}),
    ],
)
@pytest.mark.parametrize("start", [0, 5])
def test_prefill_rows_pads_prompts_and_decodes_as_each_alone(preset, overrides, start):
    """Prompts of 2, 7 and 4 tokens in one right-padded prefill: each row's logits are its own last
    token's, and the decode steps after it (which overwrite the padding's cache entries before any
    query sees them) give the logits of prefilling and decoding that prompt alone."""
    from nanoseek.generation.steps import prefill_rows

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset).replace(vocab_size=64, max_position_embeddings=32, **overrides)
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 64, (start,), generator=g).tolist()  # positions 0..start-1, filled first
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (2, 7, 4)]
    follow = torch.randint(0, 64, (3, 3), generator=g)  # three decode steps per row
    with torch.no_grad():
        cache = model.make_cache(3, 32)
        if start:
            prefill(model, torch.tensor([prefix] * 3), cache)
        got = [prefill_rows(model, prompts, cache, start)]
        positions = torch.tensor([start + len(p) for p in prompts])
        for j in range(3):
            got.append(decode_step(model, follow[:, j : j + 1], cache, positions + j))
        for b, p in enumerate(prompts):
            alone = model.make_cache(1, 32)
            want = [prefill(model, torch.tensor([prefix + p]), alone)]
            for j in range(3):
                want.append(decode_step(model, follow[b : b + 1, j : j + 1], alone, start + len(p) + j))
            for step, (x, y) in enumerate(zip(got, want)):
                torch.testing.assert_close(x[b : b + 1], y, atol=1e-5, rtol=1e-5, msg=f"row {b}, step {step}")
