"""The folder the CLI corpus runs in: two tiny checkpoints, a corpus, and broken copies of them.

Every broken fixture is one small, named mutation of a good one (a config field, an index, a
safetensors header), so each corpus case reads as "this command on that damage".
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from nanoseek.config import ModelConfig
from nanoseek.data.tokenizer import CharTokenizer
from nanoseek.io import save_model
from nanoseek.model import Transformer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40


# ------------------------------------------------------------------------------ safetensors surgery


def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw_header(path: Path, header: bytes, data: bytes) -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def edit_header(path: Path, edit: Callable[[dict], None]) -> None:
    """Rewrite a safetensors file's JSON header with `edit` applied; the data bytes stay as they are."""
    header, data = read_header(path)
    edit(header)
    write_raw_header(path, json.dumps(header).encode(), data)


def first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def largest_float(header: dict) -> str:
    return max((k for k in header if k != "__metadata__"), key=lambda k: -header[k]["data_offsets"][0])


# ------------------------------------------------------------------------------ mutations


def edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    result = edit(data)
    path.write_text(json.dumps(data if result is None else result))


def fields(**values) -> Callable[[Path], None]:
    """Set top-level fields of a JSON file (an HF config.json)."""
    return lambda path: edit_json(path, lambda cfg: cfg.update(values))


def native_fields(**values) -> Callable[[Path], None]:
    """Set ModelConfig fields of a nanoseek config.json."""
    return lambda path: edit_json(path, lambda cfg: cfg["nanoseek"].update(values))


def text(content: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(content)


def header(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    return lambda path: edit_header(path, edit)


def weight_map(shard) -> Callable[[Path], None]:
    """An index naming `shard` as the file of one tensor."""
    return text(json.dumps({"weight_map": {"lm_head.weight": shard}}))


def to_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _dtype_list(h):
    h[first_tensor(h)]["dtype"] = ["F32"]


def _i32(h):
    h[largest_float(h)]["dtype"] = "I32"


def _overlap(h):
    a, b = [k for k in h if k != "__metadata__"][:2]
    h[b]["data_offsets"] = list(h[a]["data_offsets"])
    h[b]["shape"], h[b]["dtype"] = list(h[a]["shape"]), h[a]["dtype"]


def _out_of_range(h):
    key = first_tensor(h)
    begin, end = h[key]["data_offsets"]
    h[key]["data_offsets"] = [begin + 10**9, end + 10**9]


def _negative_shape(h):
    h[first_tensor(h)]["shape"] = [-1, 4]


def _shape_list_of_lists(h):
    h[first_tensor(h)]["shape"] = [[1], [2]]


def _deep_header(path: Path) -> None:
    _, data = read_header(path)
    write_raw_header(path, b'{"a":' * 200_000 + b"1" + b"}" * 200_000, data)


def _header_not_json(path: Path) -> None:
    _, data = read_header(path)
    write_raw_header(path, b"\xff\xfenot json", data)


def _header_too_long(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 10**15) + raw[8:])


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CONFIG, WEIGHTS, TOKENIZER, INDEX = "config.json", "model.safetensors", "tokenizer.json", "model.safetensors.index.json"

# fixture name -> (the good folder it copies, the file in it, what is done to that file)
MUTATIONS: dict[str, tuple[str, str, Callable[[Path], None]]] = {
    # HF config.json fields
    "hf_hidden_str": ("hf", CONFIG, fields(hidden_size="64")),
    "hf_maxpos": ("hf", CONFIG, fields(max_position_embeddings=200_000_000)),
    "hf_layers": ("hf", CONFIG, fields(num_hidden_layers=10_000_000)),
    "hf_vocab": ("hf", CONFIG, fields(vocab_size=100_000_000_000)),
    "hf_rope5": ("hf", CONFIG, fields(rope_scaling=5)),
    "hf_eps_nan": ("hf", CONFIG, fields(rms_norm_eps=float("nan"))),
    "hf_heads_list": ("hf", CONFIG, fields(num_attention_heads=[4])),
    "hf_no_vocab": ("hf", CONFIG, lambda p: edit_json(p, lambda c: c.pop("vocab_size") and None)),
    "hf_cfg_list": ("hf", CONFIG, text("[1, 2, 3]")),
    "hf_cfg_bytes": ("hf", CONFIG, lambda p: p.write_bytes(b'{"model_type": "\xff\xfe"}')),
    "hf_cfg_deep": ("hf", CONFIG, lambda p: p.write_text("[" * 200_000 + "]" * 200_000)),
    "hf_model_type_list": ("hf", CONFIG, fields(model_type=["llama"])),
    # sharded-weights index
    "idx_map5": ("hf", INDEX, text('{"weight_map": 5}')),
    "idx_list": ("hf", INDEX, text("[]")),
    "idx_values_int": ("hf", INDEX, weight_map(3)),
    "idx_passwd": ("hf", INDEX, weight_map("/etc/passwd")),
    "idx_dotdot": ("hf", INDEX, weight_map("../ckpt/model.safetensors")),
    "idx_folder": ("hf", INDEX, weight_map(".")),
    # safetensors headers
    "st_dtype_list": ("ckpt", WEIGHTS, header(_dtype_list)),
    "st_deep": ("ckpt", WEIGHTS, _deep_header),
    "st_i32": ("ckpt", WEIGHTS, header(_i32)),
    "st_overlap": ("ckpt", WEIGHTS, header(_overlap)),
    "st_range": ("ckpt", WEIGHTS, header(_out_of_range)),
    "st_neg_shape": ("ckpt", WEIGHTS, header(_negative_shape)),
    "st_shape_nested": ("ckpt", WEIGHTS, header(_shape_list_of_lists)),
    "st_not_json": ("ckpt", WEIGHTS, _header_not_json),
    "st_header_len": ("ckpt", WEIGHTS, _header_too_long),
    "st_truncated": ("ckpt", WEIGHTS, _truncate),
    "st_empty": ("ckpt", WEIGHTS, lambda p: p.write_bytes(b"")),
    "st_folder": ("ckpt", WEIGHTS, to_folder),
    # native checkpoint config and tokenizer
    "native_cfg_list": ("ckpt", CONFIG, text("[]")),
    "native_fields_list": ("ckpt", CONFIG, text('{"model_type": "nanoseek", "nanoseek": []}')),
    "native_hidden_str": ("ckpt", CONFIG, native_fields(hidden_size="64")),
    "native_maxpos": ("ckpt", CONFIG, native_fields(max_position_embeddings=200_000_000)),
    "native_eps_neg": ("ckpt", CONFIG, native_fields(rms_norm_eps=-1.0)),
    "native_no_weights": ("ckpt", WEIGHTS, lambda p: p.unlink()),
    "native_cfg_folder": ("ckpt", CONFIG, to_folder),
    "tok_list": ("ckpt", TOKENIZER, text("[]")),
    "tok_bytes": ("ckpt", TOKENIZER, lambda p: p.write_bytes(b"\xff\xfe\x00{")),
    "tok_chars_int": ("ckpt", TOKENIZER, text('{"type": "nanoseek-char", "version": 1, "chars": 5}')),
    "tok_folder": ("ckpt", TOKENIZER, to_folder),
    "tok_missing": ("ckpt", TOKENIZER, lambda p: p.unlink()),
}  # fmt: skip


# ------------------------------------------------------------------------------ the workspace


def _save_tiny(preset: str, folder: Path, fmt: str, tok: CharTokenizer) -> None:
    torch.manual_seed(0)
    config = ModelConfig.from_preset(preset, vocab_size=tok.vocab_size, kernels=False)
    save_model(Transformer(config), folder, format=fmt)
    tok.save(folder / "tokenizer.json")


def _split_into_index(folder: Path) -> None:
    """Give the HF folder an index naming its one file, as sharded checkpoints have."""
    header, _ = read_header(folder / "model.safetensors")
    weight_map = {k: "model.safetensors" for k in header if k != "__metadata__"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def build_workspace(root: Path) -> Path:
    """Fill `root` with every fixture the corpus names; return it."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.txt").write_text(TEXT)
    (root / "file.txt").write_text("a plain file\n")
    files = root / "files"
    files.mkdir()
    (files / "nonutf8.toml").write_bytes(b"\xff\xfe[optim]\nlr = 1\n")
    (files / "nonutf8.txt").write_bytes(b"hello \xff\xfe world\n")
    (files / "list.json").write_text("[1, 2]")
    (files / "bad.toml").write_text("[optim\nlr = \n")
    (files / "unknown.toml").write_text("[optim]\nlearning_rate = 1.0\n")
    (files / "section_int.json").write_text('{"optim": 5}')
    (files / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
    (files / "nan.json").write_text('{"optim": {"lr": NaN}}')
    (files / "preset_int.toml").write_text("preset = 5\n")
    (files / "empty.txt").write_text("")
    tok = CharTokenizer.train([TEXT])
    _save_tiny("gpt2-tiny", root / "ckpt", "nanoseek", tok)
    _save_tiny("llama-tiny", root / "hf", "hf", tok)
    for name, (base, file, mutate) in MUTATIONS.items():
        shutil.copytree(root / base, root / name)
        if file == INDEX:
            _split_into_index(root / name)
        mutate(root / name / file)
    return root
