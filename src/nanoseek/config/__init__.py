"""Configuration: one `ModelConfig` for the architecture, one `TrainConfig` for a run.

`ModelConfig` uses the Hugging Face DeepSeek `config.json` field names wherever HF has the concept
(`hidden_size`, `num_attention_heads`, `q_lora_rank`, `n_routed_experts`, ...). The choices HF has no
field for are plain strings naming an entry of a registry (`position`, `attention`, `sparse`, `ffn`,
`norm`, `norm_position`, `fusion`); in an exported HF `config.json` they sit under the key `nanoseek`.

`TrainConfig` is made of sections (`model`, `data`, `optim`, `schedule`, `train`, `checkpoint`, `log`,
`eval`). Every field can be set from TOML/JSON or with a dotted override: `--optim.lr=3e-4`.
Unknown keys, wrong types and impossible shapes raise `NanoseekError` naming the field.

    >>> cfg = ModelConfig.from_preset("gpt2-tiny")
    >>> cfg.replace(hidden_size=128).hidden_size
    128
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from nanoseek.device import check_device_name
from nanoseek.errors import NanoseekError

POSITIONS = ("sinusoidal", "learned", "rope", "none")
ATTENTIONS = ("mha", "gqa", "mqa", "mla", "v4")
SPARSE_KINDS = ("dense", "sliding", "nsa", "dsa", "csa", "hca")
FFNS = ("relu", "gelu", "swiglu", "moe")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
FUSIONS = ("residual", "dwa", "dynamic", "hyper", "mhc")
SCORING_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
ROPE_TYPES = ("default", "yarn")


# --------------------------------------------------------------------------------------------
# generic dataclass <-> dict with validation


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp, where: str):
    """Check `value` against the annotation `tp`; accept ints for floats. Raise naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise NanoseekError(f"{where}: must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except NanoseekError as e:
                errors.append(str(e))
        raise errors[0] if len(errors) == 1 else NanoseekError(f"{where}: got {value!r}, expected {_type_name(tp)}")
    if tp is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise NanoseekError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise NanoseekError(f"{where}: expected a table/object, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise NanoseekError(f"{where}: expected a table/object, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise NanoseekError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise NanoseekError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise NanoseekError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise NanoseekError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass `cls` from `data`, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise NanoseekError(
            f"unknown config key {prefix}{unknown[0]!r}; valid keys: {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def _check_choice(where: str, value: str, valid: tuple[str, ...]):
    if value not in valid:
        raise NanoseekError(f"{where}={value!r} is not valid; choose one of: {', '.join(valid)}")


def _check_positive(where: str, value, allow_zero: bool = False):
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise NanoseekError(f"{where}={value} must be {'>= 0' if allow_zero else '> 0'}")


# --------------------------------------------------------------------------------------------
# the model


@dataclass
class ModelConfig:
    """Every architectural choice of a `Transformer`. HF DeepSeek field names where HF has one."""

    # sizes (HF names)
    vocab_size: int = 128
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: Optional[int] = None  # None = num_attention_heads (MHA)
    head_dim: Optional[int] = None  # None = hidden_size // num_attention_heads
    intermediate_size: int = 256
    max_position_embeddings: int = 256
    # norms, init, biases, dropout
    rms_norm_eps: float = 1e-6  # eps of every norm (LayerNorm too)
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    # rotary positions
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"rope_type": "yarn", "factor": .., ...}
    rope_interleave: bool = True  # DeepSeek pairs (2i, 2i+1); False = Llama half-split
    # multi-head latent attention
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # DeepSeekMoE
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 128
    first_k_dense_replace: int = 0
    routed_scaling_factor: float = 1.0
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    num_hash_layers: int = 0  # the first MoE layers route by a fixed token-id -> experts table (V4)
    swiglu_limit: Optional[float] = None  # clamp expert gate (max) and up (+-) pre-activations (V4: 10)
    aux_loss_alpha: float = 0.0  # sequence-wise balance loss weight
    bias_update_speed: float = 0.001  # gamma of auxiliary-loss-free balancing
    # multi-token prediction
    num_nextn_predict_layers: int = 0
    mtp_loss_weight: float = 0.3
    # special tokens
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    # nanoseek kinds (no HF field; exported under "nanoseek")
    position: str = "rope"
    attention: str = "mha"
    sparse: str = "dense"  # the attention pattern of every layer (see sparse_layers)
    sparse_layers: Optional[list] = None  # per-layer kinds; a shorter list repeats (["sliding", "dense"])
    sliding_window: int = 512  # keys a "sliding" query sees, itself included
    nsa_block: int = 64  # NSA: tokens per compressed / selected block (l = l' = d)
    nsa_topn: int = 16  # NSA: blocks each query block attends to (first, previous and own included)
    index_topk: int = 2048  # DSA: keys each query attends to (HF deepseek_v32 names)
    index_n_heads: int = 64
    index_head_dim: int = 128
    # DeepSeek-V4 attention (attention="v4"; HF deepseek_v4 names, legacy scalar forms of compress_rates)
    o_groups: int = 8  # head groups of the grouped output projection
    o_lora_rank: int = 1024  # width each group projects to
    compress_rate_csa: int = 4  # tokens per compressed entry in "csa" layers
    compress_rate_hca: int = 128  # tokens per compressed entry in "hca" layers
    compress_rope_theta: float = 160000.0  # RoPE base of csa/hca layers (YaRN from rope_scaling)
    ffn: str = "swiglu"
    norm: str = "rmsnorm"
    norm_position: str = "pre"
    fusion: str = "residual"
    hc_mult: int = 4  # residual streams of hyper / mhc fusion
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    embedding_scale: bool = False  # multiply embeddings by sqrt(hidden_size) (Vaswani)
    final_norm: bool = True  # post-norm models already end in a norm
    depth_scaled_init: bool = True  # output projections get std / sqrt(2 * layers)
    # how the model runs (no effect on its weights or math; never exported to HF)
    kernels: bool = True  # fused/recomputing fast paths from nanoseek.kernels where installed; False = the plain reference

    def __post_init__(self):
        self.validate()

    # ----- derived
    @property
    def n_kv_heads(self) -> int:
        if self.attention in ("mqa", "v4"):
            return 1
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_dim(self) -> int:
        """Dimensions of a head that rotate: the decoupled slice in MLA, the whole head otherwise."""
        return self.qk_rope_head_dim if self.attention in ("mla", "v4") else self.attn_head_dim

    def layer_sparse(self, i: int) -> str:
        """The attention pattern of layer i: dense (causal), sliding, nsa, dsa, csa or hca."""
        if self.sparse_layers:
            return self.sparse_layers[i % len(self.sparse_layers)]
        return self.sparse

    def is_moe_layer(self, i: int) -> bool:
        return self.ffn == "moe" and i >= self.first_k_dense_replace

    # ----- validation
    def validate(self):
        if not isinstance(self.kernels, bool):
            raise NanoseekError(f"kernels={self.kernels!r}: expected true/false")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings"):
            _check_positive(name, getattr(self, name))
        for name in ("num_key_value_heads", "head_dim", "q_lora_rank"):
            _check_positive(name, getattr(self, name))
        _check_choice("position", self.position, POSITIONS)
        _check_choice("attention", self.attention, ATTENTIONS)
        _check_choice("sparse", self.sparse, SPARSE_KINDS)
        self._validate_sparse()
        _check_choice("ffn", self.ffn, FFNS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("norm_position", self.norm_position, NORM_POSITIONS)
        _check_choice("fusion", self.fusion, FUSIONS)
        for name in ("attention_dropout", "hidden_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise NanoseekError(f"{name}={p} must be in [0, 1)")
        if self.rms_norm_eps <= 0:
            raise NanoseekError(f"rms_norm_eps={self.rms_norm_eps} must be > 0")
        if self.attention == "mla":
            self._validate_mla()
        elif self.attention == "v4":
            self._validate_v4()
        else:
            self._validate_heads()
        if self.ffn == "moe":
            self._validate_moe()
        if self.rope_scaling is not None:
            self._validate_rope_scaling()
        _check_positive("num_nextn_predict_layers", self.num_nextn_predict_layers, allow_zero=True)
        if self.norm_position == "post" and self.fusion != "residual":
            raise NanoseekError("norm_position='post' works only with fusion='residual'")
        _check_positive("hc_mult", self.hc_mult)
        _check_positive("hc_sinkhorn_iters", self.hc_sinkhorn_iters)

    def _validate_sparse(self):
        if self.sparse_layers is not None:
            if not isinstance(self.sparse_layers, list) or not self.sparse_layers:
                raise NanoseekError("sparse_layers must be a non-empty list of kinds, one per layer "
                                    f"(or a pattern that repeats): {', '.join(SPARSE_KINDS)}")
            for i, kind in enumerate(self.sparse_layers):
                _check_choice(f"sparse_layers[{i}]", kind, SPARSE_KINDS)
        kinds = {self.layer_sparse(i) for i in range(self.num_hidden_layers)}
        _check_positive("sliding_window", self.sliding_window)
        if "nsa" in kinds:
            _check_positive("nsa_block", self.nsa_block)
            if self.nsa_topn < 3:
                raise NanoseekError(f"nsa_topn={self.nsa_topn} must be >= 3 (the first, previous and own block "
                                    f"are always selected)")
            if self.attention == "mla":
                raise NanoseekError("sparse='nsa' has its own key/value projections per branch; use "
                                    "attention='mha', 'gqa' or 'mqa' (for MLA models use sparse='dsa')")
        v4_kinds = {"csa", "hca"} & kinds
        if v4_kinds and self.attention != "v4":
            raise NanoseekError(f"sparse={sorted(v4_kinds)[0]!r} is DeepSeek-V4 compressed attention; it needs "
                                "attention='v4'")
        if self.attention == "v4" and {"nsa", "dsa"} & kinds:
            raise NanoseekError("attention='v4' layers are one of: dense, sliding, csa, hca")
        if "csa" in kinds:
            for name in ("index_topk", "index_n_heads", "index_head_dim"):
                _check_positive(name, getattr(self, name))
            if self.index_head_dim < self.qk_rope_head_dim:
                raise NanoseekError(f"index_head_dim={self.index_head_dim} must be >= qk_rope_head_dim="
                                    f"{self.qk_rope_head_dim} (the indexer rotates its last rope dims)")
        if "dsa" in kinds:
            for name in ("index_topk", "index_n_heads", "index_head_dim"):
                _check_positive(name, getattr(self, name))
            if self.attention != "mla" or not self.q_lora_rank:
                raise NanoseekError("sparse='dsa' (the lightning indexer) needs attention='mla' with a "
                                    "q_lora_rank, as DeepSeek-V3.2 has")
            if self.index_head_dim < self.qk_rope_head_dim:
                raise NanoseekError(f"index_head_dim={self.index_head_dim} must be >= qk_rope_head_dim="
                                    f"{self.qk_rope_head_dim} (the indexer rotates its first rope dims)")

    def _validate_v4(self):
        h, hd = self.num_attention_heads, self.attn_head_dim
        if self.num_key_value_heads not in (None, 1):
            raise NanoseekError(f"num_key_value_heads={self.num_key_value_heads}: attention='v4' has one shared "
                                "key/value head (set 1 or leave it unset)")
        if not self.q_lora_rank:
            raise NanoseekError("attention='v4' needs q_lora_rank (its queries are low-rank)")
        for name in ("o_groups", "o_lora_rank", "compress_rate_csa", "compress_rate_hca"):
            _check_positive(name, getattr(self, name))
        if h % self.o_groups:
            raise NanoseekError(f"o_groups={self.o_groups} does not divide num_attention_heads={h}")
        if self.qk_rope_head_dim % 2 or not 0 < self.qk_rope_head_dim <= hd:
            raise NanoseekError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even and in (0, head_dim={hd}]")
        if self.position != "rope":
            raise NanoseekError(f"attention='v4' needs position='rope' (got {self.position!r})")
        for name in ("compress_rate_csa", "compress_rate_hca"):
            if getattr(self, name) < 2:
                raise NanoseekError(f"{name}={getattr(self, name)} must be >= 2")

    def _validate_heads(self):
        h = self.num_attention_heads
        if self.head_dim is None and self.hidden_size % h:
            raise NanoseekError(
                f"num_attention_heads={h} does not divide hidden_size={self.hidden_size}; "
                f"pick a divisor of {self.hidden_size} or set head_dim"
            )
        if self.attention == "mha" and self.num_key_value_heads not in (None, h):
            raise NanoseekError(
                f"num_key_value_heads={self.num_key_value_heads} needs attention='gqa' "
                f"(attention='mha' uses num_key_value_heads = num_attention_heads = {h})"
            )
        kv = self.n_kv_heads
        if h % kv:
            raise NanoseekError(
                f"num_key_value_heads={kv} does not divide num_attention_heads={h}"
            )
        if self.position == "rope" and self.attn_head_dim % 2:
            raise NanoseekError(f"head_dim={self.attn_head_dim} must be even for position='rope'")

    def _validate_mla(self):
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _check_positive(name, getattr(self, name))
        if self.qk_rope_head_dim % 2:
            raise NanoseekError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        if self.position != "rope":
            raise NanoseekError(f"attention='mla' needs position='rope' (got {self.position!r})")

    def _validate_moe(self):
        _check_positive("n_routed_experts", self.n_routed_experts)
        _check_positive("moe_intermediate_size", self.moe_intermediate_size)
        _check_positive("n_shared_experts", self.n_shared_experts, allow_zero=True)
        _check_choice("scoring_func", self.scoring_func, SCORING_FUNCS)
        _check_choice("topk_method", self.topk_method, TOPK_METHODS)
        e, k = self.n_routed_experts, self.num_experts_per_tok
        if not 1 <= k <= e:
            raise NanoseekError(f"num_experts_per_tok={k} must be in [1, n_routed_experts={e}]")
        if e % self.n_group:
            raise NanoseekError(f"n_group={self.n_group} does not divide n_routed_experts={e}")
        if not 1 <= self.topk_group <= self.n_group:
            raise NanoseekError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        if self.topk_group * (e // self.n_group) < k:
            raise NanoseekError(
                f"topk_group={self.topk_group} groups of {e // self.n_group} experts hold fewer than "
                f"num_experts_per_tok={k} experts"
            )
        _check_positive("first_k_dense_replace", self.first_k_dense_replace, allow_zero=True)
        _check_positive("num_hash_layers", self.num_hash_layers, allow_zero=True)
        if self.swiglu_limit is not None:
            _check_positive("swiglu_limit", self.swiglu_limit)
        if self.scoring_func == "sqrtsoftplus" and self.n_group > 1:
            raise NanoseekError("scoring_func='sqrtsoftplus' (V4) routes without groups; set n_group=1")

    def _validate_rope_scaling(self):
        rs = self.rope_scaling
        kind = rs.get("rope_type", rs.get("type", "default"))
        _check_choice("rope_scaling.rope_type", kind, ROPE_TYPES)
        if kind == "yarn":
            factor = rs.get("factor")
            if not isinstance(factor, (int, float)) or factor < 1:
                raise NanoseekError(f"rope_scaling.factor={factor!r} must be a number >= 1")
            if not isinstance(rs.get("original_max_position_embeddings", 0), int):
                raise NanoseekError("rope_scaling.original_max_position_embeddings must be an integer")

    # ----- construction helpers
    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return from_dict(cls, data, "model")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        from nanoseek.config.presets import get_preset

        return cls.from_dict({**get_preset(name), **overrides})

    def to_dict(self) -> dict:
        return to_dict(self)

    def replace(self, **changes) -> "ModelConfig":
        return ModelConfig.from_dict({**self.to_dict(), **changes})


# --------------------------------------------------------------------------------------------
# a training run


@dataclass
class DataConfig:
    path: list[str] = field(default_factory=list)  # text files; empty = the bundled corpus
    tokenizer: str = "char"  # "char", "bpe", or a path to a tokenizer.json
    vocab_size: int = 2048  # for tokenizer="bpe"
    val_fraction: float = 0.1  # the last 10% of tokens, as nanoGPT splits
    seq_len: int = 128
    cache_dir: str = ""  # where token shards go; "" = OUT/data


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
        _check_choice("optim.name", self.optim.name, ("adamw", "muon"))
        _check_choice("schedule.name", self.schedule.name, SCHEDULES)
        _check_choice("train.dtype", self.train.dtype, ("float32", "bfloat16"))
        check_device_name("train.device", self.train.device)
        _check_choice("dist.strategy", self.dist.strategy, ("none", "ddp", "fsdp"))
        _check_positive("train.dsa_warmup_steps", self.train.dsa_warmup_steps, allow_zero=True)
        if self.train.dsa_warmup_steps and self.dist.strategy == "ddp":
            raise NanoseekError("train.dsa_warmup_steps trains only the indexers, which DDP cannot do "
                                "(it expects a gradient for every parameter); warm up in one process")
        for where, value in (("optim.lr", self.optim.lr), ("train.batch_size", self.train.batch_size),
                             ("train.grad_accum", self.train.grad_accum), ("data.seq_len", self.data.seq_len),
                             ("eval.batch_size", self.eval.batch_size), ("log.every", self.log.every)):
            _check_positive(where, value)
        for where, value in (("train.max_steps", self.train.max_steps), ("train.max_tokens", self.train.max_tokens),
                             ("train.max_seconds", self.train.max_seconds), ("optim.grad_clip", self.optim.grad_clip),
                             ("schedule.warmup_steps", self.schedule.warmup_steps),
                             ("checkpoint.every", self.checkpoint.every), ("eval.every", self.eval.every),
                             ("optim.weight_decay", self.optim.weight_decay)):
            _check_positive(where, value, allow_zero=True)
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

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        return from_dict(cls, data)

    def to_dict(self) -> dict:
        return to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


SCHEDULES = ("constant", "cosine", "wsd", "multistep", "inverse_sqrt")


# --------------------------------------------------------------------------------------------
# files and overrides


def load_config_file(path: str | Path) -> dict:
    """Read a TOML or JSON file into a plain dict."""
    path = Path(path)
    if not path.is_file():
        raise NanoseekError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        return json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise NanoseekError(f"config file {path} could not be parsed: {e}") from None


def parse_value(text: str):
    """Parse an override value as JSON (numbers, true/false, lists, null), else keep the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        if lowered in ("none", "null"):
            return None
        return text


def apply_override(data: dict, dotted: str, value) -> None:
    """Set `data[a][b] = value` for `dotted = "a.b"`, creating tables as needed."""
    keys = dotted.split(".")
    if not all(keys):
        raise NanoseekError(f"bad override key {dotted!r}; use --section.field=VALUE")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise NanoseekError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def build_train_config(file: str | None = None, preset: str | None = None,
                       overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Preset (model + run defaults) < config file < dotted overrides."""
    from nanoseek.config.presets import DEFAULT_PRESET, get_preset, get_run_defaults

    data: dict = load_config_file(file) if file else {}
    name = preset or data.get("preset") or DEFAULT_PRESET
    merged: dict = {"preset": name, "model": dict(get_preset(name))}
    for section, values in get_run_defaults(name).items():
        merged.setdefault(section, {}).update(values)
    _deep_update(merged, data)
    for key, value in (overrides or {}).items():
        apply_override(merged, key, value)
    return TrainConfig.from_dict(merged)


def _deep_update(dst: dict, src: dict):
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def mscale(scale: float, m: float = 1.0) -> float:
    """YaRN attention magnitude correction: 0.1 * m * ln(s) + 1 for s > 1."""
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
