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

When the sequence has no more blocks than nsa_topn, every block is selected and the selected
branch is plain causal attention (one SDPA, no selection pass).

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
from .attention import allowed_keys, attention_probs, causal_attention
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
        self.whole_selection_shortcut = True  # False: always run the block selection (for tests)

    def reset_extra_parameters(self, std: float, out_std: float):
        nn.init.normal_(self.block_pos, 0.0, std)
        nn.init.normal_(self.compress_k.weight, 0.0, std / math.sqrt(self.block))
        nn.init.normal_(self.compress_v.weight, 0.0, std / math.sqrt(self.block))
        nn.init.zeros_(self.gate_proj.bias)

    def make_cache(self, batch: int, max_len: int, dtype, device) -> list[DenseKVCache]:
        return NSACache([DenseKVCache(batch, self.n_kv_heads, max_len, self.head_dim, self.head_dim, dtype, device)
                         for _ in BRANCHES])

    # ------------------------------------------------------------------ forward
    def project(self, x: torch.Tensor, rope):
        """q (B, H, T, d) and the branches' [k_cmp, v_cmp, k_slc, v_slc, k_win, v_win] (B, G, T, d),
        keys rotated."""
        b, t, _ = x.shape
        hd, kv = self.head_dim, self.n_kv_heads * self.head_dim
        parts = self.qkv_proj(x).split([self.n_heads * hd] + [kv] * 6, dim=-1)
        q = parts[0].view(b, t, self.n_heads, hd).transpose(1, 2)
        kvs = [p.view(b, t, self.n_kv_heads, hd).transpose(1, 2) for p in parts[1:]]
        if rope is not None:
            q = apply_rope(q, *rope, self.interleave)
            kvs = [apply_rope(p, *rope, self.interleave) if i % 2 == 0 else p for i, p in enumerate(kvs)]
        return q, kvs

    def forward(self, x: torch.Tensor, rope=None, cache=None, start=0) -> torch.Tensor:
        if isinstance(start, torch.Tensor):  # continuous batching: one row at a time
            rows = [self.forward(x[i:i + 1], None if rope is None else (rope[0][i], rope[1][i]),
                                 cache.rows(i, i + 1), int(start[i])) for i in range(x.shape[0])]
            return torch.cat(rows)
        b, t, _ = x.shape
        hd = self.head_dim
        q, kvs = self.project(x, rope)
        branches = [(kvs[0], kvs[1]), (kvs[2], kvs[3]), (kvs[4], kvs[5])]
        if cache is not None:
            branches = [c.update(start, k, v) for c, (k, v) in zip(cache.caches, branches)]
        (k_cmp, v_cmp), (k_slc, v_slc), (k_win, v_win) = branches
        k_blocks, v_blocks = self.compress(k_cmp), self.compress(v_cmp, values=True)
        if self.covers_every_block(start, t):  # the selection is every causal block: one causal SDPA
            o_cmp, _ = self.compressed_attention(q, k_blocks, v_blocks, start, with_scores=False)
            o_slc = causal_attention(q, k_slc, v_slc, start, self.scale)
        else:
            o_cmp, p_cmp = self.compressed_attention(q, k_blocks, v_blocks, start)
            o_slc = self.selected_attention(q, k_slc, v_slc, p_cmp, start)
        o_win = causal_attention(q, k_win, v_win, start, self.scale, window=self.window)
        g = torch.sigmoid(self.gate_proj(x)).view(b, t, 3, self.n_heads).permute(2, 0, 3, 1)[..., None]
        o = g[0] * o_cmp + g[1] * o_slc + g[2] * o_win
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.n_heads * hd))

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor, rope=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights (B, H, T, T), allowed (B, T, T)) per token key: the gated selected and window
        attention plus the compressed attention spread evenly over each block's tokens; allowed = the
        tokens of the selected blocks (any KV group) and the window."""
        b, t, _ = x.shape
        l = self.block
        q, kvs = self.project(x, rope)
        k_blocks = self.compress(kvs[0])
        _, scores = self.compressed_attention(q, k_blocks, self.compress(kvs[1], values=True), 0)
        nb, n = (t - 1) // l + 1, k_blocks.shape[2]
        blocks, valid = self.pick_blocks(scores, 0, nb)  # (B, G, nb, K)
        chosen = torch.zeros(b, self.n_kv_heads, nb, nb + 1, dtype=torch.bool, device=x.device)
        chosen = chosen.scatter_(-1, blocks.masked_fill(~valid, nb), True)[..., :nb]  # invalid picks: a spare column
        block_of = torch.arange(t, device=x.device) // l
        selected = chosen[:, :, block_of][..., block_of] & allowed_keys(t, None, x.device)  # (B, G, T, T)
        group = self.n_heads // self.n_kv_heads
        p_slc = attention_probs(q, kvs[2], selected.repeat_interleave(group, dim=1), self.scale)
        p_win = attention_probs(q, kvs[4], allowed_keys(t, self.window, x.device), self.scale)
        p_cmp = torch.zeros_like(p_win)
        if n:
            visible = (torch.arange(n, device=x.device) * l + l - 1)[None, :] <= torch.arange(t, device=x.device)[:, None]
            p_blocks = attention_probs(q, k_blocks, visible, self.scale).nan_to_num(0.0)  # (B, H, T, n)
            p_cmp[..., :n * l] = p_blocks.repeat_interleave(l, dim=-1) / l
        g = torch.sigmoid(self.gate_proj(x)).view(b, t, 3, self.n_heads).permute(2, 0, 3, 1)[..., None]
        weights = g[0] * p_cmp + g[1] * p_slc + g[2] * p_win
        return weights, selected.any(1) | allowed_keys(t, self.window, x.device)

    # ------------------------------------------------------------------ branches
    def compress(self, x_BGSD: torch.Tensor, values: bool = False) -> torch.Tensor:
        """One summary per complete block of l tokens: (B, G, S // l, d)."""
        b, g, s, d = x_BGSD.shape
        n = s // self.block
        blocks = x_BGSD[:, :, :n * self.block].reshape(b, g, n, self.block, d) + self.block_pos
        proj = self.compress_v if values else self.compress_k
        return proj(blocks.flatten(-2))

    def covers_every_block(self, start: int, t: int) -> bool:
        """True when the last query block may select every block before it (first, previous, own and
        nsa_topn - 3 chosen): the selected branch is then exactly causal attention (tested)."""
        return self.whole_selection_shortcut and (start + t - 1) // self.block + 1 <= self.n_select

    def compressed_attention(self, q, k_blocks, v_blocks, start: int, with_scores: bool = True):
        """Attention over the complete blocks (SDPA), and per query block the selection scores
        p^slc (B, G, nb, n): softmax_j(q_t . k^cmp_j) summed over the block's queries and the group's
        heads (no gradient: the choice of blocks is not differentiable)."""
        b, h, t, _ = q.shape
        n, l = k_blocks.shape[2], self.block
        nb = (start + t - 1) // l - start // l + 1
        if n == 0:
            return torch.zeros_like(q), q.new_zeros(b, self.n_kv_heads, nb, 0)
        query_pos = torch.arange(start, start + t, device=q.device)[:, None]
        block_end = torch.arange(n, device=q.device)[None, :] * l + l - 1
        visible = block_end <= query_pos  # (T, n)
        blind = int((~visible.any(-1)).sum())  # the first queries, before any block is complete
        gqa = self.n_heads != self.n_kv_heads
        mask = visible.clone()
        mask[:blind] = True  # (their output is zeroed below; all-masked rows would give NaN)
        out = F.scaled_dot_product_attention(q, k_blocks, v_blocks, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
        if blind:
            keep = (torch.arange(t, device=q.device) >= blind)[:, None]
            out = out * keep
        if not with_scores:
            return out, None
        with torch.no_grad():
            k = k_blocks.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            bias = torch.zeros(t, n, device=q.device).masked_fill_(~mask, float("-inf"))
            probs = torch.baddbmm(bias.expand(b * h, t, n), q.flatten(0, 1).float(),
                                  k.flatten(0, 1).float().transpose(-1, -2), alpha=self.scale).softmax(-1)
            probs = probs.view(b, h, t, n)
            probs[:, :, :blind] = 0
            front = start - (start // l) * l
            if front or (front + t) % l:  # partial first or last query block: pad to whole blocks
                probs = F.pad(probs, (0, 0, front, nb * l - front - t))
            scores = probs.view(b, h, nb, l, n).sum(3).view(b, self.n_kv_heads, -1, nb, n).sum(2)
        return out, scores

    def selected_attention(self, q, k, v, p_cmp, start: int):
        """Every query block at once: one batched SDPA, each block over its own selected key blocks.
        `p_cmp` holds the selection scores (B, G, nb, n) from `compressed_attention`."""
        b, h, t, d = q.shape
        l, g, s = self.block, self.n_kv_heads, k.shape[2]
        first, last = start // l, (start + t - 1) // l
        nb, front, back = last - first + 1, start - first * l, (last + 1) * l - (start + t)
        blocks, valid = self.pick_blocks(p_cmp, first, nb)  # (B, G, nb, K)
        token = (blocks[..., None] * l + torch.arange(l, device=q.device)).flatten(-2)  # (B, G, nb, K*l)
        token_ok = valid.repeat_interleave(l, dim=-1) & (token < s)
        query_pos = first * l + torch.arange(nb * l, device=q.device).view(nb, l)
        mask = token_ok[..., None, :] & (token[..., None, :] <= query_pos[None, None, :, :, None])
        # rows of the flattened (B * G * S, d) keys: index_select copies whole rows (a gather with an
        # expanded index reads one index per element: 2.4x slower at 16K here)
        rows = (token.clamp(max=s - 1) + torch.arange(b * g, device=q.device).view(b, g, 1, 1) * s).flatten()
        k_sel = k.reshape(b * g * s, d).index_select(0, rows).view(b, g, nb, -1, d)
        v_sel = v.reshape(b * g * s, v.shape[-1]).index_select(0, rows).view(b, g, nb, -1, v.shape[-1])
        q_blocks = (F.pad(q, (0, 0, front, back)) if front or back else q).view(b, h, nb, l, d)
        fold = lambda x: x.transpose(1, 2).flatten(0, 1)  # (B, X, nb, ...) -> (B * nb, X, ...)
        mask = fold(mask)
        if g > 1:
            mask = mask.repeat_interleave(h // g, dim=1)
        out = F.scaled_dot_product_attention(fold(q_blocks), fold(k_sel), fold(v_sel), attn_mask=mask,
                                             scale=self.scale, enable_gqa=g != h)
        out = out.view(b, nb, h, l, d).transpose(1, 2).reshape(b, h, nb * l, d)
        return out[:, :, front:front + t]

    def pick_blocks(self, score_BGbn: torch.Tensor, first: int, nb: int):
        """Block ids (B, G, nb, K) and their validity for query blocks first..first+nb-1: the first,
        previous and own block, then the top (nsa_topn - 3) of the blocks complete before the query
        block by their selection score."""
        b, g, _, n = score_BGbn.shape
        qb = torch.arange(first, first + nb, device=score_BGbn.device)
        forced = torch.stack([torch.zeros_like(qb), (qb - 1).clamp(min=0), qb], -1)  # (nb, 3)
        forced_ok = torch.stack([torch.ones_like(qb, dtype=torch.bool), qb > 1, qb > 0], -1)
        blocks, valid = forced.expand(b, g, nb, 3), forced_ok.expand(b, g, nb, 3)
        n_free = min(self.n_select - 3, n)
        if n_free <= 0:
            return blocks, valid
        candidate = torch.arange(n, device=score_BGbn.device)[None, :]
        usable = (candidate < qb[:, None] - 1) & (candidate > 0)  # complete before, and not forced
        top = score_BGbn.masked_fill(~usable, float("-inf")).topk(n_free, dim=-1)
        return torch.cat([blocks, top.indices], -1), torch.cat([valid, top.values > float("-inf")], -1)


class NSACache:
    """One dense K/V cache per branch (cmp, slc, win)."""

    def __init__(self, caches: list[DenseKVCache]):
        self.caches = caches

    def rows(self, lo: int, hi: int, length: int | None = None) -> NSACache:
        return NSACache([c.rows(lo, hi, length) for c in self.caches])

    def move_row(self, src: int, dst: int) -> None:
        for c in self.caches:
            c.move_row(src, dst)
