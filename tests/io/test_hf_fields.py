"""Every config.json field transformers' modeling code reads is honoured or refused by name.

For each supported `model_type`, each field of its transformers config class is set to a value other
than the base one on a tiny random model: nanoseek's logits equal transformers' within 1e-4 (fp32), or
loading stops with an error that names the field. A field transformers adds later fails
`test_walk_covers_every_field` until it is placed here. The slow mark keeps one case of each kind
(same / refused) per model_type in the default run.
"""

from pathlib import Path

import pytest
import torch

from nanoseek import generate, load_model
from nanoseek.errors import NanoseekError
from nanoseek.io.hf import config_from_hf

transformers = pytest.importorskip("transformers", reason="needs the optional extra: pip install -e '.[hf]'")
pytestmark = pytest.mark.hf

SAME, REFUSE = "same", "refuse"

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
    initializer_range=0.1,
)
MLA = dict(
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    moe_intermediate_size=32,
    n_routed_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
)
V4 = dict(
    vocab_size=128,
    hidden_size=64,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    head_dim=32,
    partial_rotary_factor=0.25,
    q_lora_rank=24,
    o_groups=2,
    o_lora_rank=16,
    index_n_heads=8,
    index_head_dim=16,
    index_topk=4,
    sliding_window=8,
    hc_mult=2,
    layer_types=["compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    mlp_layer_types=["hash_moe", "moe", "moe"],
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    max_position_embeddings=256,
    initializer_range=0.1,
    rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1),
)
GPT2 = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.1)

FAMILIES = {
    "llama": ("LlamaConfig", TINY),
    "deepseek_v2": (
        "DeepseekV2Config",
        dict(TINY, **MLA, q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1),
    ),
    "deepseek_v3": ("DeepseekV3Config", dict(TINY, **MLA, q_lora_rank=24, n_group=2, topk_group=1)),
    "deepseek_v32": (
        "DeepseekV32Config",
        dict(TINY, **MLA, q_lora_rank=24, n_group=2, topk_group=1, index_topk=6, index_n_heads=4, index_head_dim=16),
    ),
    "deepseek_v4": ("DeepseekV4Config", V4),
    "gpt2": ("GPT2Config", GPT2),
}


def rope(kind: str, rotary_dim: int = 16, **extra) -> dict:
    """A `rope_parameters` value of each scaled kind (longrope's factors sized for `rotary_dim`)."""
    params = {
        "linear": dict(rope_type="linear", factor=2.0),
        "dynamic": dict(rope_type="dynamic", factor=2.0),
        "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=16, beta_slow=2),
        "llama3": dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8,
        ),
        "longrope": dict(
            rope_type="longrope",
            short_factor=[1.0 + 0.1 * i for i in range(rotary_dim // 2)],
            long_factor=[1.0 + 0.7 * i for i in range(rotary_dim // 2)],
            original_max_position_embeddings=16,
        ),
    }[kind]
    return {"rope_theta": 10000.0, **params, **extra}


def common(rotary_dim: int) -> list:
    """Fields every decoder family here shares, with the same fate."""
    return [
        ("vocab_size", dict(vocab_size=96), SAME),
        ("hidden_size", dict(hidden_size=32), SAME),
        ("num_hidden_layers", dict(num_hidden_layers=3), SAME),
        ("hidden_act", dict(hidden_act="gelu"), REFUSE),
        ("max_position_embeddings", dict(max_position_embeddings=32), SAME),
        ("initializer_range", dict(initializer_range=0.05), SAME),
        ("rms_norm_eps", dict(rms_norm_eps=1e-2), SAME),
        ("use_cache", dict(use_cache=False), SAME),
        ("pad_token_id", dict(pad_token_id=5), SAME),
        ("bos_token_id", dict(bos_token_id=3), SAME),
        ("eos_token_id", dict(eos_token_id=[4, 7]), SAME),
        ("attention_dropout", dict(attention_dropout=0.1), SAME),
        ("rope_parameters", dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0}), SAME),
        ("rope_parameters", dict(rope_parameters=rope("linear")), SAME),
        ("rope_parameters", dict(rope_parameters=rope("dynamic"), max_position_embeddings=16), SAME),
        ("rope_parameters", dict(rope_parameters=rope("yarn", mscale=0.8, mscale_all_dim=0.6)), SAME),
        ("rope_parameters", dict(rope_parameters=rope("yarn", truncate=False, attention_factor=1.3)), SAME),
        ("rope_parameters", dict(rope_parameters=rope("llama3")), SAME),
        ("rope_parameters", dict(rope_parameters=rope("longrope", rotary_dim)), SAME),
        ("partial_rotary_factor", dict(partial_rotary_factor=0.5), REFUSE),
        ("quantization_config", dict(quantization_config={"quant_method": "gptq", "bits": 4}), REFUSE),
    ]


def deepseek_common() -> list:
    return [
        ("intermediate_size", dict(intermediate_size=48), SAME),
        ("moe_intermediate_size", dict(moe_intermediate_size=16), SAME),
        ("num_attention_heads", dict(num_attention_heads=2, num_key_value_heads=2), SAME),
        ("num_key_value_heads", dict(num_key_value_heads=2), REFUSE),
        ("n_shared_experts", dict(n_shared_experts=2), SAME),
        ("n_routed_experts", dict(n_routed_experts=8), SAME),
        ("num_experts_per_tok", dict(num_experts_per_tok=1), SAME),
        ("output_router_logits", dict(output_router_logits=True), SAME),
        ("routed_scaling_factor", dict(routed_scaling_factor=2.5), SAME),
        ("kv_lora_rank", dict(kv_lora_rank=8), SAME),
        ("qk_nope_head_dim", dict(qk_nope_head_dim=4), SAME),
        ("qk_rope_head_dim", dict(qk_rope_head_dim=4), SAME),
        ("v_head_dim", dict(v_head_dim=12), SAME),
        ("tie_word_embeddings", dict(tie_word_embeddings=True), SAME),
        ("attention_bias", dict(attention_bias=True), SAME),
        ("aux_loss_alpha", dict(aux_loss_alpha=0.01), SAME),  # training only
    ]


WALK: dict[str, list] = {
    "llama": common(16)
    + [
        ("intermediate_size", dict(intermediate_size=48), SAME),
        ("num_attention_heads", dict(num_attention_heads=8), SAME),
        ("num_key_value_heads", dict(num_key_value_heads=2), SAME),
        ("num_key_value_heads", dict(num_key_value_heads=1), SAME),
        ("pretraining_tp", dict(pretraining_tp=2), SAME),  # not read by transformers 5
        ("tie_word_embeddings", dict(tie_word_embeddings=True), SAME),
        ("attention_bias", dict(attention_bias=True), SAME),
        ("mlp_bias", dict(mlp_bias=True), SAME),
        ("head_dim", dict(head_dim=32), SAME),
    ],
    "deepseek_v2": common(8)
    + deepseek_common()
    + [
        ("pretraining_tp", dict(pretraining_tp=2), SAME),
        ("head_dim", dict(head_dim=32), SAME),  # transformers' V2 sets head_dim = qk_rope_head_dim
        ("first_k_dense_replace", dict(first_k_dense_replace=0), SAME),
        ("q_lora_rank", dict(q_lora_rank=24), SAME),
        ("topk_method", dict(topk_method="group_limited_greedy", n_group=2, topk_group=1), SAME),
        ("n_group", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2), SAME),
        ("topk_group", dict(topk_method="group_limited_greedy", n_group=2, topk_group=2), SAME),
        ("topk_method", dict(topk_method="noaux_tc"), REFUSE),
        ("norm_topk_prob", dict(norm_topk_prob=True), SAME),  # transformers' V2 never normalizes
        ("mlp_bias", dict(mlp_bias=True), REFUSE),
        ("scoring_func", dict(scoring_func="sigmoid"), REFUSE),
        ("moe_layer_freq", dict(moe_layer_freq=2), REFUSE),
        ("rope_interleave", dict(rope_interleave=False), REFUSE),
    ],
    "deepseek_v3": common(8)
    + deepseek_common()
    + [
        ("pretraining_tp", dict(pretraining_tp=2), SAME),
        ("head_dim", dict(head_dim=32), REFUSE),  # transformers' V3 sizes its RoPE by it and breaks
        ("first_k_dense_replace", dict(first_k_dense_replace=0), SAME),
        ("q_lora_rank", dict(q_lora_rank=None), SAME),
        ("n_group", dict(n_group=4, topk_group=2, n_routed_experts=8), SAME),
        ("topk_group", dict(topk_group=2), SAME),
        ("norm_topk_prob", dict(norm_topk_prob=False), SAME),
        ("rope_interleave", dict(rope_interleave=False), SAME),
        ("rope_interleave", dict(rope_interleave=False, q_lora_rank=None), SAME),
        ("num_mtp_layers", dict(num_mtp_layers=2), SAME),  # transformers saves no MTP weights
        ("scoring_func", dict(scoring_func="softmax"), REFUSE),
        ("topk_method", dict(topk_method="greedy"), REFUSE),
        ("mlp_bias", dict(mlp_bias=True), REFUSE),
        ("moe_layer_freq", dict(moe_layer_freq=2), REFUSE),
    ],
    "deepseek_v32": common(8)
    + deepseek_common()
    + [
        ("head_dim", dict(head_dim=32), SAME),  # transformers' V3.2 sets head_dim = qk_rope_head_dim
        ("first_k_dense_replace", dict(first_k_dense_replace=0), SAME),
        ("q_lora_rank", dict(q_lora_rank=16), SAME),
        ("n_group", dict(n_group=4, topk_group=2, n_routed_experts=8), SAME),
        ("topk_group", dict(topk_group=2), SAME),
        ("norm_topk_prob", dict(norm_topk_prob=False), SAME),
        ("index_topk", dict(index_topk=3), SAME),
        ("index_head_dim", dict(index_head_dim=24), SAME),
        ("index_n_heads", dict(index_n_heads=2), SAME),
        ("mlp_layer_types", dict(mlp_layer_types=["dense", "sparse"]), SAME),
        ("mlp_layer_types", dict(mlp_layer_types=["sparse", "dense"]), REFUSE),
        ("layer_types", dict(layer_types=["indexed_attention"] * 2), SAME),
        ("layer_types", dict(layer_types=["full_attention"] * 2), REFUSE),
        ("scoring_func", dict(scoring_func="softmax"), REFUSE),
        ("topk_method", dict(topk_method="greedy"), REFUSE),
        ("mlp_bias", dict(mlp_bias=True), REFUSE),
        ("rope_interleave", dict(rope_interleave=False), REFUSE),
    ],
    "deepseek_v4": [
        ("vocab_size", dict(vocab_size=96), SAME),
        ("hidden_size", dict(hidden_size=32), SAME),
        ("moe_intermediate_size", dict(moe_intermediate_size=16), SAME),
        ("num_hidden_layers", dict(num_hidden_layers=2), SAME),
        ("num_attention_heads", dict(num_attention_heads=8), SAME),
        ("num_key_value_heads", dict(num_key_value_heads=2), SAME),  # V4 has one K=V head whatever it says
        ("head_dim", dict(head_dim=16), SAME),
        ("q_lora_rank", dict(q_lora_rank=16), SAME),
        ("num_experts_per_tok", dict(num_experts_per_tok=1), SAME),
        ("n_routed_experts", dict(n_routed_experts=8), SAME),
        ("n_shared_experts", dict(n_shared_experts=2), REFUSE),
        ("scoring_func", dict(scoring_func="sigmoid"), SAME),
        ("scoring_func", dict(scoring_func="softmax"), REFUSE),
        ("norm_topk_prob", dict(norm_topk_prob=False), SAME),  # transformers' V4 always normalizes
        ("routed_scaling_factor", dict(routed_scaling_factor=2.5), SAME),
        ("max_position_embeddings", dict(max_position_embeddings=128), SAME),
        ("rope_theta", dict(rope_theta=5000.0), SAME),
        (
            "layer_types",
            dict(layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]),
            SAME,
        ),
        (
            "compress_rates",
            dict(compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4}),
            SAME,
        ),
        ("compress_rope_theta", dict(compress_rope_theta=80000.0), SAME),
        ("hc_mult", dict(hc_mult=3), SAME),
        ("hc_sinkhorn_iters", dict(hc_sinkhorn_iters=5), SAME),
        ("hc_eps", dict(hc_eps=1e-2), SAME),
        ("mlp_layer_types", dict(mlp_layer_types=["moe", "moe", "moe"]), SAME),
        ("mlp_layer_types", dict(mlp_layer_types=["moe", "hash_moe", "moe"]), REFUSE),
        ("swiglu_limit", dict(swiglu_limit=0.02), SAME),
        ("sliding_window", dict(sliding_window=4), SAME),
        ("o_groups", dict(o_groups=4), SAME),
        ("o_lora_rank", dict(o_lora_rank=8), SAME),
        ("index_n_heads", dict(index_n_heads=4), SAME),
        ("index_head_dim", dict(index_head_dim=24), SAME),
        ("index_topk", dict(index_topk=2), SAME),
        ("num_nextn_predict_layers", dict(num_nextn_predict_layers=0), SAME),
        ("output_router_logits", dict(output_router_logits=True), SAME),
        ("router_aux_loss_coef", dict(router_aux_loss_coef=0.1), SAME),
        ("router_jitter_noise", dict(router_jitter_noise=0.1), SAME),  # not read by its modeling code
        ("hidden_act", dict(hidden_act="gelu"), REFUSE),
        ("initializer_range", dict(initializer_range=0.05), SAME),
        ("rms_norm_eps", dict(rms_norm_eps=1e-2), SAME),
        ("use_cache", dict(use_cache=False), SAME),
        ("pad_token_id", dict(pad_token_id=5), SAME),
        ("bos_token_id", dict(bos_token_id=3), SAME),
        ("eos_token_id", dict(eos_token_id=[4, 7]), SAME),
        ("tie_word_embeddings", dict(tie_word_embeddings=True), REFUSE),
        ("rope_scaling", dict(rope_scaling=rope("linear")), SAME),
        ("rope_scaling", dict(rope_scaling=rope("llama3")), SAME),
        ("rope_scaling", dict(rope_scaling=rope("dynamic")), REFUSE),
        (
            "rope_parameters",
            dict(
                rope_scaling=None,
                rope_parameters={
                    "main": rope("linear", partial_rotary_factor=0.25),
                    "compress": {"rope_type": "default", "rope_theta": 1e5, "partial_rotary_factor": 0.25},
                },
            ),
            REFUSE,
        ),
        ("partial_rotary_factor", dict(partial_rotary_factor=0.5), SAME),
        ("attention_bias", dict(attention_bias=True), SAME),  # not read by its modeling code
        ("mlp_bias", dict(mlp_bias=True), REFUSE),
        ("attention_dropout", dict(attention_dropout=0.1), SAME),
        ("quantization_config", dict(quantization_config={"quant_method": "gptq", "bits": 4}), REFUSE),
    ],
    "gpt2": [
        ("vocab_size", dict(vocab_size=96), SAME),
        ("n_positions", dict(n_positions=32), SAME),
        ("n_embd", dict(n_embd=32), SAME),
        ("n_layer", dict(n_layer=3), SAME),
        ("n_head", dict(n_head=8), SAME),
        ("n_inner", dict(n_inner=48), SAME),
        ("activation_function", dict(activation_function="gelu"), SAME),
        ("activation_function", dict(activation_function="gelu_pytorch_tanh"), SAME),
        ("activation_function", dict(activation_function="relu"), SAME),
        ("activation_function", dict(activation_function="silu"), REFUSE),
        ("resid_pdrop", dict(resid_pdrop=0.2), SAME),
        ("embd_pdrop", dict(embd_pdrop=0.2), SAME),
        ("attn_pdrop", dict(attn_pdrop=0.2), SAME),
        ("layer_norm_epsilon", dict(layer_norm_epsilon=1e-2), SAME),
        ("initializer_range", dict(initializer_range=0.05), SAME),
        ("summary_type", dict(summary_type="last"), SAME),  # the sequence-summary heads are not the LM's
        ("summary_use_proj", dict(summary_use_proj=False), SAME),
        ("summary_activation", dict(summary_activation="tanh"), SAME),
        ("summary_proj_to_labels", dict(summary_proj_to_labels=False), SAME),
        ("summary_first_dropout", dict(summary_first_dropout=0.2), SAME),
        ("scale_attn_weights", dict(scale_attn_weights=False), REFUSE),
        ("use_cache", dict(use_cache=False), SAME),
        ("bos_token_id", dict(bos_token_id=3), SAME),
        ("eos_token_id", dict(eos_token_id=4), SAME),
        ("pad_token_id", dict(pad_token_id=5), SAME),
        ("scale_attn_by_inverse_layer_idx", dict(scale_attn_by_inverse_layer_idx=True), REFUSE),
        ("reorder_and_upcast_attn", dict(reorder_and_upcast_attn=True), SAME),  # fp32 attention either way
        ("add_cross_attention", dict(add_cross_attention=True), REFUSE),
        ("tie_word_embeddings", dict(tie_word_embeddings=False), SAME),
        ("quantization_config", dict(quantization_config={"quant_method": "gptq", "bits": 4}), REFUSE),
    ],
}
# one case of each kind per model_type runs by default; the rest are marked slow
DEFAULT_RUN = {
    "llama": ("rope_parameters", "partial_rotary_factor"),
    "deepseek_v2": ("topk_method", "num_key_value_heads"),
    "deepseek_v3": ("rope_interleave", "scoring_func"),
    "deepseek_v32": ("mlp_layer_types", "mlp_bias"),
    "deepseek_v4": ("scoring_func", "n_shared_experts"),
    "gpt2": ("activation_function", "scale_attn_weights"),
}


def walk_cases():
    for family, cases in WALK.items():
        for i, (field, overrides, expect) in enumerate(cases):
            marks = [] if field in DEFAULT_RUN[family] else [pytest.mark.slow]
            yield pytest.param(family, field, overrides, expect, id=f"{family}-{field}-{i}", marks=marks)


def hf_model(family: str, overrides: dict):
    cls_name, base = FAMILIES[family]
    config = getattr(transformers, cls_name)(**{**base, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    experts = getattr(config, "n_routed_experts", 0) or 0
    with torch.no_grad():  # what transformers initializes to zero or one must matter too
        for name, p in model.named_parameters():
            if name.endswith(("bias", "sinks", "position_bias", "base")):
                p.normal_(0, 0.3)
            elif name.endswith(("norm.weight", "layernorm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.uniform_(0.5, 1.5)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.1)
            if name.endswith("tid2eid"):
                buf.copy_(torch.rand(buf.shape[0], experts).argsort(-1)[:, : buf.shape[1]])
    return model


@pytest.mark.parametrize("family,field,overrides,expect", list(walk_cases()))
def test_field_is_honoured_or_refused(family, field, overrides, expect, tmp_path):
    if expect == REFUSE:
        cls_name, base = FAMILIES[family]
        cfg = {**getattr(transformers, cls_name)(**base).to_dict(), **overrides}
        with pytest.raises(NanoseekError, match=field):
            config_from_hf(cfg, Path("config.json"))
        return
    hf = hf_model(family, overrides)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    x = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for length in (24, 10):  # the length-dependent RoPE kinds switch between the two
            expected = hf(x[:, :length]).logits
            assert (ours(x[:, :length]).logits - expected).abs().max().item() <= 1e-4, (field, length)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_walk_covers_every_field(family):
    cls_name, _ = FAMILIES[family]
    fields = set(getattr(transformers, cls_name).__annotations__)
    walked = {field for field, _, _ in WALK[family]}
    assert fields <= walked, f"{family}: fields nobody placed: {sorted(fields - walked)}"


@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
def test_length_dependent_rope_generates_like_transformers(kind, tmp_path):
    """Decoding across the original length: the prompt's keys keep their rotation, each new step
    rotates with the length it reaches (as transformers does)."""
    overrides = dict(rope_parameters=rope(kind), max_position_embeddings=16 if kind == "dynamic" else 64)
    hf = hf_model("llama", overrides)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    prompt = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(2))
    hf.generation_config.eos_token_id = None
    expected = hf.generate(prompt, max_new_tokens=14, do_sample=False, pad_token_id=0)[0, 10:]
    assert generate(ours, prompt[0], max_new_tokens=14, temperature=0).tolist() == expected.tolist()


@pytest.mark.parametrize(
    "preset,overrides",
    [
        ("llama-tiny", dict(rope_scaling=dict(rope_type="dynamic", factor=2.0, original_max_position_embeddings=16))),
        ("llama-tiny", dict(rope_scaling=rope("longrope"), tie_word_embeddings=True, mlp_bias=True)),
        ("deepseek-v3-tiny", dict(rope_interleave=False, rope_scaling=rope("llama3"), tie_word_embeddings=True)),
        pytest.param("llama-tiny", dict(rope_scaling=rope("linear"), head_dim=32), marks=pytest.mark.slow),
        pytest.param("llama-tiny", dict(rope_scaling=rope("yarn", truncate=False)), marks=pytest.mark.slow),
        pytest.param("deepseek-v2-tiny", dict(rope_scaling=rope("dynamic")), marks=pytest.mark.slow),
    ],
)
def test_exports_what_transformers_reads_back(preset, overrides, tmp_path):
    """nanoseek -> HF: the same fields, written so that transformers computes the same logits."""
    from nanoseek import ModelConfig, Transformer

    torch.manual_seed(0)
    ours = Transformer(ModelConfig.from_preset(preset, initializer_range=0.1, **overrides)).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
    ours.save_pretrained(tmp_path, format="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    x = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for length in (24, 10):
            assert (hf(x[:, :length]).logits - ours(x[:, :length]).logits).abs().max().item() <= 1e-4
