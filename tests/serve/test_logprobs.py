"""Logprobs: the server's loglikelihoods are the in-process model's log_softmax (fp32, within 1e-4)."""

from __future__ import annotations

import json
import threading

import pytest
import torch

httpx = pytest.importorskip("httpx")

from test_engine import ByteTokenizer, tiny_model  # noqa: E402

from nanoseek.generation import SamplingOptions  # noqa: E402
from nanoseek.serve.engine import Engine, Sequence  # noqa: E402
from nanoseek.serve.logprobs import TextOffsets, TokenLogprob, TokenStrings, completion_logprobs  # noqa: E402

TOL = 1e-4


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(T, V): log_softmax of the model's logits at each position of `ids`, one plain forward."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def post(server, path, body):
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------------------- the engine


def test_engine_records_prompt_and_batched_decode_logprobs_equal_to_one_forward():
    model = tiny_model("deepseek-v3-tiny")
    prompts = [[5, 9, 2, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42, 17]]  # rows at different positions
    engine = Engine(model, ByteTokenizer(), max_batch=3, max_queue=4)
    done = [threading.Event() for _ in prompts]
    events = [[] for _ in prompts]

    def emit(i):
        return lambda e: (events[i].append(e), e.finish_reason and done[i].set())

    seqs = [
        Sequence(p, 6, SamplingOptions(temperature=0), emit(i), index=i, logprobs=3, echo_logprobs=True)
        for i, p in enumerate(prompts)
    ]
    engine.start()
    try:
        engine.submit(seqs)
        assert all(d.wait(60) for d in done)
    finally:
        engine.stop()
    for seq, evs in zip(seqs, events):
        entries = [e for ev in evs for e in ev.logprobs]
        ids = seq.prompt_ids + seq.output_ids
        assert [e.id for e in entries] == ids and entries[0].logprob is None
        ref = reference_logprobs(model, ids)
        for t, e in enumerate(entries[1:], start=1):
            assert abs(e.logprob - ref[t - 1, e.id].item()) < TOL
            top = ref[t - 1].topk(3)
            assert [i for i, _ in e.top] == top.indices.tolist()
            assert max(abs(v - w) for (_, v), w in zip(e.top, top.values.tolist())) < TOL


def test_max_tokens_zero_returns_the_prompt_only():
    model = tiny_model("gpt2-tiny")
    engine = Engine(model, ByteTokenizer(), max_batch=1, max_queue=1)
    got, done = [], threading.Event()
    seq = Sequence([3, 1, 4, 1, 5], 0, SamplingOptions(temperature=0), lambda e: (got.append(e), done.set()))
    seq.logprobs, seq.echo_logprobs = 0, True
    engine.start()
    try:
        engine.submit([seq])
        assert done.wait(60)
    finally:
        engine.stop()
    assert got[0].finish_reason == "length" and got[0].completion_tokens == 0
    assert [e.id for e in got[0].logprobs] == [3, 1, 4, 1, 5] and seq.output_ids == []


def test_completion_logprobs_shape_offsets_and_colliding_strings():
    from nanoseek.data.tokenizer import CharTokenizer

    tok = CharTokenizer.train(["ab"])
    a, b = tok.encode("a")[0], tok.encode("b")[0]
    first, second, third = tok.encode("日")  # an unknown character: its three UTF-8 byte tokens
    entries = [
        TokenLogprob(a, None),
        TokenLogprob(first, -1.0, [(b, -0.5)]),
        TokenLogprob(second, -2.0, [(first, -0.1)]),
        TokenLogprob(third, float("-inf"), []),
        TokenLogprob(b, -0.3, [(b, -0.3)]),
    ]
    out = completion_logprobs(entries, TokenStrings(tok), TextOffsets(tok))
    assert out["tokens"] == ["a", "\\xe6", "\\x97", "\\xa5", "b"]
    assert out["text_offset"] == [0, 1, 1, 1, 2]  # the three bytes are one character
    assert out["token_logprobs"] == [None, -1.0, -2.0, -9999.0, -0.3]
    assert out["top_logprobs"][0] is None and out["top_logprobs"][1] == {"\\xe6": -1.0, "b": -0.5}
    assert out["top_logprobs"][4] == {"b": -0.3}
    json.dumps(out, allow_nan=False)  # no -inf reaches the JSON


# ---------------------------------------------------------------------------- over HTTP


def test_echo_with_zero_tokens_gives_the_prompt_loglikelihood(server, local):
    model, tok = local
    text = "Hello, 日本!"
    out = post(
        server, "/v1/completions", {"model": "tiny-chat", "prompt": text, "echo": True, "logprobs": 2, "max_tokens": 0}
    )
    choice = out["choices"][0]
    assert choice["text"] == text and out["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    ids = tok.encode(text)
    ref = reference_logprobs(model, ids)
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for t in range(1, len(ids)):
        assert abs(lp["token_logprobs"][t] - ref[t - 1, ids[t]].item()) < TOL
        assert abs(max(lp["top_logprobs"][t].values()) - ref[t - 1].max().item()) < TOL
    assert lp["text_offset"][:3] == [0, 1, 2]


def test_batched_token_id_prompts_with_echo_and_one_token_as_lm_eval_sends_them(server, local):
    model, tok = local
    prompts = [tok.encode("The sky is blue"), tok.encode("Two and two")]
    body = {"model": "tiny-chat", "prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    out = post(server, "/v1/completions", body)
    choices = sorted(out["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1]
    for ids, choice in zip(prompts, choices):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt, then the one generated token
        generated = ids + [int(reference_logprobs(model, ids)[-1].argmax())]
        ref = reference_logprobs(model, generated)
        for t in range(1, len(generated)):
            assert abs(lp["token_logprobs"][t] - ref[t - 1, generated[t]].item()) < TOL


def test_streamed_logprobs_equal_the_whole_answer(server):
    body = {"model": "tiny-chat", "prompt": "Once", "max_tokens": 10, "temperature": 0, "logprobs": 2, "echo": True}
    whole = post(server, "/v1/completions", body)["choices"][0]
    tokens, token_logprobs, text = [], [], ""
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                if choice["logprobs"]:
                    tokens += choice["logprobs"]["tokens"]
                    token_logprobs += choice["logprobs"]["token_logprobs"]
    assert text == whole["text"] and tokens == whole["logprobs"]["tokens"]
    assert token_logprobs == whole["logprobs"]["token_logprobs"]


def test_chat_logprobs_in_openai_shape(client, local):
    model, tok = local
    out = client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.logprob - TOL  # greedy: the chosen token is the best
        assert bytes(item.bytes).decode("utf-8", "backslashreplace") == item.token or item.token.startswith("<|")


def test_logprob_requests_out_of_range_are_refused(server):
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
