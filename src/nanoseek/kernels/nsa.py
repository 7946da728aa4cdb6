"""NSA's compressed branch in chunks of queries, p recomputed in backward (model/attention/nsa.py's math).

    o_t = sum_j p_tj v^cmp_j,   p_t = softmax_j(q_t . k^cmp_j * scale) over the blocks complete at t

The reference (`compressed_block_attention`) holds p (B, H, T, n) whole, and autograd keeps it for
backward. `CompressedBlockAttention` goes over chunks of CMP_CHUNK queries, each against only the
blocks its last query can see (about half the causal work skipped), and keeps nothing of size T x n:
backward recomputes p from q and k^cmp, flash-style,
    dS = P * (dP - rowsum(dO * O)),   dq = scale dS k,   dk = scale dS^T q,   dv = P^T dO.
`ChunkedNativeSparseAttention` (installed for NativeSparseAttention when `ModelConfig.kernels`) runs
its compressed branch through it; everything else is the reference's.

    >>> q, kv = torch.randn(1, 2, 8, 4, requires_grad=True), torch.randn(1, 1, 2, 4)
    >>> out, probs = CompressedBlockAttention.apply(q, kv, kv, 0, 4, 0.5, True)
    >>> out.grad_fn.name(), tuple(probs.shape)
    ('CompressedBlockAttentionBackward', (1, 1, 8, 2))
"""

from __future__ import annotations

import torch

from nanoseek.kernels.block_attention import block_sparse_attention, sliding_window_attention, tiles_pay
from nanoseek.kernels.dsa import GatheredAttention, native_ops
from nanoseek.model.attention.nsa import NativeSparseAttention, visible_blocks
from nanoseek.model.moe.experts import matmul_dtype

CMP_CHUNK = 1024  # queries per step of the compressed branch (bounds its (C, n) score tiles)


class ChunkedNativeSparseAttention(NativeSparseAttention):
    """NativeSparseAttention whose compressed branch runs `CompressedBlockAttention` and whose selected
    branch, for query groups smaller than a block, runs DSA's gathered kernel over each query's
    picked tokens (`selected_tokens`)."""

    def block_attention(self, q, k_blocks, v_blocks, start: int, with_probs: bool):
        return CompressedBlockAttention.apply(q, k_blocks, v_blocks, start, self.block, self.scale, with_probs)

    def window_attention(self, q, k, v, start: int):
        """The window branch as a sliding window's tiles where they pay (kernels/block_attention.py's
        `sliding_window_attention`: on the CPU, eagerly, a window shorter than the keys, heads folded
        into at least 256 rows), else the reference's banded SDPA."""
        return sliding_window_attention(q, k, v, start, self.window, self.scale)

    def selected_attention(self, q, k, v, p_cmp, start: int):
        """The reference's per-query-block SDPA over each block's picks as `block_sparse_attention`
        tiles on the CPU (groups smaller than a block: `selected_attention_by_group`)."""
        if self.query_group < self.block or not tiles_pay(q):
            return super().selected_attention(q, k, v, p_cmp, start)
        l = self.block
        first, last = start // l, (start + q.shape[2] - 1) // l
        blocks, valid = self.pick_blocks(p_cmp, first, last - first + 1)
        return block_sparse_attention(q, k, v, blocks, valid, start, l, self.scale)

    def selected_attention_by_group(self, q, k, v, p_cmp, start: int):
        """The reference's masked or gathered SDPA over each group's picked blocks, as `GatheredAttention`
        over each query's picked tokens: T x K l work (the masked form's is T x S), nothing kept for
        backward but the picks. On the CPU with the C++ kernel, eagerly, in fp32 (and bf16 where the kernel
        takes it: `native_ops`); elsewhere the reference."""
        if torch.compiler.is_compiling() or native_ops(q) is None:  # compiled graphs: the reference, no break
            return super().selected_attention_by_group(q, k, v, p_cmp, start)
        b, h, t, d = q.shape
        g, s, d_v = self.n_kv_heads, k.shape[2], v.shape[-1]
        picked, valid = self.selected_tokens(p_cmp, start, t, s)  # (B, G, T, K l)
        out = GatheredAttention.apply(
            q.reshape(b * g, h // g, t, d),
            k.reshape(b * g, 1, s, d),
            v.reshape(b * g, 1, s, d_v),
            d_v,
            picked.flatten(0, 1),
            valid.flatten(0, 1),
            self.scale,
        )
        return out.reshape(b, h, t, d_v)

    def selected_tokens(self, p_cmp, start: int, t: int, s: int):
        """(picked (B, G, T, K l) int32 key positions, valid): each query's group's K blocks as tokens
        (`choose_blocks`), valid where the block is a real pick and the token is a key (< s) not after
        the query. Invalid picks point at key 0."""
        l, m = self.block, self.query_group
        first = start // l
        own = first + torch.arange(p_cmp.shape[2], device=p_cmp.device) * m // l  # each group's query block
        blocks, block_ok = self.choose_blocks(p_cmp, own)  # (B, G, groups, K)
        query_pos = torch.arange(start, start + t, device=p_cmp.device)
        group_of = (query_pos - first * l) // m
        offsets = torch.arange(l, dtype=torch.int32, device=p_cmp.device)
        token = (blocks.to(torch.int32)[:, :, group_of, :, None] * l + offsets).flatten(-2)  # (B, G, T, K l)
        ok = block_ok[:, :, group_of].repeat_interleave(l, dim=-1)
        ok &= (token <= query_pos[:, None]) & (token < s)
        return token.masked_fill_(~ok, 0), ok


def chunk_probs(q_BGRCd, k_BGnd, start: int, block: int, scale: float) -> torch.Tensor:
    """model/attention/nsa.py's `block_probs` for one chunk, in place on its logits (no autograd here)."""
    b, g, r, c, d = q_BGRCd.shape
    n = k_BGnd.shape[2]
    logits = torch.matmul(q_BGRCd.reshape(b, g, r * c, d), k_BGnd.transpose(-1, -2)).view(b, g, r, c, n)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    visible = visible_blocks(start, c, block, n, q_BGRCd.device)
    blind = ~visible.any(-1, keepdim=True)  # (C, 1): all-masked rows would give NaN
    probs = logits.mul_(scale).masked_fill_(~(visible | blind), float("-inf")).softmax(-1)
    return probs.masked_fill_(blind, 0.0) if bool(blind[0]) else probs


def compressed_chunks(start: int, t: int, block: int, n: int):
    """(first query, end query, blocks the chunk's last query sees) per chunk with any complete block."""
    for a in range(0, t, CMP_CHUNK):
        z = min(t, a + CMP_CHUNK)
        m = min(n, (start + z) // block)
        if m:
            yield a, z, m


class CompressedBlockAttention(torch.autograd.Function):
    """(o (B, H, T, d_v), p summed over each KV group's heads (B, G, T, n) in fp32, no gradient) from
    q (B, H, T, d) and k, v (B, G, n, .): `compressed_block_attention` in chunks. Under autocast q, k
    and v are cast to its dtype first and the body runs with autocast off, so backward (which
    autocast never reaches) meets the dtypes forward used; the gradients come back in the inputs'
    dtypes."""

    @staticmethod
    def forward(ctx, q, k_blocks, v_blocks, start: int, block: int, scale: float, with_probs: bool):
        ctx.input_dtypes = (q.dtype, k_blocks.dtype, v_blocks.dtype)
        dtype = matmul_dtype(q)
        with torch.autocast(q.device.type, enabled=False):
            q, k_blocks, v_blocks = (x.to(dtype) for x in (q, k_blocks, v_blocks))
            return CompressedBlockAttention.attend(ctx, q, k_blocks, v_blocks, start, block, scale, with_probs)

    @staticmethod
    def attend(ctx, q, k_blocks, v_blocks, start: int, block: int, scale: float, with_probs: bool):
        b, h, t, d = q.shape
        g, n, d_v = k_blocks.shape[1], k_blocks.shape[2], v_blocks.shape[-1]
        q_BGRTd = q.reshape(b, g, h // g, t, d)
        out = q.new_zeros(b, g, h // g, t, d_v)
        probs_BGTn = q.new_zeros(b, g, t if with_probs else 0, n, dtype=torch.float32)
        for a, z, m in compressed_chunks(start, t, block, n):
            p = chunk_probs(q_BGRTd[:, :, :, a:z], k_blocks[:, :, :m], start + a, block, scale)
            o = torch.matmul(p.to(v_blocks.dtype).flatten(2, 3), v_blocks[:, :, :m])
            out[:, :, :, a:z] = o.unflatten(2, (h // g, -1))
            if with_probs:
                probs_BGTn[:, :, a:z, :m] = p.sum(2)
        ctx.save_for_backward(q, k_blocks, v_blocks, out)
        ctx.meta = (start, block, scale)
        ctx.mark_non_differentiable(probs_BGTn)
        return out.view(b, h, t, d_v), probs_BGTn

    @staticmethod
    def backward(ctx, d_out, _d_probs):
        q, k_blocks, v_blocks, out = ctx.saved_tensors
        start, block, scale = ctx.meta
        b, h, t, d = q.shape
        g, n = k_blocks.shape[1], k_blocks.shape[2]
        r = h // g
        q_BGRTd = q.reshape(b, g, r, t, d)
        do_BGRTv = d_out.reshape(b, g, r, t, -1).to(out.dtype)
        delta = (do_BGRTv * out).sum(-1, keepdim=True)  # rowsum(dO * O)
        delta = delta.to(torch.promote_types(delta.dtype, torch.float32))
        dq = torch.zeros_like(q_BGRTd)
        dk, dv = torch.zeros_like(k_blocks), torch.zeros_like(v_blocks)
        for a, z, m in compressed_chunks(start, t, block, n):
            q_c, do_c = q_BGRTd[:, :, :, a:z], do_BGRTv[:, :, :, a:z]
            p = chunk_probs(q_c, k_blocks[:, :, :m], start + a, block, scale)
            dp = torch.matmul(do_c.flatten(2, 3), v_blocks[:, :, :m].transpose(-1, -2)).view_as(p)
            ds = (p * (dp - delta[:, :, :, a:z])).mul_(scale).to(q.dtype).flatten(2, 3)  # (B, G, R*C, m)
            dq[:, :, :, a:z] = torch.matmul(ds, k_blocks[:, :, :m]).unflatten(2, (r, -1))
            dk[:, :, :m] += torch.matmul(ds.transpose(-1, -2), q_c.flatten(2, 3))
            dv[:, :, :m] += torch.matmul(p.to(do_c.dtype).flatten(2, 3).transpose(-1, -2), do_c.flatten(2, 3))
        grads = (g.to(dtype) for g, dtype in zip((dq.view(b, h, t, d), dk, dv), ctx.input_dtypes))
        return *grads, None, None, None, None
