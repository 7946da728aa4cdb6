"""Native Sparse Attention (NSA, Yuan et al. 2025): three branches mixed by per-head gates.

For query t (H heads in H_kv groups), with keys/values of its own per branch c:
    o_t = sum_{c in {cmp, slc, win}} g^c_t * Attn(q_t, K^c_t, V^c_t),   g_t = sigmoid(W_g x_t)  (per head)
Compressed (cmp): the sequence in blocks of l tokens (stride d = l here), each block j summarized as
    k^cmp_j = W_k phi(k_{jl} .. k_{jl+l-1}),  phi = flatten(k_block + P),  P = a learned intra-block
    position table (l, d_k); likewise v^cmp_j. Query t sees block j once it is complete: jl + l - 1 <= t.
Selected (slc): blocks of l' = l tokens are ranked by the compressed attention the group gives them,
    p^slc_j = sum_{h in group} softmax_j(q_{t,h} . k^cmp_j)  (with l' = l = d, p^slc = p^cmp);
    the top-n blocks, plus always the first block and the query's own and previous block, are
    attended token by token.
Window (win): the last w tokens (sliding-window attention).

CPU form (one deviation, stated): the block selection is shared by the l queries of a query
block (their p^slc summed, using only blocks that are complete before the query block starts, so
the choice never depends on the future). Each query block then runs ONE dense SDPA over its
n * l selected keys instead of a per-token gather: O(T * n * l) work in SDPA's fast kernel.
With n covering every block, the selected branch is exactly causal attention (tested).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import causal_attention
from .kv_cache import DenseKVCache
from .position import apply_rope, softmax_scale

BRANCHES = ("cmp", "slc", "win")


class NativeSparseAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.n_kv_heads
        self.head_dim = hd = config.attn_head_dim
        self.block, self.n_select, self.window = config.nsa_block, config.nsa_topn, config.sliding_window
        self.interleave = config.rope_interleave
        self.scale = softmax_scale(config, hd)
        kv = self.n_kv_heads * hd
        # q, then k/v for each of the three branches
        self.qkv_proj = nn.Linear(config.hidden_size, self.n_heads * hd + 6 * kv, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, config.hidden_size, bias=config.attention_bias)
        self.gate_proj = nn.Linear(config.hidden_size, 3 * self.n_heads, bias=True)
        self.block_pos = nn.Parameter(torch.zeros(self.block, hd))
        self.compress_k = nn.Linear(self.block * hd, hd, bias=False)
        self.compress_v = nn.Linear(self.block * hd, hd, bias=False)

    def reset_extra_parameters(self, std: float, out_std: float):
        nn.init.normal_(self.block_pos, 0.0, std)
        nn.init.normal_(self.compress_k.weight, 0.0, std / math.sqrt(self.block))
        nn.init.normal_(self.compress_v.weight, 0.0, std / math.sqrt(self.block))
        nn.init.zeros_(self.gate_proj.bias)

    def make_cache(self, batch: int, max_len: int, dtype, device) -> list[DenseKVCache]:
        return NSACache([DenseKVCache(batch, self.n_kv_heads, max_len, self.head_dim, self.head_dim, dtype, device)
                         for _ in BRANCHES])

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, rope=None, cache=None, start=0) -> torch.Tensor:
        if isinstance(start, torch.Tensor):  # continuous batching: one row at a time
            rows = [self.forward(x[i:i + 1], None if rope is None else (rope[0][i], rope[1][i]),
                                 cache.rows(i, i + 1), int(start[i])) for i in range(x.shape[0])]
            return torch.cat(rows)
        b, t, _ = x.shape
        hd, kv = self.head_dim, self.n_kv_heads * self.head_dim
        parts = self.qkv_proj(x).split([self.n_heads * hd] + [kv] * 6, dim=-1)
        q = parts[0].view(b, t, self.n_heads, hd).transpose(1, 2)
        kvs = [p.view(b, t, self.n_kv_heads, hd).transpose(1, 2) for p in parts[1:]]
        if rope is not None:
            q = apply_rope(q, *rope, self.interleave)
            kvs = [apply_rope(p, *rope, self.interleave) if i % 2 == 0 else p for i, p in enumerate(kvs)]
        branches = [(kvs[0], kvs[1]), (kvs[2], kvs[3]), (kvs[4], kvs[5])]
        if cache is not None:
            branches = [c.update(start, k, v) for c, (k, v) in zip(cache.caches, branches)]
        (k_cmp, v_cmp), (k_slc, v_slc), (k_win, v_win) = branches
        k_blocks, v_blocks = self.compress(k_cmp), self.compress(v_cmp, values=True)
        o_cmp, p_cmp = self.compressed_attention(q, k_blocks, v_blocks, start)
        o_slc = self.selected_attention(q, k_slc, v_slc, p_cmp, start)
        o_win = causal_attention(q, k_win, v_win, start, self.scale, window=self.window)
        g = torch.sigmoid(self.gate_proj(x)).view(b, t, 3, self.n_heads).permute(2, 0, 3, 1)[..., None]
        o = g[0] * o_cmp + g[1] * o_slc + g[2] * o_win
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.n_heads * hd))

    # ------------------------------------------------------------------ branches
    def compress(self, x_BGSD: torch.Tensor, values: bool = False) -> torch.Tensor:
        """One summary per complete block of l tokens: (B, G, S // l, d)."""
        b, g, s, d = x_BGSD.shape
        n = s // self.block
        blocks = x_BGSD[:, :, :n * self.block].reshape(b, g, n, self.block, d) + self.block_pos
        proj = self.compress_v if values else self.compress_k
        return proj(blocks.flatten(-2))

    def compressed_attention(self, q, k_blocks, v_blocks, start: int):
        """Attention over the complete blocks; also the probabilities (B, H, T, n) for selection."""
        t, n = q.shape[2], k_blocks.shape[2]
        if n == 0:
            return torch.zeros_like(q), q.new_zeros(*q.shape[:3], 0)
        rep = self.n_heads // self.n_kv_heads
        k = k_blocks.repeat_interleave(rep, dim=1)
        v = v_blocks.repeat_interleave(rep, dim=1)
        query_pos = torch.arange(start, start + t, device=q.device)[:, None]
        block_end = torch.arange(n, device=q.device)[None, :] * self.block + self.block - 1
        visible = block_end <= query_pos  # (T, n)
        logits = torch.matmul(q, k.transpose(-1, -2)).float() * self.scale
        any_visible = visible.any(-1, keepdim=True)  # queries before the first complete block see none
        logits = logits.masked_fill(~visible & any_visible, float("-inf")).masked_fill(~any_visible, 0.0)
        probs = (torch.softmax(logits, dim=-1) * any_visible).to(q.dtype)
        return torch.matmul(probs, v), probs

    def selected_attention(self, q, k, v, p_cmp, start: int):
        """Per query block: SDPA over its top-n earlier blocks plus the first, previous and own block."""
        b, h, t, d = q.shape
        l = self.block
        first_block, last_block = start // l, (start + t - 1) // l
        rep = self.n_heads // self.n_kv_heads
        outs = []
        for qb in range(first_block, last_block + 1):
            a, e = max(start, qb * l), min(start + t, (qb + 1) * l)  # positions of this query block
            blocks = self.pick_blocks(p_cmp[:, :, a - start:e - start], qb)  # (B, G, n_sel) block ids
            idx = (blocks[..., None] * l + torch.arange(l, device=q.device)).flatten(-2)  # (B, G, n_sel*l)
            safe = idx.clamp(max=k.shape[2] - 1)  # the own block may be incomplete; masked below
            k_sel = torch.gather(k, 2, safe[..., None].expand(-1, -1, -1, d))
            v_sel = torch.gather(v, 2, safe[..., None].expand(-1, -1, -1, d))
            query_pos = torch.arange(a, e, device=q.device)
            mask = idx[:, :, None, :] <= query_pos[None, None, :, None]  # causal within the own block
            mask = mask & _first_occurrence(blocks)[..., None, :].repeat_interleave(l, dim=-1)
            outs.append(F.scaled_dot_product_attention(
                q[:, :, a - start:e - start], k_sel.repeat_interleave(rep, 1), v_sel.repeat_interleave(rep, 1),
                attn_mask=mask.repeat_interleave(rep, 1), scale=self.scale))
        return torch.cat(outs, dim=2)

    def pick_blocks(self, p_BHCn: torch.Tensor, qb: int) -> torch.Tensor:
        """Block ids for query block qb: top-n by group-summed p^cmp over blocks before qb, plus
        block 0, qb - 1 and qb. Duplicates are allowed (masked as one)."""
        b = p_BHCn.shape[0]
        forced = torch.tensor(sorted({0, max(qb - 1, 0), qb}), device=p_BHCn.device)
        n_free = max(self.n_select - len(forced), 0)
        usable = min(qb, p_BHCn.shape[-1])  # blocks complete before this query block starts
        if not usable or not n_free:
            return forced.expand(b, self.n_kv_heads, -1)
        score = p_BHCn[..., :usable].float().sum(2)  # over the block's queries
        score = score.view(b, self.n_kv_heads, -1, usable).sum(2)  # over the heads of a group
        top = score.topk(min(n_free, usable), dim=-1).indices
        return torch.cat([forced.expand(b, self.n_kv_heads, -1), top], dim=-1)


def _first_occurrence(blocks: torch.Tensor) -> torch.Tensor:
    """True where a block id appears for the first time along the last dim (so it counts once)."""
    same = blocks[..., :, None] == blocks[..., None, :]
    earlier = torch.ones(blocks.shape[-1], blocks.shape[-1], dtype=torch.bool, device=blocks.device).tril(-1)
    return ~(same & earlier).any(-1)


class NSACache:
    """One dense K/V cache per branch (cmp, slc, win)."""

    def __init__(self, caches: list[DenseKVCache]):
        self.caches = caches

    def rows(self, lo: int, hi: int, length: int | None = None) -> NSACache:
        return NSACache([c.rows(lo, hi, length) for c in self.caches])

    def move_row(self, src: int, dst: int) -> None:
        for c in self.caches:
            c.move_row(src, dst)
