"""Hugging Face checkpoint interop: load and save `deepseek_v2`, `deepseek_v3`, `deepseek_v32`,
`deepseek_v4`, `llama` and `gpt2` folders.

    config.py  config.json <-> ModelConfig for llama and DeepSeek-V2/V3/V3.2; fields refused by name
    v4.py      the same for DeepSeek-V4, and its tensor names
    gpt2.py    the same for GPT-2 (learned positions, LayerNorm, GELU, Conv1D weights)
    state.py   tensor names and fused layouts, both directions
    files.py   TensorSource (memory-mapped, sharded), FP8 dequantization, writing shards

Loading maps the config to a `ModelConfig` and every key to nanoseek's module tree, one tensor at a
time from memory-mapped safetensors into a model built on the meta device. Saving writes the same
layout back (experts unpacked per expert), a config.json that transformers' `AutoModelForCausalLM`
reads, and the tokenizer files. What transformers cannot express is refused.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from nanoseek.config import ModelConfig
from nanoseek.config.memory import check_memory
from nanoseek.config.validate import MODEL, check_range
from nanoseek.errors import NanoseekError
from nanoseek.io.checkpoint import (
    load_state_into,
    model_config_from_json,
    read_json,
    resolve_checkpoint,
    weight_bytes,
)
from nanoseek.io.hf.config import deepseek_config_from_hf, deepseek_config_to_hf
from nanoseek.io.hf.files import FP8_BLOCK, TensorSource, checkpoint_dtype, dequantize_fp8, write_shards
from nanoseek.io.hf.gpt2 import gpt2_config_from_hf, gpt2_config_to_hf
from nanoseek.io.hf.state import mtp_layers_on_disk, nanoseek_to_hf_state, read_state
from nanoseek.io.hf.tokenizer import write_hf_tokenizer
from nanoseek.io.hf.v4 import v4_config_from_hf, v4_config_to_hf
from nanoseek.model import Transformer

SUPPORTED = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4", "llama", "gpt2")


def config_from_hf(cfg: dict, source: Path) -> ModelConfig:
    """A ModelConfig from an HF config.json dict; `source` names the file in errors, which are one
    line whatever the file holds (a missing field, a wrong type, a value out of range)."""
    kind = cfg.get("model_type")
    if not isinstance(kind, str) or kind not in SUPPORTED:
        raise NanoseekError(f"{source}: unknown model_type={kind!r}; supported: {', '.join(SUPPORTED)}")
    if cfg.get("auto_map"):
        print(f"note: {source} names custom code (auto_map); nanoseek never executes it", file=sys.stderr)
    field = "n_layer" if kind == "gpt2" else "num_hidden_layers"
    layers = cfg.get(field)  # checked first: the readers loop over the layers
    if layers is not None and (not isinstance(layers, int) or isinstance(layers, bool)):
        raise NanoseekError(f"{source}: {field}={layers!r} must be an integer")
    try:
        if layers is not None:
            check_range(field, layers, MODEL["num_hidden_layers"])
        if kind == "deepseek_v4":
            return v4_config_from_hf(cfg, source)
        if kind == "gpt2":
            return gpt2_config_from_hf(cfg, source)
        return deepseek_config_from_hf(cfg, source)
    except KeyError as e:
        raise NanoseekError(f"{source}: the field {e.args[0]!r} is missing") from None
    except NanoseekError as e:
        message = str(e)
        raise NanoseekError(message if message.startswith(str(source)) else f"{source}: {message}") from None
    except (TypeError, ValueError, AttributeError) as e:  # a field of the wrong shape met by the mapping
        raise NanoseekError(f"{source}: malformed field ({e})") from None


def read_model_config(path: str | Path) -> tuple[ModelConfig, Path]:
    """(ModelConfig, checkpoint folder) of a nanoseek checkpoint, a run folder or an HF folder, from
    its config.json alone: no weights are read and nothing is allocated."""
    folder = resolve_checkpoint(path)
    cfg = read_json(folder / "config.json")
    if cfg.get("model_type") == "nanoseek":
        return model_config_from_json(cfg, folder / "config.json"), folder
    return config_from_hf(cfg, folder / "config.json"), folder


def config_to_hf(config: ModelConfig) -> dict:
    """A config.json for transformers; refuses what it cannot express."""
    if config.attention == "v4":
        return v4_config_to_hf(config)
    if config.position == "learned":
        return gpt2_config_to_hf(config)
    return deepseek_config_to_hf(config)


def load_hf_model(folder: str | Path, dtype=None, trust_pickle: bool = False):
    """Build a nanoseek Transformer from an HF-format folder, in eval mode."""
    folder = Path(folder)
    cfg = read_json(folder / "config.json")
    config = config_from_hf(cfg, folder / "config.json")
    if dtype is None:
        dtype = checkpoint_dtype(cfg)
    check_memory(config, f"loading {folder}", weight_bytes(dtype))
    source = TensorSource(folder, trust_pickle)
    stored = mtp_layers_on_disk(source, config.num_hidden_layers)
    if stored < config.num_nextn_predict_layers:  # e.g. saved by transformers, which drops MTP
        config = config.replace(num_nextn_predict_layers=stored)
    state = read_state(source, config)
    with torch.device("meta"):
        model = Transformer(config)
    load_state_into(model, state, folder, dtype)
    return model.eval()


ENCODER_DECODER_EXPORT = (
    "cannot save an encoder-decoder model in HF format: no transformers class matches it exactly (MarianMT lays "
    "its sinusoidal table out as [sin | cos] where nanoseek interleaves sin and cos; BART learns its positions "
    "with an offset of 2 and normalizes the embeddings); keep the nanoseek checkpoint, which nanoseek sample, "
    "eval and serve read"
)


def save_hf(
    model,
    folder: str | Path,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    drop_mtp: bool = False,
):
    """Write an HF-format folder that transformers' AutoModelForCausalLM loads, with the tokenizer of
    `tokenizer_dir` in the HF `tokenizers` format and its configs (`nanoseek.io.hf.tokenizer`).

    DeepSeek MTP modules are kept as layers after the last decoder layer (as DeepSeek's checkpoints
    keep them); `drop_mtp` leaves them out (and sets num_nextn_predict_layers=0)."""
    if model.config.architecture == "encoder_decoder":
        raise NanoseekError(ENCODER_DECODER_EXPORT)
    folder = Path(folder)
    config = model.config.replace(num_nextn_predict_layers=0) if drop_mtp else model.config
    hf_config = config_to_hf(config)
    state = nanoseek_to_hf_state(model, mtp=not drop_mtp)
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    hf_config["torch_dtype"] = str(next(iter(dtypes))).replace("torch.", "") if len(dtypes) == 1 else "float32"
    folder.mkdir(parents=True, exist_ok=True)
    special_ids = write_hf_tokenizer(Path(tokenizer_dir), folder, config) if tokenizer_dir else {}
    for key, value in special_ids.items():  # the tokenizer's ids where the model config names none
        if hf_config.get(key) is None:
            hf_config[key] = value
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    write_shards(state, folder, max_shard_bytes)
    return folder


__all__ = [
    "FP8_BLOCK",
    "SUPPORTED",
    "TensorSource",
    "config_from_hf",
    "config_to_hf",
    "dequantize_fp8",
    "load_hf_model",
    "read_model_config",
    "save_hf",
]
