"""Hugging Face checkpoint interop: load and save `deepseek_v2`, `deepseek_v3`, `deepseek_v32`,
`deepseek_v4` and `llama` folders.

A folder holds config.json, model.safetensors (or shards with model.safetensors.index.json),
tokenizer.json and tokenizer_config.json. Loading maps the config to a `ModelConfig` and every key
to nanoseek's module tree, one tensor at a time from memory-mapped safetensors into a model built
on the meta device, so a checkpoint is never held twice in memory:

    model.embed_tokens.weight                      -> embed_tokens.weight
    model.layers.i.{input_layernorm,post_attention_layernorm,self_attn.*}  -> layers.i.(same)
    model.layers.i.self_attn.{q,k,v}_proj (llama) -> layers.i.self_attn.qkv_proj   (concatenated rows)
    model.layers.i.mlp.{gate,up}_proj              -> layers.i.mlp.gate_up_proj      (gate rows first)
    model.layers.i.mlp.experts.e.{gate,up,down}_proj (per expert on disk)
                                                   -> layers.i.mlp.experts.{gate_up_proj [E,2I,D], down_proj [E,D,I]}
    model.layers.(L+k).{enorm,hnorm,eh_proj,shared_head.norm, block keys}  -> mtp.k.*  (MTP after the last layer)
    model.norm.weight, lm_head.weight              -> norm.weight, lm_head.weight

DeepSeek-V4 folders carry the upstream (Hub) names, with or without transformers' `model.` prefix
(`embed`, `head`, `layers.i.attn.{wq_a,q_norm,wq_b,wkv,norm,wo_a,wo_b,attn_sink}`, `...attn.compressor.*`,
`...attn.indexer.{wq_b,weights_proj,compressor.*}`, `layers.i.ffn.experts.e.{w1,w2,w3}`, `hc_*`); they are
renamed to transformers' module names (V4_RENAMES, the same rules as transformers' conversion mapping)
and from there to nanoseek's (`model.hc_head` -> `stream_head`, experts stacked, shared gate/up fused).
Saving writes what transformers' own `save_pretrained` writes for V4.

FP8 block-quantized weights (`weight_scale_inv`, 128x128 blocks) are dequantized on load.
Saving writes the same layout back (experts unpacked per expert), a config.json that transformers'
`AutoModelForCausalLM` reads, and the tokenizer files. What transformers cannot express is refused.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from nanoseek.config import ModelConfig, mscale
from nanoseek.errors import NanoseekError
from nanoseek.io.checkpoint import load_state_into, read_json
from nanoseek.io.safetensors import SafetensorsFile
from nanoseek.model import Transformer

SUPPORTED = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4", "llama")
V4_LAYER_TYPES = {"sliding_attention": "sliding", "compressed_sparse_attention": "csa",
                  "heavily_compressed_attention": "hca"}
V4_COMPRESS_RATIOS = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
# upstream / on-disk name -> transformers module name, applied in order (transformers' conversion rules)
V4_RENAMES = [
    (r"\.attn\.", ".self_attn."), (r"\.ffn\.", ".mlp."), (r"\.indexer\.compressor\.", ".compressor.indexer."),
    (r"^embed\.weight", "embed_tokens.weight"), (r"^head\.weight", "lm_head.weight"),
    (r"^hc_head_(fn|base|scale)", r"hc_head.hc_\1"), (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."), (r"\.hc_attn_(fn|base|scale)", r".attn_hc.\1"),
    (r"\.hc_ffn_(fn|base|scale)", r".ffn_hc.\1"), (r"\.attn_sink", ".sinks"),
    (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
    (r"\.indexer\.wq_b\.", ".compressor.indexer.q_b_proj."), (r"\.norm\.", ".kv_norm."), (r"\.ape$", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."), (r"\.self_attn\.wq_b\.", ".self_attn.q_b_proj."), (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."), (r"\.wo_a\.", ".o_a_proj."), (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."), (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
    (r"\.w1\.weight$", ".gate_proj.weight"), (r"\.w2\.weight$", ".down_proj.weight"), (r"\.w3\.weight$", ".up_proj.weight"),
]
# nanoseek name -> the names transformers' save_pretrained writes for V4 (then prefixed with `model.`)
V4_SAVE_RENAMES = [
    (r"^stream_head\.hc_(fn|base|scale)$", r"hc_head.hc_\1"), (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."), (r"\.attn_hc\.(fn|base|scale)$", r".hc_attn_\1"),
    (r"\.ffn_hc\.(fn|base|scale)$", r".hc_ffn_\1"), (r"\.self_attn\.sinks$", ".self_attn.attn_sink"),
    (r"\.compressor\.indexer\.scorer\.weights_proj\.", ".indexer.weights_proj."),
    (r"\.compressor\.indexer\.q_b_proj\.", ".indexer.wq_b."), (r"\.compressor\.indexer\.", ".indexer.compressor."),
    (r"\.kv_norm\.", ".norm."), (r"\.position_bias$", ".ape"), (r"\.q_a_proj\.", ".wq_a."), (r"\.q_b_proj\.", ".wq_b."),
    (r"\.kv_proj\.", ".wkv."), (r"\.gate_proj\.", ".wgate."), (r"\.o_a_proj\.", ".wo_a."), (r"\.o_b_proj\.", ".wo_b."),
    (r"\.q_a_norm\.", ".q_norm."), (r"\.e_score_correction_bias$", ".bias"),
    (r"\.self_attn\.", ".attn."), (r"\.mlp\.", ".ffn."),
]
FP8_BLOCK = 128


# ------------------------------------------------------------------------------------ config


def _rope_scaling(cfg: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from `rope_scaling` (legacy) or `rope_parameters` (transformers 5)."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or None
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    if scaling is None and params.get("rope_type", "default") not in ("default", None):
        scaling = params
    if scaling:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        if scaling.get("rope_type") == "default":
            scaling = None
    return theta, scaling


def config_from_hf(cfg: dict, source: Path) -> ModelConfig:
    kind = cfg.get("model_type")
    if kind not in SUPPORTED:
        raise NanoseekError(f"{source}: unknown model_type={kind!r}; supported: {', '.join(SUPPORTED)}")
    if cfg.get("auto_map"):
        print(f"note: {source} names custom code (auto_map); nanoseek never executes it")
    if kind == "deepseek_v4":
        return v4_config_from_hf(cfg, source)
    theta, scaling = _rope_scaling(cfg)
    common = dict(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"], intermediate_size=cfg["intermediate_size"],
        max_position_embeddings=cfg.get("max_position_embeddings", 2048), rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        initializer_range=cfg.get("initializer_range", 0.02), tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        attention_bias=cfg.get("attention_bias", False), rope_theta=theta, rope_scaling=scaling,
        bos_token_id=_first_id(cfg.get("bos_token_id")), eos_token_id=_first_id(cfg.get("eos_token_id")),
        pad_token_id=_first_id(cfg.get("pad_token_id")), position="rope", norm="rmsnorm", norm_position="pre",
    )
    if kind == "llama":
        kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        return ModelConfig(**common, attention="gqa", num_key_value_heads=kv, head_dim=cfg.get("head_dim"),
                           ffn="swiglu", mlp_bias=cfg.get("mlp_bias", False), rope_interleave=False)
    v2 = kind == "deepseek_v2"
    moe = bool(cfg.get("n_routed_experts"))
    if kind == "deepseek_v32":
        cfg = {**cfg, "first_k_dense_replace": _dense_prefix(cfg, source)}
    deepseek = dict(
        attention="mla", q_lora_rank=cfg.get("q_lora_rank"), kv_lora_rank=cfg["kv_lora_rank"],
        qk_nope_head_dim=cfg["qk_nope_head_dim"], qk_rope_head_dim=cfg["qk_rope_head_dim"],
        v_head_dim=cfg["v_head_dim"], rope_interleave=True, ffn="moe" if moe else "swiglu",
        num_nextn_predict_layers=cfg.get("num_nextn_predict_layers", 0) or 0,
    )
    if moe:
        method = cfg.get("topk_method") or ("greedy" if v2 else "noaux_tc")
        deepseek.update(
            n_routed_experts=cfg["n_routed_experts"], n_shared_experts=cfg.get("n_shared_experts") or 0,
            num_experts_per_tok=cfg["num_experts_per_tok"], moe_intermediate_size=cfg["moe_intermediate_size"],
            first_k_dense_replace=cfg.get("first_k_dense_replace", 0),
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
            scoring_func=cfg.get("scoring_func") or ("softmax" if v2 else "sigmoid"), topk_method=method,
            n_group=cfg.get("n_group") or 1, topk_group=cfg.get("topk_group") or 1,
            # HF DeepSeek-V2 never normalizes the top-k weights, whatever norm_topk_prob says
            norm_topk_prob=False if v2 else bool(cfg.get("norm_topk_prob", True)),
            aux_loss_alpha=float(cfg.get("aux_loss_alpha", 0.0) or 0.0) if not v2 else 0.0,
        )
    if kind == "deepseek_v32":
        deepseek.update(sparse="dsa", index_topk=cfg.get("index_topk", 2048),
                        index_n_heads=cfg.get("index_n_heads", 64), index_head_dim=cfg.get("index_head_dim", 128))
    return ModelConfig(**common, **deepseek)


def v4_config_from_hf(cfg: dict, source: Path) -> ModelConfig:
    """A ModelConfig from a deepseek_v4 config.json (current and legacy field forms)."""
    n = cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim", 512)
    rope = cfg.get("qk_rope_head_dim") or int(head_dim * (cfg.get("partial_rotary_factor") or 0.125))
    types = cfg.get("layer_types")
    if types is None and cfg.get("compress_ratios") is not None:
        types = [V4_COMPRESS_RATIOS.get(r, f"compress_ratio={r}") for r in cfg["compress_ratios"]]
    if types is None:  # transformers' default: two HCA layers, then HCA / CSA alternating
        types = ["heavily_compressed_attention"] * min(n, 2) + [
            "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(max(n - 2, 0))]
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
    if isinstance(main, dict) and isinstance(compress, dict):
        theta, compress_theta = main.get("rope_theta", 10000.0), compress.get("rope_theta", 160000.0)
        scaling = {k: v for k, v in compress.items() if k not in ("rope_theta", "partial_rotary_factor", "attention_factor")}
        if compress.get("rope_type") == "yarn":  # transformers scales cos/sin unless attention_factor says 1
            factor = compress.get("attention_factor") or mscale(float(compress.get("factor", 1.0)))
            if abs(factor - 1.0) > 1e-6:
                raise NanoseekError(f"{source}: rope_parameters.compress.attention_factor={factor:.4g}; nanoseek's "
                                    f"V4 layers rotate with unscaled cos/sin (DeepSeek-V4 uses 1.0)")
    else:
        theta, scaling = _rope_scaling(cfg)
        compress_theta = cfg.get("compress_rope_theta", 160000.0)
    if scaling and scaling.get("rope_type", "default") == "default":
        scaling = None
    return ModelConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_hidden_layers=n,
        num_attention_heads=cfg["num_attention_heads"], head_dim=head_dim, qk_rope_head_dim=rope,
        intermediate_size=cfg.get("moe_intermediate_size", 2048), max_position_embeddings=cfg.get("max_position_embeddings", 1048576),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), initializer_range=cfg.get("initializer_range", 0.02),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False), rope_theta=float(theta),
        rope_scaling=scaling, compress_rope_theta=float(compress_theta), rope_interleave=True,
        bos_token_id=_first_id(cfg.get("bos_token_id")), eos_token_id=_first_id(cfg.get("eos_token_id")),
        pad_token_id=_first_id(cfg.get("pad_token_id")), position="rope", norm="rmsnorm", norm_position="pre",
        attention="v4", q_lora_rank=cfg.get("q_lora_rank", 1024), o_groups=cfg.get("o_groups", 8),
        o_lora_rank=cfg.get("o_lora_rank", 1024), sliding_window=cfg.get("sliding_window", 128),
        sparse_layers=[V4_LAYER_TYPES[t] for t in types[:n]], compress_rate_csa=csa, compress_rate_hca=hca,
        index_topk=cfg.get("index_topk", 512), index_n_heads=cfg.get("index_n_heads", 64),
        index_head_dim=cfg.get("index_head_dim", 128), ffn="moe", n_routed_experts=cfg.get("n_routed_experts", 256),
        n_shared_experts=cfg.get("n_shared_experts", 1), num_experts_per_tok=cfg.get("num_experts_per_tok", 6),
        moe_intermediate_size=cfg.get("moe_intermediate_size", 2048), first_k_dense_replace=0,
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.5)),
        scoring_func=cfg.get("scoring_func", "sqrtsoftplus"), topk_method="noaux_tc", norm_topk_prob=True,
        num_hash_layers=n_hash, swiglu_limit=float(cfg.get("swiglu_limit", 10.0)), fusion="mhc",
        hc_mult=cfg.get("hc_mult", 4), hc_sinkhorn_iters=cfg.get("hc_sinkhorn_iters", 20),
        hc_eps=float(cfg.get("hc_eps", 1e-6)), num_nextn_predict_layers=0,
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
    if (config.scoring_func not in ("sqrtsoftplus", "sigmoid") or config.topk_method != "noaux_tc"
            or not config.norm_topk_prob or config.n_group != 1):
        problems.append("deepseek_v4 routing is sqrtsoftplus or sigmoid scores, noaux_tc top-k, normalized "
                        "(norm_topk_prob=true), no groups (n_group=1)")
    if config.swiglu_limit is None:
        problems.append("deepseek_v4 always clamps its SwiGLU: set swiglu_limit")
    if config.num_nextn_predict_layers:
        problems.append("transformers' deepseek_v4 drops MTP modules: set num_nextn_predict_layers=0 to export")
    if config.tie_word_embeddings or config.norm != "rmsnorm" or config.norm_position != "pre" or config.embedding_scale:
        problems.append("deepseek_v4 has an untied head and pre-RMSNorm blocks")
    if problems:
        raise NanoseekError("cannot save in HF format: " + "; ".join(problems))
    names = {v: k for k, v in V4_LAYER_TYPES.items()}
    partial = config.qk_rope_head_dim / config.attn_head_dim
    compress = {"rope_type": "default", "rope_theta": config.compress_rope_theta, "partial_rotary_factor": partial}
    if config.rope_scaling:
        compress = {**config.rope_scaling, **compress, "rope_type": config.rope_scaling.get("rope_type", "yarn"),
                    "attention_factor": 1.0}
    n_hash = min(config.num_hash_layers, config.num_hidden_layers)
    return dict(
        model_type="deepseek_v4", architectures=["DeepseekV4ForCausalLM"], vocab_size=config.vocab_size,
        hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=1, head_dim=config.attn_head_dim,
        partial_rotary_factor=partial, q_lora_rank=config.q_lora_rank, o_groups=config.o_groups,
        o_lora_rank=config.o_lora_rank, sliding_window=config.sliding_window,
        layer_types=[names[k] for k in kinds],
        compress_rates={"compressed_sparse_attention": config.compress_rate_csa,
                        "heavily_compressed_attention": config.compress_rate_hca},
        rope_theta=config.rope_theta, compress_rope_theta=config.compress_rope_theta,
        rope_parameters={"main": {"rope_type": "default", "rope_theta": config.rope_theta,
                                  "partial_rotary_factor": partial}, "compress": compress},
        index_topk=config.index_topk, index_n_heads=config.index_n_heads, index_head_dim=config.index_head_dim,
        n_routed_experts=config.n_routed_experts, n_shared_experts=config.n_shared_experts,
        num_experts_per_tok=config.num_experts_per_tok, moe_intermediate_size=config.moe_intermediate_size,
        mlp_layer_types=["hash_moe"] * n_hash + ["moe"] * (config.num_hidden_layers - n_hash),
        scoring_func=config.scoring_func, routed_scaling_factor=config.routed_scaling_factor, norm_topk_prob=True,
        swiglu_limit=config.swiglu_limit, hc_mult=config.hc_mult, hc_sinkhorn_iters=config.hc_sinkhorn_iters,
        hc_eps=config.hc_eps, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, initializer_range=config.initializer_range, tie_word_embeddings=False,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        num_nextn_predict_layers=0, hidden_act="silu", attention_dropout=config.attention_dropout,
    )


def v4_key_to_hf_module(key: str) -> str:
    """An on-disk V4 key (upstream names, with or without `model.`) -> transformers' module name."""
    key = key[len("model."):] if key.startswith("model.") else key
    for pattern, replacement in V4_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def v4_key_to_nanoseek(key: str) -> str | None:
    if key.startswith(("mtp.", "model.mtp.")):
        return None  # transformers ignores V4's MTP weights too
    key = v4_key_to_hf_module(key)
    if key.startswith("hc_head."):
        return "stream_head." + key[len("hc_head."):]
    return key if key.startswith(("layers.", "embed_tokens.", "lm_head.", "norm.")) else None


def v4_key_to_hf(name: str) -> str:
    """A nanoseek V4 name -> the key transformers' save_pretrained writes."""
    if name == "lm_head.weight":
        return "head.weight"
    name = re.sub(r"\.(experts\.\d+|shared_experts)\.(gate_proj|up_proj|down_proj)\.",
                  lambda m: f".{m.group(1)}.{ {'gate_proj': 'w1', 'down_proj': 'w2', 'up_proj': 'w3'}[m.group(2)]}.", name)
    for pattern, replacement in V4_SAVE_RENAMES:
        name = re.sub(pattern, replacement, name)
    return "model." + name


def _dense_prefix(cfg: dict, source: Path) -> int:
    """first_k_dense_replace from V3.2's `mlp_layer_types` (dense layers first, then MoE)."""
    types = cfg.get("mlp_layer_types")
    if types is None:
        return cfg.get("first_k_dense_replace", 3)
    n_dense = next((i for i, t in enumerate(types) if t != "dense"), len(types))
    if any(t != "sparse" for t in types[n_dense:]):
        raise NanoseekError(f"{source}: mlp_layer_types={types} must be dense layers followed by MoE "
                            f"('sparse') layers")
    layer_types = set(cfg.get("layer_types") or ["indexed_attention"])
    if layer_types != {"indexed_attention"}:
        raise NanoseekError(f"{source}: layer_types={sorted(layer_types)}: nanoseek reads V3.2 checkpoints "
                            f"whose layers are all 'indexed_attention'")
    return n_dense


def _first_id(value):
    return value[0] if isinstance(value, list) and value else value


def config_to_hf(config: ModelConfig) -> dict:
    """A config.json for transformers; refuses what it cannot express."""
    if config.attention == "v4":
        return v4_config_to_hf(config)
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
        if config.tie_word_embeddings or not config.rope_interleave:
            problems.append("DeepSeek checkpoints need an untied head and interleaved RoPE")
        if config.ffn not in ("swiglu", "moe") or config.mlp_bias:
            problems.append(f"DeepSeek layers are SwiGLU without biases (got ffn={config.ffn!r}, mlp_bias={config.mlp_bias})")
        if kind == "deepseek_v2" and (config.norm_topk_prob or config.topk_method == "noaux_tc"):
            problems.append("softmax routing with normalized top-k or noaux_tc has no deepseek_v2 form")
    elif config.ffn == "swiglu" and not config.rope_interleave:
        kind = "llama"
    else:
        problems.append(f"attention={config.attention!r} with ffn={config.ffn!r} and "
                        f"rope_interleave={config.rope_interleave} matches no transformers model "
                        f"(llama needs swiglu + half-split RoPE; DeepSeek needs mla)")
        kind = None
    if problems:
        raise NanoseekError("cannot save in HF format: " + "; ".join(problems))
    out = dict(
        model_type=kind, architectures=[{"llama": "LlamaForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
                                         "deepseek_v3": "DeepseekV3ForCausalLM",
                                         "deepseek_v32": "DeepseekV32ForCausalLM"}[kind]],
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        initializer_range=config.initializer_range, tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=config.attention_bias, rope_theta=config.rope_theta, rope_scaling=config.rope_scaling,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        hidden_act="silu", torch_dtype="float32", attention_dropout=config.attention_dropout,
    )
    if kind == "llama":
        out.update(num_key_value_heads=config.n_kv_heads, head_dim=config.attn_head_dim, mlp_bias=config.mlp_bias)
        return out
    out.update(num_key_value_heads=config.num_attention_heads, q_lora_rank=config.q_lora_rank,
               kv_lora_rank=config.kv_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
               qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim,
               head_dim=config.qk_rope_head_dim, rope_interleave=True,
               num_nextn_predict_layers=config.num_nextn_predict_layers)
    if config.ffn == "moe":
        out.update(n_routed_experts=config.n_routed_experts, n_shared_experts=config.n_shared_experts,
                   num_experts_per_tok=config.num_experts_per_tok,
                   moe_intermediate_size=config.moe_intermediate_size,
                   first_k_dense_replace=config.first_k_dense_replace, moe_layer_freq=1,
                   routed_scaling_factor=config.routed_scaling_factor, scoring_func=config.scoring_func,
                   topk_method=config.topk_method, n_group=config.n_group, topk_group=config.topk_group,
                   norm_topk_prob=config.norm_topk_prob)
    else:  # a dense MLA model: every layer dense
        out.update(n_routed_experts=None, first_k_dense_replace=config.num_hidden_layers,
                   moe_intermediate_size=config.intermediate_size, n_shared_experts=None, num_experts_per_tok=None)
    if kind == "deepseek_v32":
        out.update(index_topk=config.index_topk, index_n_heads=config.index_n_heads,
                   index_head_dim=config.index_head_dim, layer_types=["indexed_attention"] * config.num_hidden_layers)
    return out


# ------------------------------------------------------------------------------------ reading files


class TensorSource:
    """Lazy access to every tensor of a folder (single file or sharded)."""

    def __init__(self, folder: Path, trust_pickle: bool = False):
        self.folder = folder
        self.files: dict[str, Path] = {}
        self._handles: dict[Path, SafetensorsFile] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise NanoseekError(f"{index} is not a valid safetensors index ({e})") from None
            self.files = {k: folder / v for k, v in weight_map.items()}
            missing = {str(p) for p in self.files.values() if not p.is_file()}
            if missing:
                raise NanoseekError(f"{index} names a missing shard: {sorted(missing)[0]}")
        else:
            shards = sorted(folder.glob("*.safetensors"))
            if shards:
                for shard in shards:
                    for key in self._open(shard).keys():
                        self.files[key] = shard
            elif (folder / "pytorch_model.bin").is_file():
                if not trust_pickle:
                    raise NanoseekError(f"{folder / 'pytorch_model.bin'} is a pickle file; refusing to load it "
                                        f"(pass --trust-pickle to load it with torch.load(weights_only=True))")
                self._pickled = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
                self.files = {k: folder / "pytorch_model.bin" for k in self._pickled}
            else:
                raise NanoseekError(f"{folder} holds no *.safetensors weights")

    def _open(self, path: Path) -> SafetensorsFile:
        if path not in self._handles:
            self._handles[path] = SafetensorsFile(path)
        return self._handles[path]

    def keys(self):
        return self.files.keys()

    def get(self, key: str) -> torch.Tensor:
        if self._pickled is not None:
            return self._pickled[key]
        handle = self._open(self.files[key])
        if key not in handle.entries:
            raise NanoseekError(f"{handle.path} does not hold {key!r} (named by the index)")
        return handle.get(key)


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """w = w_fp8 * s per 128x128 block (DeepSeek-V3's block-wise FP8)."""
    out, inp = weight.shape
    scale = scale_inv.float().repeat_interleave(FP8_BLOCK, 0)[:out].repeat_interleave(FP8_BLOCK, 1)[:, :inp]
    return weight.float() * scale


# ------------------------------------------------------------------------------------ key mapping


def hf_key_to_nanoseek(key: str, n_layers: int) -> str | None:
    """Map one HF key to its nanoseek name (None = a key nanoseek does not store)."""
    if key in ("lm_head.weight",):
        return key
    if key.startswith("model.") and not key.startswith("model.layers."):
        return key[len("model."):]
    m = re.match(r"model\.layers\.(\d+)\.(.*)", key)
    if not m:
        return None
    i, rest = int(m.group(1)), m.group(2)
    if i < n_layers:
        return f"layers.{i}.{rest}"
    k = i - n_layers  # MTP modules stored after the last decoder layer
    if rest in ("embed_tokens.weight", "shared_head.head.weight"):
        return None  # shared with the main model
    if rest.split(".")[0] in ("enorm", "hnorm", "eh_proj", "shared_head"):
        return f"mtp.{k}.{rest}"
    return f"mtp.{k}.block.{rest}"


def read_state(source: TensorSource, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Every nanoseek tensor, built from the HF keys (fused / stacked where nanoseek fuses)."""
    n = config.num_hidden_layers
    raw_keys = [k for k in source.keys() if not k.endswith("weight_scale_inv")]
    grouped: dict[str, dict[str, str]] = {}  # nanoseek target -> {part: hf key}
    state: dict[str, torch.Tensor] = {}
    v4 = config.attention == "v4"
    for key in raw_keys:
        name = v4_key_to_nanoseek(key) if v4 else hf_key_to_nanoseek(key, n)
        if name is None:
            continue
        if name.startswith("mtp.") and int(name.split(".")[1]) >= config.num_nextn_predict_layers:
            continue  # more MTP layers on disk than the config asks for
        target, part = fused_target(name, config)
        if target is None:
            state[name] = _load(source, key)
        else:
            grouped.setdefault(target, {})[part] = key
    for target, parts in grouped.items():
        state[target] = assemble(source, target, parts, config)
    return state


def fused_target(name: str, config: ModelConfig) -> tuple[str | None, str | None]:
    """(fused nanoseek key, part) for keys nanoseek stores fused or stacked."""
    m = re.match(r"(.*)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", name)
    if m:
        which = "down_proj" if m.group(3) == "down_proj" else "gate_up_proj"
        return f"{m.group(1)}.experts.{which}", f"{m.group(2)}.{m.group(3)}"
    m = re.match(r"(.*\.mlp(?:\.shared_experts)?)\.(gate_proj|up_proj)\.weight$", name)
    if m:
        return f"{m.group(1)}.gate_up_proj.weight", m.group(2)
    m = re.match(r"(.*self_attn)\.(q_proj|k_proj|v_proj)\.(weight|bias)$", name)
    if m and config.attention != "mla":
        return f"{m.group(1)}.qkv_proj.{m.group(3)}", m.group(2)
    return None, None


def _load(source: TensorSource, key: str) -> torch.Tensor:
    tensor = source.get(key)
    scale_key = key.replace(".weight", ".weight_scale_inv")
    if tensor.dtype in (getattr(torch, "float8_e4m3fn", None),) and scale_key in source.files:
        tensor = dequantize_fp8(tensor, source.get(scale_key))
    return tensor


def assemble(source: TensorSource, target: str, parts: dict[str, str], config: ModelConfig) -> torch.Tensor:
    if target.endswith("qkv_proj.weight") or target.endswith("qkv_proj.bias"):
        _require(parts, ("q_proj", "k_proj", "v_proj"), target)
        return torch.cat([_load(source, parts[p]) for p in ("q_proj", "k_proj", "v_proj")])
    if target.endswith("gate_up_proj.weight"):
        _require(parts, ("gate_proj", "up_proj"), target)
        return torch.cat([_load(source, parts["gate_proj"]), _load(source, parts["up_proj"])])
    n_experts = config.n_routed_experts
    if target.endswith("experts.gate_up_proj"):
        rows = []
        for e in range(n_experts):
            _require(parts, (f"{e}.gate_proj", f"{e}.up_proj"), target)
            rows.append(torch.cat([_load(source, parts[f"{e}.gate_proj"]), _load(source, parts[f"{e}.up_proj"])]))
        return torch.stack(rows)
    _require(parts, tuple(f"{e}.down_proj" for e in range(n_experts)), target)
    return torch.stack([_load(source, parts[f"{e}.down_proj"]) for e in range(n_experts)])


def _require(parts: dict, names: tuple, target: str):
    for name in names:
        if name not in parts:
            raise NanoseekError(f"checkpoint is missing {name!r} needed for {target}")


def nanoseek_to_hf_state(model) -> dict[str, torch.Tensor]:
    """The HF on-disk layout of a nanoseek model's weights (experts unpacked, fusions split)."""
    config = model.config
    n = config.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("scalar_mix."):  # nanoseek's embedding mix has no place in transformers
            continue
        tensor = tensor.detach().contiguous()
        if config.attention == "v4":
            for key, value in split_fused(name, tensor, config).items():
                out[v4_key_to_hf(key)] = value.contiguous()
            continue
        if name == "lm_head.weight":
            if not config.tie_word_embeddings:  # a tied head is the embedding (HF re-ties on load)
                out[name] = tensor
            continue
        m = re.match(r"mtp\.(\d+)\.(block\.)?(.*)", name)
        if m:
            hf = f"model.layers.{n + int(m.group(1))}.{m.group(3)}"
        else:
            hf = "model." + name
        for key, value in split_fused(hf, tensor, config).items():
            out[key] = value.contiguous()
    for k in range(config.num_nextn_predict_layers):  # MTP layers store their own copies
        out[f"model.layers.{n + k}.embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
        out[f"model.layers.{n + k}.shared_head.head.weight"] = out["lm_head.weight"].clone()
    return out


def split_fused(key: str, tensor: torch.Tensor, config: ModelConfig) -> dict[str, torch.Tensor]:
    if key.endswith("experts.gate_up_proj"):
        base, i = key[: -len("gate_up_proj")], config.moe_intermediate_size
        out = {}
        for e in range(tensor.shape[0]):
            out[f"{base}{e}.gate_proj.weight"] = tensor[e, :i]
            out[f"{base}{e}.up_proj.weight"] = tensor[e, i:]
        return out
    if key.endswith("experts.down_proj"):
        base = key[: -len("down_proj")]
        return {f"{base}{e}.down_proj.weight": tensor[e] for e in range(tensor.shape[0])}
    if key.endswith("gate_up_proj.weight"):
        half = tensor.shape[0] // 2
        base = key[: -len("gate_up_proj.weight")]
        return {f"{base}gate_proj.weight": tensor[:half], f"{base}up_proj.weight": tensor[half:]}
    m = re.match(r"(.*)\.qkv_proj\.(weight|bias)$", key)
    if m:
        hd = config.attn_head_dim
        sizes = [config.num_attention_heads * hd, config.n_kv_heads * hd, config.n_kv_heads * hd]
        q, k, v = tensor.split(sizes)
        return {f"{m.group(1)}.{p}.{m.group(2)}": t for p, t in zip(("q_proj", "k_proj", "v_proj"), (q, k, v))}
    return {key: tensor}


# ------------------------------------------------------------------------------------ public API


def mtp_layers_on_disk(source: TensorSource, n_layers: int) -> int:
    indices = {int(m.group(1)) for k in source.keys() if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    return len([i for i in indices if i >= n_layers])


def load_hf_model(folder: str | Path, dtype=None, trust_pickle: bool = False):
    """Build a nanoseek Transformer from an HF-format folder, in eval mode."""
    folder = Path(folder)
    cfg = read_json(folder / "config.json")
    config = config_from_hf(cfg, folder / "config.json")
    source = TensorSource(folder, trust_pickle)
    stored = mtp_layers_on_disk(source, config.num_hidden_layers)
    if stored < config.num_nextn_predict_layers:  # e.g. saved by transformers, which drops MTP
        config = config.replace(num_nextn_predict_layers=stored)
    state = read_state(source, config)
    with torch.device("meta"):
        model = Transformer(config)
    if dtype is None:
        dtype = _checkpoint_dtype(cfg)
    load_state_into(model, state, folder, dtype)
    model.checkpoint_dir = folder
    return model.eval()


def _checkpoint_dtype(cfg: dict):
    name = cfg.get("torch_dtype") or cfg.get("dtype")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(name)


def save_hf(model, folder: str | Path, tokenizer_dir: str | Path | None = None,
            max_shard_bytes: int = 5 * 1024 ** 3):
    """Write an HF-format folder that transformers' AutoModelForCausalLM loads."""
    folder = Path(folder)
    hf_config = config_to_hf(model.config)
    state = nanoseek_to_hf_state(model)
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    hf_config["torch_dtype"] = str(next(iter(dtypes))).replace("torch.", "") if len(dtypes) == 1 else "float32"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    write_shards(state, folder, max_shard_bytes)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else getattr(model, "checkpoint_dir", None)
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy(Path(tokenizer_dir) / name, folder / name)
    return folder


def write_shards(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int):
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
