"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al. 2017).

The encoder reads the whole source at once; the decoder writes the target one token at a time,
attending to what it has written (causal self-attention) and to the encoder's output m (cross-attention):

    encoder layer:  h = Sub(h, SelfAttn(h; M_src));   h = Sub(h, FFN(h))
    decoder layer:  g = Sub(g, CausalSelfAttn(g));   g = Sub(g, CrossAttn(g, m; M_src));   g = Sub(g, FFN(g))
    post-norm (the paper):  Sub(x, F) = Norm(x + Dropout(F(x)))
    pre-norm:               Sub(x, F) = x + Dropout(F(Norm(x)))
    CrossAttn(g, m) = Concat_i(softmax(g W_i^Q (m W_i^K)^T / sqrt(d_k) + M_src) m W_i^V) W^O
    m = Norm_enc(h_N)   (a post-norm stack already ends in a norm: `final_norm` false)

One embedding table E serves the source, the target and the output projection (logits = g_N E^T when the
head is tied), scaled by sqrt(d) when `embedding_scale`, plus the configured positions, each sequence from
position 0. The attention, FFN, norm and position modules are the decoder-only model's, chosen by the same
config fields; rotary positions, when configured, rotate the self-attentions only (a source and a target
position do not share an axis).

Padding never reaches a real token. Sources are right-padded and M_src (0 for real keys, -inf for pads)
hides the pads from the encoder's self-attention and from every cross-attention; targets are right-padded,
where causal attention keeps the pads from the real tokens, and their loss targets are -1 (ignored).

Generation encodes once, projects m to every decoder layer's cross-attention keys and values once
(`EncoderMemory`), and decodes against a static self-attention cache as the decoder-only model does.

    >>> model = EncoderDecoder(ModelConfig.from_preset("vaswani-tiny-ed"))
    >>> model(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)).logits.shape
    torch.Size([2, 3, 128])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nanoseek.config import ModelConfig
from nanoseek.model.attention.core import sdpa
from nanoseek.model.attention.mha import MultiHeadAttention
from nanoseek.model.kv_cache import DenseKVCache
from nanoseek.model.loss import linear_cross_entropy
from nanoseek.model.norm import make_norm
from nanoseek.model.position import ADDITIVE_POSITIONS, RotaryEmbedding, softmax_scale
from nanoseek.model.transformer import (
    CHECKPOINT_WRITERS,
    KERNEL_FUNCTIONS,
    ModelOutput,
    make_ffn,
    param_counts,
    positions,
    swap_kernels,
)


@dataclass
class EncoderMemory:
    """The encoder's output as the decoder reads it: per decoder layer the cross-attention keys and values
    (B, H_kv, S, d), projected once; the source mask (B, S), True for real tokens (None: no padding)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor | None

    def repeat_rows(self, n: int) -> EncoderMemory:
        """Each row n times in a row (the n beams of one source share its memory)."""
        rep = lambda x: x.repeat_interleave(n, dim=0)
        mask = None if self.mask is None else rep(self.mask)
        return EncoderMemory([rep(k) for k in self.keys], [rep(v) for v in self.values], mask)


def key_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) True = real key -> the (B, 1, 1, S) boolean SDPA mask shared by every head and query."""
    return None if mask is None else mask[:, None, None, :]


class EncoderSelfAttention(MultiHeadAttention):
    """Bidirectional multi-head self-attention: every source token sees every real source token."""

    def forward(self, x: torch.Tensor, rope=None, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.project(x, rope)
        dropout = self.dropout if self.training else 0.0
        return self.output(sdpa(q, k, v, attn_mask=key_mask(mask), scale=self.scale, dropout_p=dropout))


class CrossAttention(nn.Module):
    """Queries from the decoder, keys and values from the encoder output m (K and V fused in `kv_proj`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.n_kv_heads
        self.head_dim = config.attn_head_dim
        self.dropout = config.attention_dropout
        self.scale = softmax_scale(config, self.head_dim)
        d, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.kv_proj = nn.Linear(d, 2 * self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=bias)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """m (B, S, D) -> K, V (B, H_kv, S, d)."""
        b, s, _ = memory.shape
        kv = self.kv_proj(memory).view(b, s, 2, self.n_kv_heads, self.head_dim)
        return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        y = sdpa(q, k, v, attn_mask=key_mask(mask), scale=self.scale, dropout_p=dropout)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class Sublayers(nn.Module):
    """What both layers share: the residual around each sublayer, pre- or post-norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.norm_args = (config.norm, config.hidden_size, config.rms_norm_eps)

    def new_norm(self) -> nn.Module:
        return make_norm(*self.norm_args)

    def sublayer(self, h: torch.Tensor, norm: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.pre_norm:
            return h + self.dropout(fn(norm(h)))
        return norm(h + self.dropout(fn(h)))


class EncoderLayer(Sublayers):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__(config)
        self.input_layernorm = self.new_norm()
        self.self_attn = EncoderSelfAttention(config, layer)
        self.post_attention_layernorm = self.new_norm()
        self.mlp = make_ffn(config, layer)

    def forward(self, h: torch.Tensor, rope, mask: torch.Tensor | None) -> torch.Tensor:
        h = self.sublayer(h, self.input_layernorm, lambda x: self.self_attn(x, rope, mask))
        return self.sublayer(h, self.post_attention_layernorm, self.mlp)


class DecoderLayer(Sublayers):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__(config)
        self.input_layernorm = self.new_norm()
        self.self_attn = MultiHeadAttention(config, layer)
        self.encoder_attn_layernorm = self.new_norm()
        self.encoder_attn = CrossAttention(config)
        self.post_attention_layernorm = self.new_norm()
        self.mlp = make_ffn(config, layer)

    def forward(self, g, rope, cache, start, k, v, mask) -> torch.Tensor:
        """g (B, T, D) at positions start..start+T-1, against the self-attention `cache` (or none) and the
        encoder's keys k and values v for this layer."""
        g = self.sublayer(g, self.input_layernorm, lambda x: self.self_attn(x, rope, cache, start))
        g = self.sublayer(g, self.encoder_attn_layernorm, lambda x: self.encoder_attn(x, k, v, mask))
        return self.sublayer(g, self.post_attention_layernorm, self.mlp)


class EncoderDecoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.architecture != "encoder_decoder":
            raise ValueError(f"EncoderDecoder needs architecture='encoder_decoder', got {config.architecture!r}")
        self.config = config
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.pos_embed = ADDITIVE_POSITIONS[config.position](config) if config.position in ADDITIVE_POSITIONS else None
        self.rotary = RotaryEmbedding(config) if config.position == "rope" else None
        self.embed_dropout = nn.Dropout(config.hidden_dropout)
        self.encoder = nn.ModuleList(EncoderLayer(config, i) for i in range(config.n_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        final = lambda: make_norm(config.norm, d, config.rms_norm_eps) if config.final_norm else nn.Identity()
        self.encoder_norm, self.norm = final(), final()
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.embed_scale = math.sqrt(d) if config.embedding_scale else 1.0
        self.gradient_checkpointing = False  # recompute each layer in backward (set by the trainer)
        self.set_kernels(config.kernels)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def reset_parameters(self):
        """N(0, initializer_range), output projections scaled by 1/sqrt(2 * layers); embeddings N(0, d^-1/2)
        when they are scaled by sqrt(d) (unit variance at the input), as in the decoder-only model."""
        std = self.config.initializer_range
        layers = self.config.n_encoder_layers + self.config.num_hidden_layers
        out_std = std / math.sqrt(2 * layers) if self.config.depth_scaled_init else std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, out_std if name.endswith(("o_proj", "down_proj")) else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        emb_std = self.config.hidden_size**-0.5 if self.config.embedding_scale else std
        nn.init.normal_(self.embed_tokens.weight, 0.0, emb_std)
        if self.pos_embed is not None and hasattr(self.pos_embed, "weight"):
            nn.init.normal_(self.pos_embed.weight, 0.0, std)

    def set_kernels(self, on: bool) -> None:
        swap_kernels(self, on)
        self.kernels = on

    # ------------------------------------------------------------------ the two stacks
    def embed(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        h = self.embed_tokens(ids)
        if self.embed_scale != 1.0:
            h = h * self.embed_scale
        if self.pos_embed is not None:
            h = h + self.pos_embed(positions(start, ids.shape[1], ids.device))
        return self.embed_dropout(h)

    def rope(self, start: int, length: int, device):
        return None if self.rotary is None else self.rotary(positions(start, length, device))

    def source_mask(self, source_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """The given mask, else source_ids != pad_token_id when the config names a pad token, else None."""
        if mask is not None:
            return mask.bool()
        pad = self.config.pad_token_id
        return None if pad is None else source_ids != pad

    def encode(self, source_ids: torch.Tensor, source_mask: torch.Tensor | None = None) -> EncoderMemory:
        """source (B, S) -> the memory every decoder layer reads: its keys and values, and the source mask."""
        self._check_length(source_ids.shape[1])
        mask = self.source_mask(source_ids, source_mask)
        h = self.embed(source_ids)
        rope = self.rope(0, source_ids.shape[1], source_ids.device)
        for layer in self.encoder:
            h = self.call_layer(layer, h, rope, mask)
        m = self.encoder_norm(h)
        keys, values = zip(*(layer.encoder_attn.project_memory(m) for layer in self.decoder))
        return EncoderMemory(list(keys), list(values), mask)

    def decode(self, input_ids: torch.Tensor, memory: EncoderMemory, cache=None, start: int = 0) -> torch.Tensor:
        """Target tokens (B, T) at positions start..start+T-1 -> the normed hidden states (B, T, D)."""
        self._check_length(start + input_ids.shape[1])
        g = self.embed(input_ids, start)
        rope = self.rope(start, input_ids.shape[1], input_ids.device)
        for i, layer in enumerate(self.decoder):
            layer_cache = None if cache is None else cache[i]
            g = self.call_layer(layer, g, rope, layer_cache, start, memory.keys[i], memory.values[i], memory.mask)
        return self.norm(g)

    def call_layer(self, layer: nn.Module, *args) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def forward(
        self,
        source_ids: torch.Tensor | None,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        source_mask: torch.Tensor | None = None,
        memory: EncoderMemory | None = None,
        cache: list | None = None,
        start: int = 0,
        last_only: bool = False,
        return_logits: bool = True,
        label_smoothing: float = 0.0,
    ) -> ModelOutput:
        """source (B, S) and the target shifted right, input_ids (B, T) (BOS first) -> logits (B, T, V).

        With `targets` (B, T) (-1 = padding) the output holds the mean (label-smoothed) cross-entropy;
        `return_logits=False` then skips the logits (the head and loss run fused where they can).
        `memory` (from `encode`) skips the encoder; `cache` and `start` decode against a self-attention cache."""
        if memory is None:
            memory = self.encode(source_ids, source_mask)
        h = self.decode(input_ids, memory, cache, start)
        if last_only:
            h = h[:, -1:]
        if targets is None or return_logits:
            logits = self.lm_head(h)
            loss = None
            if targets is not None:
                loss = F.cross_entropy(
                    logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1, label_smoothing=label_smoothing
                )
            return ModelOutput(logits=logits, loss=loss, hidden=h)
        return ModelOutput(logits=None, loss=self.head_loss(h, targets, label_smoothing), hidden=h)

    def head_loss(self, h: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        fused = KERNEL_FUNCTIONS.get("linear_cross_entropy") if self.kernels and not label_smoothing else None
        if fused is not None:
            return fused(h, self.lm_head.weight, targets)
        return linear_cross_entropy(h, self.lm_head.weight, targets, label_smoothing=label_smoothing)

    def make_cache(self, batch: int, max_len: int | None = None, dtype=None, device=None) -> list[DenseKVCache]:
        """The decoder's self-attention caches, one per layer, for `max_len` target positions."""
        max_len = max_len or self.config.max_position_embeddings
        param = next(self.parameters())
        return [
            layer.self_attn.make_cache(batch, max_len, dtype or param.dtype, device or param.device)
            for layer in self.decoder
        ]

    def _check_length(self, end: int):
        limit = self.config.max_position_embeddings
        if end > limit:
            raise ValueError(f"sequence of {end} positions exceeds max_position_embeddings={limit}")

    # ------------------------------------------------------------------ what the trainer and the tools ask of a model
    def update_balance_bias(self, expert_load, update: bool = True) -> dict:
        return {}  # no MoE layers

    def set_dsa_warmup(self, on: bool, freeze_model: bool = True) -> None:
        pass  # no sparse attention

    def moe_layers(self) -> list:
        return []

    def save_pretrained(self, directory, format: str = "nanoseek", tokenizer_dir=None):
        if format not in CHECKPOINT_WRITERS:
            raise ValueError(f"format={format!r}; choose 'nanoseek' or 'hf' (import nanoseek.io)")
        return CHECKPOINT_WRITERS[format](self, directory, tokenizer_dir)

    def num_params(self) -> dict:
        return count_params(self)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return flops_per_token(self.config, self.num_params()["matmul_active"], seq_len)


def count_params(model: EncoderDecoder) -> dict:
    """Parameters (the shared embedding once), with the decoder-only count's keys: every one is active (dense);
    `active_non_embedding` leaves out the embedding lookups, `matmul_active` adds a tied head back."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    return param_counts(model, total, total)


def flops_per_token(config: ModelConfig, matmul_params: int, seq_len: int | None = None) -> float:
    """Training FLOPs per target token with a source as long as the target: 6 N for the weights plus
    6 H (d_qk + d_v) T per attention (the encoder's, and the decoder's self- and cross-attention)."""
    t = seq_len or config.max_position_embeddings
    attentions = config.n_encoder_layers + 2 * config.num_hidden_layers
    return float(6 * matmul_params + 6 * attentions * config.num_attention_heads * 2 * config.attn_head_dim * t)


def kv_cache_bytes_per_token(config: ModelConfig, dtype_bytes: int = 2) -> int:
    """Bytes per target token of the decoder's self-attention cache (the cross-attention keys and values
    take as much per source token)."""
    return config.num_hidden_layers * 2 * config.n_kv_heads * config.attn_head_dim * dtype_bytes


def model_info(config: ModelConfig, seq_len: int | None = None) -> dict:
    """The figures `nanoseek info` prints, computed on the meta device."""
    with torch.device("meta"):
        model = EncoderDecoder(config)
    params = count_params(model)
    return {
        "params_total": params["total"],
        "params_active": params["active"],
        "params_active_non_embedding": params["active_non_embedding"],
        "params_mtp": 0,
        "params_mtp_active": 0,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(config),
        "kv_cache_dtype": "bfloat16",
        "flops_per_token": flops_per_token(config, params["matmul_active"], seq_len),
        "flops_seq_len": seq_len or config.max_position_embeddings,
        "encoder_layers": config.n_encoder_layers,
        "decoder_layers": config.num_hidden_layers,
    }
