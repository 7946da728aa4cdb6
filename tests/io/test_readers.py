"""The checkpoint readers refuse every malformed file with one line naming it: crafted safetensors
headers, shard indexes reaching outside their folder, JSON that is not an object, a train state
without the optimizer's."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from nanoseek.errors import NanoseekError
from nanoseek.io.checkpoint import load_training_state, read_json
from nanoseek.io.hf.files import read_index
from nanoseek.io.safetensors import SafetensorsFile


def write_safetensors(path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    "header, data, message",
    [
        ({"a": {**F32, "dtype": ["F32"]}}, bytes(8), "unknown dtype"),
        ({"a": F32, "b": {**F32, "data_offsets": [4, 12]}}, bytes(16), "overlap"),
        ({"a": {**F32, "shape": [True, 2]}}, bytes(8), "malformed shape"),
        ({"a": {**F32, "data_offsets": [0, 8.0]}}, bytes(8), "claims bytes"),
        ({"a": 5}, bytes(8), "not an object"),
    ],
)
def test_a_crafted_header_is_refused(tmp_path, header, data, message):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, header, data)
    with pytest.raises(NanoseekError, match=message):
        SafetensorsFile(path)


def test_a_deeply_nested_header_is_refused_not_a_recursion_error(tmp_path):
    path = tmp_path / "model.safetensors"
    text = b'{"a":' * 200_000 + b"1" + b"}" * 200_000
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(NanoseekError, match="nested too deeply"):
        SafetensorsFile(path)


def test_a_file_that_is_not_safetensors_shows_none_of_its_bytes(tmp_path):
    path = tmp_path / "passwd"
    path.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(NanoseekError) as error:
        SafetensorsFile(path)
    assert str(int.from_bytes(b"root:x:0", "little")) not in str(error.value)


def test_a_folder_is_called_a_folder(tmp_path):
    with pytest.raises(NanoseekError, match="is a folder"):
        SafetensorsFile(tmp_path)
    with pytest.raises(NanoseekError, match="is a folder"):
        read_json(tmp_path)


@pytest.mark.parametrize("shard", ["/etc/passwd", "../outside.safetensors", ".", 3, ""])
def test_an_index_naming_a_file_outside_its_folder_is_refused(tmp_path, shard):
    (tmp_path / "outside.safetensors").write_bytes(b"")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    with pytest.raises(NanoseekError, match="weight_map"):
        read_index(index)


@pytest.mark.parametrize("content", ["[]", '{"weight_map": 5}', '{"weight_map": [1]}'])
def test_an_index_that_is_not_a_map_is_refused(tmp_path, content):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(content)
    with pytest.raises(NanoseekError, match="index.json"):
        read_index(index)


def test_a_train_state_without_the_optimizer_is_refused(tmp_path):
    (tmp_path / "train_state.json").write_text(json.dumps({"step": 3}))
    save_file({"rng/torch": torch.get_rng_state()}, str(tmp_path / "optimizer.safetensors"))
    with pytest.raises(NanoseekError, match="optimizer"):
        load_training_state(tmp_path)
