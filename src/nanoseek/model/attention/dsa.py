"""DeepSeek Sparse Attention (V3.2): a lightning indexer picks the keys each query attends to.

Per query t and key s (H_I indexer heads of width d_I, much smaller than the attention's):
    q^I_{t,h} = W^{IQ}_h c^Q_t            (c^Q = the MLA query latent, q_a_layernorm(q_a_proj(x)))
    k^I_s     = LayerNorm(W^{IK} x_s)     (one key per token, shared by the indexer heads)
    RoPE, half-split, on the first qk_rope_head_dim dims of q^I and k^I
    w_{t,h}   = (W^w x_t)_h / sqrt(H_I)
    I_{t,s}   = sum_h w_{t,h} ReLU(q^I_{t,h} . k^I_s / sqrt(d_I))          (fp32)
    S_t       = top-k_s { I_{t,s} : s <= t },   k = index_topk   (ties at the k-th score: the earliest keys)
MLA then attends only to S_t (all other keys masked). With k >= t + 1 every causal key is kept,
so the layer equals dense MLA exactly.

Training (DeepSeek-V3.2 report): the indexer learns by distillation from the main attention,
    L_I = sum_t KL( p_t || softmax_s(I_{t,s}) ),   p_t = normalize(sum_h P^{attn}_{h,t,:}),
first in a dense warm-up (attention dense, only the indexer trained), then during sparse training
over S_t only; the indexer's inputs are detached so L_I trains the indexer alone.

Weights carry the HF names: `indexer.wq_b`, `indexer.wk`, `indexer.k_norm` (LayerNorm with bias,
eps 1e-6), `indexer.weights_proj`. The indexer keys k^I are cached like the MLA latents.

    >>> cfg = ModelConfig.from_preset("deepseek-v32-tiny")
    >>> LightningIndexer(cfg).wq_b.weight.shape
    torch.Size([64, 24])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nanoseek.config import ModelConfig
from nanoseek.model.attention.core import sdpa
from nanoseek.model.position import apply_rope

INDEX_NORM_EPS = 1e-6


class LightningIndexer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = config.index_n_heads, config.index_head_dim
        self.rope_dim, self.topk = config.qk_rope_head_dim, config.index_topk
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=INDEX_NORM_EPS)
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False)

    def rotate(self, x: torch.Tensor, cos, sin) -> torch.Tensor:
        rot, rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat([apply_rope(rot, cos, sin, interleave=False), rest], dim=-1)

    def keys(self, x_BTD: torch.Tensor, rope) -> torch.Tensor:
        """k^I (B, T, d_I) of the new tokens, rotated at their positions."""
        return self.rotate(self.k_norm(self.wk(x_BTD)), *rope)

    def scores(self, x_BTD: torch.Tensor, q_latent_BTQ: torch.Tensor, keys_BSI: torch.Tensor, rope) -> torch.Tensor:
        """I (B, T, S) in fp32 (under autocast in its dtype: the products run under it), before any mask."""
        b, t, _ = x_BTD.shape
        q_BXI, w_N1H = self.queries(x_BTD, q_latent_BTQ, rope)
        # one GEMM over the (t, h) rows, then per query the heads' weighted sum as a batched (1 x H) @ (H x S)
        dots_BXS = torch.matmul(q_BXI, keys_BSI.float().transpose(-1, -2))
        return torch.bmm(w_N1H, dots_BXS.relu_().view(b * t, self.n_heads, -1)).view(b, t, -1)

    def queries(self, x_BTD: torch.Tensor, q_latent_BTQ: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """(q^I rotated, as (B, T H, d_I) rows, and the head weights w / sqrt(d_I) as (B T, 1, H)), fp32:
        relu(a z) = a relu(z) for a > 0 moves 1/sqrt(d_I) into the weights."""
        b, t, _ = x_BTD.shape
        cos, sin = rope
        q_BTHI = self.wq_b(q_latent_BTQ).view(b, t, self.n_heads, self.head_dim)
        q_BTHI = self.rotate(q_BTHI.transpose(1, 2), cos, sin).transpose(1, 2)
        w_N1H = self.weights_proj(x_BTD).float().view(b * t, 1, self.n_heads) * (self.n_heads * self.head_dim) ** -0.5
        return q_BTHI.float().reshape(b, t * self.n_heads, -1), w_N1H

    def pick(self, scores_BTS: torch.Tensor, causal_BTS: torch.Tensor):
        """(picked (B, T, K), valid (B, T, K)): the top-k causal keys of each query by score, K =
        min(top-k, S), ties going to the earliest key (`earliest_topk`: a query picks the same keys
        whatever follows it, so a prefill, a longer prefill and a decode step agree); a pick is
        invalid where a row has fewer than K causal keys."""
        k = min(self.topk, scores_BTS.shape[-1])
        masked = scores_BTS.masked_fill(~causal_BTS, float("-inf"))
        picked = earliest_topk(masked, k)
        return picked, masked.gather(-1, picked) > float("-inf")

    def select(self, scores_BTS: torch.Tensor, causal_BTS: torch.Tensor) -> torch.Tensor:
        """Boolean keep-mask (B, T, S): the top-k causal keys of each query (`pick` as a mask)."""
        picked_BTK, _ = self.pick(scores_BTS, causal_BTS)
        keep = torch.zeros_like(causal_BTS).scatter_(-1, picked_BTK, True)
        return keep & causal_BTS  # rows with fewer than k causal keys picked some masked ones


def earliest_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (..., k), in no particular order, of the k largest fp32 scores along the last dim,
    ties at the k-th score going to the lower index (the indexers' ReLU scores tie at 0 often; -inf
    marks what a query cannot see), so that the picks of a query do not depend on the keys after it.

    Eagerly, one float top-k of k + 1: when the (k+1)-th score differs from the k-th, the first k
    are the answer; the rows where they tie (rare on real scores) are redone from the whole row:
    every score above the tied one, then the earliest ties. Inside a compiled graph (no data-
    dependent branches), `earliest_topk_keyed`. Equal sets (tested)."""
    if torch.compiler.is_compiling() or k >= scores.shape[-1]:
        return earliest_topk_keyed(scores, k)
    scores = scores.float()  # (-0.0 and 0.0 compare equal here)
    top = scores.topk(k + 1, dim=-1, sorted=False)
    last = top.values.amin(-1, keepdim=True)  # the (k+1)-th score
    ties = (top.values == last).sum(-1) > 1  # it ties with a kept one: which of them is ambiguous
    indices = top.indices  # drop the (k+1)-th: the last entry moves into its place, then is cut off
    indices.scatter_(-1, top.values.argmin(-1, keepdim=True), indices[..., -1:].clone())
    picked = indices[..., :k]
    if ties.any():
        rows = ties.nonzero(as_tuple=True)
        row_scores, row_last = scores[rows], last[rows]
        above, tied = row_scores > row_last, row_scores == row_last
        room = k - above.sum(-1, keepdim=True)
        chosen = above | (tied & (tied.cumsum(-1) <= room))
        picked[rows] = chosen.nonzero()[:, -1].view(-1, k)
    return picked


def earliest_topk_keyed(scores: torch.Tensor, k: int) -> torch.Tensor:
    """`earliest_topk` as one int64 top-k (no branches, for compiled graphs): the score's bits made
    order-preserving, then the index (reversed) in the low 32 bits."""
    bits = (scores.float() + 0.0).contiguous().view(torch.int32).long()  # + 0.0: -0.0 ties with 0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    index = torch.arange(scores.shape[-1], device=scores.device)
    return (ordered * (1 << 32) + (0xFFFFFFFF - index)).topk(k, dim=-1).indices


def causal_mask(start, t: int, s: int, device) -> torch.Tensor:
    """(T, S) or, for per-row positions, (B, T, S): key s visible from query t."""
    key_pos = torch.arange(s, device=device)
    if isinstance(start, torch.Tensor):
        return (key_pos[None, None, :] <= start[:, None, None]).expand(-1, t, -1)
    query_pos = torch.arange(start, start + t, device=device)
    return key_pos[None, :] <= query_pos[:, None]


def indexer_kl(attn_probs_BHTS: torch.Tensor, scores_BTS: torch.Tensor, keep_BTS: torch.Tensor) -> torch.Tensor:
    """Mean over queries of KL(head-summed attention || softmax of the indexer over the kept keys)."""
    target = attn_probs_BHTS.detach().float().sum(1)
    target = target / target.sum(-1, keepdim=True).clamp_min(1e-20)
    log_q = torch.log_softmax(scores_BTS.masked_fill(~keep_BTS, float("-inf")), dim=-1)
    terms = torch.where(keep_BTS & (target > 0), target * (target.clamp_min(1e-20).log() - log_q), 0.0)
    return terms.sum(-1).mean()


# ---------------------------------------------------------------------------- long sequences

SELECT_CHUNK = 256  # queries scored and attended per step on the long-sequence path
GATHER_FROM = 16  # a chunk gathers its picks once it sees more than GATHER_FROM * top-k keys


def gathered_attention(q_BHTX, k_BGSX, v_BGSV, picked_BTK, valid_BTK, scale: float) -> torch.Tensor:
    """softmax over each query's own selected keys only: gather them, never touch the rest.

    q (B, H, T, X); k, v (B, G, S, .) with G key/value heads (G divides H; MLA's absorbed form has
    G = 1); picked (B, T, K) key indices and valid (B, T, K) whether each pick is a causal key.
    Cost T * K per head instead of T * S; the gather is one index_select (its backward an index_add)."""
    b, h, t, _ = q_BHTX.shape
    g = k_BGSX.shape[1]
    # advanced indexing reads only the picked rows, also from a strided view (a cache's first S
    # positions); flattening such a view to rows first would copy all of it
    batch = torch.arange(b, device=picked_BTK.device)[:, None, None]
    k_sel = k_BGSX.transpose(1, 2)[batch, picked_BTK]  # (B, T, K, G, X)
    v_sel = v_BGSV.transpose(1, 2)[batch, picked_BTK]
    q_BTGRX = q_BHTX.transpose(1, 2).reshape(b, t, g, h // g, -1)
    logits = torch.einsum("btgrx,btkgx->btgrk", q_BTGRX, k_sel) * scale
    logits = logits.masked_fill(~valid_BTK[:, :, None, None], float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1).to(v_sel.dtype)
    out = torch.einsum("btgrk,btkgv->btgrv", probs, v_sel)
    return out.reshape(b, t, h, -1).transpose(1, 2)


def chunked_sparse_attention(
    indexer: LightningIndexer, x_BTD, q_latent_BTQ, keys_BSI, rope, start: int, q_BHTX, k_BGSX, v_BGSV, scale: float
) -> torch.Tensor:
    """DSA for long sequences, per chunk of C queries: score only the keys up to the chunk's end,
    take the top-k, and attend to the picks through a (C, S_visible) mask in one fused SDPA (no
    T x S score matrix, nothing kept for backward but the mask). A chunk that sees no more keys
    than top-k keeps every causal key and skips the indexer; one that sees more than
    GATHER_FROM * top-k gathers its picks instead (cost T * K, not T * S; recomputed in backward)."""
    t, d_v = x_BTD.shape[1], v_BGSV.shape[-1]
    cos, sin = rope
    if d_v != q_BHTX.shape[-1]:  # the fused kernel needs equal widths: pad the values once
        v_wide = F.pad(v_BGSV, (0, q_BHTX.shape[-1] - d_v))
    else:
        v_wide = v_BGSV
    outs = []
    # q split once, not sliced per chunk (each slice's backward would zero-fill a gradient of all of q)
    for a, q_chunk in zip(range(0, t, SELECT_CHUNK), q_BHTX.split(SELECT_CHUNK, dim=2)):
        bnd = min(t, a + SELECT_CHUNK)
        visible = start + bnd  # keys any query of the chunk can see
        causal = causal_mask(start + a, bnd - a, visible, x_BTD.device)
        if visible <= indexer.topk:
            keep = causal.expand(x_BTD.shape[0], -1, -1)
        else:
            scores = indexer.scores(
                x_BTD[:, a:bnd], q_latent_BTQ[:, a:bnd], keys_BSI[:, :visible], (cos[a:bnd], sin[a:bnd])
            )
            picked, valid = indexer.pick(scores, causal)
            if visible > GATHER_FROM * indexer.topk:
                outs.append(
                    gathered_chunk(q_chunk, k_BGSX[:, :, :visible], v_BGSV[:, :, :visible], picked, valid, scale)
                )
                continue
            # the picks as an additive mask built directly (a boolean one is converted by SDPA: one
            # more pass over C x S_visible)
            bias = torch.zeros_like(valid, dtype=q_chunk.dtype).masked_fill_(~valid, float("-inf"))
            keep = torch.full_like(scores, float("-inf"), dtype=q_chunk.dtype).scatter_(-1, picked, bias)
        out = sdpa(q_chunk, k_BGSX[:, :, :visible], v_wide[:, :, :visible], attn_mask=keep[:, None], scale=scale)
        outs.append(out[..., :d_v])
    return torch.cat(outs, dim=2)


def gathered_chunk(q, k, v, picked, valid, scale: float) -> torch.Tensor:
    """`gathered_attention`; under autograd the gathered keys are recomputed in backward, not kept."""
    if torch.is_grad_enabled():
        return checkpoint(gathered_attention, q, k, v, picked, valid, scale, use_reentrant=False)
    return gathered_attention(q, k, v, picked, valid, scale)
