import json

import pytest

from nanoseek.config import ModelConfig, TrainConfig, build_train_config
from nanoseek.config.presets import PRESETS
from nanoseek.errors import NanoseekError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_round_trips_json(name):
    cfg = ModelConfig.from_preset(name)
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_train_config_round_trips_json():
    cfg = build_train_config(preset="gpt2-tiny", overrides={"optim.lr": 3e-4, "model.hidden_size": 128})
    assert cfg.optim.lr == 3e-4 and cfg.model.hidden_size == 128
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_toml_file_then_overrides(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('preset = "llama-tiny"\n[optim]\nlr = 5e-4\n[train]\nmax_steps = 7\n')
    cfg = build_train_config(str(f), overrides={"train.max_steps": 9})
    assert cfg.preset == "llama-tiny" and cfg.model.attention == "gqa"
    assert cfg.optim.lr == 5e-4 and cfg.train.max_steps == 9


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"optim.lrr": 1.0}, "lrr"),
        ({"model.hidden_sise": 64}, "hidden_sise"),
        ({"optim.lr": "fast"}, "optim.lr"),
        ({"train.max_steps": 1.5}, "train.max_steps"),
        ({"model.num_attention_heads": 5}, "num_attention_heads=5"),
        ({"model.norm": "batchnorm"}, "norm='batchnorm'"),
        ({"model.position": "xpos"}, "position"),
        ({"schedule.name": "exp"}, "schedule.name"),
        ({"data.seq_len": 4096}, "data.seq_len"),
        ({"model.tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ],
)
def test_bad_input_names_the_field(overrides, field):
    with pytest.raises(NanoseekError, match=field.replace("(", r"\(")):
        build_train_config(preset="gpt2-tiny", overrides=overrides)


def test_unknown_preset_lists_choices():
    with pytest.raises(NanoseekError, match="gpt2-tiny"):
        ModelConfig.from_preset("gpt5")


def test_gqa_heads_must_divide():
    with pytest.raises(NanoseekError, match="num_key_value_heads=3"):
        ModelConfig.from_preset("llama-tiny", num_key_value_heads=3)


def test_moe_group_constraints():
    base = dict(ffn="moe", n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=1)
    with pytest.raises(NanoseekError, match="topk_group"):
        ModelConfig.from_preset("llama-tiny", **base)
    ModelConfig.from_preset("llama-tiny", **{**base, "topk_group": 2})
