"""DSA's long-sequence path, fast (model/attention/dsa.py's `chunked_sparse_attention`, same picks, same math).

The reference walks chunks of SELECT_CHUNK queries: the indexer scores the keys the chunk can see,
each query keeps its top-k, and attention runs over those picks, either as an additive mask in one
SDPA over every visible key or, once a chunk sees more than 16 x top-k keys, over gathered picks
(recomputed in backward by torch.utils.checkpoint). `sparse_attention` here computes the same
output with less work:

  * the chunks that see no more than top-k keys keep every causal key: they are one causal SDPA
    together (the fused kernel skips the blocks above the diagonal; the reference masks each chunk);
  * a chunk gathers its picks once it sees more than GATHER_FROM * top-k keys (the masked SDPA costs
    S_visible per query, the gathered one top-k at a lower rate per key);
  * `GatheredAttention` gathers GATHER_BYTES of picked keys at a time and keeps nothing of size
    T x K but the picks (int32): backward gathers again and recomputes the softmax, flash-style,
        dS = P * (dP - rowsum(P * dP)),  dq = scale dS K_sel,  dK_sel = scale dS^T q,  dV_sel = P^T dO,
    and adds dK_sel, dV_sel into dk, dv with one index_add per step;
  * values that are a prefix of the keys (MLA's absorbed form: the key is [c_KV ; k_R], the value
    c_KV) are passed as their width: the picks are gathered once and serve as both.

The indexer's scores are computed without autograd: the picks are indices, so no gradient reaches
the indexer through this path in the reference either. Which keys a query keeps is exactly the
reference's (the same scores, chunk by chunk, and the same `topk` call).

    >>> from nanoseek import ModelConfig
    >>> from nanoseek.model.attention.dsa import LightningIndexer
    >>> q, k = torch.randn(1, 2, 6, 8, requires_grad=True), torch.randn(1, 1, 6, 8)
    >>> picked, valid = torch.tensor([[[0, 1]] * 6]), torch.ones(1, 6, 2, dtype=torch.bool)
    >>> GatheredAttention.apply(q, k, None, 4, picked, valid, 0.5).grad_fn.name()
    'GatheredAttentionBackward'
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoseek.model.attention.core import causal_attention, sdpa
from nanoseek.model.attention.dsa import SELECT_CHUNK, LightningIndexer, causal_mask
from nanoseek.model.moe.experts import matmul_dtype

GATHER_FROM = 3  # a chunk gathers its picks once it sees more than GATHER_FROM * top-k keys
GATHER_BYTES = 16 << 20  # picked keys (and values) gathered per step of `GatheredAttention`


def gather_rows(x_BGSX: torch.Tensor) -> torch.Tensor:
    """(B * S, G, X): one row per (batch, position), what an index_select gathers (a view when G = 1)."""
    b, g, s, x = x_BGSX.shape
    return x_BGSX.transpose(1, 2).reshape(b * s, g, x)


class GatheredAttention(torch.autograd.Function):
    """softmax over each query's picked keys (model/attention/dsa.py's `gathered_attention`) in steps
    of GATHER_BYTES. q (B, H, T, X); k (B, G, S, X); v (B, G, S, V), or None with `d_v`: the values
    are k[..., :d_v]; picked (B, T, K) key indices, valid (B, T, K) whether each pick counts.
    Returns (B, H, T, V). Under autocast q, k, v are cast to its dtype and the body runs with it off."""

    @staticmethod
    def forward(ctx, q, k, v, d_v: int, picked, valid, scale: float):
        ctx.input_dtypes = (q.dtype, k.dtype, None if v is None else v.dtype)
        dtype = matmul_dtype(q)
        with torch.autocast(q.device.type, enabled=False):
            q, k = q.to(dtype), k.to(dtype)
            v = None if v is None else v.to(dtype)
            picked = picked.to(torch.int32)
            out = GatheredAttention.attend(q, k, v, d_v, picked, valid, scale)
        ctx.save_for_backward(q, k, v, picked, valid)
        ctx.meta = (d_v, scale)
        return out

    @staticmethod
    def steps(q, k, picked):
        """(first query, end query, flat key rows (B * n * K,)) per step of n queries."""
        b, _, t, _ = q.shape
        g, s, width = k.shape[1], k.shape[2], k.shape[-1]
        n_picks = picked.shape[-1]
        n = max(1, GATHER_BYTES // (b * n_picks * g * width * k.element_size()))
        batch_offset = (torch.arange(b, device=q.device, dtype=torch.int32) * s)[:, None, None]
        for a in range(0, t, n):
            z = min(t, a + n)
            yield a, z, (picked[:, a:z] + batch_offset).flatten()

    @staticmethod
    def step_probs(q_NGRX, k_sel_NGKX, valid_NK, scale: float):
        logits = torch.matmul(q_NGRX, k_sel_NGKX.transpose(-1, -2))
        logits = logits.float().mul_(scale).masked_fill_(~valid_NK[:, None, None, :], float("-inf"))
        return logits.softmax(-1).to(q_NGRX.dtype)

    @staticmethod
    def step_inputs(q, k_rows, v_rows, d_v, picked, valid, a, z, rows):
        """q, the gathered keys and values and valid of queries a..z, each with one batch dim N = B * n."""
        b, h, _, x = q.shape
        g = k_rows.shape[1]
        n_picks = picked.shape[-1]
        q_NGRX = q[:, :, a:z].transpose(1, 2).reshape(-1, g, h // g, x)
        k_sel_NGKX = k_rows.index_select(0, rows).view(-1, n_picks, g, x).transpose(1, 2)
        if v_rows is None:
            v_sel_NGKV = k_sel_NGKX[..., :d_v]
        else:
            v_sel_NGKV = v_rows.index_select(0, rows).view(-1, n_picks, g, d_v).transpose(1, 2)
        return q_NGRX, k_sel_NGKX, v_sel_NGKV, valid[:, a:z].reshape(-1, n_picks)

    @staticmethod
    def attend(q, k, v, d_v: int, picked, valid, scale: float):
        b, h, t, _ = q.shape
        g = k.shape[1]
        k_rows, v_rows = gather_rows(k), None if v is None else gather_rows(v)
        out_BTGRV = q.new_empty(b, t, g, h // g, d_v)
        for a, z, rows in GatheredAttention.steps(q, k, picked):
            q_NGRX, k_sel, v_sel, valid_NK = GatheredAttention.step_inputs(
                q, k_rows, v_rows, d_v, picked, valid, a, z, rows
            )
            probs = GatheredAttention.step_probs(q_NGRX, k_sel, valid_NK, scale)
            out_BTGRV[:, a:z] = torch.matmul(probs, v_sel).view(b, z - a, g, h // g, d_v)
        return out_BTGRV.view(b, t, h, d_v).transpose(1, 2)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, picked, valid = ctx.saved_tensors
        d_v, scale = ctx.meta
        b, h, t, x = q.shape
        g = k.shape[1]
        k_rows, v_rows = gather_rows(k), None if v is None else gather_rows(v)
        d_out_BTGRV = d_out.to(q.dtype).transpose(1, 2).reshape(b, t, g, h // g, d_v)
        dq_BTGRX = torch.empty(b, t, g, h // g, x, dtype=q.dtype, device=q.device)
        dk_rows = k_rows.new_zeros(k_rows.shape)
        dv_rows = None if v is None else v_rows.new_zeros(v_rows.shape)
        for a, z, rows in GatheredAttention.steps(q, k, picked):
            q_NGRX, k_sel, v_sel, valid_NK = GatheredAttention.step_inputs(
                q, k_rows, v_rows, d_v, picked, valid, a, z, rows
            )
            probs = GatheredAttention.step_probs(q_NGRX, k_sel, valid_NK, scale)
            do_NGRV = d_out_BTGRV[:, a:z].reshape(-1, g, h // g, d_v)
            dp = torch.matmul(do_NGRV, v_sel.transpose(-1, -2))
            ds = (dp - (probs * dp).sum(-1, keepdim=True)).mul_(probs).mul_(scale)
            dq_BTGRX[:, a:z] = torch.matmul(ds, k_sel).view(b, z - a, g, h // g, x)
            dk_sel_NGKX = torch.matmul(ds.transpose(-1, -2), q_NGRX)
            dv_sel_NGKV = torch.matmul(probs.transpose(-1, -2), do_NGRV)
            if dv_rows is None:
                dk_sel_NGKX[..., :d_v] += dv_sel_NGKV
            else:
                dv_rows.index_add_(0, rows, dv_sel_NGKV.transpose(1, 2).reshape(-1, g, d_v))
            dk_rows.index_add_(0, rows, dk_sel_NGKX.transpose(1, 2).reshape(-1, g, x))
        dq = dq_BTGRX.view(b, t, h, x).transpose(1, 2)
        dk = dk_rows.view(b, -1, g, x).transpose(1, 2)
        dv = None if dv_rows is None else dv_rows.view(b, -1, g, d_v).transpose(1, 2)
        q_dtype, k_dtype, v_dtype = ctx.input_dtypes
        return dq.to(q_dtype), dk.to(k_dtype), None if dv is None else dv.to(v_dtype), None, None, None, None


def sparse_attention(
    indexer: LightningIndexer, x_BTD, q_latent_BTQ, keys_BSI, rope, start: int, q_BHTX, k_BGSX, v, scale: float
) -> torch.Tensor:
    """`chunked_sparse_attention`, fast. `v` is the values (B, G, S, V) or an int d_v: the values are then
    k[..., :d_v] (MLA's absorbed form), gathered with the keys. The chunks fall in three runs, by the
    keys they see: at most top-k (dense, one causal attention), up to GATHER_FROM * top-k (masked
    SDPA per chunk), more (one `GatheredAttention` over all of them)."""
    t, x_width = q_BHTX.shape[2], q_BHTX.shape[-1]
    topk = indexer.topk
    shared = isinstance(v, int)
    d_v = v if shared else v.shape[-1]
    if shared:  # attend with v = k: each output column depends only on its own value column
        v_wide = k_BGSX
    else:  # the fused kernel needs equal widths: pad the values once
        v_wide = F.pad(v, (0, x_width - d_v)) if d_v < x_width else v
    chunks = [(a, min(t, a + SELECT_CHUNK)) for a in range(0, t, SELECT_CHUNK)]  # the reference's chunks
    dense_end = max((z for _, z in chunks if start + z <= topk), default=0)
    gather_start = max(dense_end, min((a for a, z in chunks if start + z > GATHER_FROM * topk), default=t))
    # q split once, not sliced per chunk (each slice's backward would zero-fill a gradient of all of q)
    q_dense, q_mask, q_gather = q_BHTX.split([dense_end, gather_start - dense_end, t - gather_start], dim=2)
    outs = []
    if dense_end:
        s = start + dense_end
        outs.append(causal_attention(q_dense, k_BGSX[:, :, :s], v_wide[:, :, :s], start, scale)[..., :d_v])
    for a, q_chunk in zip(range(dense_end, gather_start, SELECT_CHUNK), q_mask.split(SELECT_CHUNK, dim=2)):
        s = start + a + q_chunk.shape[2]
        picked, valid = chunk_picks(indexer, x_BTD, q_latent_BTQ, keys_BSI, rope, start, a, a + q_chunk.shape[2])
        keep = torch.full((*picked.shape[:2], s), float("-inf"), dtype=q_chunk.dtype, device=q_chunk.device)
        keep.scatter_(-1, picked, torch.zeros_like(picked, dtype=keep.dtype).masked_fill_(~valid, float("-inf")))
        out = sdpa(q_chunk, k_BGSX[:, :, :s], v_wide[:, :, :s], attn_mask=keep[:, None], scale=scale)
        outs.append(out[..., :d_v])
    if gather_start < t:
        chunks = [
            chunk_picks(indexer, x_BTD, q_latent_BTQ, keys_BSI, rope, start, a, min(t, a + SELECT_CHUNK))
            for a in range(gather_start, t, SELECT_CHUNK)
        ]
        picked = torch.cat([p.to(torch.int32) for p, _ in chunks], dim=1)
        valid = torch.cat([m for _, m in chunks], dim=1)
        del chunks
        outs.append(GatheredAttention.apply(q_gather, k_BGSX, None if shared else v, d_v, picked, valid, scale))
    return torch.cat(outs, dim=2)


@torch.no_grad()
def chunk_picks(indexer: LightningIndexer, x_BTD, q_latent_BTQ, keys_BSI, rope, start: int, a: int, z: int):
    """(picked (B, C, K), valid (B, C, K)) of queries a..z: the reference's scores and top-k over the
    keys the chunk sees; a pick is invalid where a row has fewer causal keys than K."""
    cos, sin = rope
    visible = start + z
    causal = causal_mask(start + a, z - a, visible, x_BTD.device)
    scores = indexer.scores(x_BTD[:, a:z], q_latent_BTQ[:, a:z], keys_BSI[:, :visible], (cos[a:z], sin[a:z]))
    top = scores.masked_fill_(~causal, float("-inf")).topk(indexer.topk, dim=-1, sorted=False)
    return top.indices, top.values > float("-inf")
