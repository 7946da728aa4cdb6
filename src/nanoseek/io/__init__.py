"""Checkpoints on disk: nanoseek's native folders and Hugging Face folders, safetensors only.

    save_model(model, directory, format="nanoseek" | "hf", tokenizer_dir=None) -> directory
    load_model(path, dtype=None, trust_pickle=False) -> model in eval mode

Importing this package installs `save_model`'s formats as the writers behind
`Transformer.save_pretrained` (the model itself writes no files).
"""

from __future__ import annotations

from pathlib import Path

import torch

from nanoseek.io.checkpoint import (CONFIG_FILE, TOKENIZER_FILE, load_native_model, read_json, resolve_checkpoint,
                                   write_model_files)
from nanoseek.io.hf import load_hf_model, save_hf
from nanoseek.model.transformer import CHECKPOINT_WRITERS

FORMATS = ("nanoseek", "hf")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path: str | Path, dtype=None, trust_pickle: bool = False):
    """A nanoseek checkpoint, a run folder (its latest checkpoint) or an HF-format folder, in eval mode.

    `trust_pickle` allows an HF folder's pytorch_model.bin (read with torch.load(weights_only=True))."""
    ckpt = resolve_checkpoint(path)
    cfg = read_json(ckpt / CONFIG_FILE)
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    if cfg.get("model_type") == "nanoseek":
        return load_native_model(ckpt, cfg, dtype)
    return load_hf_model(ckpt, dtype=dtype, trust_pickle=trust_pickle)


def save_native(model, directory, tokenizer_dir=None) -> Path:
    """config.json + model.safetensors (+ the tokenizer of `tokenizer_dir` or the model's source folder)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    source = Path(tokenizer_dir or getattr(model, "checkpoint_dir", "") or "") / TOKENIZER_FILE
    write_model_files(model, directory, source.read_text() if source.is_file() else None)
    return directory


def save_model(model, directory, format: str = "nanoseek", tokenizer_dir=None) -> Path:
    """Write `model` to `directory` as a nanoseek checkpoint or a transformers-loadable HF folder."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}; choose 'nanoseek' or 'hf'")
    return CHECKPOINT_WRITERS[format](model, directory, tokenizer_dir)


CHECKPOINT_WRITERS.update(nanoseek=save_native, hf=save_hf)

__all__ = ["FORMATS", "load_model", "save_model"]
