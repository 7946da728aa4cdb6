"""HF-format folders without transformers: round trip, FP8 block dequantization, sharding, bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoseek import ModelConfig, Transformer, load_model
from nanoseek.cli import main as cli_main
from nanoseek.errors import NanoseekError
from nanoseek.io.hf import dequantize_fp8, save_hf


def tiny(preset="deepseek-v3-tiny"):
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset(preset)).eval()


def test_round_trip_keeps_every_tensor_and_mtp(tmp_path):
    model = tiny()
    save_hf(model, tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in keys  # experts unpacked per expert on disk
    assert "model.layers.2.eh_proj.weight" in keys  # MTP stored after the last layer
    again = load_model(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_sharded_save_and_load(tmp_path):
    model = tiny()
    save_hf(model, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    x = torch.randint(0, 128, (1, 9))
    torch.testing.assert_close(load_model(tmp_path)(x).logits, model(x).logits)


def test_fp8_block_weights_are_dequantized(tmp_path):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8")
    model = tiny()
    save_hf(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    key = "model.layers.0.self_attn.kv_b_proj.weight"  # [64, 16]: one partial 128x128 block
    w = state[key]
    scale = w.abs().max() / 448.0
    state[key] = (w / scale).to(torch.float8_e4m3fn)
    state[key.replace(".weight", ".weight_scale_inv")] = scale.reshape(1, 1).float()
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = load_model(tmp_path).layers[0].self_attn.kv_b_proj.weight
    torch.testing.assert_close(loaded, state[key].float() * scale)
    assert (loaded - w).abs().max() < 0.07 * w.abs().max()  # e4m3 keeps ~2 significant digits


def test_dequantize_uses_128_blocks():
    w = torch.ones(200, 300)
    scale = torch.arange(1.0, 7.0).reshape(2, 3)
    out = dequantize_fp8(w, scale)
    assert out[0, 0] == 1 and out[127, 127] == 1 and out[128, 0] == 4 and out[199, 299] == 6


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda cfg: {**cfg, "model_type": "gpt_neox"}, "unknown model_type"),
        (lambda cfg: {**cfg, "model_type": "deepseek_v4", "layer_types": ["full_attention"] * 2}, "layer_types"),
    ],
)
def test_bad_config_names_the_problem(tmp_path, change, message):
    save_hf(tiny(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(change(cfg)))
    with pytest.raises(NanoseekError, match=message):
        load_model(tmp_path)


def test_missing_key_and_shape_mismatch_name_the_key(tmp_path):
    save_hf(tiny(), tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state.pop("model.layers.0.self_attn.o_proj.weight")
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(NanoseekError, match="o_proj"):
        load_model(tmp_path)
    state["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(NanoseekError, match=r"o_proj.*shape"):
        load_model(tmp_path)


def test_header_with_impossible_offsets_is_refused(tmp_path, capsys):
    save_hf(tiny(), tmp_path)
    path = tmp_path / "model.safetensors"
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"] = [0, 10**12]
    blob = json.dumps(header).encode().ljust(n)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n :])
    with pytest.raises(NanoseekError, match="model.safetensors"):
        load_model(tmp_path)
    assert cli_main(["convert", str(tmp_path), str(tmp_path / "out"), "--to", "nanoseek"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert cli_main(["info", str(tmp_path)]) == 0  # info reads the config alone, not the weights


def test_pickle_is_refused_unless_trusted(tmp_path):
    model = tiny("llama-tiny")
    save_hf(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(NanoseekError, match="trust-pickle"):
        load_model(tmp_path)
    x = torch.randint(0, 128, (1, 5))
    torch.testing.assert_close(load_model(tmp_path, trust_pickle=True)(x).logits, model(x).logits)


def test_convert_command_round_trip(tmp_path, capsys):
    model = tiny()
    model.save_pretrained(tmp_path / "native")
    assert cli_main(["convert", str(tmp_path / "native"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "deepseek_v3"
    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "nanoseek"]) == 0
    x = torch.randint(0, 128, (1, 7))
    torch.testing.assert_close(load_model(tmp_path / "back")(x).logits, model(x).logits)
    assert cli_main(["convert", str(tmp_path / "native"), str(tmp_path / "hf"), "--to", "hf"]) == 2
