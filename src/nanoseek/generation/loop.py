"""The token loop: prefill, then one decode step per new token, with a static key/value cache.

Method (as gpt-fast and HF `generate` do it):

1. Allocate one static cache per layer for exactly P + N positions (P prompt tokens, N new ones).
2. Prefill: one forward over the prompt at positions 0..P-1 writes every layer's keys/values into
   the cache; only the last position's logits are kept (`last_only=True`).
3. Decode: each step feeds the single token just sampled at position p and attends to the cached
   positions 0..p, so a step costs one token's forward instead of the whole sequence's.
4. `sampling.Sampler` turns the logits (B, V) into the next token (B,) (see sampling.py).
5. A row ends when it emits a stop id (eos); it then repeats that id, and the loop ends when
   every row has ended or N tokens were made.

`TokenLoop` is the loop for one batch of prompts of equal length (`generate`, and through
`streaming.TextStream` the `sample` and `chat` commands). The server engine (serve/engine.py)
schedules rows of different lengths itself but samples and detokenizes with the same pieces
(`Sampler`, `streaming.Detokenizer`); speculative decoding samples its main model's choice with a
greedy `Sampler`. `compile=True` decodes with `compiled.CompiledDecoder`.

    >>> from nanoseek import ModelConfig, Transformer
    >>> model = Transformer(ModelConfig.from_preset("gpt2-tiny")).eval()
    >>> generate(model, [1, 2, 3], max_new_tokens=4, temperature=0).shape
    torch.Size([4])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial

import torch

from nanoseek.errors import NanoseekError
from nanoseek.generation.compiled import (
    CompiledDecoder,
    DecodeOptions,
    compiled_prefill,
)
from nanoseek.generation.sampling import Sampler, SamplingOptions
from nanoseek.generation.steps import decode_step, prefill

# ---------------------------------------------------------------------------- the loop


def model_device(model, fallback: torch.device) -> torch.device:
    """Device of the model's first parameter; `fallback` for a model without parameters."""
    params = model.parameters() if hasattr(model, "parameters") else iter(())
    first = next(iter(params), None)
    return fallback if first is None else first.device


def as_batch(input_ids: torch.Tensor | Sequence[int], device: torch.device | None = None) -> tuple[torch.Tensor, bool]:
    """(B, P) int64 prompt ids and whether the input was a single 1-D prompt."""
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.tensor(list(input_ids), dtype=torch.long)
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise NanoseekError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() not in (1, 2):
        raise NanoseekError(f"input_ids must be (T,) or (B, T), got shape {tuple(input_ids.shape)}")
    single = input_ids.dim() == 1
    batch = input_ids.unsqueeze(0) if single else input_ids
    device = device if device is not None else batch.device
    return batch.to(device=device, dtype=torch.long), single


def check_lengths(prompt_len: int, max_new_tokens: int, context: int) -> None:
    if prompt_len == 0:
        raise NanoseekError("the prompt is empty: generation needs at least one prompt token")
    if max_new_tokens < 0:
        raise NanoseekError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if prompt_len + max_new_tokens > context:
        raise NanoseekError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = "
            f"{prompt_len + max_new_tokens} exceeds the context limit of {context} positions "
            f"(max_position_embeddings); shorten the prompt or lower max_new_tokens"
        )


class TokenLoop:
    """The one prefill/decode/sample loop; iterate it to get the next ids (B,) step by step.

    Validation happens in the constructor; the model is switched to eval mode while the loop runs
    and put back in its previous mode when it ends (or is closed). Every step runs under
    `torch.inference_mode()`; nothing happens between steps, so a consumer can stream.
    """

    def __init__(
        self,
        model,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        options: SamplingOptions,
        stop_ids: Sequence[int] = (),
        compile: bool = False,
        tokenizer=None,
        compile_prefill: bool = False,
        decode_options: DecodeOptions | None = None,
    ):
        # when `tokenizer` is given, ids it does not know are never sampled
        self.sampler = Sampler(options, input_ids.device, tokenizer)
        self.compile, self.compile_prefill = compile, compile_prefill
        self.decode_options = decode_options or DecodeOptions()
        check_lengths(input_ids.shape[1], max_new_tokens, model.config.max_position_embeddings)
        self.model = model
        self.input_ids = input_ids
        self.max_new_tokens = max_new_tokens
        self.options = options
        self.stop_ids = torch.tensor(list(stop_ids), dtype=torch.long, device=input_ids.device)

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1]

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.max_new_tokens == 0:
            return
        was_training = self.model.training
        self.model.eval()
        try:
            self._start()
            for step in range(self.max_new_tokens):
                yield self._step(step)
                if self._all_finished():
                    return
        finally:
            self.model.train(was_training)
            if getattr(self, "decoder", None) is not None:
                self.decoder.release()

    @torch.inference_mode()
    def _start(self) -> None:
        batch, total = self.input_ids.shape[0], self.prompt_len + self.max_new_tokens
        self.decoder = CompiledDecoder.acquire(self.model, batch, total) if self.compile else None
        if self.decoder is not None:
            self.decoder.configure(self.decode_options)
        self.cache = self.decoder.cache if self.decoder else self.model.make_cache(batch, total)
        self.history = torch.zeros(batch, total, dtype=torch.long, device=self.input_ids.device)
        self.history[:, : self.prompt_len] = self.input_ids
        self.finished = torch.zeros(batch, dtype=torch.bool, device=self.input_ids.device)

    @torch.inference_mode()
    def _step(self, step: int) -> torch.Tensor:
        end = self.prompt_len + step  # position of the token sampled in this step
        if step == 0:
            run = compiled_prefill(self.model) if self.compile_prefill else partial(prefill, self.model)
            logits = run(self.input_ids, self.cache)
        elif self.decoder is not None:
            positions = torch.full((self.input_ids.shape[0],), end - 1, device=self.input_ids.device)
            # a fresh (B, 1) tensor: a view of the history would carry its length in its stride
            # (batch 1: .contiguous() keeps the view), and a new stride means a new graph
            token = self.history[:, end - 1 : end].clone(memory_format=torch.contiguous_format)
            logits = self.decoder(token, positions, guarded=step == 1)
        else:
            logits = decode_step(self.model, self.history[:, end - 1 : end], self.cache, end - 1)
        token = self.sampler(logits, self.history[:, :end])
        if self.stop_ids.numel():
            token = torch.where(self.finished, self.stop_ids[0], token)
            self.finished |= torch.isin(token, self.stop_ids)
        self.history[:, end] = token
        return token

    def _all_finished(self) -> bool:
        return bool(self.stop_ids.numel()) and bool(self.finished.all())


def stop_id_list(eos_id: int | None, stop_ids: Sequence[int] | None) -> list[int]:
    """eos first (finished rows repeat the first id), then the other stop ids."""
    ids = [] if eos_id is None else [int(eos_id)]
    return ids + [int(i) for i in (stop_ids or ()) if int(i) not in ids]


def generate(
    model,
    input_ids: torch.Tensor | Sequence[int],
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    eos_id: int | None = None,
    stop_ids: Sequence[int] | None = None,
    compile: bool = False,
    compile_prefill: bool = False,
    direct_calls: bool = True,
    cuda_graphs: bool = True,
) -> torch.Tensor:
    """The new token ids after `input_ids` (B, T) -> (B, n_new); a 1-D prompt gives (n_new,).

    Rows that emit `eos_id` (or one of `stop_ids`) repeat it afterwards; generation ends early
    once every row has finished. `compile=True` decodes with a compiled static-shape step
    (`CompiledDecoder`; the first call per batch size and length bucket compiles, later ones reuse
    the graph). With it, `direct_calls` (CPU) and `cuda_graphs` (CUDA) choose its fast paths
    (`compiled.DecodeOptions`; both on by default, the same tokens either way).
    `compile_prefill=True` also runs the prompt through `compiled_prefill` (one dynamic-shape graph;
    a long first compile, see there).
    """
    ids, single = as_batch(input_ids, model_device(model, torch.device("cpu")))
    options = SamplingOptions(temperature, top_k, top_p, repetition_penalty, seed)
    loop = TokenLoop(
        model,
        ids,
        max_new_tokens,
        options,
        stop_id_list(eos_id, stop_ids),
        compile=compile,
        compile_prefill=compile_prefill,
        decode_options=DecodeOptions(direct_calls, cuda_graphs),
    )
    steps = list(loop)
    # stacking outside inference mode gives an ordinary tensor the caller may use freely
    new = torch.stack(steps, dim=1) if steps else ids.new_empty((ids.shape[0], 0))
    return new[0] if single else new
