"""DeepSeek-V4 (`deepseek_v4`): its config.json and its tensor names, both directions.

V4 folders carry the upstream (Hub) names, with or without transformers' `model.` prefix
(`embed`, `head`, `layers.i.attn.{wq_a,q_norm,wq_b,wkv,norm,wo_a,wo_b,attn_sink}`, `...attn.compressor.*`,
`...attn.indexer.{wq_b,weights_proj,compressor.*}`, `layers.i.ffn.experts.e.{w1,w2,w3}`, `hc_*`); they are
renamed to transformers' module names (V4_RENAMES, the same rules as transformers' conversion mapping)
and from there to nanoseek's (`model.hc_head` -> `stream_head`). Saving writes what transformers' own
`save_pretrained` writes for V4 (V4_SAVE_RENAMES). Stacking experts and fusing gate/up is shared with
the other families (`nanoseek.io.hf.state`).
"""

from __future__ import annotations

import re
from pathlib import Path

from nanoseek.config import ModelConfig, mscale
from nanoseek.errors import NanoseekError
from nanoseek.io.hf.config import SILU, first_id, refuse_fields, rope_from_hf

V4_LAYER_TYPES = {
    "sliding_attention": "sliding",
    "compressed_sparse_attention": "csa",
    "heavily_compressed_attention": "hca",
}
V4_COMPRESS_RATIOS = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
V4_RENAMES = [
    (r"\.attn\.", ".self_attn."),
    (r"\.ffn\.", ".mlp."),
    (r"\.indexer\.compressor\.", ".compressor.indexer."),
    (r"^embed\.weight", "embed_tokens.weight"),
    (r"^head\.weight", "lm_head.weight"),
    (r"^hc_head_(fn|base|scale)", r"hc_head.hc_\1"),
    (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_attn_(fn|base|scale)", r".attn_hc.\1"),
    (r"\.hc_ffn_(fn|base|scale)", r".ffn_hc.\1"),
    (r"\.attn_sink", ".sinks"),
    (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
    (r"\.indexer\.wq_b\.", ".compressor.indexer.q_b_proj."),
    (r"\.norm\.", ".kv_norm."),
    (r"\.ape$", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."),
    (r"\.self_attn\.wq_b\.", ".self_attn.q_b_proj."),
    (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."),
    (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."),
    (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
    (r"\.w1\.weight$", ".gate_proj.weight"),
    (r"\.w2\.weight$", ".down_proj.weight"),
    (r"\.w3\.weight$", ".up_proj.weight"),
]
V4_SAVE_RENAMES = [
    (r"^stream_head\.hc_(fn|base|scale)$", r"hc_head.hc_\1"),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.attn_hc\.(fn|base|scale)$", r".hc_attn_\1"),
    (r"\.ffn_hc\.(fn|base|scale)$", r".hc_ffn_\1"),
    (r"\.self_attn\.sinks$", ".self_attn.attn_sink"),
    (r"\.compressor\.indexer\.scorer\.weights_proj\.", ".indexer.weights_proj."),
    (r"\.compressor\.indexer\.q_b_proj\.", ".indexer.wq_b."),
    (r"\.compressor\.indexer\.", ".indexer.compressor."),
    (r"\.kv_norm\.", ".norm."),
    (r"\.position_bias$", ".ape"),
    (r"\.q_a_proj\.", ".wq_a."),
    (r"\.q_b_proj\.", ".wq_b."),
    (r"\.kv_proj\.", ".wkv."),
    (r"\.gate_proj\.", ".wgate."),
    (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."),
    (r"\.q_a_norm\.", ".q_norm."),
    (r"\.e_score_correction_bias$", ".bias"),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
]


V4_FIELD_RULES = [
    ("hidden_act", "silu", SILU, "the SwiGLU experts gate with SiLU"),
    ("scoring_func", "sqrtsoftplus", ("sqrtsoftplus", "sigmoid"), "V4 routers score by sqrt-softplus or sigmoid"),
    ("n_shared_experts", 1, (1,), "transformers' deepseek_v4 has one shared expert"),
    ("mlp_bias", False, (False,), "DeepSeek-V4 checkpoints have no MLP biases"),
    ("tie_word_embeddings", False, (False,), "deepseek_v4 has an untied head"),
]


def v4_config_from_hf(cfg: dict, source: Path) -> ModelConfig:
    """A ModelConfig from a deepseek_v4 config.json (current and legacy field forms)."""
    refuse_fields(cfg, source, V4_FIELD_RULES)
    n = cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim", 512)
    if cfg.get("partial_rotary_factor") is not None:  # transformers: it wins over the legacy qk_rope_head_dim
        rope = int(head_dim * cfg["partial_rotary_factor"])
    else:
        rope = cfg.get("qk_rope_head_dim") or int(head_dim * 0.125)
    types = cfg.get("layer_types")
    if types is None and cfg.get("compress_ratios") is not None:
        types = [V4_COMPRESS_RATIOS.get(r, f"compress_ratio={r}") for r in cfg["compress_ratios"]]
    if types is None:  # transformers' default: two HCA layers, then HCA / CSA alternating
        types = ["heavily_compressed_attention"] * min(n, 2) + [
            "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(max(n - 2, 0))
        ]
    if len(types) != n:
        raise NanoseekError(f"{source}: layer_types has {len(types)} entries for num_hidden_layers={n}")
    bad = [t for t in types if t not in V4_LAYER_TYPES]
    if bad:
        raise NanoseekError(f"{source}: layer_types entry {bad[0]!r}; valid: {', '.join(V4_LAYER_TYPES)}")
    rates = dict(cfg.get("compress_rates") or {})
    csa = cfg.get("compress_rate_csa") or rates.get("compressed_sparse_attention", 4)
    hca = cfg.get("compress_rate_hca") or rates.get("heavily_compressed_attention", 128)
    mlp_types = cfg.get("mlp_layer_types")
    if mlp_types is None:
        n_hash = cfg.get("num_hash_layers", 3)
    else:
        n_hash = next((i for i, t in enumerate(mlp_types) if t != "hash_moe"), len(mlp_types))
        if any(t != "moe" for t in mlp_types[n_hash:]):
            raise NanoseekError(f"{source}: mlp_layer_types={mlp_types} must be hash_moe layers followed by moe layers")
    params = cfg.get("rope_parameters") or {}
    main, compress = params.get("main"), params.get("compress")
    if isinstance(main, dict) and isinstance(compress, dict) and not cfg.get("rope_scaling"):  # rope_scaling wins
        if main.get("rope_type", main.get("type", "default")) != "default":
            raise NanoseekError(
                f"{source}: rope_parameters.main.rope_type={main.get('rope_type', main.get('type'))!r} is not "
                "supported (V4's sliding layers rotate with plain RoPE; scaling goes in rope_parameters.compress)"
            )
        theta, compress_theta = main.get("rope_theta", 10000.0), compress.get("rope_theta", 160000.0)
        scaling = {
            k: v for k, v in compress.items() if k not in ("rope_theta", "partial_rotary_factor", "attention_factor")
        }
        if compress.get("rope_type") == "yarn":  # transformers scales cos/sin unless attention_factor says 1
            factor = compress.get("attention_factor") or mscale(float(compress.get("factor", 1.0)))
            if abs(factor - 1.0) > 1e-6:
                raise NanoseekError(
                    f"{source}: rope_parameters.compress.attention_factor={factor:.4g}; nanoseek's "
                    f"V4 layers rotate with unscaled cos/sin (DeepSeek-V4 uses 1.0)"
                )
    else:
        theta, scaling = rope_from_hf(cfg, source, whole_heads=False)
        compress_theta = cfg.get("compress_rope_theta", 160000.0)
    if scaling and scaling.get("rope_type", "default") == "default":
        scaling = None
    return ModelConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_hidden_layers=n,
        num_attention_heads=cfg["num_attention_heads"],
        head_dim=head_dim,
        qk_rope_head_dim=rope,
        intermediate_size=cfg.get("moe_intermediate_size", 2048),
        max_position_embeddings=cfg.get("max_position_embeddings", 1048576),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        initializer_range=cfg.get("initializer_range", 0.02),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        rope_theta=float(theta),
        rope_scaling=scaling,
        compress_rope_theta=float(compress_theta),
        rope_interleave=True,
        bos_token_id=first_id(cfg.get("bos_token_id")),
        eos_token_id=first_id(cfg.get("eos_token_id")),
        pad_token_id=first_id(cfg.get("pad_token_id")),
        position="rope",
        norm="rmsnorm",
        norm_position="pre",
        attention="v4",
        q_lora_rank=cfg.get("q_lora_rank", 1024),
        o_groups=cfg.get("o_groups", 8),
        o_lora_rank=cfg.get("o_lora_rank", 1024),
        sliding_window=cfg.get("sliding_window", 128),
        sparse_layers=[V4_LAYER_TYPES[t] for t in types[:n]],
        compress_rate_csa=csa,
        compress_rate_hca=hca,
        index_topk=cfg.get("index_topk", 512),
        index_n_heads=cfg.get("index_n_heads", 64),
        index_head_dim=cfg.get("index_head_dim", 128),
        ffn="moe",
        n_routed_experts=cfg.get("n_routed_experts", 256),
        n_shared_experts=cfg.get("n_shared_experts", 1),
        num_experts_per_tok=cfg.get("num_experts_per_tok", 6),
        moe_intermediate_size=cfg.get("moe_intermediate_size", 2048),
        first_k_dense_replace=0,
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.5)),
        scoring_func=cfg.get("scoring_func", "sqrtsoftplus"),
        topk_method="noaux_tc",
        norm_topk_prob=True,
        num_hash_layers=n_hash,
        swiglu_limit=float(cfg.get("swiglu_limit", 10.0)),
        fusion="mhc",
        hc_mult=cfg.get("hc_mult", 4),
        hc_sinkhorn_iters=cfg.get("hc_sinkhorn_iters", 20),
        hc_eps=float(cfg.get("hc_eps", 1e-6)),
        num_nextn_predict_layers=0,
        attention_dropout=cfg.get("attention_dropout", 0.0),
    )


def v4_config_to_hf(config: ModelConfig) -> dict:
    """config.json for transformers' DeepseekV4ForCausalLM; refuses what it cannot express."""
    problems = []
    kinds = [config.layer_sparse(i) for i in range(config.num_hidden_layers)]
    if "dense" in kinds:
        problems.append("a 'dense' V4 layer (transformers' V4 layers are sliding, csa or hca)")
    if config.fusion != "mhc" or config.ffn != "moe" or config.first_k_dense_replace:
        problems.append("deepseek_v4 needs fusion='mhc' and every layer MoE (first_k_dense_replace=0)")
    if (
        config.scoring_func not in ("sqrtsoftplus", "sigmoid")
        or config.topk_method != "noaux_tc"
        or not config.norm_topk_prob
        or config.n_group != 1
    ):
        problems.append(
            "deepseek_v4 routing is sqrtsoftplus or sigmoid scores, noaux_tc top-k, normalized "
            "(norm_topk_prob=true), no groups (n_group=1)"
        )
    if config.swiglu_limit is None:
        problems.append("deepseek_v4 always clamps its SwiGLU: set swiglu_limit")
    if config.num_nextn_predict_layers:
        problems.append("transformers' deepseek_v4 drops MTP modules: export with drop_mtp (convert --drop-mtp)")
    if (
        config.tie_word_embeddings
        or config.norm != "rmsnorm"
        or config.norm_position != "pre"
        or config.embedding_scale
    ):
        problems.append("deepseek_v4 has an untied head and pre-RMSNorm blocks")
    if problems:
        raise NanoseekError("cannot save in HF format: " + "; ".join(problems))
    names = {v: k for k, v in V4_LAYER_TYPES.items()}
    partial = config.qk_rope_head_dim / config.attn_head_dim
    compress = {"rope_type": "default", "rope_theta": config.compress_rope_theta, "partial_rotary_factor": partial}
    if config.rope_scaling:
        compress = {
            **config.rope_scaling,
            **compress,
            "rope_type": config.rope_scaling.get("rope_type", "yarn"),
            "attention_factor": 1.0,
        }
    n_hash = min(config.num_hash_layers, config.num_hidden_layers)
    return dict(
        model_type="deepseek_v4",
        architectures=["DeepseekV4ForCausalLM"],
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=1,
        head_dim=config.attn_head_dim,
        partial_rotary_factor=partial,
        q_lora_rank=config.q_lora_rank,
        o_groups=config.o_groups,
        o_lora_rank=config.o_lora_rank,
        sliding_window=config.sliding_window,
        layer_types=[names[k] for k in kinds],
        compress_rates={
            "compressed_sparse_attention": config.compress_rate_csa,
            "heavily_compressed_attention": config.compress_rate_hca,
        },
        rope_theta=config.rope_theta,
        compress_rope_theta=config.compress_rope_theta,
        rope_parameters={
            "main": {"rope_type": "default", "rope_theta": config.rope_theta, "partial_rotary_factor": partial},
            "compress": compress,
        },
        index_topk=config.index_topk,
        index_n_heads=config.index_n_heads,
        index_head_dim=config.index_head_dim,
        n_routed_experts=config.n_routed_experts,
        n_shared_experts=config.n_shared_experts,
        num_experts_per_tok=config.num_experts_per_tok,
        moe_intermediate_size=config.moe_intermediate_size,
        mlp_layer_types=["hash_moe"] * n_hash + ["moe"] * (config.num_hidden_layers - n_hash),
        scoring_func=config.scoring_func,
        routed_scaling_factor=config.routed_scaling_factor,
        norm_topk_prob=True,
        swiglu_limit=config.swiglu_limit,
        hc_mult=config.hc_mult,
        hc_sinkhorn_iters=config.hc_sinkhorn_iters,
        hc_eps=config.hc_eps,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        initializer_range=config.initializer_range,
        tie_word_embeddings=False,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        num_nextn_predict_layers=0,
        hidden_act="silu",
        attention_dropout=config.attention_dropout,
    )


def v4_key_to_hf_module(key: str) -> str:
    """An on-disk V4 key (upstream names, with or without `model.`) -> transformers' module name."""
    key = key[len("model.") :] if key.startswith("model.") else key
    for pattern, replacement in V4_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def v4_key_to_nanoseek(key: str) -> str | None:
    if key.startswith(("mtp.", "model.mtp.")):
        return None  # transformers ignores V4's MTP weights too
    key = v4_key_to_hf_module(key)
    if key.startswith("hc_head."):
        return "stream_head." + key[len("hc_head.") :]
    return key if key.startswith(("layers.", "embed_tokens.", "lm_head.", "norm.")) else None


def v4_key_to_hf(name: str) -> str:
    """A nanoseek V4 name -> the key transformers' save_pretrained writes."""
    if name == "lm_head.weight":
        return "head.weight"
    name = re.sub(
        r"\.(experts\.\d+|shared_experts)\.(gate_proj|up_proj|down_proj)\.",
        lambda m: f".{m.group(1)}.{ {'gate_proj': 'w1', 'down_proj': 'w2', 'up_proj': 'w3'}[m.group(2)] }.",
        name,
    )
    for pattern, replacement in V4_SAVE_RENAMES:
        name = re.sub(pattern, replacement, name)
    return "model." + name
