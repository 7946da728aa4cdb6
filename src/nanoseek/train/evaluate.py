"""Evaluation: one loop for `nanoseek train` (periodic validation) and `nanoseek eval` (a checkpoint).

Over evaluated target tokens y_1..y_N with model probabilities p(y_i | y_<i):

    loss        L   = -(1/N) sum_i ln p(y_i | y_<i)            (nats per token)
    perplexity      = exp(L)
    bits per byte   = -sum_i log2 p(y_i | y_<i) / bytes(y_1..y_N)

Bits per byte divides by the UTF-8 bytes the targets decode to, so it compares models with
different tokenizers. Training evaluates a fixed set of random windows of the validation split
(`fixed_batches`, the same windows every time); `nanoseek eval` reads the whole split or file in
non-overlapping windows (`iter_eval_batches`), so every token after the first is a target once.

    >>> from nanoseek import ModelConfig, Transformer
    >>> model = Transformer(ModelConfig.from_preset("gpt2-tiny"))
    >>> tokens = np.arange(200) % 50
    >>> result = evaluate(model, fixed_batches(tokens, batch_size=2, seq_len=16, batches=3))
    >>> result.tokens, round(result.perplexity, 1) == round(math.exp(result.loss), 1)
    (96, True)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanoseek.data import BUNDLED_CORPUS, corpus_path
from nanoseek.data.files import check_input_file
from nanoseek.data.shards import BatchLoader, TokenDataset, iter_eval_batches, prepare_corpus
from nanoseek.device import autocast
from nanoseek.errors import NanoseekError
from nanoseek.io.checkpoint import STATE_FILE, read_json


@dataclass
class EvalResult:
    """Summed cross-entropy (nats) over `tokens` targets that decode to `bytes` bytes."""

    loss_sum: float = 0.0
    tokens: int = 0
    bytes: int = 0

    @property
    def loss(self) -> float:
        return self.loss_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50))

    @property
    def bits_per_byte(self) -> float:
        return self.loss_sum / math.log(2) / max(self.bytes, 1)


@torch.no_grad()
def evaluate(
    model,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    byte_lengths: np.ndarray | None = None,
    device: torch.device | str = "cpu",
    dtype: str = "float32",
) -> EvalResult:
    """Token-weighted cross-entropy of `model` over (x, y) batches (or (source, x, y) for an encoder-decoder);
    targets of -1 (a pair task's padding and sources) do not count. `byte_lengths[id]` = bytes of a token.

    The head and the loss run fused (the (B, T, V) logits are never formed); the model's mode is kept."""
    was_training = model.training
    model.eval()
    result = EvalResult()
    try:
        with autocast(device, dtype):
            for *inputs, y in batches:
                loss = model(*(t.to(device) for t in inputs), y.to(device), return_logits=False).loss
                counted = y[y >= 0]
                result.loss_sum += loss.item() * counted.numel()
                result.tokens += counted.numel()
                if byte_lengths is not None:
                    result.bytes += int(byte_lengths[counted.numpy()].sum())
    finally:
        model.train(was_training)
    return result


def fixed_batches(tokens, batch_size: int, seq_len: int, batches: int, seed: int = 0) -> Iterator:
    """`batches` random windows of `tokens`, the same ones for the same seed (validation in training)."""
    loader = BatchLoader(tokens, batch_size, seq_len, seed=seed)
    for _ in range(batches):
        yield loader.next()


# ------------------------------------------------------------------------------------ a checkpoint


def eval_tokens(data_path, tokenizer, run_cfg: dict, folder: Path) -> np.ndarray:
    """Tokens of `data_path` (the whole file), else the validation split of the run's training corpus."""
    if data_path:
        path = check_input_file(corpus_path(data_path), "data file")
        raw = path.read_bytes()
        if not raw:
            raise NanoseekError(f"data file {path} is empty")
        return np.asarray(tokenizer.encode(raw), dtype=np.int64)
    if not run_cfg:
        raise NanoseekError(f"this checkpoint has no training record ({STATE_FILE}); pass --data PATH")
    data = run_cfg.get("data", {})
    files = [corpus_path(f) for f in data.get("path") or []] or [str(BUNDLED_CORPUS)]
    for f in files:
        if not Path(f).is_file():
            raise NanoseekError(f"training data file {f} is gone; pass --data PATH")
    # the run's own token shards (reused when they match; rebuilt otherwise): the same split as training
    run_dir = folder.parent.parent if folder.parent.name == "checkpoints" else folder
    shard_dir = Path(data.get("cache_dir") or run_dir / "data")
    prepare_corpus(files, shard_dir, tokenizer, val_fraction=data.get("val_fraction", 0.1))
    return np.asarray(TokenDataset(shard_dir).split("val"), dtype=np.int64)


def evaluate_checkpoint(
    model,
    tokenizer,
    folder: Path,
    data=None,
    seq_len: int | None = None,
    batch_size: int = 16,
    max_batches: int | None = None,
) -> dict:
    """{"loss", "perplexity", "tokens", "bits_per_byte", "bytes", "seq_len"} of a loaded checkpoint on
    `data` (a text file) or its training run's validation split; `seq_len` defaults to the run's."""
    state_file = Path(folder) / STATE_FILE
    run_cfg = read_json(state_file)["config"] if state_file.is_file() else {}
    limit = model.config.max_position_embeddings
    seq_len = seq_len or run_cfg.get("data", {}).get("seq_len") or min(limit, 1024)
    if not 1 <= seq_len <= limit:
        raise NanoseekError(f"--seq-len={seq_len} must be in [1, {limit}] (the model's context)")
    tokens = eval_tokens(data, tokenizer, run_cfg, Path(folder))
    if len(tokens) < 2:
        raise NanoseekError("the evaluation text has fewer than 2 tokens")
    device = next(model.parameters()).device
    result = evaluate(
        model,
        iter_eval_batches(tokens, batch_size, seq_len, max_batches=max_batches),
        tokenizer.token_byte_lengths(),
        device,
    )
    return {
        "loss": result.loss,
        "perplexity": result.perplexity,
        "tokens": result.tokens,
        "bits_per_byte": result.bits_per_byte,
        "bytes": result.bytes,
        "seq_len": seq_len,
    }
