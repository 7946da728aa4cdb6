"""Named configs. A preset is a dict of `ModelConfig` fields, plus optional run defaults.

One size scale for every family (parameters at the preset's own vocabulary):

    -tiny    ~0.1M   unit tests (milliseconds)
    -mini    ~1-2M   CPU training in minutes (the demo, `deepseek-v3-mini`)
    -small   ~4-11M  CPU benchmarks and longer CPU runs
    full names       the published shapes, for counting and loading checkpoints (`gpt2` is GPT-2
                     small, 124M; `vaswani-base` the paper's base model)

`gpt2-baby` (10.8M, nanoGPT's "baby GPT") is the GPT-2 family's small-scale shape: the name
`gpt2-small` stays an alias of `gpt2-mini`, which it named before. Old names live on in `ALIASES`.

    >>> sorted(PRESETS)[:2]
    ['deepseek-v2', 'deepseek-v2-lite']
"""

from __future__ import annotations

import warnings

from nanoseek.config.parse import did_you_mean
from nanoseek.errors import NanoseekError, NanoseekWarning

# The original block in decoder-only form: post-LayerNorm, sinusoidal positions added to the
# embedding scaled by sqrt(d), ReLU feed-forward with biases, tied output head.
_VASWANI = dict(
    position="sinusoidal",
    attention="mha",
    ffn="relu",
    norm="layernorm",
    norm_position="post",
    embedding_scale=True,
    tie_word_embeddings=True,
    attention_bias=True,
    mlp_bias=True,
    rms_norm_eps=1e-5,
    final_norm=False,
    hidden_dropout=0.0,
)
# nanoGPT's GPT-2: learned positions, pre-LayerNorm, GELU, biases, tied head.
_GPT2 = dict(
    position="learned",
    attention="mha",
    ffn="gelu",
    norm="layernorm",
    norm_position="pre",
    tie_word_embeddings=True,
    attention_bias=True,
    mlp_bias=True,
    rms_norm_eps=1e-5,
)
# Llama: RoPE (half-split), pre-RMSNorm, SwiGLU, GQA, untied head, no biases.
_LLAMA = dict(
    position="rope",
    attention="gqa",
    ffn="swiglu",
    norm="rmsnorm",
    norm_position="pre",
    rope_interleave=False,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
)
# DeepSeek-V2/V3: MLA with interleaved decoupled RoPE, DeepSeekMoE, pre-RMSNorm, untied head.
_DEEPSEEK = dict(
    position="rope",
    attention="mla",
    ffn="moe",
    norm="rmsnorm",
    norm_position="pre",
    rope_interleave=True,
    tie_word_embeddings=False,
    rms_norm_eps=1e-6,
)
# DeepSeek-V4: shared-KV attention with sinks over a window + compressed entries (CSA/HCA), mHC streams,
# every layer MoE (sqrt-softplus router, the first layers hash-routed, clamped SwiGLU).
_V4 = dict(
    position="rope",
    attention="v4",
    ffn="moe",
    norm="rmsnorm",
    norm_position="pre",
    fusion="mhc",
    rope_interleave=True,
    tie_word_embeddings=False,
    rms_norm_eps=1e-6,
    scoring_func="sqrtsoftplus",
    topk_method="noaux_tc",
    norm_topk_prob=True,
    first_k_dense_replace=0,
    routed_scaling_factor=1.5,
    swiglu_limit=10.0,
    hc_sinkhorn_iters=20,
)
_V2_ROUTER = dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False)
_V3_ROUTER = dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True)

PRESETS: dict[str, dict] = {
    "vaswani-tiny": dict(
        _VASWANI,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=256,
    ),
    "vaswani-mini": dict(
        _VASWANI,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=256,
    ),
    # the base model of "Attention Is All You Need" (decoder-only), for counting
    "vaswani-base": dict(
        _VASWANI,
        vocab_size=37000,
        hidden_size=512,
        num_hidden_layers=6,
        num_attention_heads=8,
        intermediate_size=2048,
        max_position_embeddings=512,
        hidden_dropout=0.1,
    ),
    # the encoder-decoder of "Attention Is All You Need": two stacks joined by cross-attention, source and
    # target embeddings shared and tied to the output projection, post-norm, sinusoidal positions
    "vaswani-tiny-ed": dict(
        _VASWANI,
        architecture="encoder_decoder",
        hidden_size=64,
        num_hidden_layers=2,
        encoder_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
    ),
    # the CPU one: trains on the couplets in minutes
    "vaswani-mini-ed": dict(
        _VASWANI,
        architecture="encoder_decoder",
        hidden_size=128,
        num_hidden_layers=2,
        encoder_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=64,
        hidden_dropout=0.1,
    ),
    # the paper's base model (Table 3): N = 6 + 6, d_model 512, h 8, d_ff 2048, P_drop 0.1, shared 37K BPE vocabulary
    "vaswani-base-ed": dict(
        _VASWANI,
        architecture="encoder_decoder",
        vocab_size=37000,
        hidden_size=512,
        num_hidden_layers=6,
        encoder_layers=6,
        num_attention_heads=8,
        intermediate_size=2048,
        max_position_embeddings=512,
        hidden_dropout=0.1,
    ),
    "gpt2-tiny": dict(
        _GPT2,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=256,
    ),
    # nanoGPT's CPU recipe shape: 4 layers, 4 heads, width 128
    "gpt2-mini": dict(
        _GPT2,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=256,
    ),
    # nanoGPT's "baby GPT" shakespeare-char shape: 6 layers, 6 heads, width 384
    "gpt2-baby": dict(
        _GPT2,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        intermediate_size=1536,
        max_position_embeddings=256,
    ),
    "gpt2": dict(
        _GPT2,
        vocab_size=50257,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=1024,
    ),
    "llama-tiny": dict(
        _LLAMA,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=160,
        max_position_embeddings=256,
    ),
    "llama-small": dict(
        _LLAMA,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=688,
        max_position_embeddings=1024,
        vocab_size=2048,
    ),
    # ---- DeepSeek-V2 / V3 (MLA + DeepSeekMoE; V3 adds sigmoid routing, aux-free balancing, MTP)
    "deepseek-v2-tiny": dict(
        _DEEPSEEK,
        **_V2_ROUTER,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        moe_intermediate_size=32,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        max_position_embeddings=256,
    ),
    "deepseek-v3-tiny": dict(
        _DEEPSEEK,
        **_V3_ROUTER,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        moe_intermediate_size=32,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        max_position_embeddings=256,
    ),
    # V3.2: the tiny V3 with a lightning indexer in every layer (8 keys per query)
    "deepseek-v32-tiny": dict(
        _DEEPSEEK,
        **_V3_ROUTER,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        moe_intermediate_size=32,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        max_position_embeddings=256,
        sparse="dsa",
        index_topk=8,
        index_n_heads=2,
        index_head_dim=32,
    ),
    "deepseek-v4-tiny": dict(
        _V4,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=32,
        qk_rope_head_dim=8,
        q_lora_rank=24,
        o_groups=2,
        o_lora_rank=16,
        sliding_window=8,
        sparse_layers=["csa", "hca"],
        compress_rate_csa=4,
        compress_rate_hca=8,
        index_topk=4,
        index_n_heads=2,
        index_head_dim=16,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        num_hash_layers=1,
        hc_mult=2,
        max_position_embeddings=256,
        rope_scaling=dict(rope_type="yarn", factor=4, original_max_position_embeddings=64, beta_fast=32, beta_slow=1),
    ),
    "deepseek-v4-small": dict(
        _V4,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        head_dim=64,
        qk_rope_head_dim=16,
        q_lora_rank=128,
        o_groups=2,
        o_lora_rank=128,
        sliding_window=64,
        sparse_layers=["csa", "hca"],
        compress_rate_csa=4,
        compress_rate_hca=32,
        index_topk=64,
        index_n_heads=4,
        index_head_dim=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=256,
        num_hash_layers=1,
        hc_mult=4,
        max_position_embeddings=1024,
        vocab_size=2048,
    ),
    "deepseek-v2-small": dict(
        _DEEPSEEK,
        **_V2_ROUTER,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        intermediate_size=768,
        moe_intermediate_size=256,
        q_lora_rank=None,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        max_position_embeddings=1024,
        vocab_size=2048,
    ),
    "deepseek-v3-small": dict(
        _DEEPSEEK,
        **_V3_ROUTER,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        intermediate_size=768,
        moe_intermediate_size=256,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        max_position_embeddings=1024,
        vocab_size=2048,
    ),
    # the demo: a char-level DeepSeek-V3 in miniature (MLA + 8 routed/1 shared experts top-2 + MTP)
    "deepseek-v3-mini": dict(
        _DEEPSEEK,
        **_V3_ROUTER,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=384,
        moe_intermediate_size=128,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        max_position_embeddings=128,
    ),
    "deepseek-v2-lite": dict(
        _DEEPSEEK,
        **_V2_ROUTER,
        vocab_size=102400,
        hidden_size=2048,
        num_hidden_layers=27,
        num_attention_heads=16,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        max_position_embeddings=163840,
        aux_loss_alpha=0.001,
        bos_token_id=100000,
        eos_token_id=100001,
        rope_scaling=dict(
            rope_type="yarn",
            factor=40,
            original_max_position_embeddings=4096,
            beta_fast=32,
            beta_slow=1,
            mscale=0.707,
            mscale_all_dim=0.707,
        ),
    ),
    "deepseek-v2": dict(
        _DEEPSEEK,
        **_V2_ROUTER,
        vocab_size=102400,
        hidden_size=5120,
        num_hidden_layers=60,
        num_attention_heads=128,
        intermediate_size=12288,
        moe_intermediate_size=1536,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=160,
        n_shared_experts=2,
        num_experts_per_tok=6,
        topk_method_override=None,
        first_k_dense_replace=1,
        max_position_embeddings=163840,
        routed_scaling_factor=16.0,
        n_group=8,
        topk_group=3,
        aux_loss_alpha=0.003,
        bos_token_id=100000,
        eos_token_id=100001,
        rope_scaling=dict(
            rope_type="yarn",
            factor=40,
            original_max_position_embeddings=4096,
            beta_fast=32,
            beta_slow=1,
            mscale=0.707,
            mscale_all_dim=0.707,
        ),
    ),
    "deepseek-v3": dict(
        _DEEPSEEK,
        **_V3_ROUTER,
        vocab_size=129280,
        hidden_size=7168,
        num_hidden_layers=61,
        num_attention_heads=128,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        first_k_dense_replace=3,
        num_nextn_predict_layers=1,
        max_position_embeddings=163840,
        aux_loss_alpha=0.0001,
        bos_token_id=0,
        eos_token_id=1,
        rope_scaling=dict(
            rope_type="yarn",
            factor=40,
            original_max_position_embeddings=4096,
            beta_fast=32,
            beta_slow=1,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
    ),
    "deepseek-v4-flash": dict(
        _V4,
        vocab_size=129280,
        hidden_size=4096,
        num_hidden_layers=43,
        num_attention_heads=64,
        head_dim=512,
        qk_rope_head_dim=64,
        q_lora_rank=1024,
        o_groups=8,
        o_lora_rank=1024,
        sliding_window=128,
        compress_rate_csa=4,
        compress_rate_hca=128,
        sparse_layers=["hca", "hca"] + ["hca", "csa"] * 20 + ["hca"],
        index_topk=512,
        index_n_heads=64,
        index_head_dim=128,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=6,
        moe_intermediate_size=2048,
        num_hash_layers=3,
        hc_mult=4,
        num_nextn_predict_layers=1,
        max_position_embeddings=1048576,
        bos_token_id=0,
        eos_token_id=1,
        rope_scaling=dict(
            rope_type="yarn", factor=16, original_max_position_embeddings=65536, beta_fast=32, beta_slow=1
        ),
    ),
}
# ---- Chinese poetry: a char-level DeepSeek-V3 for the bundled Tang poems (`--data tang`)
# One token per character (vocab 7,217: the corpus's 6,958 characters + 3 special + 256 byte tokens),
# a context of 128 characters (a title, a poet and an 8-line regulated poem), no MTP (its second output
# head costs as much as the model's body at this vocabulary), sized to write 5- and 7-character verses
# after about 5 minutes of training on 2 CPU cores.
POEM_PRESETS: dict[str, dict] = {
    "deepseek-v3-poems": dict(
        _DEEPSEEK,
        **_V3_ROUTER,
        vocab_size=7217,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=384,
        moe_intermediate_size=128,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        max_position_embeddings=128,
    ),
}
PRESETS.update(POEM_PRESETS)
PRESETS["deepseek-v2"].pop("topk_method_override")
PRESETS["deepseek-v2"]["topk_method"] = "group_limited_greedy"

DEFAULT_PRESET = "deepseek-v3-mini"

# Run defaults per preset (sections of TrainConfig); the demo settings live here.
RUN_DEFAULTS: dict[str, dict] = {
    # The fastest-learning default found on a 2-core CPU (benchmarks/default_vs_nanogpt.py): a 2048-token BPE
    # (each token ~3.3 bytes of text instead of 1), Muon for the hidden matrices, WSD with a short warm-up
    # (a wall-clock budget of a few hundred steps), four evaluations spread over the budget.
    "deepseek-v3-mini": dict(
        data=dict(seq_len=128, tokenizer="bpe", vocab_size=2048),
        optim=dict(name="muon", lr=2e-3, weight_decay=0.1, beta2=0.99),
        schedule=dict(name="wsd", warmup_steps=20),
        # 140 s = the wall time of nanoGPT's CPU recipe (2000 iters) on a 2-core Zen 3 machine; bf16 where the
        # device has native bf16 matmuls (a CPU with AVX-512-bf16 or AMX, a GPU of compute capability 8+;
        # on a Zen 4: 1.38x the steps in the same time, 2.231 vs 2.298 bits/byte), fp32 elsewhere
        train=dict(batch_size=16, max_steps=0, max_seconds=140.0, dtype="auto"),
        eval=dict(every=0, points=4, batches=10),
    ),
    # the paper's recipe: Adam(0.9, 0.98, 1e-9), inverse-sqrt warm-up, label smoothing 0.1, no weight decay;
    # keep the last 5 checkpoints for `nanoseek average` (the paper averaged the last 5 of the base model)
    "vaswani-mini-ed": dict(
        data=dict(seq_len=32, tokenizer="char"),
        optim=dict(lr=2e-3, weight_decay=0.0, beta1=0.9, beta2=0.98, eps=1e-9),
        schedule=dict(name="inverse_sqrt", warmup_steps=400),
        train=dict(batch_size=64, max_steps=0, max_seconds=180.0, label_smoothing=0.1),
        checkpoint=dict(every=250, keep_last=5),
        eval=dict(every=250, batches=10, batch_size=64),
    ),
    "vaswani-base-ed": dict(
        data=dict(seq_len=256, tokenizer="bpe", vocab_size=37000),
        # lr = d^-0.5 * warmup^-0.5 = (512 * 4000)^-0.5 at the peak
        optim=dict(lr=7e-4, weight_decay=0.0, beta1=0.9, beta2=0.98, eps=1e-9),
        schedule=dict(name="inverse_sqrt", warmup_steps=4000),
        train=dict(batch_size=64, max_steps=100000, label_smoothing=0.1),
        checkpoint=dict(every=1000, keep_last=5),
    ),
    "gpt2-mini": dict(
        data=dict(seq_len=128, tokenizer="char"),
        optim=dict(lr=2e-3, weight_decay=0.1, beta2=0.99),
        schedule=dict(name="cosine", warmup_steps=100),
        train=dict(batch_size=16, max_steps=2000, dtype="float32"),
        eval=dict(every=250, batches=20),
    ),
}
RUN_DEFAULTS["vaswani-tiny-ed"] = RUN_DEFAULTS["vaswani-mini-ed"]
RUN_DEFAULTS["deepseek-v3-poems"] = dict(
    data=dict(path=["tang"], seq_len=128, tokenizer="char"),
    optim=dict(lr=2e-3, weight_decay=0.1, beta2=0.99),
    schedule=dict(name="cosine", warmup_steps=100),
    train=dict(batch_size=16, max_steps=0, max_seconds=300.0, dtype="float32"),
    eval=dict(every=250, batches=20),
)


# Earlier names whose size word broke the scale above: old name -> current name.
ALIASES: dict[str, str] = {
    "gpt2-small": "gpt2-mini",  # 0.84M; GPT-2 small (124M) is `gpt2`
    "vaswani-small": "vaswani-mini",
}


def canonical_name(name: str) -> str:
    """The current name of preset `name` (an alias resolves; anything else is returned as given)."""
    return ALIASES.get(name, name)


def alias_note(name: str) -> str | None:
    """One line for a user who typed an old preset name, else None.

    >>> alias_note("gpt2-small")
    "note: preset 'gpt2-small' is now called 'gpt2-mini' (the same model); GPT-2 small (124M) is 'gpt2'"
    """
    if name not in ALIASES:
        return None
    note = f"note: preset {name!r} is now called {ALIASES[name]!r} (the same model)"
    return note + ("; GPT-2 small (124M) is 'gpt2'" if name == "gpt2-small" else "")


def get_preset(name: str) -> dict:
    note = alias_note(name)
    if note:
        warnings.warn(note, NanoseekWarning, stacklevel=2)
    name = canonical_name(name)
    if name not in PRESETS:
        raise NanoseekError(
            f"unknown preset {name!r}{did_you_mean(name, PRESETS)}; choose one of: {', '.join(sorted(PRESETS))}"
        )
    return dict(PRESETS[name])


def get_run_defaults(name: str) -> dict:
    name = canonical_name(name)
    get_preset(name)
    return {k: dict(v) for k, v in RUN_DEFAULTS.get(canonical_name(name), {}).items()}
