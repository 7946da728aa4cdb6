"""Attention over key blocks chosen per query block, as batched matrix products over tiles, recomputed
in backward: the CPU fast path of NSA's selected and window branches, of sliding-window layers and of
V4's HCA layers.

Positions go in blocks of C. Query block i (positions iC .. iC + C - 1) of KV group g attends to the
K key blocks I_i = (b_1 .. b_K) of that group's keys. With the R = H / H_kv query heads of the group
folded into R C rows (the heads share the keys, so each key block is read once for all of them), one
tile is

    O_i = softmax(scale Q_i K_{I_i}^T + M_i) V_{I_i},      Q_i (R C, d),  K_{I_i}, V_{I_i} (K C, .)

where M_i hides key token s from query t unless s's block is a valid pick, s < S, s <= t and, with a
window w, s > t - w. NSA's selected branch (its K picked blocks per query block,
model/attention/nsa.py's `selected_attention`) and a sliding window (blocks i - ceil(w / C) .. i,
`banded_block_attention`) are both this form; so is HCA (kernels/csa.py: the window's blocks plus
every closed entry and the sink, rows of one key table that carry their own positions).

Why not SDPA: the CPU flash kernel runs a masked (C, C + w - 1) band at the speed of its short rows
and cannot skip the masked half of the band's first and last tiles. Here a tile is two large GEMMs
(R C x d x K C: 512 x 512 x 1024 in NSA's 16K bench layout) and one in-place softmax between them. At
16K tokens, 8 heads of 512 on one key head, one Zen-4 core (fp32): NSA's window branch 2.9 s with
banded SDPA, 2.0 s as 64-token tiles over 9 blocks.

Tiles go through in chunks of about TILE_BYTES of fp32 logits: the chunk's key blocks are gathered
into a reused buffer (one index_select of whole C x d blocks), and nothing is kept for backward but
the inputs as the products use them (q padded to whole blocks, k and v in the compute dtypes), not
even the output: at 64K tokens and 8 heads of 512 each copy is 1 GiB. Backward
rebuilds the query tiles, gathers again, recomputes P and, flash-style,
    dS = P * (dP - rowsum(P * dP)),   dQ = dS K,   dK = dS^T Q,   dV = P^T dO     (Q pre-scaled)
(rowsum(P * dP) = rowsum(dO * O), here from the fp32 P and dP rather than a rounded O), adding dK
and dV into the picked blocks (index_add). Under bf16/fp16 autocast the logits are fp32
products of the fp32 q and k, as `explicit_attention` computes them (q and k rounded to bf16 first
doubled dq's and dk's error), the softmax, dS and their products stay fp32 (through `TileProducts`,
named fp32 on purpose in dtype accounting), and only P V and P^T dO take autocast's dtype; fp64
stays fp64; the gradients come back in the inputs' dtypes.

Every block a query can see picked is causal attention:

    >>> from nanoseek.model.attention.core import causal_attention
    >>> q, kv = torch.randn(1, 2, 8, 4), torch.randn(1, 1, 8, 4)
    >>> blocks, valid = torch.tensor([[[[0, 0], [0, 1]]]]), torch.tensor([[[[True, False], [True, True]]]])
    >>> out = block_sparse_attention(q, kv, kv, blocks, valid, 0, 4, 0.5)
    >>> torch.allclose(out, causal_attention(q, kv, kv, 0, 0.5), atol=1e-6)
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.attention.core import causal_attention, compute_dtype

TILE_BYTES = 8 << 20  # fp32 logits per chunk of tiles (with the gathered keys and values, L2/L3-sized)
WINDOW_TILE = 64  # tokens per query and key block of a sliding window's tiles
MIN_TILE_ROWS = 256  # a sliding window runs as tiles from this many rows per tile (R query heads x C)


def tiles_pay(q) -> bool:
    """Whether the tiles run at all: on the CPU, eagerly (a compiled graph keeps the reference's SDPA
    calls), for more than one query (a decode step's one row is the reference's small matmuls)."""
    return q.device.type == "cpu" and not torch.compiler.is_compiling() and q.shape[2] > 1


def sliding_window_attention(q, k, v, start: int, window: int, scale: float) -> torch.Tensor:
    """`causal_attention(q, k, v, start, scale, window=window)`, as `banded_block_attention` tiles where
    they pay: the tiles run, the window is shorter than the keys, and the R = H / H_kv query heads of a
    key head fill at least MIN_TILE_ROWS rows of a WINDOW_TILE-token tile. With one query head per key
    head (plain MHA, 64-wide heads) the tiles' 64-row GEMMs ran no faster than the flash kernel (one
    Zen-4 core: forward 162 against 135 ms at 8 x 8 heads x 1,024 tokens, window 256); with 8 heads
    folded they ran 1.2x faster forward and backward (4 x 2,048 tokens, 8 heads of 576 on one key head)."""
    rows = q.shape[1] // k.shape[1] * WINDOW_TILE
    if tiles_pay(q) and window < k.shape[2] and rows >= MIN_TILE_ROWS:
        return banded_block_attention(q, k, v, start, window, scale, WINDOW_TILE)
    return causal_attention(q, k, v, start, scale, window=window)


def block_sparse_attention(
    q, k, v, key_blocks, valid, start: int, block: int, scale: float, window=None, key_pos=None, windowed=None
):
    """q (B, H, T, d) at positions start..start+T-1 against k (B, G, S, d), v (B, G, S, d_v);
    key_blocks, valid (B, G, nq, K): the key blocks (of `block` tokens) of each query block
    start // block .. start // block + nq - 1, and which are real picks. Returns (B, H, T, d_v).

    By default key row s stands for position s. `key_pos` (S,) int64 gives each row its own (a row
    is visible from that position on; a compressed entry's is the last token it pools), and
    `windowed` (S,) bool says which rows the window applies to (default: all)."""
    b, h, t, d = q.shape
    g, s = k.shape[1], k.shape[2]
    c, nq = block, key_blocks.shape[2]
    first = start // c
    front = start - first * c
    back = nq * c - front - t
    if back < 0:
        raise ValueError(f"block_sparse_attention: {nq} query blocks of {c} do not cover {t} queries from {start}")
    q = F.pad(q, (0, 0, front, back)) if front or back else q
    out = BlockSparseAttention.apply(
        q,
        k.reshape(b * g, s, d),
        v.reshape(b * g, s, v.shape[-1]),
        key_blocks.reshape(b * g * nq, -1),
        valid.reshape(b * g * nq, -1),
        first,
        c,
        scale,
        window,
        key_pos,
        windowed,
    )
    return out[:, :, front : front + t]


def banded_block_attention(q, k, v, start: int, window: int, scale: float, block: int = 64):
    """Sliding-window causal attention (each query over its last `window` keys, itself included) as
    `block_sparse_attention` over blocks of `block` tokens: query block i over key blocks
    i - ceil(window / block) .. i, those before position 0 invalid. Same result as
    model/attention/core.py's `causal_attention(..., window=window)`."""
    t = q.shape[2]
    first, last = start // block, (start + t - 1) // block
    query_block = torch.arange(first, last + 1, device=q.device)[:, None]
    key_blocks = query_block - torch.arange(-(-window // block), -1, -1, device=q.device)  # (nq, K), ascending
    b, g = k.shape[:2]
    key_blocks = key_blocks.expand(b, g, *key_blocks.shape)
    return block_sparse_attention(q, k, v, key_blocks.clamp(min=0), key_blocks >= 0, start, block, scale, window)


class TileProducts(nn.Module):
    """out = a @ b for the tiles' fp32 (or fp64) products: the logits Q K^T and, in backward, dO V^T,
    dS K and dS^T Q. A module only so that dtype accounting (analysis/dtype_flops.py) names these
    products as fp32 on purpose under bf16 autocast, as it does `AttentionLogits`."""

    def forward(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.bmm(a, b, out=out)


TILE_PRODUCTS = TileProducts()


def wide_dtype(x: torch.Tensor) -> torch.dtype:
    """The logits' dtype: fp32, or x's where it is wider."""
    return torch.promote_types(x.dtype, torch.float32)


class TilePlan:
    """The tiles' key blocks, masks and chunks: N tiles (B G rows x nq query blocks) of R C query rows."""

    def __init__(self, k, key_blocks, valid, first: int, nq: int, block: int, window, key_pos=None, windowed=None):
        self.s, self.block, self.window = k.shape[1], block, window
        self.key_pos, self.windowed = key_pos, windowed
        self.n_blocks = -(-self.s // block)
        self.first, self.nq = first, nq
        rows = torch.arange(key_blocks.shape[0], device=k.device) // nq  # each tile's (b, g) row
        self.index = (rows[:, None] * self.n_blocks + key_blocks.clamp(0, self.n_blocks - 1)).flatten()
        self.key_blocks, self.valid = key_blocks, valid

    def table(self, x):
        """x (B G, S, .) as whole blocks (B G n_blocks, C, .), zero-padded past S."""
        pad = self.n_blocks * self.block - self.s
        x = F.pad(x, (0, 0, 0, pad)) if pad else x
        return x.reshape(-1, self.block, x.shape[-1])

    def chunks(self, n_tiles: int, rows: int):
        n_keys = self.key_blocks.shape[1] * self.block
        step = max(1, TILE_BYTES // (rows * n_keys * 4))
        for a in range(0, n_tiles, step):
            yield a, min(n_tiles, a + step)

    def buffers(self, chunks, k, v):
        """Reused buffers for the largest chunk's gathered key and value blocks."""
        most = max(z - a for a, z in chunks) * self.key_blocks.shape[1]
        return (x.new_empty(most, self.block, x.shape[-1]) for x in (k, v))

    def logits(self, chunks, q_tiles, rows: int) -> torch.Tensor:
        """A reused (most tiles, R C, K C) buffer for the logits, fp32 or wider."""
        most = max(z - a for a, z in chunks)
        return q_tiles.new_empty(most, rows, self.key_blocks.shape[1] * self.block, dtype=wide_dtype(q_tiles))

    def gather(self, table, a: int, z: int, out: torch.Tensor) -> torch.Tensor:
        """Tiles a..z-1's key blocks of `table`, (z - a, K C, .), in `out`'s storage."""
        k_blocks = self.key_blocks.shape[1]
        picked = out[: (z - a) * k_blocks]
        torch.index_select(table, 0, self.index[a * k_blocks : z * k_blocks], out=picked)
        return picked.view(z - a, k_blocks * self.block, -1)

    def hidden(self, a: int, z: int):
        """(hidden (n, C, K C) bool, blind (n, C) or None): the masked logits of tiles a..z-1, and the
        rows that see no key at all (None when every row sees one)."""
        c = self.block
        device = self.key_blocks.device
        offsets = torch.arange(c, device=device)
        query_pos = ((self.first + torch.arange(a, z, device=device) % self.nq) * c)[:, None] + offsets  # (n, C)
        token = (self.key_blocks[a:z, :, None] * c + offsets).flatten(1)  # (n, K C)
        ok = self.valid[a:z].repeat_interleave(c, dim=1) & (token < self.s)
        key_pos = token if self.key_pos is None else self.key_pos[token.clamp(max=self.s - 1)]
        seen = ok[:, None, :] & (key_pos[:, None, :] <= query_pos[:, :, None])
        if self.window is not None:
            near = key_pos[:, None, :] > query_pos[:, :, None] - self.window
            if self.windowed is not None:
                near |= ~self.windowed[token.clamp(max=self.s - 1)][:, None, :]
            seen &= near
        blind = ~seen.any(-1)
        return ~seen, (blind if bool(blind.any()) else None)


def tile_probs(q_c, k_c, hidden, blind, logits: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T + M) in `logits`' storage (n, R C, K C) and dtype (fp32, or fp64 for fp64); blind rows 0."""
    n = q_c.shape[0]
    logits = TILE_PRODUCTS(q_c, k_c.transpose(1, 2), out=logits[:n])
    c = hidden.shape[1]
    folded = logits.view(n, -1, c, logits.shape[-1])  # (n, R, C, K C)
    folded.masked_fill_(hidden[:, None], float("-inf"))
    torch.softmax(logits, dim=-1, out=logits)
    if blind is not None:
        folded.masked_fill_(blind[:, None, :, None], 0.0)
    return logits


class BlockSparseAttention(torch.autograd.Function):
    """O (B, H, nq C, d_v), copied back from its tiles to head order, from q (B, H, nq C, d) at positions from
    first * C, k (B G, S, d), v (B G, S, d_v) and each tile's key blocks and validity (B G nq, K):
    tile n is query block first + n % nq of KV row n // nq. The query tiles (B G nq, R C, d) are
    built scaled in one pass, and backward writes dq back through the same layout."""

    @staticmethod
    def forward(ctx, q, k, v, key_blocks, valid, first: int, block: int, scale: float, window, key_pos, windowed):
        ctx.input_dtypes = (q.dtype, k.dtype, v.dtype)
        dtype = compute_dtype(q)  # autocast's for fp32 q; fp64 stays fp64
        with torch.autocast(q.device.type, enabled=False):
            wide = wide_dtype(q)  # the logits' inputs and products: q, k as given (fp32 here under autocast)
            k, v = k.to(wide), v.to(dtype)
            q_tiles = q.new_empty(tile_shape(q, k, block), dtype=wide)
            torch.mul(tile_view(q, k.shape[0], block), scale, out=q_tiles)
            nq = q_tiles.shape[2]
            plan = TilePlan(k, key_blocks, valid, first, nq, block, window, key_pos, windowed)
            out_tiles = BlockSparseAttention.attend(plan, q_tiles.flatten(0, 2).flatten(1, 2), k, v)
        ctx.save_for_backward(q, k, v, key_blocks, valid, key_pos, windowed)  # q itself: the tiles are rebuilt
        ctx.meta = (first, block, window, scale)
        return heads_view(out_tiles.view(*q_tiles.shape[:-1], -1))

    @staticmethod
    def attend(plan: TilePlan, q_tiles, k, v):
        """The output tiles (N, R C, d_v) of the query tiles (N, R C, d)."""
        n_tiles, rows, _ = q_tiles.shape
        k_table, v_table = plan.table(k), plan.table(v)
        out = v.new_empty(n_tiles, rows, v.shape[-1])
        chunks = list(plan.chunks(n_tiles, rows))
        k_buf, v_buf = plan.buffers(chunks, k, v)
        logits = plan.logits(chunks, q_tiles, rows)
        for a, z in chunks:
            hidden, blind = plan.hidden(a, z)
            p = tile_probs(q_tiles[a:z], plan.gather(k_table, a, z, k_buf), hidden, blind, logits)
            torch.bmm(p.to(v.dtype), plan.gather(v_table, a, z, v_buf), out=out[a:z])
        return out

    @staticmethod
    def backward(ctx, d_out):
        with torch.autocast(d_out.device.type, enabled=False):  # backward may run inside the caller's autocast
            return BlockSparseAttention.grads(ctx, d_out)

    @staticmethod
    def grads(ctx, d_out):
        q, k, v, key_blocks, valid, key_pos, windowed = ctx.saved_tensors
        first, block, window, scale = ctx.meta
        tiles = tile_shape(q, k, block)
        wide = wide_dtype(q)
        q_tiles = q.new_empty(tiles, dtype=wide)
        torch.mul(tile_view(q, k.shape[0], block), scale, out=q_tiles)
        plan = TilePlan(k, key_blocks, valid, first, tiles[2], block, window, key_pos, windowed)
        q_tiles = q_tiles.flatten(0, 2).flatten(1, 2)
        n_tiles, rows, _ = q_tiles.shape
        d_out_tiles = v.new_empty(n_tiles, rows, v.shape[-1])
        d_out_tiles.view(*tiles[:-1], -1).copy_(tile_view(d_out, tiles[0] * tiles[1], block))
        k_table, v_table = plan.table(k), plan.table(v)
        dk_table, dv_table = torch.zeros_like(k_table), torch.zeros_like(v_table, dtype=wide)
        dq = torch.empty_like(q_tiles)
        chunks = list(plan.chunks(n_tiles, rows))
        k_buf, v_buf = plan.buffers(chunks, k, v)
        logits, d_logits = plan.logits(chunks, q_tiles, rows), plan.logits(chunks, q_tiles, rows)
        k_blocks = key_blocks.shape[1]
        for a, z in chunks:
            hidden, blind = plan.hidden(a, z)
            k_c, v_c = plan.gather(k_table, a, z, k_buf), plan.gather(v_table, a, z, v_buf)
            p = tile_probs(q_tiles[a:z], k_c, hidden, blind, logits)
            dp = TILE_PRODUCTS(d_out_tiles[a:z].to(wide), v_c.to(wide).transpose(1, 2), out=d_logits[: z - a])
            delta = (p * dp).sum(-1, keepdim=True)  # rowsum(P * dP) = rowsum(dO * O), exact in fp32
            ds = dp.sub_(delta).mul_(p)  # dS = P (dP - delta), in fp32
            TILE_PRODUCTS(ds, k_c, out=dq[a:z])
            index = plan.index[a * k_blocks : z * k_blocks]
            dk = TILE_PRODUCTS(ds.transpose(1, 2), q_tiles[a:z])
            dk_table.index_add_(0, index, dk.view(-1, block, k.shape[-1]))
            dv = torch.bmm(p.to(d_out_tiles.dtype).transpose(1, 2), d_out_tiles[a:z])
            dv_table.index_add_(0, index, dv.view(-1, block, v.shape[-1]).to(wide))
        s = k.shape[1]
        dq = heads_view(dq.mul_(scale).view(tiles))  # Q was scaled: dq = scale dS K
        dk = dk_table.view(k.shape[0], -1, k.shape[-1])[:, :s]
        dv = dv_table.view(v.shape[0], -1, v.shape[-1])[:, :s]
        grads = (x.to(dtype) for x, dtype in zip((dq, dk, dv), ctx.input_dtypes))
        return *grads, None, None, None, None, None, None, None, None


def tile_shape(q, k, block: int) -> tuple[int, ...]:
    """(B, G, nq, R, C, d): q's (B, H, nq C, d) as tiles of the R heads of each KV group."""
    b, h, t, d = q.shape
    g = k.shape[0] // b
    return (b, g, t // block, h // g, block, d)


def tile_view(x, rows: int, block: int) -> torch.Tensor:
    """x (B, H, nq C, .) viewed in tile order (B, G, nq, R, C, .), G = rows / B (no copy)."""
    b, h, t, d = x.shape
    g = rows // b
    return x.unflatten(2, (t // block, block)).unflatten(1, (g, h // g)).transpose(2, 3)


def heads_view(tiles) -> torch.Tensor:
    """Tiles (B, G, nq, R, C, .) back in head order (B, H, nq C, .): a strided view where it can be."""
    b, g, nq, r, c, d = tiles.shape
    return tiles.transpose(2, 3).reshape(b, g * r, nq * c, d)
