"""GPT-2 (`gpt2`): its config.json and its tensor names, both directions.

GPT-2 is the `gpt2*` presets' architecture: learned positions added to the token embedding,
pre-LayerNorm blocks with biases, a two-layer GELU MLP, a final LayerNorm and a head tied to the
embedding. Its names and layout (with or without the `transformer.` prefix older folders lack):

    wte.weight, wpe.weight                     -> embed_tokens.weight, pos_embed.weight
    h.i.ln_1, h.i.ln_2, ln_f                   -> layers.i.input_layernorm, .post_attention_layernorm, norm
    h.i.attn.c_attn   (q | k | v columns)      -> layers.i.self_attn.qkv_proj
    h.i.attn.c_proj, h.i.mlp.c_fc, .c_proj     -> layers.i.self_attn.o_proj, .mlp.up_proj, .mlp.down_proj

GPT-2's projections are `Conv1D` modules whose weight is stored (in, out), the transpose of a Linear's
(out, in): each such weight is transposed on the way in and out. `h.i.attn.bias` / `masked_bias` (the
causal mask old checkpoints store) are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from nanoseek.config import ModelConfig
from nanoseek.errors import NanoseekError
from nanoseek.io.hf.config import first_id, refuse_fields

# HF's activation_function -> nanoseek's ffn kind ("gelu_new", "gelu_fast", "gelu_pytorch_tanh": the tanh form)
GPT2_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}
GPT2_FIELD_RULES = [  # (field, value when absent, accepted, why)
    ("scale_attn_weights", True, (True,), "nanoseek scales attention logits by head_dim^-0.5"),
    ("scale_attn_by_inverse_layer_idx", False, (False,), "no per-layer attention scale"),
    ("add_cross_attention", False, (False,), "nanoseek models are decoder-only"),
]
# nanoseek name (with {i} for the layer) -> (GPT-2 name, transposed)
GPT2_NAMES = {
    "embed_tokens.weight": ("wte.weight", False),
    "pos_embed.weight": ("wpe.weight", False),
    "norm.weight": ("ln_f.weight", False),
    "norm.bias": ("ln_f.bias", False),
    "lm_head.weight": ("lm_head.weight", False),
}
GPT2_LAYER_NAMES = {
    "input_layernorm.weight": ("ln_1.weight", False),
    "input_layernorm.bias": ("ln_1.bias", False),
    "post_attention_layernorm.weight": ("ln_2.weight", False),
    "post_attention_layernorm.bias": ("ln_2.bias", False),
    "self_attn.qkv_proj.weight": ("attn.c_attn.weight", True),
    "self_attn.qkv_proj.bias": ("attn.c_attn.bias", False),
    "self_attn.o_proj.weight": ("attn.c_proj.weight", True),
    "self_attn.o_proj.bias": ("attn.c_proj.bias", False),
    "mlp.up_proj.weight": ("mlp.c_fc.weight", True),
    "mlp.up_proj.bias": ("mlp.c_fc.bias", False),
    "mlp.down_proj.weight": ("mlp.c_proj.weight", True),
    "mlp.down_proj.bias": ("mlp.c_proj.bias", False),
}
_FROM_GPT2 = {hf: (ours, t) for ours, (hf, t) in GPT2_NAMES.items()}
_FROM_GPT2_LAYER = {hf: (ours, t) for ours, (hf, t) in GPT2_LAYER_NAMES.items()}


def gpt2_config_from_hf(cfg: dict, source: Path) -> ModelConfig:
    """A ModelConfig (the gpt2 presets' kinds) from a gpt2 config.json."""
    refuse_fields(cfg, source, GPT2_FIELD_RULES)
    act = cfg.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
        raise NanoseekError(
            f"{source}: activation_function={act!r} is not supported (accepted: {', '.join(GPT2_ACTIVATIONS)})"
        )
    d = cfg.get("n_embd", 768)
    return ModelConfig(
        vocab_size=cfg.get("vocab_size", 50257),
        hidden_size=d,
        num_hidden_layers=cfg.get("n_layer", 12),
        num_attention_heads=cfg.get("n_head", 12),
        intermediate_size=cfg.get("n_inner") or 4 * d,
        max_position_embeddings=cfg.get("n_positions", 1024),
        rms_norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        initializer_range=cfg.get("initializer_range", 0.02),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        attention_bias=True,
        mlp_bias=True,
        attention_dropout=float(cfg.get("attn_pdrop") or 0.0),
        hidden_dropout=float(cfg.get("resid_pdrop") or 0.0),
        bos_token_id=first_id(cfg.get("bos_token_id")),
        eos_token_id=first_id(cfg.get("eos_token_id")),
        pad_token_id=first_id(cfg.get("pad_token_id")),
        position="learned",
        attention="mha",
        ffn=GPT2_ACTIVATIONS[act],
        norm="layernorm",
        norm_position="pre",
    )


def gpt2_config_to_hf(config: ModelConfig) -> dict:
    """A config.json for transformers' GPT2LMHeadModel; refuses what GPT-2 cannot express."""
    problems = []
    if config.attention != "mha" or config.n_kv_heads != config.num_attention_heads:
        problems.append(f"attention={config.attention!r} (GPT-2 is multi-head attention)")
    if config.ffn not in ("gelu", "gelu_tanh", "relu"):
        problems.append(f"ffn={config.ffn!r} (GPT-2's MLP is gelu, gelu_tanh or relu)")
    if config.norm != "layernorm" or config.norm_position != "pre" or not config.final_norm:
        problems.append("GPT-2 is pre-LayerNorm with a final norm")
    if not (config.attention_bias and config.mlp_bias):
        problems.append("GPT-2 has attention and MLP biases")
    if config.head_dim not in (None, config.hidden_size // config.num_attention_heads):
        problems.append(f"head_dim={config.head_dim} (GPT-2's is hidden_size / heads)")
    if config.fusion != "residual" or config.embedding_scale or config.sparse_layers or config.sparse != "dense":
        problems.append("GPT-2 has plain residual, dense layers and no embedding scale")
    if config.num_nextn_predict_layers:
        problems.append("GPT-2 has no MTP modules")
    if problems:
        raise NanoseekError("cannot save in HF format (gpt2): " + "; ".join(problems))
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}[config.ffn]
    return dict(
        model_type="gpt2",
        architectures=["GPT2LMHeadModel"],
        vocab_size=config.vocab_size,
        n_embd=config.hidden_size,
        n_layer=config.num_hidden_layers,
        n_head=config.num_attention_heads,
        n_inner=config.intermediate_size,
        n_positions=config.max_position_embeddings,
        activation_function=act,
        layer_norm_epsilon=config.rms_norm_eps,
        initializer_range=config.initializer_range,
        tie_word_embeddings=config.tie_word_embeddings,
        resid_pdrop=config.hidden_dropout,
        embd_pdrop=config.hidden_dropout,
        attn_pdrop=config.attention_dropout,
        scale_attn_weights=True,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def gpt2_key_to_nanoseek(key: str) -> tuple[str | None, bool]:
    """(nanoseek name or None for keys nanoseek does not store, whether to transpose)."""
    key = key[len("transformer.") :] if key.startswith("transformer.") else key
    if key in _FROM_GPT2:
        return _FROM_GPT2[key]
    m = re.match(r"h\.(\d+)\.(.*)", key)
    if m and m.group(2) in _FROM_GPT2_LAYER:
        name, transpose = _FROM_GPT2_LAYER[m.group(2)]
        return f"layers.{m.group(1)}.{name}", transpose
    return None, False  # attn.bias / attn.masked_bias: the causal mask old checkpoints store


def gpt2_state(model) -> dict[str, torch.Tensor]:
    """The GPT-2 on-disk layout of a nanoseek model (Conv1D weights transposed, a tied head left out)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("scalar_mix.") or (name == "lm_head.weight" and model.config.tie_word_embeddings):
            continue
        m = re.match(r"layers\.(\d+)\.(.*)", name)
        hf, transpose = GPT2_LAYER_NAMES[m.group(2)] if m else GPT2_NAMES[name]
        key = f"transformer.h.{m.group(1)}.{hf}" if m else (hf if hf == "lm_head.weight" else f"transformer.{hf}")
        out[key] = (tensor.t() if transpose else tensor).detach().contiguous()
    return out
