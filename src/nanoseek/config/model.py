"""`ModelConfig`: every architectural choice of a `Transformer`, and the kinds each axis allows.

Field names are the Hugging Face DeepSeek `config.json` names wherever HF has the concept
(`hidden_size`, `num_attention_heads`, `q_lora_rank`, `n_routed_experts`, ...). The choices HF has no
field for are plain strings naming an entry of a registry (`position`, `attention`, `sparse`, `ffn`,
`norm`, `norm_position`, `fusion`); in an exported HF `config.json` they sit under the key `nanoseek`.
Impossible shapes and unknown kinds raise `NanoseekError` at construction, naming the field.

    >>> cfg = ModelConfig.from_preset("gpt2-tiny")
    >>> cfg.replace(hidden_size=128).hidden_size
    128
    >>> round(mscale(40.0), 4)  # YaRN: 0.1 ln(s) + 1
    1.3689
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nanoseek.config.parse import check_choice, check_positive, from_dict, to_dict
from nanoseek.config.presets import get_preset
from nanoseek.config.validate import MODEL, check_fields, check_rope_scaling
from nanoseek.errors import NanoseekError

POSITIONS = ("sinusoidal", "learned", "rope", "alibi", "t5", "none")
BIAS_POSITIONS = ("alibi", "t5")  # biases on the attention logits by distance (model/position.py)
ATTENTIONS = ("mha", "gqa", "mqa", "mla", "v4")
SPARSE_KINDS = ("dense", "sliding", "nsa", "dsa", "csa", "hca")
FFNS = ("relu", "gelu", "gelu_tanh", "swiglu", "moe")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
FUSIONS = ("residual", "dwa", "dynamic", "hyper", "mhc")
SCORING_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")  # model/position.py
ARCHITECTURES = ("decoder", "encoder_decoder")


@dataclass
class ModelConfig:
    """Every architectural choice of a `Transformer`. HF DeepSeek field names where HF has one."""

    # sizes (HF names)
    vocab_size: int = 128  # tokens in the vocabulary (training raises it to the tokenizer's)
    hidden_size: int = 64  # width d of the residual stream
    num_hidden_layers: int = 2  # transformer blocks
    num_attention_heads: int = 4  # query heads per layer
    num_key_value_heads: int | None = None  # key/value heads (gqa); None = num_attention_heads (MHA)
    head_dim: int | None = None  # width of a head; None = hidden_size // num_attention_heads
    intermediate_size: int = 256  # hidden width of a dense FFN (and of MoE models' first dense layers)
    max_position_embeddings: int = 256  # context: the most positions the model takes
    # norms, init, biases, dropout
    rms_norm_eps: float = 1e-6  # eps of every norm (LayerNorm too)
    initializer_range: float = 0.02  # std of the normal weight init
    tie_word_embeddings: bool = False  # the output head shares the input embedding matrix
    attention_bias: bool = False  # biases on the attention projections
    mlp_bias: bool = False  # biases on the FFN projections
    attention_dropout: float = 0.0  # dropout on attention probabilities (training)
    hidden_dropout: float = 0.0  # dropout on each block's output (training)
    # rotary positions
    rope_theta: float = 10000.0  # RoPE base: the longest wavelength's scale
    rope_scaling: dict | None = None  # {"rope_type": "yarn", "factor": .., ...}: YaRN context extension
    rope_interleave: bool = True  # DeepSeek pairs (2i, 2i+1); False = Llama half-split
    # T5 relative bias (position="t5"; HF T5 names)
    relative_attention_num_buckets: int = 32  # learned biases per head: exact below half, log-spaced above
    relative_attention_max_distance: int = 128  # distances from here on share the last bucket
    # multi-head latent attention
    q_lora_rank: int | None = None  # MLA/V4: rank of the low-rank query projection; None = full-rank queries
    kv_lora_rank: int = 512  # MLA: width of the cached key/value latent
    qk_nope_head_dim: int = 128  # MLA: query/key dims per head without RoPE
    qk_rope_head_dim: int = 64  # MLA/V4: query/key dims per head that carry RoPE (shared key for MLA)
    v_head_dim: int = 128  # MLA: value dims per head
    # DeepSeekMoE
    n_routed_experts: int = 0  # ffn="moe": experts a router chooses from
    n_shared_experts: int = 0  # ffn="moe": experts every token goes through
    num_experts_per_tok: int = 2  # routed experts per token (top-k)
    moe_intermediate_size: int = 128  # hidden width of each expert
    first_k_dense_replace: int = 0  # the first k layers keep a dense FFN
    routed_scaling_factor: float = 1.0  # multiplies the routed experts' weighted sum
    scoring_func: str = "sigmoid"  # router scores: softmax (V2), sigmoid (V3), sqrtsoftplus (V4)
    topk_method: str = "noaux_tc"  # expert choice: greedy, group_limited_greedy, noaux_tc (bias-balanced)
    n_group: int = 1  # expert groups for group-limited routing
    topk_group: int = 1  # groups a token's experts may come from
    norm_topk_prob: bool = True  # renormalize the chosen experts' weights to sum to 1
    num_hash_layers: int = 0  # the first MoE layers route by a fixed token-id -> experts table (V4)
    swiglu_limit: float | None = None  # clamp expert gate (max) and up (+-) pre-activations (V4: 10)
    aux_loss_alpha: float = 0.0  # sequence-wise balance loss weight
    bias_update_speed: float = 0.001  # gamma of auxiliary-loss-free balancing
    # multi-token prediction
    num_nextn_predict_layers: int = 0  # MTP modules: each predicts one more token ahead
    mtp_loss_weight: float = 0.3  # lambda: weight of the MTP loss in training
    # special tokens
    bos_token_id: int | None = None  # beginning-of-sequence token id (HF checkpoints)
    eos_token_id: int | None = None  # end-of-sequence token id: generation stops there
    pad_token_id: int | None = None  # padding token id (HF checkpoints)
    # nanoseek kinds (no HF field; exported under "nanoseek")
    architecture: str = "decoder"  # architecture: decoder (one causal stack), encoder_decoder (Vaswani et al. 2017)
    encoder_layers: int | None = None  # encoder_decoder: encoder depth (None = num_hidden_layers, the decoder's)
    position: str = "rope"  # positions: sinusoidal, learned, rope, none
    attention: str = "mha"  # attention: mha, gqa, mqa, mla (latent KV), v4 (shared-KV with sinks)
    sparse: str = "dense"  # the attention pattern of every layer (see sparse_layers)
    sparse_layers: list | None = None  # per-layer kinds; a shorter list repeats (["sliding", "dense"])
    sliding_window: int = 512  # keys a "sliding" query sees, itself included
    nsa_block: int = 64  # NSA: tokens per compressed / selected block (l = l' = d)
    nsa_topn: int = 16  # NSA: blocks each query block attends to (first, previous and own included)
    nsa_query_group: int | None = None  # NSA: queries sharing one block selection (None: nsa_block; 1: per token)
    index_topk: int = 2048  # DSA/CSA: keys (entries) each query attends to, chosen by the indexer
    index_n_heads: int = 64  # DSA/CSA: heads of the lightning indexer
    index_head_dim: int = 128  # DSA/CSA: width of an indexer head
    # DeepSeek-V4 attention (attention="v4"; HF deepseek_v4 names, legacy scalar forms of compress_rates)
    o_groups: int = 8  # head groups of the grouped output projection
    o_lora_rank: int = 1024  # width each group projects to
    compress_rate_csa: int = 4  # tokens per compressed entry in "csa" layers
    compress_rate_hca: int = 128  # tokens per compressed entry in "hca" layers
    compress_rope_theta: float = 160000.0  # RoPE base of csa/hca layers (YaRN from rope_scaling)
    ffn: str = "swiglu"  # feed-forward: relu, gelu, swiglu, moe (DeepSeekMoE)
    norm: str = "rmsnorm"  # norm: layernorm, rmsnorm
    norm_position: str = "pre"  # pre (before each sublayer) or post (after the residual add, Vaswani)
    fusion: str = "residual"  # how layers combine: residual, dwa, dynamic, hyper, mhc
    hc_mult: int = 4  # residual streams of hyper / mhc fusion
    hc_sinkhorn_iters: int = 20  # mhc: Sinkhorn iterations making the stream mix doubly stochastic
    hc_eps: float = 1e-6  # mhc: eps of the Sinkhorn normalization
    embedding_scale: bool = False  # multiply embeddings by sqrt(hidden_size) (Vaswani)
    final_norm: bool = True  # a norm before the head (post-norm models already end in one)
    depth_scaled_init: bool = True  # output projections get std / sqrt(2 * layers)
    # how the model runs (no effect on its weights or math; never exported to HF)
    kernels: bool = True  # fused fast paths of nanoseek.kernels where installed; False = the plain reference

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
        check_fields(self, MODEL)  # each field: its type and range (config/validate.py)
        check_choice("architecture", self.architecture, ARCHITECTURES)
        check_choice("position", self.position, POSITIONS)
        check_choice("attention", self.attention, ATTENTIONS)
        check_choice("sparse", self.sparse, SPARSE_KINDS)
        self._validate_sparse()
        if self.position in BIAS_POSITIONS:
            self._validate_bias_position()
        check_choice("ffn", self.ffn, FFNS)
        check_choice("norm", self.norm, NORMS)
        check_choice("norm_position", self.norm_position, NORM_POSITIONS)
        check_choice("fusion", self.fusion, FUSIONS)
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
        if self.norm_position == "post" and self.fusion != "residual":
            raise NanoseekError("norm_position='post' works only with fusion='residual'")
        if self.architecture == "encoder_decoder":
            self._validate_encoder_decoder()

    def _validate_sparse(self):
        if self.sparse_layers is not None:
            if not isinstance(self.sparse_layers, list) or not self.sparse_layers:
                raise NanoseekError(
                    "sparse_layers must be a non-empty list of kinds, one per layer "
                    f"(or a pattern that repeats): {', '.join(SPARSE_KINDS)}"
                )
            for i, kind in enumerate(self.sparse_layers):
                check_choice(f"sparse_layers[{i}]", kind, SPARSE_KINDS)
        kinds = {self.layer_sparse(i) for i in range(self.num_hidden_layers)}
        if "nsa" in kinds:
            if self.nsa_topn < 3:
                raise NanoseekError(
                    f"nsa_topn={self.nsa_topn} must be >= 3 (the first, previous and own block are always selected)"
                )
            group = self.nsa_query_group
            if group is not None and (group < 1 or self.nsa_block % group):
                raise NanoseekError(
                    f"nsa_query_group={group} must divide nsa_block={self.nsa_block} (1 = per token; None = nsa_block)"
                )
            if self.attention == "mla":
                raise NanoseekError(
                    "sparse='nsa' has its own key/value projections per branch; use "
                    "attention='mha', 'gqa' or 'mqa' (for MLA models use sparse='dsa')"
                )
        v4_kinds = {"csa", "hca"} & kinds
        if v4_kinds and self.attention != "v4":
            raise NanoseekError(
                f"sparse={sorted(v4_kinds)[0]!r} is DeepSeek-V4 compressed attention; it needs attention='v4'"
            )
        if self.attention == "v4" and {"nsa", "dsa"} & kinds:
            raise NanoseekError("attention='v4' layers are one of: dense, sliding, csa, hca")
        if "csa" in kinds:
            if self.index_head_dim < self.qk_rope_head_dim:
                raise NanoseekError(
                    f"index_head_dim={self.index_head_dim} must be >= qk_rope_head_dim="
                    f"{self.qk_rope_head_dim} (the indexer rotates its last rope dims)"
                )
        if "dsa" in kinds:
            if self.attention != "mla" or not self.q_lora_rank:
                raise NanoseekError(
                    "sparse='dsa' (the lightning indexer) needs attention='mla' with a "
                    "q_lora_rank, as DeepSeek-V3.2 has"
                )
            if self.index_head_dim < self.qk_rope_head_dim:
                raise NanoseekError(
                    f"index_head_dim={self.index_head_dim} must be >= qk_rope_head_dim="
                    f"{self.qk_rope_head_dim} (the indexer rotates its first rope dims)"
                )

    def _validate_bias_position(self):
        kinds = {self.layer_sparse(i) for i in range(self.num_hidden_layers)}
        if kinds - {"dense", "sliding"}:
            raise NanoseekError(
                f"position={self.position!r} (a bias on the attention logits) works with sparse kinds dense and "
                f"sliding only (got {sorted(kinds - {'dense', 'sliding'})[0]!r})"
            )
        if self.position == "t5":
            if self.relative_attention_num_buckets < 2:
                raise NanoseekError(
                    f"relative_attention_num_buckets={self.relative_attention_num_buckets} must be >= 2"
                )
            if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 2:
                raise NanoseekError(
                    f"relative_attention_max_distance={self.relative_attention_max_distance} must be > "
                    f"relative_attention_num_buckets / 2 = {self.relative_attention_num_buckets // 2}"
                )

    @property
    def n_encoder_layers(self) -> int:
        """Encoder depth of an encoder-decoder model (0 for a decoder-only one)."""
        if self.architecture != "encoder_decoder":
            return 0
        return self.num_hidden_layers if self.encoder_layers is None else self.encoder_layers

    def _validate_encoder_decoder(self):
        """The encoder-decoder stacks are built from the dense parts: MHA/GQA/MQA attention, a dense FFN,
        a plain residual, no MTP."""
        check_positive("encoder_layers", self.encoder_layers)
        choices = {
            "attention": (self.attention, ("mha", "gqa", "mqa")),
            "sparse": (self.sparse if not self.sparse_layers else "per-layer", ("dense",)),
            "ffn": (self.ffn, ("relu", "gelu", "swiglu")),
            "fusion": (self.fusion, ("residual",)),
        }
        for name, (value, valid) in choices.items():
            if value not in valid:
                raise NanoseekError(
                    f"{name}={value!r}: architecture='encoder_decoder' supports {name} = {', '.join(valid)}"
                )
        if self.num_nextn_predict_layers:
            raise NanoseekError("num_nextn_predict_layers must be 0 for architecture='encoder_decoder'")
        if self.position in BIAS_POSITIONS:
            raise NanoseekError(
                f"position={self.position!r}: architecture='encoder_decoder' takes positions that add to or rotate "
                "the embeddings (sinusoidal, learned, rope), not a bias on the attention logits"
            )

    def _validate_v4(self):
        h, hd = self.num_attention_heads, self.attn_head_dim
        if self.num_key_value_heads not in (None, 1):
            raise NanoseekError(
                f"num_key_value_heads={self.num_key_value_heads}: attention='v4' has one shared "
                "key/value head (set 1 or leave it unset)"
            )
        if not self.q_lora_rank:
            raise NanoseekError("attention='v4' needs q_lora_rank (its queries are low-rank)")
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
            raise NanoseekError(f"num_key_value_heads={kv} does not divide num_attention_heads={h}")
        if self.position == "rope" and self.attn_head_dim % 2:
            raise NanoseekError(f"head_dim={self.attn_head_dim} must be even for position='rope'")

    def _validate_mla(self):
        for name in ("qk_nope_head_dim", "qk_rope_head_dim"):  # 0 is in their range, not in MLA's
            check_positive(name, getattr(self, name))
        if self.qk_rope_head_dim % 2:
            raise NanoseekError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        if self.position != "rope":
            raise NanoseekError(
                f"attention='mla' needs position='rope' (got {self.position!r}): its decoupled rotary key carries "
                "the positions; distance biases (alibi, t5) work with attention='mha', 'gqa' or 'mqa'"
            )

    def _validate_moe(self):
        check_positive("n_routed_experts", self.n_routed_experts)
        check_choice("scoring_func", self.scoring_func, SCORING_FUNCS)
        check_choice("topk_method", self.topk_method, TOPK_METHODS)
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
        if self.scoring_func == "sqrtsoftplus" and self.n_group > 1:
            raise NanoseekError("scoring_func='sqrtsoftplus' (V4) routes without groups; set n_group=1")

    def _validate_rope_scaling(self):
        rs = self.rope_scaling
        if not isinstance(rs, dict):
            raise NanoseekError(f"rope_scaling={rs!r} must be a table with a rope_type ({', '.join(ROPE_TYPES)})")
        kind = rs.get("rope_type", rs.get("type", "default"))
        check_choice("rope_scaling.rope_type", kind, ROPE_TYPES)
        if kind in ("linear", "dynamic", "yarn", "llama3") and rs.get("factor") is None:
            raise NanoseekError(f"rope_scaling.factor is missing: {kind} needs a number >= 1")
        check_rope_scaling(rs)  # the numbers it holds: types and ranges (config/validate.py)
        if kind == "llama3":
            low, high = rs.get("low_freq_factor"), rs.get("high_freq_factor")
            if not all(isinstance(v, (int, float)) for v in (low, high)) or not 0 < low < high:
                raise NanoseekError(
                    f"rope_scaling low_freq_factor={low!r}, high_freq_factor={high!r}: llama3 needs numbers "
                    "with 0 < low_freq_factor < high_freq_factor"
                )
        if kind == "longrope":
            for name in ("short_factor", "long_factor"):
                factors = rs.get(name)
                if not isinstance(factors, list) or len(factors) != self.rope_dim // 2:
                    raise NanoseekError(
                        f"rope_scaling.{name} must be a list of {self.rope_dim // 2} numbers (rotary dims / 2)"
                    )
        if self.attention == "v4" and kind in ("dynamic", "longrope"):
            raise NanoseekError(
                f"rope_scaling.rope_type={kind!r} changes with the sequence length; attention='v4' takes "
                "default, linear, yarn or llama3"
            )

    # ----- construction helpers
    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        return from_dict(cls, data, "model")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        return cls.from_dict({**get_preset(name), **overrides})

    def to_dict(self) -> dict:
        return to_dict(self)

    def replace(self, **changes) -> ModelConfig:
        return ModelConfig.from_dict({**self.to_dict(), **changes})


def mscale(scale: float, m: float = 1.0) -> float:
    """YaRN attention magnitude correction: 0.1 * m * ln(s) + 1 for s > 1."""
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
