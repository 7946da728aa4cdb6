"""Configuration: one `ModelConfig` for the architecture, one `TrainConfig` for a run.

model.py    ModelConfig, the kinds each axis allows, its validation; `mscale` (YaRN)
train.py    TrainConfig and its sections; build_train_config (preset < file < overrides)
parse.py    from_dict / to_dict coercion, TOML/JSON files, parse_value, apply_override
validate.py every field's type and range (one table per section), checked when a config is built
memory.py   the memory a model needs, from its config alone; check_memory refuses what does not fit
presets.py  named configs

>>> ModelConfig.from_preset("gpt2-tiny").replace(hidden_size=128).hidden_size
128
"""

from nanoseek.config.model import (
    ARCHITECTURES,
    ATTENTIONS,
    FFNS,
    FUSIONS,
    NORM_POSITIONS,
    NORMS,
    POSITIONS,
    ROPE_TYPES,
    SCORING_FUNCS,
    SPARSE_KINDS,
    TOPK_METHODS,
    ModelConfig,
    mscale,
)
from nanoseek.config.parse import apply_override, from_dict, load_config_file, parse_value, to_dict
from nanoseek.config.train import (
    SCHEDULES,
    TASKS,
    CheckpointConfig,
    DataConfig,
    DistConfig,
    EvalConfig,
    LogConfig,
    LoopConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    build_resume_config,
    build_train_config,
    saved_run_config,
)

__all__ = [
    "ARCHITECTURES",
    "ATTENTIONS",
    "FFNS",
    "FUSIONS",
    "NORM_POSITIONS",
    "NORMS",
    "POSITIONS",
    "ROPE_TYPES",
    "SCORING_FUNCS",
    "SPARSE_KINDS",
    "TOPK_METHODS",
    "ModelConfig",
    "mscale",
    "apply_override",
    "from_dict",
    "load_config_file",
    "parse_value",
    "to_dict",
    "SCHEDULES",
    "TASKS",
    "CheckpointConfig",
    "DataConfig",
    "DistConfig",
    "EvalConfig",
    "LogConfig",
    "LoopConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "build_resume_config",
    "build_train_config",
    "saved_run_config",
]
