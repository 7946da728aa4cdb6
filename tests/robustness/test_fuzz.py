"""Property-based fuzzing of what reads user input: whatever arrives, the reader gives a value or a
`NanoseekError` (one line, the CLI's exit status 2), never another exception.

The config parser (JSON/TOML text and plain dicts), the `--section.field=VALUE` override parser,
the safetensors header reader (arbitrary bytes, and headers of valid files with fields replaced)
and the tokenizers, whose promise is a lossless round trip of any text and any bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoseek.cli.common import split_overrides
from nanoseek.config import ModelConfig, TrainConfig, build_train_config, load_config_file
from nanoseek.config.train import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LogConfig,
    LoopConfig,
    OptimConfig,
    ScheduleConfig,
)
from nanoseek.data import BUNDLED_CORPUS
from nanoseek.data.tokenizer import BPETokenizer, CharTokenizer
from nanoseek.errors import NanoseekError
from nanoseek.io.safetensors import SafetensorsFile

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "train": LoopConfig,
    "checkpoint": CheckpointConfig,
    "log": LogConfig,
    "eval": EvalConfig,
}
FIELDS = {section: [f.name for f in dataclasses.fields(cls)] for section, cls in SECTIONS.items()}

# JSON-like values of every kind a user can write, the awkward ones included
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 2, 64, 0.5, 1e-8, 1e23, "64", "rope", "", "nan"]),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def config_dicts(draw) -> dict:
    """A run config of real section and field names (and a few made-up ones) holding any values."""
    data: dict = {}
    for section in draw(st.lists(st.sampled_from([*FIELDS, "bogus"]), max_size=3, unique=True)):
        names = FIELDS.get(section, ["x"])
        fields = draw(st.lists(st.sampled_from([*names, "typo"]), min_size=1, max_size=3, unique=True))
        data[section] = {name: draw(values) for name in fields}
    if draw(st.booleans()):
        data[draw(st.sampled_from([*FIELDS, "preset"]))] = draw(values)
    return data


def gives_config_or_user_error(build) -> None:
    try:
        result = build()
    except NanoseekError as e:
        assert "\n" not in str(e).strip() or len(str(e)) > 0  # a message, not an empty error
        return
    assert isinstance(result, (TrainConfig, ModelConfig, dict))


@FUZZ
@given(config_dicts())
def test_config_dicts_build_or_fail_cleanly(data):
    gives_config_or_user_error(
        lambda: TrainConfig.from_dict({"model": ModelConfig.from_preset("gpt2-tiny").to_dict(), **data})
    )


@FUZZ
@given(st.dictionaries(st.sampled_from(FIELDS["model"]), values, max_size=4))
def test_model_configs_build_or_fail_cleanly(fields):
    gives_config_or_user_error(
        lambda: ModelConfig.from_dict({**ModelConfig.from_preset("llama-tiny").to_dict(), **fields})
    )


numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-(2**70), max_value=2**70))


@FUZZ
@given(
    st.dictionaries(st.sampled_from([f"{s}.{f}" for s, names in FIELDS.items() for f in names]), numbers, max_size=3)
)
def test_built_configs_hold_finite_numbers(overrides):
    """What validation lets through is finite: no NaN or infinity reaches the trainer."""
    try:
        cfg = build_train_config(preset="gpt2-tiny", overrides=overrides)
    except NanoseekError:
        return
    for section in FIELDS:
        for value in dataclasses.asdict(getattr(cfg, section)).values():
            for item in value if isinstance(value, list) else [value]:
                assert not isinstance(item, float) or math.isfinite(item)


@FUZZ
@given(st.binary(max_size=200), st.sampled_from([".toml", ".json"]))
def test_config_files_of_any_bytes_parse_or_fail_cleanly(raw, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"run{suffix}"
        path.write_bytes(raw)
        gives_config_or_user_error(lambda: load_config_file(path))
        gives_config_or_user_error(lambda: build_train_config(path))


@FUZZ
@given(
    st.sampled_from([f"{s}.{f}" for s, names in FIELDS.items() for f in names] + ["model", "model..x", "x.y.z"]),
    st.text(max_size=30),
)
def test_override_strings_build_or_fail_cleanly(key, value):
    def build():
        return build_train_config(preset="gpt2-tiny", overrides=split_overrides([f"--{key}={value}"]))

    gives_config_or_user_error(build)


@FUZZ
@given(st.lists(st.text(max_size=20), max_size=3))
def test_arbitrary_arguments_are_overrides_or_a_clean_error(args):
    gives_config_or_user_error(lambda: split_overrides(args))


# ------------------------------------------------------------------------------ safetensors


def load_any(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(raw)
        try:
            SafetensorsFile(path).load_all()
        except NanoseekError:
            pass


@FUZZ
@given(st.binary(max_size=300))
def test_safetensors_of_arbitrary_bytes_load_or_fail_cleanly(raw):
    load_any(raw)


@FUZZ
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=2**64 - 1))
def test_safetensors_of_any_header_length_load_or_fail_cleanly(body, n):
    load_any(struct.pack("<Q", n) + body)


def valid_header() -> dict:
    return {
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]},
        "__metadata__": {"format": "pt"},
    }


@FUZZ
@given(
    st.sampled_from(["a", "b", "__metadata__"]),
    st.sampled_from(["dtype", "shape", "data_offsets", "extra"]),
    values,
    st.integers(min_value=0, max_value=64),
)
def test_safetensors_headers_with_a_field_replaced_load_or_fail_cleanly(tensor, field, value, data_len):
    header = valid_header()
    if isinstance(header[tensor], dict):
        header[tensor][field] = value
    text = json.dumps(header).encode()
    load_any(struct.pack("<Q", len(text)) + text + bytes(data_len))


def test_a_valid_file_loads():
    text = json.dumps(valid_header()).encode()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(40))
        tensors = SafetensorsFile(path).load_all()
    assert tensors["a"].shape == (2, 3) and tensors["b"].shape == (2,)


# ------------------------------------------------------------------------------ tokenizers


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    corpus = BUNDLED_CORPUS.read_text()[:20_000]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.txt"
        path.write_text(corpus)
        bpe = BPETokenizer.train([str(path)], vocab_size=400)
    return {"char": CharTokenizer.train([corpus]), "bpe": bpe}


@FUZZ
@given(text=st.text(max_size=200))
def test_any_text_round_trips_through_both_tokenizers(tokenizers, text):
    for tok in tokenizers.values():
        assert tok.decode_bytes(tok.encode(text)) == text.encode("utf-8", errors="surrogatepass")


@FUZZ
@given(data=st.binary(max_size=200))
def test_any_bytes_round_trip_through_both_tokenizers(tokenizers, data):
    for tok in tokenizers.values():
        ids = tok.encode(data)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode_bytes(ids) == data


@FUZZ
@given(text=st.text(min_size=1, max_size=100))
def test_a_char_tokenizer_trained_on_any_text_round_trips_it(text):
    try:
        tok = CharTokenizer.train([text])
    except NanoseekError:
        return  # e.g. text made only of surrogates: nothing to learn
    assert tok.decode_bytes(tok.encode(text)) == text.encode("utf-8", errors="surrogatepass")
