"""Every config field's type and valid range, in one table per section, checked by `check_fields`.

A config is checked where it is built (`__post_init__`), whatever built it: a TOML/JSON file, a
`--section.field=VALUE` override, an HF `config.json` or Python code. `check_fields` first coerces
each value to its annotation (an int is accepted for a float, `64.0` for an int) and then holds it to
its `Range`; every float must also be finite (NaN and infinities are refused everywhere), and every
int must fit in 64 bits. The error is one line naming the field and its valid values:

    >>> check_range("optim.beta1", 2.0, Range(0, 1, high_open=True))
    Traceback (most recent call last):
    ...
    nanoseek.errors.NanoseekError: optim.beta1=2.0 must be a number in [0, 1)

Checks that tie several fields together (heads dividing the width, top-k within the experts) live
with their config class; this module holds what one field alone must satisfy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass

from nanoseek.config.parse import coerce
from nanoseek.errors import NanoseekError

MAX_INT = 2**63 - 1  # what a torch int64 (a seed, a count, a shape) holds
MAX_LAYERS = 10_000  # one module is built per layer, even on the meta device: bounded in time and memory
MAX_THREADS = 4096


@dataclass(frozen=True)
class Range:
    """low <= value <= high (either bound open, or absent)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return "finite"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


POSITIVE = Range(1)  # counts and sizes
COUNT = Range(0)  # counts where 0 means none / off
POSITIVE_REAL = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)  # [0, 1]
PROBABILITY = Range(0, 1, high_open=True)  # [0, 1): dropout, betas, momentum

MODEL = {
    "vocab_size": POSITIVE,
    "hidden_size": POSITIVE,
    "num_hidden_layers": Range(1, MAX_LAYERS),
    "encoder_layers": Range(1, MAX_LAYERS),
    "num_attention_heads": POSITIVE,
    "num_key_value_heads": POSITIVE,
    "head_dim": POSITIVE,
    "intermediate_size": POSITIVE,
    "max_position_embeddings": POSITIVE,
    "rms_norm_eps": Range(0, 1, low_open=True, high_open=True),
    "initializer_range": NON_NEGATIVE,
    "attention_dropout": PROBABILITY,
    "hidden_dropout": PROBABILITY,
    "rope_theta": POSITIVE_REAL,
    "relative_attention_num_buckets": POSITIVE,
    "relative_attention_max_distance": POSITIVE,
    "q_lora_rank": POSITIVE,
    "kv_lora_rank": POSITIVE,
    "qk_nope_head_dim": COUNT,
    "qk_rope_head_dim": COUNT,
    "v_head_dim": POSITIVE,
    "n_routed_experts": COUNT,
    "n_shared_experts": COUNT,
    "num_experts_per_tok": COUNT,
    "moe_intermediate_size": POSITIVE,
    "first_k_dense_replace": COUNT,
    "routed_scaling_factor": POSITIVE_REAL,
    "n_group": POSITIVE,
    "topk_group": POSITIVE,
    "num_hash_layers": COUNT,
    "swiglu_limit": POSITIVE_REAL,
    "aux_loss_alpha": NON_NEGATIVE,
    "bias_update_speed": NON_NEGATIVE,
    "num_nextn_predict_layers": Range(0, MAX_LAYERS),
    "mtp_loss_weight": NON_NEGATIVE,
    "bos_token_id": COUNT,
    "eos_token_id": COUNT,
    "pad_token_id": COUNT,
    "sliding_window": POSITIVE,
    "nsa_block": POSITIVE,
    "nsa_topn": POSITIVE,
    "nsa_query_group": POSITIVE,
    "index_topk": POSITIVE,
    "index_n_heads": POSITIVE,
    "index_head_dim": POSITIVE,
    "o_groups": POSITIVE,
    "o_lora_rank": POSITIVE,
    "compress_rate_csa": POSITIVE,
    "compress_rate_hca": POSITIVE,
    "compress_rope_theta": POSITIVE_REAL,
    "hc_mult": Range(1, 64),
    "hc_sinkhorn_iters": Range(1, 10_000),
    "hc_eps": POSITIVE_REAL,
}

# rope_scaling is a free-form table (HF's); the keys nanoseek reads, and their ranges
ROPE_SCALING = {
    "factor": Range(1),
    "low_freq_factor": POSITIVE_REAL,
    "high_freq_factor": POSITIVE_REAL,
    "original_max_position_embeddings": POSITIVE,
    "beta_fast": POSITIVE_REAL,
    "beta_slow": POSITIVE_REAL,
    "mscale": NON_NEGATIVE,
    "mscale_all_dim": NON_NEGATIVE,
    "attention_factor": POSITIVE_REAL,
}

SECTIONS = {
    "data": {"vocab_size": Range(1, 2**32), "val_fraction": PROBABILITY, "seq_len": POSITIVE},
    "optim": {
        "lr": POSITIVE_REAL,
        "weight_decay": NON_NEGATIVE,
        "beta1": PROBABILITY,
        "beta2": PROBABILITY,
        "eps": POSITIVE_REAL,
        "grad_clip": NON_NEGATIVE,
        "muon_lr": POSITIVE_REAL,
        "muon_momentum": PROBABILITY,
    },
    "schedule": {
        "warmup_steps": COUNT,
        "min_lr_ratio": FRACTION,
        "decay_fraction": FRACTION,
        "milestones": FRACTION,  # each of them
        "gamma": POSITIVE_REAL,
        "plateau_factor": Range(0, 1, low_open=True),
        "plateau_patience": COUNT,
        "plateau_cooldown": COUNT,
        "plateau_threshold": NON_NEGATIVE,
        "plateau_min_ratio": FRACTION,
        "spike_repeat_window": COUNT,
        "spike_k": POSITIVE_REAL,
        "spike_ema": PROBABILITY,
        "spike_min_steps": COUNT,
        "spike_lr_factor": Range(0, 1, low_open=True),
        "spike_recover_steps": POSITIVE,
        "spike_snapshot_every": POSITIVE,
    },
    "train": {
        "batch_size": POSITIVE,
        "grad_accum": POSITIVE,
        "max_steps": COUNT,
        "max_tokens": COUNT,
        "max_seconds": NON_NEGATIVE,
        "seed": Range(0, MAX_INT),
        "threads": Range(0, MAX_THREADS),
        "dsa_warmup_steps": COUNT,
        "label_smoothing": PROBABILITY,
    },
    "checkpoint": {"every": COUNT, "keep_last": POSITIVE},
    "log": {"every": POSITIVE},
    "eval": {"every": COUNT, "points": COUNT, "batches": POSITIVE, "batch_size": POSITIVE},
    "dist": {},
}


def check_range(where: str, value, valid: Range | None) -> None:
    """`value` (a number) is finite, fits in 64 bits and lies in `valid`; else one line naming `where`."""
    kind = "an integer" if isinstance(value, int) else "a number"
    if isinstance(value, float) and not math.isfinite(value):
        raise NanoseekError(f"{where}={value} must be a finite number{' ' + valid.describe() if valid else ''}")
    if isinstance(value, int) and not -MAX_INT - 1 <= value <= MAX_INT and (valid is None or valid.high is None):
        raise NanoseekError(f"{where}={value} must be {kind} that fits in 64 bits")
    if valid is not None and not valid.holds(value):
        raise NanoseekError(f"{where}={value!r} must be {kind} {valid.describe()}")


def check_fields(obj, ranges: dict[str, Range], prefix: str = "") -> None:
    """Coerce every field of dataclass `obj` to its annotation and hold its numbers to `ranges`."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        where = prefix + f.name
        value = coerce(getattr(obj, f.name), hints[f.name], where)
        object.__setattr__(obj, f.name, value)
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                check_range(where if not isinstance(value, list) else f"{where}[{i}]", item, ranges.get(f.name))


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def check_rope_scaling(scaling: dict, where: str = "rope_scaling") -> None:
    """The numbers of a rope_scaling table nanoseek reads: present ones of the right type and range."""
    for key, valid in ROPE_SCALING.items():
        value = scaling.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise NanoseekError(f"{where}.{key}={value!r} must be a number {valid.describe()}")
        if key == "original_max_position_embeddings" and not float(value).is_integer():
            raise NanoseekError(f"{where}.{key}={value!r} must be an integer {valid.describe()}")
        check_range(f"{where}.{key}", value, valid)
