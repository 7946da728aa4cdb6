"""Every config field is held to its type and range wherever the config comes from (a file, an
override, an HF config.json, Python), with one line naming the field and its valid values."""

from __future__ import annotations

import dataclasses
import math

import pytest

from nanoseek.config import ModelConfig, TrainConfig, build_train_config, load_config_file
from nanoseek.config.validate import MODEL, SECTIONS
from nanoseek.errors import NanoseekError


def build(**overrides) -> TrainConfig:
    return build_train_config(preset="gpt2-tiny", overrides=overrides)


@pytest.mark.parametrize(
    "field, value",
    [
        ("model.head_dim", "abc"),
        ("model.num_key_value_heads", [2]),
        ("model.rope_scaling", 5),
        ("model.q_lora_rank", True),
        ("model.swiglu_limit", "x"),
        ("model.bos_token_id", 1.5),
    ],
)
def test_an_optional_field_of_the_wrong_type_is_a_user_error(field, value):
    with pytest.raises(NanoseekError, match=field.split(".")[1]):
        build(**{field: value})


@pytest.mark.parametrize(
    "field, value, valid",
    [
        ("optim.beta1", 2, r"\[0, 1\)"),
        ("optim.eps", -1, "> 0"),
        ("optim.lr", float("nan"), "finite"),
        ("optim.lr", float("inf"), "finite"),
        ("model.initializer_range", -1, ">= 0"),
        ("model.rms_norm_eps", float("nan"), "finite"),
        ("train.threads", -1, r"\[0, 4096\]"),
        ("eval.batches", 0, ">= 1"),
        ("train.seed", 10**23, r"\[0, 9223372036854775807\]"),
        ("schedule.milestones", [0.5, 1.5], r"milestones\[1\]"),
        ("model.num_hidden_layers", 10_000_000, r"\[1, 10000\]"),
        ("model.pad_token_id", -5, ">= 0"),
        ("data.vocab_size", 10, "tokenizer='bpe'"),
    ],
)
def test_a_value_out_of_range_names_the_field_and_its_valid_values(field, value, valid):
    overrides = {field: value, **({"data.tokenizer": "bpe"} if field == "data.vocab_size" else {})}
    with pytest.raises(NanoseekError, match=valid) as error:
        build(**overrides)
    assert field.split(".")[1] in str(error.value) and "\n" not in str(error.value)


FLOAT_FIELDS = [f"model.{f.name}" for f in dataclasses.fields(ModelConfig) if f.type in ("float", "float | None")] + [
    f"{section}.{f.name}"
    for section in SECTIONS
    for f in dataclasses.fields(type(getattr(TrainConfig(), section)))
    if f.type == "float"
]


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_no_float_field_takes_nan_or_infinity(field, value):
    with pytest.raises(NanoseekError, match=field.split(".")[1]):
        build(**{field: value})


def test_every_range_names_a_real_field():
    assert set(MODEL) <= {f.name for f in dataclasses.fields(ModelConfig)}
    defaults = TrainConfig()
    for section, ranges in SECTIONS.items():
        assert set(ranges) <= {f.name for f in dataclasses.fields(type(getattr(defaults, section)))}


def test_a_config_built_in_python_is_checked_and_coerced_too():
    with pytest.raises(NanoseekError, match="hidden_size"):
        ModelConfig(hidden_size="64")
    with pytest.raises(NanoseekError, match="rms_norm_eps"):
        ModelConfig(rms_norm_eps=math.nan)
    config = ModelConfig(initializer_range=1, hidden_size=64.0)
    assert isinstance(config.initializer_range, float) and isinstance(config.hidden_size, int)


@pytest.mark.parametrize(
    "scaling, field",
    [
        ({"rope_type": "yarn", "factor": "x"}, "factor"),
        ({"rope_type": "yarn", "factor": math.nan}, "factor"),
        ({"rope_type": "yarn"}, "factor"),
        ({"rope_type": ["yarn"]}, "rope_type"),
        ({"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 1.5}, "original_max"),
        ({"rope_type": "yarn", "factor": 4, "beta_fast": -1}, "beta_fast"),
    ],
)
def test_rope_scaling_numbers_are_checked(scaling, field):
    with pytest.raises(NanoseekError, match=field):
        ModelConfig.from_preset("llama-tiny", rope_scaling=scaling)


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        (b"\xff\xfe[optim]\n", ".toml", "not UTF-8"),
        (b"[1, 2]", ".json", "must hold a table"),
        (b"[" * 100_000 + b"]" * 100_000, ".json", "could not be parsed"),
        (b'"text"', ".json", "must hold a table"),
    ],
)
def test_a_broken_config_file_is_one_line_naming_it(tmp_path, content, suffix, message):
    path = tmp_path / f"run{suffix}"
    path.write_bytes(content)
    with pytest.raises(NanoseekError, match=message) as error:
        load_config_file(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_folder_given_as_the_config_file_is_called_a_folder(tmp_path):
    with pytest.raises(NanoseekError, match="is a folder"):
        load_config_file(tmp_path)


def test_a_section_that_is_not_a_table_names_the_section(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"optim": 5}')
    with pytest.raises(NanoseekError, match="optim"):
        build_train_config(path)
    with pytest.raises(NanoseekError, match="preset"):
        build_train_config(overrides={"preset": 5})
