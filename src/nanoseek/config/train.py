"""`TrainConfig`: a training run, made of sections, and `build_train_config` that assembles one.

Sections: `model` (a `ModelConfig`), `data`, `optim`, `schedule`, `train` (the loop), `checkpoint`,
`log`, `eval`, `dist`. Every field can be set from TOML/JSON or with a dotted override
(`--optim.lr=3e-4`); the layers merge as preset (model + run defaults) < config file < overrides.

    >>> cfg = build_train_config(preset="gpt2-tiny", overrides={"optim.lr": 3e-4})
    >>> cfg.optim.lr, cfg.model.hidden_size == ModelConfig.from_preset("gpt2-tiny").hidden_size
    (0.0003, True)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.config.model import ModelConfig
from nanoseek.config.parse import (
    apply_override,
    check_choice,
    check_positive,
    deep_update,
    from_dict,
    load_config_file,
    to_dict,
)
from nanoseek.config.presets import DEFAULT_PRESET, get_preset, get_run_defaults
from nanoseek.device import check_device_name
from nanoseek.errors import NanoseekError

SCHEDULES = ("constant", "cosine", "wsd", "multistep", "inverse_sqrt")
# "lm": next-token prediction over text files; the others are sequence-to-sequence pair tasks (data/pairs.py)
TASKS = ("lm", "couplets", "copy", "reverse", "sort")


@dataclass
class DataConfig:
    path: list[str] = field(default_factory=list)  # text files; empty = the bundled corpus
    tokenizer: str = "char"  # "char", "bpe", or a path to a tokenizer.json
    vocab_size: int = 2048  # for tokenizer="bpe"
    val_fraction: float = 0.1  # the last 10% of tokens, as nanoGPT splits
    seq_len: int = 128
    cache_dir: str = ""  # where token shards go; "" = OUT/data
    task: str = "lm"  # lm | couplets (data.path = tang_poems.txt) | copy | reverse | sort (synthetic)


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off
    muon_lr: float = 0.02  # optim.name="muon": lr of the hidden matrices
    muon_momentum: float = 0.95


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # constant | cosine | wsd | multistep | inverse_sqrt
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine / wsd floor as a fraction of lr
    decay_fraction: float = 0.2  # wsd: final fraction of training that decays
    milestones: list[float] = field(default_factory=lambda: [0.8, 0.9])  # multistep
    gamma: float = 0.316  # multistep factor per milestone


@dataclass
class LoopConfig:
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int = 2000  # 0 = no step limit
    max_tokens: int = 0  # 0 = no token limit
    max_seconds: float = 0.0  # 0 = no wall-clock limit
    seed: int = 1337
    dtype: str = "float32"  # float32 | bfloat16 (autocast)
    device: str = "auto"  # auto (a CUDA GPU if torch sees one, else cpu) | cpu | cuda | cuda:N
    compile: bool = False
    threads: int = 0  # 0 = torch default
    dsa_warmup_steps: int = 0  # DSA models: dense attention, only the indexers train, for this many steps
    label_smoothing: float = 0.0  # epsilon_ls: targets (1 - eps) one-hot + eps uniform (Vaswani: 0.1)


@dataclass
class CheckpointConfig:
    every: int = 500  # steps; 0 = only at the end
    keep_last: int = 2


@dataclass
class LogConfig:
    every: int = 10
    progress: bool = True
    plot: bool = True


@dataclass
class EvalConfig:
    every: int = 250  # 0 = only at the end
    batches: int = 20
    batch_size: int = 32


@dataclass
class DistConfig:
    strategy: str = "none"  # none | ddp | fsdp (under torchrun)
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    mixed_precision: bool = False  # fsdp: bf16 parameters in compute, fp32 gradient reduction
    expert_parallel: bool = False  # ddp + MoE: routed experts sharded across ranks, all-to-all tokens


@dataclass
class TrainConfig:
    """A training run: the model plus data, optimizer, schedule, loop, checkpoint, log, eval."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    preset: str = ""
    out: str = "runs/default"

    def __post_init__(self):
        self.validate()

    def validate(self):
        check_choice("optim.name", self.optim.name, ("adamw", "muon"))
        check_choice("schedule.name", self.schedule.name, SCHEDULES)
        check_choice("train.dtype", self.train.dtype, ("float32", "bfloat16"))
        check_device_name("train.device", self.train.device)
        check_choice("dist.strategy", self.dist.strategy, ("none", "ddp", "fsdp"))
        self._validate_task()
        check_positive("train.dsa_warmup_steps", self.train.dsa_warmup_steps, allow_zero=True)
        if self.train.dsa_warmup_steps and self.dist.strategy == "ddp":
            raise NanoseekError(
                "train.dsa_warmup_steps trains only the indexers, which DDP cannot do "
                "(it expects a gradient for every parameter); warm up in one process"
            )
        for where, value in (
            ("optim.lr", self.optim.lr),
            ("train.batch_size", self.train.batch_size),
            ("train.grad_accum", self.train.grad_accum),
            ("data.seq_len", self.data.seq_len),
            ("eval.batch_size", self.eval.batch_size),
            ("log.every", self.log.every),
        ):
            check_positive(where, value)
        for where, value in (
            ("train.max_steps", self.train.max_steps),
            ("train.max_tokens", self.train.max_tokens),
            ("train.max_seconds", self.train.max_seconds),
            ("optim.grad_clip", self.optim.grad_clip),
            ("schedule.warmup_steps", self.schedule.warmup_steps),
            ("checkpoint.every", self.checkpoint.every),
            ("eval.every", self.eval.every),
            ("optim.weight_decay", self.optim.weight_decay),
        ):
            check_positive(where, value, allow_zero=True)
        if self.checkpoint.keep_last < 1:
            raise NanoseekError(f"checkpoint.keep_last={self.checkpoint.keep_last} must be >= 1")
        if not 0.0 <= self.data.val_fraction < 1.0:
            raise NanoseekError(f"data.val_fraction={self.data.val_fraction} must be in [0, 1)")
        if not (self.train.max_steps or self.train.max_tokens or self.train.max_seconds):
            raise NanoseekError("set at least one of train.max_steps, train.max_tokens, train.max_seconds")
        if self.data.seq_len > self.model.max_position_embeddings:
            raise NanoseekError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_position_embeddings="
                f"{self.model.max_position_embeddings}"
            )

    def _validate_task(self):
        check_choice("data.task", self.data.task, TASKS)
        if not 0.0 <= self.train.label_smoothing < 1.0:
            raise NanoseekError(f"train.label_smoothing={self.train.label_smoothing} must be in [0, 1)")
        if self.model.architecture == "encoder_decoder":
            if self.data.task == "lm":
                raise NanoseekError(
                    "model.architecture='encoder_decoder' translates a source into a target: set a pair task, "
                    f"--data.task={'|'.join(TASKS[1:])}"
                )
            if self.dist.strategy == "fsdp":
                raise NanoseekError("dist.strategy='fsdp' shards decoder-only models; use 'ddp' for encoder_decoder")

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return from_dict(cls, data)

    def to_dict(self) -> dict:
        return to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def build_train_config(
    file: str | Path | None = None, preset: str | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Preset (model + run defaults) < config file < dotted overrides."""
    data: dict = load_config_file(file) if file else {}
    name = preset or data.get("preset") or DEFAULT_PRESET
    merged: dict = {"preset": name, "model": dict(get_preset(name))}
    for section, values in get_run_defaults(name).items():
        merged.setdefault(section, {}).update(values)
    deep_update(merged, data)
    for key, value in (overrides or {}).items():
        apply_override(merged, key, value)
    return TrainConfig.from_dict(merged)


RUN_CONFIG_FILE = "train_config.json"  # the full config a run writes into its folder
FIXED_ON_RESUME = ("model.", "data.tokenizer", "data.vocab_size", "data.seq_len", "data.task")


def saved_run_config(out: str | Path) -> Path | None:
    """The config file of the run in folder `out`, when it holds one."""
    path = Path(out) / RUN_CONFIG_FILE
    return path if path.is_file() else None


def build_resume_config(out: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The run in `out` as it was configured (its train_config.json), with `overrides` for what may
    change when it continues (budgets, checkpoint, log and eval cadence, optimizer, ...). A change of
    the model or of the tokenization is an error naming the field: the checkpoint holds that model."""
    saved_file = saved_run_config(out)
    if saved_file is None:
        raise NanoseekError(f"{out} holds no {RUN_CONFIG_FILE}: nothing to resume")
    saved = load_config_file(saved_file)
    for key, value in (overrides or {}).items():
        if key.startswith(FIXED_ON_RESUME):
            old: Any = saved
            for part in key.split("."):
                old = old.get(part) if isinstance(old, dict) else None
            if old != value:
                raise NanoseekError(
                    f"--{key}={value!r}: a resumed run keeps {key}={old!r} (its checkpoint holds that model); "
                    f"train a new run into another --out to change it"
                )
    return build_train_config(saved_file, None, {**(overrides or {}), "out": str(out)})
