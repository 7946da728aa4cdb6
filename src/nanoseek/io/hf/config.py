"""Hugging Face `config.json` <-> `ModelConfig` for `llama`, `deepseek_v2`, `deepseek_v3` and `deepseek_v32`.

The field names are mostly shared (ModelConfig uses HF's names); what differs per family:
DeepSeek-V2 routes by softmax without normalizing the top-k weights, V3 by sigmoid with a
correction bias (`noaux_tc`), V3.2 adds the lightning indexer (`index_*`) and names its dense
prefix through `mlp_layer_types`; Llama is grouped-query attention with half-split RoPE.
`rope_from_hf` reads both the legacy `rope_scaling` and transformers 5's `rope_parameters`.
DeepSeek-V4 has its own adapter (`nanoseek.io.hf.v4`), GPT-2 too (`nanoseek.io.hf.gpt2`).

No field transformers' modeling code reads is dropped in silence: each is mapped onto the model or,
where nanoseek (or transformers itself) cannot follow it, refused on load with a line naming it
(`refuse_fields`; the walk over every field is tests/io/test_hf_fields.py).
"""

from __future__ import annotations

from pathlib import Path

from nanoseek.config import ModelConfig
from nanoseek.errors import NanoseekError

SILU = ("silu", "swish")
# model_type -> [(field, value when absent, accepted values, what the model does instead)]
FIELD_RULES: dict[str, list[tuple[str, object, tuple, str]]] = {
    "llama": [("hidden_act", "silu", SILU, "the SwiGLU layers gate with SiLU")],
    "deepseek_v2": [
        ("hidden_act", "silu", SILU, "the SwiGLU layers gate with SiLU"),
        ("scoring_func", "softmax", ("softmax",), "transformers' deepseek_v2 routes by softmax"),
        ("topk_method", "greedy", ("greedy", "group_limited_greedy"), "deepseek_v2 routing is greedy or group-limited"),
        ("mlp_bias", False, (False,), "DeepSeek checkpoints have no MLP biases"),
        ("moe_layer_freq", 1, (1,), "every layer after first_k_dense_replace is MoE"),
        ("rope_interleave", True, (True,), "transformers' deepseek_v2 always rotates interleaved pairs"),
    ],
    "deepseek_v3": [
        ("hidden_act", "silu", SILU, "the SwiGLU layers gate with SiLU"),
        ("scoring_func", "sigmoid", ("sigmoid",), "transformers' deepseek_v3 routes by sigmoid"),
        ("topk_method", "noaux_tc", ("noaux_tc",), "transformers' deepseek_v3 routes by noaux_tc"),
        ("mlp_bias", False, (False,), "transformers' deepseek_v3 has no MLP biases"),
        ("moe_layer_freq", 1, (1,), "every layer after first_k_dense_replace is MoE"),
    ],
    "deepseek_v32": [
        ("hidden_act", "silu", SILU, "the SwiGLU layers gate with SiLU"),
        ("scoring_func", "sigmoid", ("sigmoid",), "transformers' deepseek_v32 routes by sigmoid"),
        ("topk_method", "noaux_tc", ("noaux_tc",), "transformers' deepseek_v32 routes by noaux_tc"),
        ("mlp_bias", False, (False,), "transformers' deepseek_v32 has no MLP biases"),
        ("rope_interleave", True, (True,), "transformers' deepseek_v32 always rotates interleaved pairs"),
    ],
}


def refuse_fields(cfg: dict, source: Path, rules) -> None:
    """One clear error for the first field whose value the model cannot follow."""
    for field, default, accepted, why in rules:
        value = cfg.get(field, default)
        if value is None:
            value = default
        if value not in accepted:
            raise NanoseekError(
                f"{source}: {field}={value!r} is not supported ({why}; accepted: {', '.join(map(repr, accepted))})"
            )
    quant = cfg.get("quantization_config")
    if quant and quant.get("quant_method", "fp8") != "fp8":
        raise NanoseekError(
            f"{source}: quantization_config.quant_method={quant.get('quant_method')!r}: nanoseek reads fp32, "
            "bf16, fp16 and DeepSeek's block-FP8 weights only"
        )


def rope_from_hf(cfg: dict, source: Path | None = None, whole_heads: bool = True) -> tuple[float, dict | None]:
    """(theta, scaling) from `rope_scaling` (legacy) or `rope_parameters` (transformers 5).

    The scaling comes back complete as transformers completes it: `original_max_position_embeddings`
    defaults to `max_position_embeddings` (a top-level one wins, as in transformers) and YaRN's unset
    `factor` is their ratio. With `whole_heads`, a `partial_rotary_factor` other than 1 is refused:
    these models rotate whole heads (the decoupled RoPE slice in MLA)."""
    params, scaling = cfg.get("rope_parameters") or {}, cfg.get("rope_scaling") or None
    for name, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is not None and not isinstance(value, dict):
            raise NanoseekError(f"rope_scaling: {name}={value!r} must be an object (or null)")
    params = dict(params)
    theta = cfg.get("rope_theta") or params.get("rope_theta") or 10000.0
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise NanoseekError(f"rope_theta={theta!r} must be a number > 0")
    theta = float(theta)
    if scaling is None and params.get("rope_type", params.get("type", "default")) not in ("default", None):
        scaling = params
    partial = (
        cfg.get("partial_rotary_factor")
        or params.get("partial_rotary_factor")
        or (scaling or {}).get("partial_rotary_factor")
    )
    if whole_heads and partial not in (None, 1, 1.0):
        raise NanoseekError(
            f"{source or 'config.json'}: partial_rotary_factor={partial!r} is not supported (nanoseek rotates "
            "whole heads here, the decoupled RoPE slice in MLA)"
        )
    if not scaling:
        return theta, None
    scaling = {k: v for k, v in scaling.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if "type" in scaling:
        scaling.setdefault("rope_type", scaling.pop("type"))
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        return theta, None
    max_positions = cfg.get("max_position_embeddings", 2048)
    if kind in ("yarn", "llama3", "longrope"):
        if cfg.get("original_max_position_embeddings"):
            scaling["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        scaling.setdefault("original_max_position_embeddings", max_positions)
    if kind == "yarn" and scaling.get("factor") is None:
        scaling["factor"] = max_positions / scaling["original_max_position_embeddings"]
    if kind == "dynamic":  # HF's max_position_embeddings is where the growth starts
        scaling["original_max_position_embeddings"] = max_positions
    return theta, {k: v for k, v in scaling.items() if v is not None}


def context_from_hf(cfg: dict, scaling: dict | None) -> int:
    """nanoseek's context: `max_position_embeddings`, or for dynamic NTK (which grows past it) that
    times the factor."""
    n = cfg.get("max_position_embeddings", 2048)
    if scaling and scaling.get("rope_type") == "dynamic":
        return int(n * float(scaling["factor"]))
    return n


def rope_to_hf(config: ModelConfig) -> tuple[int, dict | None]:
    """(max_position_embeddings, rope_scaling) for config.json: the inverse of `rope_from_hf`."""
    scaling = dict(config.rope_scaling) if config.rope_scaling else None
    if scaling and scaling.get("rope_type", scaling.get("type")) == "dynamic":
        original = scaling.pop("original_max_position_embeddings", None) or config.max_position_embeddings
        return original, scaling
    return config.max_position_embeddings, scaling


def first_id(value):
    """The first of a list of token ids (HF allows several eos ids), or the id itself; a negative
    id (some configs write pad_token_id=-1 for none) is none."""
    value = value[0] if isinstance(value, list) and value else value
    return None if isinstance(value, int) and value < 0 else value


def _dense_prefix(cfg: dict, source: Path) -> int:
    """first_k_dense_replace from V3.2's `mlp_layer_types` (dense layers first, then MoE)."""
    types = cfg.get("mlp_layer_types")
    if types is None:
        return cfg.get("first_k_dense_replace", 3)
    n_dense = next((i for i, t in enumerate(types) if t != "dense"), len(types))
    if any(t != "sparse" for t in types[n_dense:]):
        raise NanoseekError(f"{source}: mlp_layer_types={types} must be dense layers followed by MoE ('sparse') layers")
    layer_types = set(cfg.get("layer_types") or ["indexed_attention"])
    if layer_types != {"indexed_attention"}:
        raise NanoseekError(
            f"{source}: layer_types={sorted(layer_types)}: nanoseek reads V3.2 checkpoints "
            f"whose layers are all 'indexed_attention'"
        )
    return n_dense


def deepseek_config_from_hf(cfg: dict, source: Path) -> ModelConfig:
    """A ModelConfig from a deepseek_v2 / deepseek_v3 / deepseek_v32 / llama config.json."""
    kind = cfg["model_type"]
    refuse_fields(cfg, source, FIELD_RULES[kind])
    theta, scaling = rope_from_hf(cfg, source)
    common = dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        intermediate_size=cfg["intermediate_size"],
        max_position_embeddings=context_from_hf(cfg, scaling),
        rms_norm_eps=cfg.get("rms_norm_eps") or 1e-6,  # null means the default
        initializer_range=cfg.get("initializer_range") or 0.02,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        attention_dropout=float(cfg.get("attention_dropout") or 0.0),
        rope_theta=theta,
        rope_scaling=scaling,
        bos_token_id=first_id(cfg.get("bos_token_id")),
        eos_token_id=first_id(cfg.get("eos_token_id")),
        pad_token_id=first_id(cfg.get("pad_token_id")),
        position="rope",
        norm="rmsnorm",
        norm_position="pre",
    )
    if kind == "llama":
        kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        return ModelConfig(
            **common,
            attention="gqa",
            num_key_value_heads=kv,
            head_dim=cfg.get("head_dim"),
            ffn="swiglu",
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            rope_interleave=False,
        )
    kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if kv != cfg["num_attention_heads"]:
        raise NanoseekError(
            f"{source}: num_key_value_heads={kv} is not supported: MLA expands one latent into all "
            f"{cfg['num_attention_heads']} heads (set it to num_attention_heads)"
        )
    if kind == "deepseek_v3" and cfg.get("head_dim") not in (None, cfg["qk_rope_head_dim"]):
        raise NanoseekError(  # transformers' V3 sizes its RoPE tables by head_dim and breaks
            f"{source}: head_dim={cfg['head_dim']} is not supported: deepseek_v3 rotates "
            f"qk_rope_head_dim={cfg['qk_rope_head_dim']} dims (leave head_dim out or equal to it)"
        )
    v2 = kind == "deepseek_v2"
    moe = bool(cfg.get("n_routed_experts"))
    if kind == "deepseek_v32":
        cfg = {**cfg, "first_k_dense_replace": _dense_prefix(cfg, source)}
    deepseek = dict(
        attention="mla",
        q_lora_rank=cfg.get("q_lora_rank"),
        kv_lora_rank=cfg["kv_lora_rank"],
        qk_nope_head_dim=cfg["qk_nope_head_dim"],
        qk_rope_head_dim=cfg["qk_rope_head_dim"],
        v_head_dim=cfg["v_head_dim"],
        # only transformers' deepseek_v3 reads rope_interleave; V2 and V3.2 always interleave
        rope_interleave=bool(cfg.get("rope_interleave", True)) if kind == "deepseek_v3" else True,
        ffn="moe" if moe else "swiglu",
        num_nextn_predict_layers=cfg.get("num_nextn_predict_layers", 0) or 0,
    )
    if moe:
        method = "greedy" if v2 else "noaux_tc"
        deepseek.update(
            n_routed_experts=cfg["n_routed_experts"],
            n_shared_experts=cfg.get("n_shared_experts") or 0,
            num_experts_per_tok=cfg["num_experts_per_tok"],
            moe_intermediate_size=cfg["moe_intermediate_size"],
            first_k_dense_replace=cfg.get("first_k_dense_replace") or 0,
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
            scoring_func="softmax" if v2 else "sigmoid",
            topk_method=cfg.get("topk_method") or method,
            n_group=cfg.get("n_group") or 1,
            topk_group=cfg.get("topk_group") or 1,
            # HF DeepSeek-V2 never normalizes the top-k weights, whatever norm_topk_prob says
            norm_topk_prob=False if v2 else bool(cfg.get("norm_topk_prob", True)),
            aux_loss_alpha=float(cfg.get("aux_loss_alpha", 0.0) or 0.0) if not v2 else 0.0,
        )
    if kind == "deepseek_v32":
        deepseek.update(
            sparse="dsa",
            index_topk=cfg.get("index_topk", 2048),
            index_n_heads=cfg.get("index_n_heads", 64),
            index_head_dim=cfg.get("index_head_dim", 128),
        )
    return ModelConfig(**common, **deepseek)


def deepseek_config_to_hf(config: ModelConfig) -> dict:
    """A config.json for transformers' Llama or DeepSeek-V2/V3/V3.2; refuses what it cannot express."""
    problems = []
    if config.position != "rope":
        problems.append(f"position={config.position!r} (HF models use rope)")
    if config.norm != "rmsnorm" or config.norm_position != "pre" or not config.final_norm:
        problems.append("norm must be pre-RMSNorm with a final norm")
    if config.fusion != "residual" or config.embedding_scale:
        problems.append(f"fusion={config.fusion!r}/embedding_scale has no transformers equivalent")
    kinds = {config.layer_sparse(i) for i in range(config.num_hidden_layers)}
    dsa = kinds == {"dsa"}
    if kinds not in ({"dense"}, {"dsa"}):
        problems.append(f"attention pattern {sorted(kinds)} (transformers has all-dense or all-DSA layers)")
    if config.attention == "mla":
        kind = "deepseek_v3" if config.scoring_func == "sigmoid" or config.ffn != "moe" else "deepseek_v2"
        if dsa:
            kind = "deepseek_v32"
            if config.ffn != "moe" or config.topk_method != "noaux_tc":
                problems.append("deepseek_v32 needs MoE layers with noaux_tc routing")
        if kind != "deepseek_v3" and not config.rope_interleave:
            problems.append(f"{kind} always rotates interleaved pairs (half-split RoPE exports as deepseek_v3 only)")
        if kind == "deepseek_v3" and config.ffn == "moe" and config.topk_method != "noaux_tc":
            problems.append("sigmoid routing exports as deepseek_v3, which routes by noaux_tc")
        if config.ffn not in ("swiglu", "moe") or config.mlp_bias:
            problems.append(
                f"DeepSeek layers are SwiGLU without biases (got ffn={config.ffn!r}, mlp_bias={config.mlp_bias})"
            )
        if kind == "deepseek_v2" and (config.norm_topk_prob or config.topk_method == "noaux_tc"):
            problems.append("softmax routing with normalized top-k or noaux_tc has no deepseek_v2 form")
        if config.ffn == "moe" and config.scoring_func not in ("softmax", "sigmoid"):
            problems.append(f"scoring_func={config.scoring_func!r} (DeepSeek-V2/V3 route by softmax or sigmoid)")
        if config.swiglu_limit is not None or config.num_hash_layers:
            problems.append("swiglu_limit / hash routing are DeepSeek-V4's (attention='v4')")
    elif config.ffn == "swiglu" and not config.rope_interleave:
        kind = "llama"
    else:
        problems.append(
            f"attention={config.attention!r} with ffn={config.ffn!r} and "
            f"rope_interleave={config.rope_interleave} matches no transformers model "
            f"(llama needs swiglu + half-split RoPE; DeepSeek needs mla)"
        )
        kind = None
    if problems:
        raise NanoseekError("cannot save in HF format: " + "; ".join(problems))
    max_positions, scaling = rope_to_hf(config)
    out = dict(
        model_type=kind,
        architectures=[
            {
                "llama": "LlamaForCausalLM",
                "deepseek_v2": "DeepseekV2ForCausalLM",
                "deepseek_v3": "DeepseekV3ForCausalLM",
                "deepseek_v32": "DeepseekV32ForCausalLM",
            }[kind]
        ],
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=max_positions,
        rms_norm_eps=config.rms_norm_eps,
        initializer_range=config.initializer_range,
        tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=config.attention_bias,
        rope_theta=config.rope_theta,
        rope_scaling=scaling,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        hidden_act="silu",
        torch_dtype="float32",
        attention_dropout=config.attention_dropout,
    )
    if kind == "llama":
        out.update(num_key_value_heads=config.n_kv_heads, head_dim=config.attn_head_dim, mlp_bias=config.mlp_bias)
        return out
    out.update(
        num_key_value_heads=config.num_attention_heads,
        q_lora_rank=config.q_lora_rank,
        kv_lora_rank=config.kv_lora_rank,
        qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim,
        v_head_dim=config.v_head_dim,
        head_dim=config.qk_rope_head_dim,
        rope_interleave=config.rope_interleave,
        num_nextn_predict_layers=config.num_nextn_predict_layers,
    )
    if config.ffn == "moe":
        out.update(
            n_routed_experts=config.n_routed_experts,
            n_shared_experts=config.n_shared_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            moe_intermediate_size=config.moe_intermediate_size,
            first_k_dense_replace=config.first_k_dense_replace,
            moe_layer_freq=1,
            routed_scaling_factor=config.routed_scaling_factor,
            scoring_func=config.scoring_func,
            topk_method=config.topk_method,
            n_group=config.n_group,
            topk_group=config.topk_group,
            norm_topk_prob=config.norm_topk_prob,
        )
    else:  # a dense MLA model: every layer dense
        out.update(
            n_routed_experts=None,
            first_k_dense_replace=config.num_hidden_layers,
            moe_intermediate_size=config.intermediate_size,
            n_shared_experts=None,
            num_experts_per_tok=None,
        )
    if kind == "deepseek_v32":
        out.update(
            index_topk=config.index_topk,
            index_n_heads=config.index_n_heads,
            index_head_dim=config.index_head_dim,
            layer_types=["indexed_attention"] * config.num_hidden_layers,
        )
    return out
