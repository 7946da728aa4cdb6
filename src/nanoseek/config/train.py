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
    deep_update,
    from_dict,
    load_config_file,
    to_dict,
)
from nanoseek.config.presets import DEFAULT_PRESET, canonical_name, get_preset, get_run_defaults
from nanoseek.config.validate import SECTIONS, check_fields
from nanoseek.device import check_device_name
from nanoseek.errors import NanoseekError

SCHEDULES = ("constant", "cosine", "wsd", "multistep", "inverse_sqrt", "plateau")
OPTIMIZERS = ("adamw", "muon", "schedule_free")
BPE_MIN_VOCAB = 256 + 3  # every byte, and the three special tokens
# "lm": next-token prediction over text files; the others are sequence-to-sequence pair tasks (data/pairs.py)
TASKS = ("lm", "couplets", "copy", "reverse", "sort")


@dataclass
class DataConfig:
    """The text to train on, its tokenizer and its windows."""

    path: list[str] = field(default_factory=list)  # text files; empty = the bundled tiny Shakespeare
    tokenizer: str = "char"  # "char", "bpe" (trained on the data), or a path to a tokenizer.json
    vocab_size: int = 2048  # tokens of a trained BPE vocabulary (tokenizer="bpe" only)
    val_fraction: float = 0.1  # the last fraction of tokens, held out for validation (nanoGPT's split)
    seq_len: int = 128  # tokens per training window (at most model.max_position_embeddings)
    cache_dir: str = ""  # where token shards go; "" = OUT/data
    task: str = "lm"  # lm | couplets (data.path: the poems, default the bundled tang) | copy | reverse | sort


@dataclass
class OptimConfig:
    """The optimizer."""

    name: str = "adamw"  # adamw, muon (Muon for the hidden matrices, AdamW for the rest), schedule_free
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.1  # decoupled weight decay on matrices (not norms, biases, embeddings' gains)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator eps
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = off
    muon_lr: float = 0.02  # optim.name="muon": lr of the hidden matrices
    muon_momentum: float = 0.95  # optim.name="muon": Nesterov momentum
    # optim.name="schedule_free": x = the average the model is evaluated and saved at (Defazio et al. 2024);
    # gradients are taken at y = (1 - beta1) z + beta1 x, so beta1 interpolates between z and x


@dataclass
class ScheduleConfig:
    """The learning-rate schedule over the budget."""

    name: str = "cosine"  # constant | cosine | wsd | multistep | inverse_sqrt | plateau
    warmup_steps: int = 100  # linear warmup from 0 to optim.lr over these steps
    min_lr_ratio: float = 0.1  # cosine / wsd floor as a fraction of lr
    decay_fraction: float = 0.2  # wsd: final fraction of training that decays
    milestones: list[float] = field(default_factory=lambda: [0.8, 0.9])  # multistep
    gamma: float = 0.316  # multistep factor per milestone
    plateau_factor: float = 0.5  # plateau: multiply the lr by this when val_loss stops improving
    plateau_patience: int = 2  # plateau: evaluations without improvement tolerated before lowering
    plateau_cooldown: int = 0  # plateau: evaluations to wait after lowering before counting again
    plateau_threshold: float = 1e-3  # plateau: relative improvement of val_loss that counts as one
    plateau_min_ratio: float = 0.01  # plateau: the lr never drops below this fraction of optim.lr
    spike_guard: bool = False  # skip or roll back a step whose loss or grad norm jumps above mean + k std
    spike_action: str = "auto"  # auto (skip a lone spike, roll back a repeated or non-finite one) | skip | rollback
    spike_repeat_window: int = 10  # auto: a spike this many steps or fewer after the last rolls back
    spike_k: float = 6.0  # spike threshold in running standard deviations above the running mean
    spike_ema: float = 0.98  # decay of the running mean and variance of loss and grad norm
    spike_min_steps: int = 20  # steps observed before the guard may fire
    spike_lr_factor: float = 0.5  # lr multiplier after a rolled-back spike (every spike with skip)
    spike_recover_steps: int = 100  # quiet steps over which the lr grows back to the schedule's
    spike_snapshot_every: int = 10  # rollback: steps between in-memory copies of weights and optimizer


@dataclass
class LoopConfig:
    """The training loop: batches, budgets, seed, device, precision."""

    batch_size: int = 32  # windows per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 2000  # stop after this many optimizer steps; 0 = no step limit
    max_tokens: int = 0  # stop after this many training tokens; 0 = no token limit
    max_seconds: float = 0.0  # wall-clock budget of the whole command (setup and evals too); 0 = none
    seed: int = 1337  # seeds the weights, the batch order and the evaluation windows
    dtype: str = "float32"  # float32 | bfloat16 (autocast) | auto (bfloat16 where the device has native bf16 matmuls)
    device: str = "auto"  # auto (a CUDA GPU if torch sees one, else cpu) | cpu | cuda | cuda:N
    compile: bool = False  # train a torch.compile'd model
    threads: int = 0  # torch threads; 0 = torch's default (one per core; fewer on a busy shared machine)
    dsa_warmup_steps: int = 0  # DSA models: dense attention, only the indexers train, for this many steps
    label_smoothing: float = 0.0  # epsilon_ls: targets (1 - eps) one-hot + eps uniform (Vaswani: 0.1)


@dataclass
class CheckpointConfig:
    """When checkpoints are written."""

    every: int = 500  # save every N steps; 0 = only at the end
    keep_last: int = 2  # checkpoints kept (older ones are deleted)


@dataclass
class LogConfig:
    """What a run shows and records as it goes."""

    every: int = 10  # write a metrics.jsonl line every N steps
    progress: bool = True  # show the progress bar
    plot: bool = True  # draw loss.png at the end


@dataclass
class EvalConfig:
    """Validation during training."""

    every: int = 250  # evaluate every N steps; 0 = only at the end
    points: int = 0  # evaluate at this many evenly spaced fractions of the budget instead of every N steps
    batches: int = 20  # batches per evaluation (the same fixed windows each time)
    batch_size: int = 32  # windows per evaluation batch


@dataclass
class DistConfig:
    """Training on several processes (under torchrun)."""

    strategy: str = "none"  # none | ddp | fsdp (under torchrun)
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    mixed_precision: bool = False  # fsdp: bf16 parameters in compute, fp32 gradient reduction
    expert_parallel: bool = False  # ddp + MoE: routed experts sharded across ranks, all-to-all tokens


@dataclass
class TrainConfig:
    """A training run: the model plus data, optimizer, schedule, loop, checkpoint, log, eval."""

    model: ModelConfig = field(default_factory=ModelConfig)  # the architecture
    data: DataConfig = field(default_factory=DataConfig)  # text, tokenizer, windows
    optim: OptimConfig = field(default_factory=OptimConfig)  # the optimizer
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # the learning-rate schedule
    train: LoopConfig = field(default_factory=LoopConfig)  # the loop: batches, budgets, device
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # checkpoint cadence
    log: LogConfig = field(default_factory=LogConfig)  # logging, progress bar, plot
    eval: EvalConfig = field(default_factory=EvalConfig)  # validation during training
    dist: DistConfig = field(default_factory=DistConfig)  # several processes
    preset: str = ""  # the named config the model (and run defaults) came from
    out: str = "runs/default"  # the run folder: checkpoints, metrics, summary

    def __post_init__(self):
        self.validate()

    def validate(self):
        check_fields(self, {})
        for section, ranges in SECTIONS.items():  # each field: its type and range (config/validate.py)
            check_fields(getattr(self, section), ranges, f"{section}.")
        check_choice("optim.name", self.optim.name, OPTIMIZERS)
        check_choice("schedule.name", self.schedule.name, SCHEDULES)
        check_choice("schedule.spike_action", self.schedule.spike_action, ("auto", "skip", "rollback"))
        self.check_adaptive()
        check_choice("train.dtype", self.train.dtype, ("float32", "bfloat16", "auto"))
        check_device_name("train.device", self.train.device)
        check_choice("dist.strategy", self.dist.strategy, ("none", "ddp", "fsdp"))
        self._validate_task()
        if self.train.dsa_warmup_steps and self.dist.strategy == "ddp":
            raise NanoseekError(
                "train.dsa_warmup_steps trains only the indexers, which DDP cannot do "
                "(it expects a gradient for every parameter); warm up in one process"
            )
        if self.data.tokenizer == "bpe" and self.data.vocab_size < BPE_MIN_VOCAB:
            raise NanoseekError(
                f"data.vocab_size={self.data.vocab_size} must be >= {BPE_MIN_VOCAB} for data.tokenizer='bpe' "
                "(256 bytes + 3 special tokens)"
            )
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

    def check_adaptive(self):
        """What the adaptive schedules need of the rest of the run (their fields' ranges are in SECTIONS)."""
        s = self.schedule
        if s.name == "plateau" and not (self.eval.every or self.eval.points):
            raise NanoseekError(
                "schedule.name=plateau reacts to the validation loss: set eval.every or eval.points > 0"
            )
        if self.optim.name == "schedule_free" and s.name not in ("constant", "plateau"):
            raise NanoseekError(
                f"optim.name=schedule_free replaces the decay: use schedule.name=constant (with warmup_steps), "
                f"not {s.name}"
            )

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
    asked = preset or data.get("preset") or DEFAULT_PRESET
    if not isinstance(asked, str):
        raise NanoseekError(f"preset: expected a preset name (a string), got {asked!r}")
    merged: dict = {"preset": canonical_name(asked), "model": dict(get_preset(asked))}
    name = merged["preset"]
    for section, values in get_run_defaults(name).items():
        merged.setdefault(section, {}).update(values)
    deep_update(merged, data)
    for key, value in (overrides or {}).items():
        apply_override(merged, key, value)
    cfg = TrainConfig.from_dict(merged)
    check_vocab_size_used(cfg)
    return cfg


def check_vocab_size_used(cfg: TrainConfig) -> None:
    """data.vocab_size sizes a BPE vocabulary that is trained; with any other tokenizer a value set
    away from its default would be ignored without a word, so it is an error naming both fields."""
    if cfg.data.tokenizer == "bpe" or cfg.data.vocab_size == DataConfig.vocab_size:
        return
    what = (
        "a char tokenizer's vocabulary is the corpus's characters"
        if cfg.data.tokenizer == "char"
        else f"the tokenizer file {cfg.data.tokenizer} brings its own vocabulary"
    )
    raise NanoseekError(
        f"data.vocab_size={cfg.data.vocab_size} has no effect with data.tokenizer={cfg.data.tokenizer!r} ({what}); "
        "drop it, or train one with data.tokenizer=bpe"
    )


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
