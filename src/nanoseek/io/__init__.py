"""Checkpoints on disk: nanoseek's native folders and Hugging Face folders, safetensors only.

    load_checkpoint(path, dtype=None, trust_pickle=False, tokenizer=True, device=None)
        -> LoadedCheckpoint(model, tokenizer, folder)
    load_model(path, dtype=None, trust_pickle=False) -> model in eval mode
    read_model_config(path) -> (ModelConfig, folder), from config.json alone (nothing allocated)
    save_model(model, directory, format="nanoseek" | "hf", tokenizer_dir=None, drop_mtp=False) -> directory
    convert(src, dst, format, dtype=None, trust_pickle=False, drop_mtp=False) -> dst

`path` may be a checkpoint folder, a run folder (its latest checkpoint) or an HF-format folder;
`folder` is the checkpoint folder it resolved to, where tokenizer.json, tokenizer_config.json (chat
template) and train_state.json live. A model does not remember where it came from: to copy a
tokenizer along when saving, pass its folder as `tokenizer_dir`.

Importing this package installs `save_model`'s formats as the writers behind
`Transformer.save_pretrained` (the model itself writes no files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch

from nanoseek.data.files import publish_dir
from nanoseek.data.tokenizer import load_tokenizer
from nanoseek.errors import NanoseekError
from nanoseek.io.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    load_native_model,
    read_json,
    resolve_checkpoint,
    write_model_files,
)
from nanoseek.io.hf import load_hf_model, read_model_config, save_hf
from nanoseek.model.transformer import CHECKPOINT_WRITERS

FORMATS = ("nanoseek", "hf")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LoadedCheckpoint(NamedTuple):
    """A loaded checkpoint: the model (eval mode), its tokenizer (None when not asked for), its folder."""

    model: Any
    tokenizer: Any
    folder: Path


def load_checkpoint(
    path: str | Path, dtype=None, trust_pickle: bool = False, tokenizer: bool = True, device=None
) -> LoadedCheckpoint:
    """Model, tokenizer and folder of a nanoseek checkpoint, a run folder or an HF-format folder.

    `trust_pickle` allows an HF folder's pytorch_model.bin (read with torch.load(weights_only=True));
    `tokenizer=True` requires the folder's tokenizer.json; `device` moves the model there."""
    folder = resolve_checkpoint(path)
    tok = None
    if tokenizer:
        if not (folder / TOKENIZER_FILE).is_file():
            raise NanoseekError(f"{folder} has no {TOKENIZER_FILE}")
        tok = load_tokenizer(folder / TOKENIZER_FILE)
    cfg = read_json(folder / CONFIG_FILE)
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    if cfg.get("model_type") == "nanoseek":
        model = load_native_model(folder, cfg, dtype)
    else:
        model = load_hf_model(folder, dtype=dtype, trust_pickle=trust_pickle)
    if device is not None:
        model = model.to(device)
    return LoadedCheckpoint(model, tok, folder)


def load_model(path: str | Path, dtype=None, trust_pickle: bool = False):
    """A nanoseek checkpoint, a run folder (its latest checkpoint) or an HF-format folder, in eval mode.

    `trust_pickle` allows an HF folder's pytorch_model.bin (read with torch.load(weights_only=True))."""
    return load_checkpoint(path, dtype, trust_pickle, tokenizer=False).model


def save_native(model, directory, tokenizer_dir=None) -> Path:
    """config.json + model.safetensors (+ the tokenizer.json of `tokenizer_dir`, when it has one)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    source = Path(tokenizer_dir) / TOKENIZER_FILE if tokenizer_dir else None
    write_model_files(model, directory, source.read_text() if source and source.is_file() else None)
    return directory


def save_model(model, directory, format: str = "nanoseek", tokenizer_dir=None, drop_mtp: bool = False) -> Path:
    """Write `model` to `directory` as a nanoseek checkpoint or a transformers-loadable HF folder
    (`drop_mtp`: an HF folder without the DeepSeek MTP layers)."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}; choose 'nanoseek' or 'hf'")
    if drop_mtp and format != "hf":
        raise NanoseekError("drop_mtp (--drop-mtp) applies to HF exports (--to hf) only")
    options = {"drop_mtp": True} if drop_mtp else {}
    return CHECKPOINT_WRITERS[format](model, directory, tokenizer_dir, **options)


def convert(
    src: str | Path, dst: str | Path, format: str, dtype=None, trust_pickle: bool = False, drop_mtp: bool = False
) -> Path:
    """Rewrite the checkpoint at `src` as `format` in `dst` (absent or empty), tokenizer included
    (`drop_mtp`: leave DeepSeek's MTP layers out of an HF export).

    `dst` appears complete or not at all (written beside it, then renamed into place)."""
    if format not in FORMATS:
        raise NanoseekError(f"--to {format!r}: choose one of: {', '.join(FORMATS)}")
    if drop_mtp and format != "hf":
        raise NanoseekError("--drop-mtp applies to --to hf only")
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise NanoseekError(f"destination {dst} exists and is not empty")
    loaded = load_checkpoint(src, dtype, trust_pickle, tokenizer=False)
    with publish_dir(dst) as tmp:
        save_model(loaded.model, tmp, format, tokenizer_dir=loaded.folder, drop_mtp=drop_mtp)
    return dst


CHECKPOINT_WRITERS.update(nanoseek=save_native, hf=save_hf)

__all__ = [
    "FORMATS",
    "LoadedCheckpoint",
    "convert",
    "load_checkpoint",
    "load_model",
    "read_model_config",
    "save_model",
]
