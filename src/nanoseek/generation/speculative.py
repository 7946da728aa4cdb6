"""Self-speculative greedy decoding with the model's own multi-token-prediction module as drafter.

State: the main model has processed tokens x_0..x_{m-1} (hidden states H_i), and x_m is known (the
greedy choice from its last logits). The MTP module, fed (H_i, Emb(x_{i+1})) for i < m, predicts
x_{m+1}: the draft d. One main forward over [x_m, d] at positions m, m+1 then gives
    g = argmax logits_m          (the true next token x_{m+1}; always accepted)
    if g == d: x_{m+2} = argmax logits_{m+1} too — two tokens for one forward.
The main model decides every token, so the output equals plain greedy decoding; the cache slot of a
rejected draft is overwritten by the next pass (static caches are written at an index).

The main model's choices go through a greedy `sampling.Sampler` (the one the token loop uses; with
a tokenizer, ids past its vocabulary are never chosen), and `compare_with_greedy` turns the ids into
text with `streaming.Detokenizer`. What stays apart from `TokenLoop` is the schedule: a forward
over two positions with a draft, and a variable number of accepted tokens per step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from nanoseek.errors import NanoseekError
from nanoseek.generation.loop import TokenLoop, as_batch, check_lengths, model_device
from nanoseek.generation.sampling import Sampler, SamplingOptions
from nanoseek.generation.streaming import Detokenizer


@dataclass
class SpeculativeStats:
    drafts: int = 0
    accepted: int = 0
    forwards: int = 0  # main-model forward passes after the prefill

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafts if self.drafts else 0.0


class _MTPDrafter:
    """The first MTP module with its own static cache, fed position by position as tokens settle."""

    def __init__(self, model, max_len: int):
        self.model = model
        self.module = model.mtp[0]
        param = next(model.parameters())
        self.cache = self.module.block.self_attn.make_cache(1, max_len, param.dtype, param.device)
        self.fed = 0  # positions 0..fed-1 are in the MTP cache

    def draft(self, hidden_BTD: torch.Tensor, tokens: torch.Tensor, upto: int) -> int:
        """Feed positions fed..upto-1 (hidden H_i of main positions, embedding of x_{i+1}); draft x_{upto+1}."""
        start = self.fed
        h = hidden_BTD[:, start:upto]
        emb = self.model.embed_tokens(tokens[:, start + 1 : upto + 1]) * self.model.embed_scale
        rope = self.model.rope(start, upto - start, tokens.device)
        _, normed = self.module(h, emb, rope, self.cache, start)
        self.fed = upto
        logits = self.model.lm_head(normed[:, -1])
        return int(logits.argmax(-1))


@torch.inference_mode()
def speculative_generate(model, input_ids, max_new_tokens: int = 32, eos_id: int | None = None, tokenizer=None):
    """Greedy decoding, two tokens per forward when the MTP draft is right. Returns (new ids, stats)."""
    if not len(getattr(model, "mtp", [])):
        raise NanoseekError("speculative decoding needs a model with num_nextn_predict_layers >= 1")
    tokens, _ = as_batch(input_ids, model_device(model, torch.device("cpu")))
    if tokens.shape[0] != 1:
        raise NanoseekError("speculative decoding runs one prompt at a time (batch 1)")
    prompt_len = tokens.shape[1]
    check_lengths(prompt_len, max_new_tokens, model.config.max_position_embeddings)
    choose = Sampler(SamplingOptions(temperature=0), tokens.device, tokenizer)
    was_training = model.training
    model.eval()
    max_len = prompt_len + max_new_tokens + 1
    cache = model.make_cache(1, max_len)
    drafter = _MTPDrafter(model, max_len)
    stats = SpeculativeStats()
    seq = torch.zeros(1, max_len + 1, dtype=torch.long, device=tokens.device)
    seq[:, :prompt_len] = tokens
    hidden = torch.zeros(
        1, max_len + 1, model.config.hidden_size, device=tokens.device, dtype=next(model.parameters()).dtype
    )
    out = model(tokens, cache=cache)
    hidden[:, :prompt_len] = out.hidden
    m = prompt_len  # main has processed seq[:m]; seq[m] is known
    seq[0, m] = choose(out.logits[:, -1])[0]
    end = prompt_len + max_new_tokens
    try:
        while m < end and not _hit_eos(seq, prompt_len, m + 1, eos_id):
            if m + 1 >= end:  # one token left: no room for a draft
                break
            d = drafter.draft(hidden, seq, m)
            out = model(torch.tensor([[int(seq[0, m]), d]], device=seq.device), cache=cache, start=m)
            stats.forwards += 1
            stats.drafts += 1
            g = choose(out.logits[0])  # the main model's choice at positions m and m + 1
            seq[0, m + 1] = g[0]
            hidden[:, m : m + 2] = out.hidden
            if int(g[0]) == d:
                stats.accepted += 1
                seq[0, m + 2] = g[1]
                m += 2
            else:
                m += 1
    finally:
        model.train(was_training)
    new = seq[0, prompt_len : min(m + 1, end)]
    if eos_id is not None and (new == eos_id).any():
        new = new[: int((new == eos_id).nonzero()[0]) + 1]
    return new, stats


def _hit_eos(seq: torch.Tensor, start: int, end: int, eos_id: int | None) -> bool:
    return eos_id is not None and bool((seq[0, start:end] == eos_id).any())


def compare_with_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[str, dict]:
    """The speculative completion of `prompt` as text (up to eos), and a report comparing it with
    plain greedy decoding of as many tokens: acceptance rate, main-model forwards, both times, and
    whether the ids are the same. `max_new_tokens` is capped by the room the context leaves."""
    ids = tokenizer.encode(prompt)
    max_new_tokens = min(max_new_tokens, model.config.max_position_embeddings - len(ids))
    t0 = time.perf_counter()
    new, stats = speculative_generate(
        model, ids, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id, tokenizer=tokenizer
    )
    t1 = time.perf_counter()
    batch, _ = as_batch(ids, new.device)  # greedy with the same unknown-id mask
    steps = list(TokenLoop(model, batch, len(new), SamplingOptions(temperature=0), tokenizer=tokenizer))
    plain = torch.stack(steps, dim=1)[0] if steps else new[:0]
    t2 = time.perf_counter()
    text = Detokenizer(tokenizer)
    completion = "".join(text.push(i) for i in new.tolist()) + text.finish()
    report = {
        "speculative_tokens": len(new),
        "acceptance_rate": round(stats.acceptance_rate, 4),
        "main_forwards": stats.forwards,
        "speculative_s": round(t1 - t0, 4),
        "greedy_s": round(t2 - t1, 4),
        "speedup": round((t2 - t1) / max(t1 - t0, 1e-9), 3),
        "same_as_greedy": plain.tolist() == new.tolist(),
    }
    return completion, report
