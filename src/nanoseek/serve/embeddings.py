"""Embeddings requests, scheduled fairly with generation.

The model belongs to the engine thread, so embeddings run there as `call` jobs, between decode
steps. One job per request would let a request of thousands of inputs stall every stream for
seconds; instead a request is cut into chunks of about CHUNK_TOKENS tokens and sends the next chunk
only once the last one is back, so a decode step runs between any two chunks:

    chunk 1 | decode step | chunk 2 | decode step | ...

A request holds one place of the engine's admission limit while it runs (429 when none is free),
as a generation request does, and stops between chunks when its client has gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from nanoseek.serve.engine import Engine, QueueFull
from nanoseek.serve.protocol import APIError

CHUNK_TOKENS = 256  # tokens embedded between two decode steps
MAX_INPUTS = 2048  # inputs per request, as OpenAI's API


def chunks(inputs: list[list[int]], tokens: int = CHUNK_TOKENS) -> Iterator[list[list[int]]]:
    """Consecutive runs of `inputs` of about `tokens` tokens (at least one input each)."""
    run, size = [], 0
    for ids in inputs:
        if run and size + len(ids) > tokens:
            yield run
            run, size = [], 0
        run.append(ids)
        size += len(ids)
    if run:
        yield run


def check_inputs(inputs: list[list[int]]) -> None:
    if not inputs:
        raise APIError(400, "input is an empty list; give at least one text", "input")
    if len(inputs) > MAX_INPUTS:
        raise APIError(400, f"input has {len(inputs)} items; at most {MAX_INPUTS} per request", "input")


async def embed_in_turns(engine: Engine, embed: Callable, inputs, gone=None) -> list | None:
    """`embed(model, chunk)` over the chunks of `inputs` on the engine thread (or in the engine
    process: `embed` picklable), taking turns with decode steps; None when `gone()` (an awaitable
    check) says the client left between two chunks."""
    try:
        engine.reserve()
    except QueueFull as e:
        raise APIError(429, f"{e}; retry later", None, "rate_limit_exceeded", "rate_limit_error") from None
    try:
        vectors = []
        for chunk in chunks(inputs):
            if gone is not None and await gone():
                return None
            vectors += await asyncio.wrap_future(engine.call_with_model(embed, chunk))
        return vectors
    finally:
        engine.unreserve()


def embed_ids(model, inputs: list[list[int]]) -> list:
    """Mean-pooled, L2-normalized scalar mix of the layer outputs (see nanoseek.analysis.embed), as float32
    numpy arrays."""
    import torch
    import torch.nn.functional as F

    vectors = []
    with torch.inference_mode():
        for ids in inputs:
            outputs = model.layer_outputs(torch.tensor([ids], device=next(model.parameters()).device))
            vector = F.normalize(model.scalar_mix(outputs).mean(1).float(), dim=-1)[0]
            vectors.append(vector.cpu().numpy())  # plain arrays: they cross a process boundary by pickle
    return vectors
