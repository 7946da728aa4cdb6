"""Multi-head latent attention (MLA, DeepSeek-V2/V3).

Per token t and head i (D = hidden, C = kv_lora_rank, R = qk_rope_head_dim):
    c_Q = RMSNorm(W_DQ h)                        (or a direct projection when q_lora_rank is unset)
    [q_C_i ; q_R_i] = W_UQ c_Q,        q_R_i = RoPE(q_R_i)
    [c_KV ; k_R] = W_DKV h,            c_KV = RMSNorm(c_KV),  k_R = RoPE(k_R)   (k_R shared by all heads)
    [k_C_i ; v_i] = W_UKV c_KV,        k_i = [k_C_i ; k_R],   q_i = [q_C_i ; q_R_i]
    o_i = softmax(q_i . k_j * scale) v_j,    out = W_O [o_1 .. o_H]
with scale = (d_nope + d_rope)^-0.5, times mscale^2 under YaRN.

The KV cache holds only c_KV (C) and k_R (R) per token. Decoding uses the absorbed form: since
q_C_i . k_C_i = (W_UK_i^T q_C_i) . c_KV, the key up-projection folds into the query and attention
runs as multi-query attention over the latent itself,
    o_i = W_UV_i (softmax([W_UK_i^T q_C_i ; q_R_i] . [c_KV ; k_R] * scale) c_KV),
so the per-head keys and values are never materialized. Training and prefill use the expanded form.
A "sliding" layer attends to its last `sliding_window` keys; a "dsa" layer to the keys its
lightning indexer selects (attention/dsa.py).

Weights carry Hugging Face names (`q_a_proj`, `q_a_layernorm`, `q_b_proj`/`q_proj`,
`kv_a_proj_with_mqa`, `kv_a_layernorm`, `kv_b_proj`, `o_proj`); q heads are laid out [nope | rope].

    >>> from nanoseek.model.position import RotaryEmbedding
    >>> cfg = ModelConfig.from_preset("deepseek-v3-tiny")
    >>> rope = RotaryEmbedding(cfg)(torch.arange(5))
    >>> MultiHeadLatentAttention(cfg)(torch.randn(1, 5, cfg.hidden_size), rope).shape
    torch.Size([1, 5, 64])
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.attention.core import allowed_keys, attention_probs, causal_attention, layer_window
from nanoseek.model.attention.dsa import (
    SELECT_CHUNK,
    LightningIndexer,
    causal_mask,
    chunked_sparse_attention,
    gathered_attention,
    indexer_kl,
)
from nanoseek.model.kv_cache import LatentKVCache
from nanoseek.model.norm import RMSNorm
from nanoseek.model.position import apply_rope, softmax_scale
from nanoseek.model.side_outputs import SideOutputs

LATENT_NORM_EPS = 1e-6  # HF builds q_a_layernorm / kv_a_layernorm with the default eps


DECODE_GATHER_ROWS = 4  # DSA queries past the cache up to which a step gathers its picks (decode, draft checks)


def is_decoding(start) -> bool:
    """True when queries follow cached positions (per-row positions always do)."""
    return isinstance(start, torch.Tensor) or start > 0


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        d, h = config.hidden_size, config.num_attention_heads
        self.window = layer_window(config, layer)
        self.n_heads = h
        self.nope, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.latent_dim = config.kv_lora_rank
        self.interleave = config.rope_interleave
        self.scale = softmax_scale(config, self.nope + self.rope_dim)
        self.dropout = config.attention_dropout
        self.absorb = True  # absorbed decode; False = expand cached latents (for testing)
        bias = config.attention_bias
        q_out = h * (self.nope + self.rope_dim)
        if config.q_lora_rank:
            self.q_a_proj = nn.Linear(d, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(config.q_lora_rank, q_out, bias=False)
        else:
            self.q_proj = nn.Linear(d, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.latent_dim + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.latent_dim, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.latent_dim, h * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_dim, d, bias=bias)
        self.indexer = LightningIndexer(config) if config.layer_sparse(layer) == "dsa" else None
        self.indexed = self.indexer is not None
        self.dsa_warmup = False  # a training phase (Transformer.set_dsa_warmup): dense while the indexer learns
        self.long_prefill = SELECT_CHUNK  # DSA inference over more queries: chunked (attention/dsa.py)

    def make_cache(self, batch: int, max_len: int, dtype, device) -> LatentKVCache:
        index_dim = self.indexer.head_dim if self.indexer is not None else 0
        return LatentKVCache(batch, max_len, self.latent_dim, self.rope_dim, dtype, device, index_dim)

    def query(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The query projection (B, T, H * d_qk) and the query latent c^Q (None without q_lora)."""
        if hasattr(self, "q_proj"):
            return self.q_proj(x), None
        q_latent = self.q_a_layernorm(self.q_a_proj(x))
        return self.q_b_proj(q_latent), q_latent

    def forward(
        self,
        x_BTD: torch.Tensor,
        rope,
        cache: LatentKVCache | None = None,
        start: int | torch.Tensor = 0,
        side: SideOutputs | None = None,
    ) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). A DSA layer given `side` (training) appends its indexer's loss there."""
        b, t, _ = x_BTD.shape
        cos, sin = rope
        q_BTX, q_latent_BTQ = self.query(x_BTD)
        q_BHTQ = q_BTX.view(b, t, self.n_heads, -1).transpose(1, 2)
        q_nope_BHTN, q_rope_BHTR = q_BHTQ.split([self.nope, self.rope_dim], dim=-1)
        q_rope_BHTR = apply_rope(q_rope_BHTR, cos, sin, self.interleave)
        latent_BTC, k_rope_BTR = self.kv_a_proj_with_mqa(x_BTD).split([self.latent_dim, self.rope_dim], dim=-1)
        latent_BTC = self.kv_a_layernorm(latent_BTC)
        k_rope_BTR = apply_rope(k_rope_BTR, cos, sin, self.interleave)
        # the indexer learns only from its own loss: its inputs are detached
        index_keys_BTI = self.indexer.keys(x_BTD.detach(), rope) if self.indexer is not None else None
        if cache is not None:
            latent_BTC, k_rope_BTR, index_keys_BTI = cache.update(start, latent_BTC, k_rope_BTR, index_keys_BTI)
        keep, scores = None, None
        if (
            self.indexer is not None
            and not self.training
            and not self.dsa_warmup
            and t > self.long_prefill
            and not isinstance(start, torch.Tensor)
        ):
            o_BHTV = self.attend_long_sparse(
                q_nope_BHTN, q_rope_BHTR, latent_BTC, k_rope_BTR, start, x_BTD, q_latent_BTQ, index_keys_BTI, rope
            )
            return self.o_proj(o_BHTV.transpose(1, 2).reshape(b, t, self.n_heads * self.v_dim))
        if self.indexer is not None and self.training and not self.dsa_warmup and cache is None:
            o_BHTV = self.attend_sparse_training(
                q_nope_BHTN, q_rope_BHTR, latent_BTC, k_rope_BTR, start, x_BTD, q_latent_BTQ, index_keys_BTI, rope, side
            )
            return self.o_proj(o_BHTV.transpose(1, 2).reshape(b, t, self.n_heads * self.v_dim))
        if self.indexer is not None:
            s = latent_BTC.shape[1]
            causal = causal_mask(start, t, s, x_BTD.device).expand(b, t, s)
            scores = self.indexer.scores(x_BTD.detach(), q_latent_BTQ.detach(), index_keys_BTI, rope)
            decode_picks = cache is not None and is_decoding(start) and self.absorb and not self.dsa_warmup
            if decode_picks and t <= DECODE_GATHER_ROWS and s > self.indexer.topk:
                key_BSX = cache.key[:, :s]
                o_BHTV = self.attend_picked(q_nope_BHTN, q_rope_BHTR, latent_BTC, k_rope_BTR, scores, causal, key_BSX)
                return self.o_proj(o_BHTV.transpose(1, 2).reshape(b, t, self.n_heads * self.v_dim))
            keep = causal if self.dsa_warmup else self.indexer.select(scores.detach(), causal)  # picks: no graph
        if cache is not None and is_decoding(start) and self.absorb:
            key_BSX = cache.key[:, : latent_BTC.shape[1]]  # [c_KV ; k_R] as stored: no concatenation
            o_BHTV = self.attend_absorbed(q_nope_BHTN, q_rope_BHTR, latent_BTC, k_rope_BTR, start, keep, key_BSX)
        else:
            o_BHTV = self.attend_expanded(q_nope_BHTN, q_rope_BHTR, latent_BTC, k_rope_BTR, start, keep, scores, side)
        return self.o_proj(o_BHTV.transpose(1, 2).reshape(b, t, self.n_heads * self.v_dim))

    def attend_expanded(
        self,
        q_nope_BHTN,
        q_rope_BHTR,
        latent_BSC,
        k_rope_BSR,
        start,
        keep=None,
        scores=None,
        side: SideOutputs | None = None,
    ):
        """Materialize per-head keys and values from the latents, then SDPA; with the indexer's `scores`
        and a `side`, also its distillation loss."""
        q, k, v_BHSV = self.expanded_inputs(q_nope_BHTN, q_rope_BHTR, latent_BSC, k_rope_BSR)
        dropout = self.dropout if self.training else 0.0
        if scores is not None and side is not None and torch.is_grad_enabled():
            side.index_losses.append(self.distillation_loss(q, k, keep, scores))
        return self.attend(q, k, v_BHSV, start, dropout, keep)

    def attend(self, q, k, v, start, dropout: float, keep) -> torch.Tensor:
        """Causal attention of q over k, v: within the layer's window, or over the kept keys (`keep`); the
        kernels' subclass (kernels/dsa.py) runs a window as tiles on the CPU."""
        return causal_attention(q, k, v, start, self.scale, dropout, self.window, keep)

    def expanded_inputs(self, q_nope_BHTN, q_rope_BHTR, latent_BSC, k_rope_BSR):
        """(q (B, H, T, N+R), k (B, H, S, N+R), v (B, H, S, V)): per-head keys and values from the latents."""
        b, s, _ = latent_BSC.shape
        kv_BHSX = self.kv_b_proj(latent_BSC).view(b, s, self.n_heads, -1).transpose(1, 2)
        k_nope_BHSN, v_BHSV = kv_BHSX.split([self.nope, self.v_dim], dim=-1)
        k_rope_BHSR = k_rope_BSR[:, None].expand(b, self.n_heads, s, self.rope_dim)
        q = torch.cat([q_nope_BHTN, q_rope_BHTR], dim=-1)
        return q, torch.cat([k_nope_BHSN, k_rope_BHSR], dim=-1), v_BHSV

    def attend_sparse_training(
        self, q_nope_BHTN, q_rope_BHTR, latent_BSC, k_rope_BSR, start, x_BTD, q_latent_BTQ, index_keys_BSI, rope, side
    ):
        """DSA's sparse training phase: the indexer scores every causal pair, each query keeps its top-k
        as a mask over all of them (expanded SDPA), and with a `side` the indexer's KL over the kept keys."""
        b, t, _ = x_BTD.shape
        s = latent_BSC.shape[1]
        causal = causal_mask(start, t, s, x_BTD.device).expand(b, t, s)
        scores = self.indexer.scores(x_BTD.detach(), q_latent_BTQ.detach(), index_keys_BSI, rope)
        keep = self.indexer.select(scores.detach(), causal)  # picks: no graph
        return self.attend_expanded(q_nope_BHTN, q_rope_BHTR, latent_BSC, k_rope_BSR, start, keep, scores, side)

    @torch.no_grad()
    def attention_map(self, x_BTD: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights (B, H, T, T), allowed keys (B, T, T): the window, or the indexer's selection)."""
        b, t, _ = x_BTD.shape
        q_BTX, q_latent_BTQ = self.query(x_BTD)
        q_BHTQ = q_BTX.view(b, t, self.n_heads, -1).transpose(1, 2)
        q_nope, q_rope = q_BHTQ.split([self.nope, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x_BTD).split([self.latent_dim, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_rope = apply_rope(k_rope, *rope, self.interleave)
        kv = self.kv_b_proj(latent).view(b, t, self.n_heads, -1).transpose(1, 2)
        k_nope = kv[..., : self.nope]
        q = torch.cat([q_nope, apply_rope(q_rope, *rope, self.interleave)], dim=-1)
        k = torch.cat([k_nope, k_rope[:, None].expand(b, self.n_heads, t, self.rope_dim)], dim=-1)
        allowed = allowed_keys(t, self.window, x_BTD.device).expand(b, t, t)
        if self.indexer is not None:
            scores = self.indexer.scores(x_BTD, q_latent_BTQ, self.indexer.keys(x_BTD, rope), rope)
            allowed = self.indexer.select(scores, allowed.contiguous())
        return attention_probs(q, k, allowed[:, None], self.scale), allowed

    def distillation_loss(self, q_BHTX, k_BHSX, keep_BTS, scores_BTS) -> torch.Tensor:
        """KL from the (head-summed) attention over the kept keys to the indexer's distribution."""
        with torch.no_grad():
            logits = torch.matmul(q_BHTX.float(), k_BHSX.float().transpose(-1, -2)) * self.scale
            probs = torch.softmax(logits.masked_fill(~keep_BTS[:, None], float("-inf")), dim=-1)
        return indexer_kl(probs, scores_BTS, keep_BTS)

    def absorbed_inputs(self, q_nope_BHTN, q_rope_BHTR, latent_BSC, k_rope_BSR, key_BSX=None):
        """The absorbed query [W_UK^T q_C ; q_R] (B, H, T, C+R), the single key head [c_KV ; k_R]
        (B, 1, S, C+R), given as `key_BSX` when the cache already holds it joined."""
        w_uk_HNC = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.latent_dim)[:, : self.nope]
        q_latent_BHTC = torch.matmul(q_nope_BHTN, w_uk_HNC.to(q_nope_BHTN.dtype))  # per head: (T, N) @ (N, C)
        q = torch.cat([q_latent_BHTC, q_rope_BHTR], dim=-1)
        k = key_BSX if key_BSX is not None else torch.cat([latent_BSC, k_rope_BSR], dim=-1)
        return q, k[:, None]

    def expand_output(self, o_latent_BHTC):
        """W_UV applied after attention over the latent values."""
        w_uv_HVC = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.latent_dim)[:, self.nope :]
        return torch.matmul(o_latent_BHTC, w_uv_HVC.to(o_latent_BHTC.dtype).transpose(-1, -2))  # (T, C) @ (C, V)

    def attend_absorbed(self, q_nope_BHTN, q_rope_BHTR, latent_BSC, k_rope_BSR, start, keep=None, key_BSX=None):
        """Fold W_UK into the query and W_UV after attention: MQA over [c_KV ; k_R]."""
        q, k = self.absorbed_inputs(q_nope_BHTN, q_rope_BHTR, latent_BSC, k_rope_BSR, key_BSX)
        o_latent_BHTC = self.attend(q, k, latent_BSC[:, None], start, 0.0, keep)
        return self.expand_output(o_latent_BHTC)

    def attend_picked(self, q_nope_BHTN, q_rope_BHTR, latent_BSC, k_rope_BSR, scores_BTS, causal_BTS, key_BSX):
        """DSA decode: absorbed MQA over only the top-k cached latents each query picks (gathered), so a
        step reads k rows of the cache, not all S; the keys `LightningIndexer.pick` chooses."""
        q, k = self.absorbed_inputs(q_nope_BHTN, q_rope_BHTR, latent_BSC, k_rope_BSR, key_BSX)
        picked_BTK, valid_BTK = self.indexer.pick(scores_BTS, causal_BTS)
        o_latent_BHTC = gathered_attention(q, k, latent_BSC[:, None], picked_BTK, valid_BTK, self.scale)
        return self.expand_output(o_latent_BHTC)

    def attend_long_sparse(
        self, q_nope_BHTN, q_rope_BHTR, latent_BSC, k_rope_BSR, start, x_BTD, q_latent_BTQ, index_keys_BSI, rope
    ):
        """DSA prefill of many tokens: absorbed MQA over each query's gathered top-k latents."""
        q, k = self.absorbed_inputs(q_nope_BHTN, q_rope_BHTR, latent_BSC, k_rope_BSR)
        o_latent_BHTC = chunked_sparse_attention(
            self.indexer, x_BTD, q_latent_BTQ, index_keys_BSI, rope, start, q, k, latent_BSC[:, None], self.scale
        )
        return self.expand_output(o_latent_BHTC)
