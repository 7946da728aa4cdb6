"""The files of a Hugging Face folder: lazy tensor access over one file or shards, FP8, writing shards.

A folder holds config.json, model.safetensors (or shards listed by model.safetensors.index.json),
tokenizer.json and tokenizer_config.json. `TensorSource` memory-maps the safetensors files and hands
out one tensor at a time, so a checkpoint is never held twice in memory. FP8 block-quantized weights
(`weight_scale_inv`, 128x128 blocks) are dequantized as they are read:

    w[i, j] = w_fp8[i, j] * scale_inv[i // 128, j // 128]

A pytorch_model.bin (pickle) is read only when the caller trusts it, with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from nanoseek.errors import NanoseekError
from nanoseek.io.checkpoint import read_json
from nanoseek.io.safetensors import SafetensorsFile

FP8_BLOCK = 128


class TensorSource:
    """Lazy access to every tensor of a folder (single file or sharded)."""

    def __init__(self, folder: Path, trust_pickle: bool = False):
        self.folder = folder
        self.files: dict[str, Path] = {}
        self._handles: dict[Path, SafetensorsFile] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.files = read_index(index)
        else:
            shards = sorted(folder.glob("*.safetensors"))
            if shards:
                for shard in shards:
                    for key in self._open(shard).keys():
                        self.files[key] = shard
            elif (folder / "pytorch_model.bin").is_file():
                if not trust_pickle:
                    raise NanoseekError(
                        f"{folder / 'pytorch_model.bin'} is a pickle file; refusing to load it "
                        f"(pass --trust-pickle to load it with torch.load(weights_only=True))"
                    )
                self._pickled = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
                self.files = {k: folder / "pytorch_model.bin" for k in self._pickled}
            else:
                raise NanoseekError(f"{folder} holds no *.safetensors weights")

    def _open(self, path: Path) -> SafetensorsFile:
        if path not in self._handles:
            self._handles[path] = SafetensorsFile(path)
        return self._handles[path]

    def keys(self):
        return self.files.keys()

    def get(self, key: str) -> torch.Tensor:
        if self._pickled is not None:
            return self._pickled[key]
        handle = self._open(self.files[key])
        if key not in handle.entries:
            raise NanoseekError(f"{handle.path} does not hold {key!r} (named by the index)")
        return handle.get(key)


def read_index(index: Path) -> dict[str, Path]:
    """{tensor name: shard path} of a model.safetensors.index.json. Every shard it names must be a
    file inside the index's folder: a name reaching elsewhere (/etc/passwd, ../x) is refused."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise NanoseekError(
            f"{index}: 'weight_map' must be an object of tensor name -> shard file, got {weight_map!r}"[:300]
        )
    folder = index.parent.resolve()
    files = {}
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise NanoseekError(f"{index}: weight_map[{key!r}] must be a shard file name, got {name!r}"[:300])
        path = (folder / name).resolve()
        if not path.is_relative_to(folder) or path == folder:
            raise NanoseekError(f"{index}: weight_map[{key!r}] = {name!r} is outside the checkpoint folder {folder}")
        if path.is_dir():
            raise NanoseekError(f"{index}: weight_map[{key!r}] = {name!r} is a folder, not a shard file")
        if not path.is_file():
            raise NanoseekError(f"{index} names a missing shard: {path}")
        files[key] = path
    return files


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """w = w_fp8 * s per 128x128 block (DeepSeek-V3's block-wise FP8)."""
    out, inp = weight.shape
    scale = scale_inv.float().repeat_interleave(FP8_BLOCK, 0)[:out].repeat_interleave(FP8_BLOCK, 1)[:, :inp]
    return weight.float() * scale


def load_tensor(source: TensorSource, key: str) -> torch.Tensor:
    """One tensor of `source`, dequantized when it is FP8 with a `weight_scale_inv` beside it."""
    tensor = source.get(key)
    scale_key = key.replace(".weight", ".weight_scale_inv")
    if tensor.dtype in (getattr(torch, "float8_e4m3fn", None),) and scale_key in source.files:
        tensor = dequantize_fp8(tensor, source.get(scale_key))
    return tensor


def write_shards(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int):
    """model.safetensors, or numbered shards of at most `max_shard_bytes` + model.safetensors.index.json."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def checkpoint_dtype(cfg: dict):
    """The dtype a config.json says its weights are stored in (None when it names none)."""
    name = cfg.get("torch_dtype") or cfg.get("dtype")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(name)
