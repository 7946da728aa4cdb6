"""DSA's long-sequence path and its sparse training step, fast (model/attention/dsa.py's
`chunked_sparse_attention` and MLA's `attend_sparse_training`: same picks, same math).

The reference walks chunks of SELECT_CHUNK queries: the indexer scores the keys the chunk can see,
each query keeps its top-k, and attention runs over those picks, either as an additive mask in one
SDPA over every visible key or, once a chunk sees more than 16 x top-k keys, over gathered picks
(recomputed in backward by torch.utils.checkpoint). `sparse_attention` here computes the same
output with less work:

  * the chunks that see no more than top-k keys keep every causal key: they are one causal SDPA
    together (the fused kernel skips the blocks above the diagonal; the reference masks each chunk);
  * a chunk gathers its picks once it sees more than GATHER_FROM * top-k keys (the masked SDPA costs
    S_visible per query, the gathered one top-k at a lower rate per key);
  * `GatheredAttention` keeps nothing of size T x K but the picks (int32): backward reads the picks
    again and recomputes the softmax, flash-style,
        dS = P * (dP - rowsum(P * dP)),  dq = scale dS K_sel,  dK_sel = scale dS^T q,  dV_sel = P^T dO.
    On fp32 CPU tensors it runs the C++ kernel csrc/gathered_attention.cpp (kernels/native.py builds
    it on first use): per query it reads its picked rows where they lie, up to 64 at a time, with an
    online softmax, and keeps the logsumexp for backward; queries go in blocks of up to 64 (of one
    key head) that walk the keys a segment at a time, so a segment's rows come from memory once per
    block and from the cache for every query of the block that picked them.
    Elsewhere (other dtypes, no compiler) it gathers one query's picks at a time into a reused
    buffer for plain matrix products and adds dK_sel, dV_sel into dk, dv with one index_add per query;
  * values that are a prefix of the keys (MLA's absorbed form: the key is [c_KV ; k_R], the value
    c_KV) are passed as their width: the picks are gathered once and serve as both.

In a prefill the indexer's scores are computed without autograd: the picks are indices, so no
gradient reaches the indexer through that path in the reference either. Which keys a query keeps
is the reference's: the same scores, chunk by chunk, in the dtype the reference's products take
(fp32, or under autocast its dtype, as `LightningIndexer.scores` runs its matmuls there too; bit
for bit where a chunk's products fit one block of keys, `scores_into`; past that to rounding, ~1e-7
relative in fp32, so a key whose score is that close to the k-th can take its place, as between any
two BLAS builds), and the same
`earliest_topk` call, or on the CPU the C++ radix select csrc/indexer_topk.cpp, which picks the
same keys from the same scores, ties included (tested).

Sparse training (`SparseLatentAttention.attend_sparse_training`): the reference masks a T x T SDPA
with the picks and takes the indexer's KL over the kept keys from T x T logits. Here the scores of
every pair only pick (no autograd, `training_picks`), attention runs `GatheredAttention` over the
picks (expanded heads, G = H), the KL target is the attention's weights at the picks
(`picked_attention`, absorbed form) and the indexer's scores are recomputed with autograd at the
picks only (`picked_index_scores`): KL(p || softmax over the picks) is the same function of the
same scores.

    >>> q, k = torch.randn(1, 2, 6, 8, requires_grad=True), torch.randn(1, 1, 6, 8)
    >>> picked, valid = torch.tensor([[[0, 1]] * 6]), torch.ones(1, 6, 2, dtype=torch.bool)
    >>> GatheredAttention.apply(q, k, None, 4, picked, valid, 0.5).grad_fn.name()
    'GatheredAttentionBackward'
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanoseek.kernels.native import bf16_kernels
from nanoseek.kernels.native import load as load_kernel
from nanoseek.kernels.window import tiled_window
from nanoseek.model.attention.core import causal_attention, sdpa
from nanoseek.model.attention.dsa import SELECT_CHUNK, LightningIndexer, causal_mask, indexer_kl
from nanoseek.model.attention.mla import MultiHeadLatentAttention
from nanoseek.model.moe.experts import matmul_dtype

# a chunk gathers its picks once it sees more than GATHER_FROM * top-k keys: on one Zen-1 core (fp32, 8 heads
# of 512 on one key head, top-2048) the C++ kernel's query costs what a masked SDPA row over ~1.5 x top-k
# keys costs (1.6 against 1.6 ms at 3K keys, 1.8 against 2.2 ms at 4K)
GATHER_FROM = 1.5


class SparseLatentAttention(MultiHeadLatentAttention):
    """MultiHeadLatentAttention whose long DSA prefill runs `sparse_attention` on the CPU: absorbed MQA
    over [c_KV ; k_R] with c_KV, the keys' prefix, as the values (gathered once). Its per-query loop
    would be tens of thousands of kernel launches on a GPU, so other devices keep the reference's
    batched chunks; a compiled prefill runs it outside the graph (its host-side loop cannot be traced)."""

    def attend(self, q, k, v, start, dropout: float, keep) -> torch.Tensor:
        """A sliding window as tiles on the CPU (kernels/window.py); everything else the reference's."""
        out = tiled_window(self, q, k, v, start, dropout, keep)
        return super().attend(q, k, v, start, dropout, keep) if out is None else out

    @torch.compiler.disable
    def attend_long_sparse(
        self, q_nope_BHTN, q_rope_BHTR, latent_BSC, k_rope_BSR, start, x_BTD, q_latent_BTQ, index_keys_BSI, rope
    ):
        if q_nope_BHTN.device.type != "cpu":
            return super().attend_long_sparse(
                q_nope_BHTN, q_rope_BHTR, latent_BSC, k_rope_BSR, start, x_BTD, q_latent_BTQ, index_keys_BSI, rope
            )
        q, k = self.absorbed_inputs(q_nope_BHTN, q_rope_BHTR, latent_BSC, k_rope_BSR)
        o_latent_BHTC = sparse_attention(
            self.indexer, x_BTD, q_latent_BTQ, index_keys_BSI, rope, start, q, k, self.latent_dim, self.scale
        )
        return self.expand_output(o_latent_BHTC)

    def attend_sparse_training(
        self, q_nope_BHTN, q_rope_BHTR, latent_BSC, k_rope_BSR, start, x_BTD, q_latent_BTQ, index_keys_BSI, rope, side
    ):
        """The reference's sparse training step with each query's top-k gathered: the indexer's scores
        over every causal pair without autograd (only the picks are used), the attention through
        `GatheredAttention` (T x K pairs, not T x S), and the KL over the picks (the reference's
        `indexer_kl` on the kept keys), its indexer scores recomputed at the picks with autograd.
        The same values and gradients as the reference in fp32 (tested); under bf16 autocast the
        C++ kernel computes in bf16 where the CPU has AVX-512 BF16, else in fp32 (tested no further
        from fp32 than the reference's bf16 step). Other devices and dtypes, no C++ kernel, dropout,
        windows and compiled graphs keep the reference."""
        s = latent_BSC.shape[1]
        if (  # fp32 or bf16 on the CPU with the C++ kernel built (PyTorch's per-query loop would be slower)
            torch.compiler.is_compiling()  # a compiled training step stays one graph: the reference
            or matmul_dtype(q_nope_BHTN) not in (torch.float32, torch.bfloat16)
            or native_ops(q_nope_BHTN.new_empty(0, dtype=torch.float32)) is None
            or isinstance(start, torch.Tensor)
            or start != 0
            or s <= self.indexer.topk
            or self.dropout > 0
            or self.window is not None
        ):
            return super().attend_sparse_training(
                q_nope_BHTN, q_rope_BHTR, latent_BSC, k_rope_BSR, start, x_BTD, q_latent_BTQ, index_keys_BSI, rope, side
            )
        picked, valid = training_picks(self.indexer, x_BTD, q_latent_BTQ, index_keys_BSI, rope)
        q, k, v_BHSV = self.expanded_inputs(q_nope_BHTN, q_rope_BHTR, latent_BSC, k_rope_BSR)
        if side is not None and torch.is_grad_enabled():
            with torch.no_grad():
                q_abs, key = self.absorbed_inputs(q_nope_BHTN, q_rope_BHTR, latent_BSC, k_rope_BSR)
            target = picked_attention(q_abs, key[:, 0], picked, valid, self.scale)
            scores = picked_index_scores(
                self.indexer, x_BTD.detach(), q_latent_BTQ.detach(), index_keys_BSI, rope, picked
            )
            side.index_losses.append(indexer_kl(target[:, None], scores, valid))
        return GatheredAttention.apply(q, k, v_BHSV, self.v_dim, picked.to(torch.int32), valid, self.scale)


class GatheredAttention(torch.autograd.Function):
    """softmax over each query's picked keys (model/attention/dsa.py's `gathered_attention`), one
    query at a time: q (B, H, T, X); k (B, G, S, X); v (B, G, S, V), or None with `d_v` (the values
    are then k[..., :d_v]); picked (B, T, K) key indices, valid (B, T, K) whether each pick counts;
    sinks (H,) or None: V4's per-head sink logits, one more weight in each head's softmax whose value
    is zero (the kernel starts each row from it; their gradient, -sum_t p_sink (dO . O), from the
    kernel's D). Returns (B, H, T, V). On the CPU the C++ kernel (`native_forward`, `native_backward`).
    Otherwise, per query and key head the picks are gathered into one reused (K, X)
    buffer and its R = H / G heads go through plain matrix products with the picks as the long side,
    (K, X) @ (X, R) then (R, K) @ (K, V) (batched products over queries, and fresh gathered tensors,
    ran at half the speed on CPU). Nothing of size T x K is kept but the picks (int32): backward
    gathers again and recomputes the softmax. Under autocast q, k, v are cast to its dtype and the
    body runs with autocast off. The C++ kernel takes bf16 where it is built for AVX-512 BF16
    (`bf16_kernels`: its products by vdpbf16ps, P and dS rounded to bf16 as bf16 matrix products
    round them, every sum fp32: forward 1.8-2.0x, backward 1.4-1.8x its fp32 speed on a Zen-4
    core); elsewhere it computes bf16 and fp16 in fp32 (the PyTorch path in bf16 ran DSA's 16K
    backward at half the fp32 kernel's speed). The output comes back in the compute dtype, the
    gradients in the inputs' dtypes."""

    @staticmethod
    def forward(ctx, q, k, v, d_v: int, picked, valid, scale: float, sinks=None):
        ctx.input_dtypes = (q.dtype, k.dtype, None if v is None else v.dtype)
        wide = torch.promote_types(q.dtype, torch.float32)  # the sinks' logits: fp32, or fp64 for fp64 inputs
        sink_logits = None if sinks is None else sinks.detach().to(torch.promote_types(sinks.dtype, wide))
        out_dtype = matmul_dtype(q)
        ops = None  # the C++ kernel: bf16 where built for it, else fp32 (also for bf16 and fp16)
        if out_dtype in (torch.float32, torch.bfloat16, torch.float16):
            ops = native_ops(q.new_empty(0, dtype=torch.float32))
        dtype = out_dtype if ops is None or out_dtype == torch.bfloat16 and bf16_kernels() else torch.float32
        with torch.autocast(q.device.type, enabled=False):
            q = q.to(dtype)  # as it lies: the kernel reads q's rows through its strides
            k = k.to(dtype)
            v = None if v is None else v.to(dtype)
            picked = picked.to(torch.int32)
            if ops is not None:  # the C++ kernel keeps its picks' layout (and the softmax's logsumexp)
                out, saved = native_forward(ops, q, k, v, d_v, picked, valid, scale, sink_logits)
                out = out.to(out_dtype)
            else:
                out = GatheredAttention.attend(q, k, v, d_v, picked, valid, scale, sink_logits)
                saved = (q, k, v, picked, valid, sink_logits)
        ctx.save_for_backward(*saved)
        ctx.meta = (d_v, scale, ops, q.shape, k.shape, None if v is None else v.shape)
        return out

    @staticmethod
    def rows(q_BHTX, picked, valid, g: int):
        """Per (batch, query, key head): (row number, b, g, the query's R heads (R, X), its picks (K,),
        the (K, 1) mask of its invalid picks or None)."""
        b, h, t, x = q_BHTX.shape
        q_rows = q_BHTX.transpose(1, 2).contiguous().view(b * t * g, h // g, x).unbind(0)
        picks = picked.reshape(b * t, -1).unbind(0)
        complete = valid.all(-1).flatten().tolist()
        for i, (idx, full) in enumerate(zip(picks, complete)):
            hidden = None if full else ~valid.reshape(b * t, -1)[i, :, None]
            for gi in range(g):
                yield i * g + gi, i // t, gi, q_rows[i * g + gi], idx, hidden

    @staticmethod
    def probs(k_sel_KX, q_RX, hidden, scale: float, sink_R=None):
        """softmax over the picks (K, R), the logits as (K, X) @ (X, R) (the faster orientation); with
        sinks, over the picks and one more logit per head whose value is zero: (K + 1, R), the sink last."""
        logits = torch.mm(k_sel_KX, q_RX.T).to(torch.promote_types(q_RX.dtype, torch.float32)).mul_(scale)
        if hidden is not None:
            logits.masked_fill_(hidden, float("-inf"))
        if sink_R is not None:
            logits = torch.cat([logits, sink_R[None].to(logits.dtype)])
        return logits.softmax(0).to(q_RX.dtype)

    @staticmethod
    def attend(q, k, v, d_v: int, picked, valid, scale: float, sinks=None):
        b, h, t, x = q.shape
        g, n_picks = k.shape[1], picked.shape[-1]
        out_BTHV = q.new_empty(b, t, h, d_v)
        out_rows = out_BTHV.view(b * t * g, h // g, d_v).unbind(0)
        k_sel = q.new_empty(n_picks, x)  # reused: a fresh one per query costs page faults
        v_sel = k_sel[:, :d_v] if v is None else q.new_empty(n_picks, d_v)
        sink_GR = None if sinks is None else sinks.view(g, -1)
        for row, bi, gi, q_RX, idx, hidden in GatheredAttention.rows(q, picked, valid, g):
            torch.index_select(k[bi, gi], 0, idx, out=k_sel)
            if v is not None:
                torch.index_select(v[bi, gi], 0, idx, out=v_sel)
            probs_KR = GatheredAttention.probs(k_sel, q_RX, hidden, scale, None if sinks is None else sink_GR[gi])
            torch.mm(probs_KR[:n_picks].T, v_sel, out=out_rows[row])
        return out_BTHV.transpose(1, 2)

    @staticmethod
    def backward(ctx, d_out):
        """Flash-style, per query: dS = P * (dP - colsum(P * dP)) (the (K, R) layout), dq = scale dS^T
        K_sel, dK_sel = scale dS q (+ P dO where the values are the keys' prefix: one product of
        [dS, P] and [q ; dO]), dV_sel = P dO,
        added into dk, dv at the picks' rows (index_add)."""
        d_v, scale, ops = ctx.meta[:3]
        if ops is not None:
            return native_backward(ctx, ops, d_out)
        q, k, v, picked, valid, sinks = ctx.saved_tensors
        b, h, t, x = q.shape
        g, n_picks = k.shape[1], picked.shape[-1]
        do_rows = d_out.to(q.dtype).transpose(1, 2).contiguous().view(b * t * g, h // g, d_v).unbind(0)
        dq_BTHX = q.new_empty(b, t, h, x)
        dq_rows = dq_BTHX.view(b * t * g, h // g, x).unbind(0)
        dk = torch.zeros_like(k, memory_format=torch.contiguous_format)
        dv = None if v is None else torch.zeros_like(v, memory_format=torch.contiguous_format)
        k_sel, dk_sel = q.new_empty(n_picks, x), q.new_empty(n_picks, x)
        v_sel = k_sel[:, :d_v] if v is None else q.new_empty(n_picks, d_v)
        dv_sel = None if v is None else q.new_empty(n_picks, d_v)
        sink_GR = None if sinks is None else sinks.view(g, -1)
        d_sinks = None if sinks is None else torch.zeros_like(sink_GR)
        for row, bi, gi, q_RX, idx, hidden in GatheredAttention.rows(q, picked, valid, g):
            torch.index_select(k[bi, gi], 0, idx, out=k_sel)
            if v is not None:
                torch.index_select(v[bi, gi], 0, idx, out=v_sel)
            probs_KR = GatheredAttention.probs(k_sel, q_RX, hidden, scale, None if sinks is None else sink_GR[gi])
            if sinks is not None:  # the sink's weight, then the picks' (K, R)
                probs_KR, sink_p_R = probs_KR[:n_picks], probs_KR[n_picks]
            do_RV = do_rows[row]
            dp_KR = torch.mm(v_sel, do_RV.T)
            d_R = (probs_KR * dp_KR).sum(0, keepdim=True)  # D = dO . O (the sink's value is zero)
            if sinks is not None:  # d s_h = p_sink (0 - D)
                d_sinks[gi] -= sink_p_R.to(d_sinks.dtype) * d_R[0].to(d_sinks.dtype)
            ds_KR = (dp_KR - d_R).mul_(probs_KR).mul_(scale)
            torch.mm(ds_KR.T, k_sel, out=dq_rows[row])
            if v is None:  # dK_sel = [dS, P] @ [q ; dO]: the value gradient joins the key's in one product
                do_RX = F.pad(do_RV, (0, x - d_v)) if d_v < x else do_RV
                torch.mm(torch.cat([ds_KR, probs_KR], 1), torch.cat([q_RX, do_RX]), out=dk_sel)
            else:
                torch.mm(ds_KR, q_RX, out=dk_sel)
                dv[bi, gi].index_add_(0, idx, torch.mm(probs_KR, do_RV, out=dv_sel))
            dk[bi, gi].index_add_(0, idx, dk_sel)
        q_dtype, k_dtype, v_dtype = ctx.input_dtypes
        dq = dq_BTHX.transpose(1, 2).to(q_dtype)
        d_sinks = None if d_sinks is None else d_sinks.flatten()
        return dq, dk.to(k_dtype), None if dv is None else dv.to(v_dtype), None, None, None, None, d_sinks


def native_ops(q: torch.Tensor):
    """The C++ kernel (csrc/gathered_attention.cpp) for fp32 CPU tensors, and bf16 ones where it is
    built for AVX-512 BF16, where it builds; else None."""
    if q.device.type != "cpu" or not (q.dtype == torch.float32 or q.dtype == torch.bfloat16 and bf16_kernels()):
        return None
    return load_kernel("gathered_attention")


def native_topk(scores: torch.Tensor):
    """The C++ top-k (csrc/indexer_topk.cpp) for fp32, bf16 or fp16 scores on the CPU, where it
    builds; else None. It takes fp32: bf16 and fp16 scores go in widened (`widened`, exactly)."""
    if scores.device.type != "cpu" or scores.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    return load_kernel("indexer_topk")


def native_forward(ops, q, k, v, d_v: int, picked, valid, scale: float, sinks=None):
    """GatheredAttention's forward in C++: (out (B, H, T, V), what backward needs). The kernel reads q
    (B, H, T, X) through its strides (a (batch, query, key head) row's R heads lie a head's stride
    apart: no transposed copy), k and v as (B G, S, .), picks as (B T, K)."""
    b, h, t, x = q.shape
    g = k.shape[1]
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_heads = k.reshape(b * g, -1, x).contiguous()
    v_heads = None if v is None else v.reshape(b * g, -1, d_v).contiguous()
    picks, ok = picked.reshape(b * t, -1).contiguous(), valid.reshape(b * t, -1).contiguous()
    sinks = None if sinks is None else sinks.float().contiguous()
    out, lse = ops.gathered_attention(q, k_heads, v_heads, d_v, picks, ok, scale, sinks)
    return out, (q, k_heads, v_heads, picks, ok, out, lse, sinks)


def native_backward(ctx, ops, d_out):
    """GatheredAttention's backward in C++ (flash-style, from the saved logsumexp)."""
    q, k_heads, v_heads, picks, ok, out, lse, sinks = ctx.saved_tensors
    d_v, scale, _, q_shape, k_shape, v_shape = ctx.meta
    d_out = d_out.to(q.dtype)  # read through its strides, as q
    d_out = d_out if d_out.stride(-1) == 1 else d_out.contiguous()
    dq, dk, dv, d_o = ops.gathered_attention_backward(q, k_heads, v_heads, d_v, picks, ok, scale, out, lse, d_out)
    q_dtype, k_dtype, v_dtype = ctx.input_dtypes
    dq = dq.to(q_dtype)
    dk = dk.view(k_shape).to(k_dtype)
    dv = None if v_shape is None else dv.view(v_shape).to(v_dtype)
    d_sinks = None
    if sinks is not None:  # d s_h = sum over rows of p_sink (0 - D), p_sink = exp(s_h - lse)
        g = k_shape[1]
        sink_GR = sinks.view(1, g, -1)
        lse_NGR = lse.view(-1, g, sink_GR.shape[-1])
        p_sink = torch.exp(sink_GR - lse_NGR).masked_fill_(lse_NGR == float("-inf"), 0.0)  # no key, no sink
        d_sinks = -(p_sink * d_o.view(-1, g, sink_GR.shape[-1])).sum(0).flatten()
    return dq, dk, dv, None, None, None, None, d_sinks


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
    scratch = Scratch(x_BTD.device, start + t)
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
        picked, valid = chunk_picks(
            indexer, x_BTD, q_latent_BTQ, keys_BSI, rope, start, a, a + q_chunk.shape[2], scratch
        )
        keep = torch.full((*picked.shape[:2], s), float("-inf"), dtype=q_chunk.dtype, device=q_chunk.device)
        keep.scatter_(-1, picked, torch.zeros_like(picked, dtype=keep.dtype).masked_fill_(~valid, float("-inf")))
        out = sdpa(q_chunk, k_BGSX[:, :, :s], v_wide[:, :, :s], attn_mask=keep[:, None], scale=scale)
        outs.append(out[..., :d_v])
    if gather_start < t:
        per_chunk = [
            chunk_picks(indexer, x_BTD, q_latent_BTQ, keys_BSI, rope, start, a, min(t, a + SELECT_CHUNK), scratch)
            for a in range(gather_start, t, SELECT_CHUNK)
        ]
        picked = torch.cat([p.to(torch.int32) for p, _ in per_chunk], dim=1)
        valid = torch.cat([m for _, m in per_chunk], dim=1)
        del per_chunk
        outs.append(GatheredAttention.apply(q_gather, k_BGSX, None if shared else v, d_v, picked, valid, scale))
    return torch.cat(outs, dim=2)


@torch.no_grad()
def training_picks(indexer: LightningIndexer, x_BTD, q_latent_BTQ, keys_BSI, rope):
    """(picked (B, T, K), valid (B, T, K)) for a whole sequence from position 0, K = top-k: `chunk_picks`
    chunk by chunk (the reference's scores, its top-k), a chunk that sees fewer than K keys padded
    with invalid picks of key 0."""
    t = x_BTD.shape[1]
    scratch = Scratch(x_BTD.device, t)
    picks, masks = [], []
    for a in range(0, t, SELECT_CHUNK):
        z = min(t, a + SELECT_CHUNK)
        picked, valid = chunk_picks(indexer, x_BTD, q_latent_BTQ, keys_BSI, rope, 0, a, z, scratch)
        short = indexer.topk - picked.shape[-1]
        picks.append(F.pad(picked.long(), (0, short)))
        masks.append(F.pad(valid, (0, short)))
    return torch.cat(picks, dim=1), torch.cat(masks, dim=1)


def flat_picks(picked_BTK: torch.Tensor, s: int) -> torch.Tensor:
    """Picks as row numbers of the keys flattened to (B S, .): one index_select reads them (advanced
    indexing on (B, S, .) with a batch index ran several times slower, its backward slower still)."""
    offsets = torch.arange(picked_BTK.shape[0], device=picked_BTK.device)[:, None, None] * s
    return (picked_BTK + offsets).flatten()


PICK_CHUNK_BYTES = 8 << 20  # gathered rows per step of the training path's per-pick products (reused heap, not
# fresh mappings: past glibc's 32 MiB mmap threshold each new tensor's pages are zero-filled on first touch)


def row_chunks(rows: int, per_row_bytes: int):
    """(first, end) row ranges of at most PICK_CHUNK_BYTES of gathered data each."""
    step = max(1, PICK_CHUNK_BYTES // max(1, per_row_bytes))
    return [(a, min(rows, a + step)) for a in range(0, rows, step)]


@torch.no_grad()
def picked_attention(q_BHTX, key_BSX, picked_BTK, valid_BTK, scale: float) -> torch.Tensor:
    """The attention's weights over each query's picks, summed over heads and normalized (B, T, K):
    the indexer's distillation target on the kept keys (the reference's `distillation_loss`). MLA's
    absorbed form: q (B, H, T, X) the absorbed queries, key (B, S, X) the one key head [c_KV ; k_R],
    so each pick is one row for every head. By chunks of queries."""
    b, h, t, x = q_BHTX.shape
    k = picked_BTK.shape[-1]
    keys = key_BSX.reshape(-1, x)
    q_rows = q_BHTX.transpose(1, 2).reshape(b * t, h, x)
    rows, ok = flat_picks(picked_BTK, key_BSX.shape[1]).view(b * t, k), valid_BTK.reshape(b * t, 1, k)
    target = torch.empty(b * t, k, dtype=torch.float32, device=q_BHTX.device)
    for a, z in row_chunks(b * t, k * x * keys.element_size()):
        k_sel = keys.index_select(0, rows[a:z].flatten()).view(z - a, k, x)
        logits = torch.bmm(q_rows[a:z], k_sel.transpose(1, 2)).mul_(scale).masked_fill_(~ok[a:z], float("-inf"))
        probs = torch.softmax(logits, dim=-1).sum(1)
        target[a:z] = probs / probs.sum(-1, keepdim=True).clamp_min(1e-20)
    return target.view(b, t, k)


def picked_index_scores(indexer: LightningIndexer, x_BTD, q_latent_BTQ, keys_BSI, rope, picked_BTK) -> torch.Tensor:
    """The indexer's I (B, T, K) at each query's picks only, with autograd: its `scores` formula,
    sum_h w_h relu(q_h . k_s), on T x K pairs instead of T x S. By chunks of rows, each recomputed in
    backward (the gathered keys are not kept)."""
    b, t, _ = x_BTD.shape
    s, k = keys_BSI.shape[1], picked_BTK.shape[-1]
    q_BXI, w_N1H = indexer.queries(x_BTD, q_latent_BTQ, rope)
    q_rows = q_BXI.view(b * t, indexer.n_heads, -1)
    keys = keys_BSI.float().reshape(b * s, -1)
    rows = flat_picks(picked_BTK, s).view(b * t, k)
    parts = [
        checkpoint(scores_at_picks, q_rows[a:z], w_N1H[a:z], keys, rows[a:z], use_reentrant=False)
        for a, z in row_chunks(b * t, k * keys.shape[-1] * keys.element_size())
    ]
    return torch.cat(parts).view(b, t, k)


def scores_at_picks(q_NHI, w_N1H, keys_SI, rows_NK) -> torch.Tensor:
    """sum_h w_h relu(q_h . k) for each row's picked keys: (N, K)."""
    k_sel = keys_SI.index_select(0, rows_NK.flatten()).view(*rows_NK.shape, -1)
    return torch.bmm(w_N1H, torch.bmm(q_NHI, k_sel.transpose(1, 2)).relu_()).squeeze(1)


class Scratch:
    """Storage the chunks' scores reuse (fp32, or the dtype the indexer's products take under
    autocast). A chunk's scores are (256, S) floats, 64 MiB at 64K keys in fp32 (its products, a
    block of keys at a time, take a buffer of DOTS_BYTES): allocated afresh per chunk, each would be a
    new mapping whose pages the kernel zero-fills on first touch (34 of 94 ms for 64 MiB at 16K, one
    Zen-3 core). A buffer shaped (..., S) of each dtype is allocated once, for S up to `max_keys`."""

    def __init__(self, device: torch.device, max_keys: int):
        self.device, self.max_keys, self.flat = device, max_keys, {}

    def take(self, name: str, shape: tuple[int, ...], widest: int | None = None, dtype=torch.float32) -> torch.Tensor:
        """A (..., keys) view of buffer `name` in `dtype`, allocated for `widest` keys per row (max_keys
        if not given: a block of keys' buffers need only the widest block)."""
        *lead, keys = shape
        widest = self.max_keys if widest is None else widest
        if keys > widest or widest > self.max_keys:
            raise ValueError(f"scratch {name!r}: {keys} keys, more than the {self.max_keys} it was sized for")
        rows = 1
        for d in lead:
            rows *= d
        key = (name, dtype)
        if key not in self.flat or self.flat[key].numel() < rows * keys:
            self.flat[key] = torch.empty(rows * widest, device=self.device, dtype=dtype)
        return self.flat[key][: rows * keys].view(shape)


DOTS_BYTES = 1 << 20  # the indexer's q . k products per step of `scores_into`: a block of keys whose
# (rows, keys) fp32 products stay in L2 while they are rectified and weighted. At 64K keys, 1,024 rows
# (256 queries x 4 heads of 128), one Zen-4 core: 212 ms a chunk in blocks of 256 keys against 270-285
# ms in one product over every key (its 256 MiB written, rectified and read again from memory)


def key_blocks(s: int, rows: int) -> list[tuple[int, int]]:
    """(first, end) key ranges for `scores_into`: DOTS_BYTES of products each, a multiple of 64 keys, the
    last one taking the remainder (every block but a whole row of fewer keys is >= 64 keys wide:
    products 1 or 3 keys wide took another code path in the BLAS, further from the one product's)."""
    step = max(64, DOTS_BYTES // (4 * max(1, rows)) // 64 * 64)
    starts = list(range(0, max(1, s - step + 1), step)) if s > step else [0]
    return [(a, starts[i + 1] if i + 1 < len(starts) else s) for i, a in enumerate(starts)]


def scores_into(scratch: Scratch, q_BXI: torch.Tensor, w: torch.Tensor, keys_BSI: torch.Tensor) -> torch.Tensor:
    """An indexer's sum_h w_h relu(q_h . k_s) in `scratch`'s buffers, by the ops its `scores` runs, a
    block of keys at a time (`key_blocks`): q (B, C H, d) rows; the head weights w (..., 1, H) in the
    shape the indexer multiplies them in (DSA: (B C, 1, H), CSA: (B, C, 1, H)); keys (B, S, d).
    Returns (..., 1, S), overwritten by the next chunk's, in the dtype the indexer's own products take:
    fp32, or under autocast its dtype (the reference's `scores` runs its matmuls under autocast: the
    same products, so the same picks). In one block the values are `scores`' bit for bit; in several,
    to rounding (~1e-7 relative in fp32: the BLAS may sum a product of another width, or of a width
    that is not a multiple of 4, in another order; tested)."""
    s, heads = keys_BSI.shape[1], w.shape[-1]
    dtype = q_BXI.dtype if q_BXI.dtype == torch.float64 else matmul_dtype(q_BXI)  # autocast leaves fp64 alone
    q_BXI, w = q_BXI.to(dtype), w.to(dtype)
    keys_BSI = keys_BSI if keys_BSI.dtype == dtype else keys_BSI.float().to(dtype)  # the reference's keys.float()
    scores = scratch.take("scores", (*w.shape[:-1], s), dtype=dtype)
    blocks = key_blocks(s, q_BXI.shape[1])
    widest = max(z - a for a, z in blocks)
    for a, z in blocks:
        dots = scratch.take("dots", (q_BXI.shape[0], q_BXI.shape[1], z - a), widest, dtype)
        torch.matmul(q_BXI, keys_BSI[:, a:z].transpose(-1, -2), out=dots)
        block = scratch.take("block", (*w.shape[:-1], z - a), widest, dtype)
        torch.matmul(w, dots.relu_().view(*w.shape[:-2], heads, z - a), out=block)
        scores[..., a:z] = block
    return scores


def widened(scores: torch.Tensor, scratch: Scratch | None) -> torch.Tensor:
    """fp32 scores for the C++ top-k: as they are, or bf16 / fp16 ones widened (exactly) into a reused buffer."""
    if scores.dtype == torch.float32:
        return scores
    if scratch is None:
        return scores.float()
    return scratch.take("widened", scores.shape).copy_(scores)


def chunk_scores(indexer: LightningIndexer, x_BCD, q_latent_BCQ, keys_BSI, rope, scratch: Scratch | None):
    """`indexer.scores`, into `scratch`'s buffers when given (`scores_into`)."""
    if scratch is None:
        return indexer.scores(x_BCD, q_latent_BCQ, keys_BSI, rope)
    b, c, _ = x_BCD.shape
    return scores_into(scratch, *indexer.queries(x_BCD, q_latent_BCQ, rope), keys_BSI).view(b, c, -1)


@torch.no_grad()
def chunk_picks(
    indexer: LightningIndexer, x_BTD, q_latent_BTQ, keys_BSI, rope, start: int, a: int, z: int, scratch=None
):
    """(picked (B, C, K), valid (B, C, K)) of queries a..z: the reference's scores and top-k over the
    keys the chunk sees; a pick is invalid where a row has fewer causal keys than K. On the CPU the
    top-k is csrc/indexer_topk.cpp's radix select (the same picks as `earliest_topk`, in ascending
    order, with no causal mask built: 51 against 239 ms for 256 queries over 49K keys, one Zen-1 core).
    With `scratch` the scores go into its reused buffers (`chunk_scores`)."""
    cos, sin = rope
    visible = start + z
    # detached first: a view taken under no_grad of a tensor that requires grad still requires it (with
    # no grad_fn), which module hooks that watch gradients (ModuleTracker) refuse
    x_BTD, q_latent_BTQ, keys_BSI = x_BTD.detach(), q_latent_BTQ.detach(), keys_BSI.detach()
    scores = chunk_scores(
        indexer, x_BTD[:, a:z], q_latent_BTQ[:, a:z], keys_BSI[:, :visible], (cos[a:z], sin[a:z]), scratch
    )
    ops = native_topk(scores)
    if ops is not None:  # query i of the chunk sees keys 0..start + a + i
        return ops.indexer_topk(widened(scores, scratch), start + a + 1, min(indexer.topk, visible))
    return indexer.pick(scores, causal_mask(start + a, z - a, visible, x_BTD.device))
