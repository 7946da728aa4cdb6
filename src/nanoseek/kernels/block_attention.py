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
doubled dq's and dk's error), the softmax, dS and its products stay fp32 (through `TileProducts`,
named fp32 on purpose in dtype accounting), and P V, dO V^T and P^T dO take autocast's dtype; fp64
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
    q,
    k,
    v,
    key_blocks,
    valid,
    start: int,
    block: int,
    scale: float,
    window=None,
    key_pos=None,
    windowed=None,
    used=None,
):
    """q (B, H, T, d) at positions start..start+T-1 against k (B, G, S, d), v (B, G, S, d_v);
    key_blocks, valid (B, G, nq, K): the key blocks (of `block` tokens) of each query block
    start // block .. start // block + nq - 1, and which are real picks. Returns (B, H, T, d_v).

    By default key row s stands for position s. `key_pos` (S,) int64 gives each row its own (a row
    is visible from that position on; a compressed entry's is the last token it pools), and
    `windowed` (S,) bool says which rows the window applies to (default: all). `used` (B, G, nq), if
    given, says how many leading key blocks each query block needs (those after are invalid for it):
    a chunk of tiles then computes only as many as its tiles need (HCA's early blocks see few entries)."""
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
        None if used is None else used.reshape(b * g * nq),
    )
    return out[:, :, front : front + t]


def banded_block_attention(q, k, v, start: int, window: int, scale: float, block: int = 64):
    """Sliding-window causal attention (each query over its last `window` keys, itself included) as
    `block_sparse_attention` over blocks of `block` tokens: query block i over key blocks
    i - ceil(window / block) .. i, those before position 0 invalid. Same result as
    model/attention/core.py's `causal_attention(..., window=window)`."""
    key_blocks = window_blocks(start, q.shape[2], window, block, q.device).expand(*k.shape[:2], -1, -1)
    return block_sparse_attention(q, k, v, key_blocks.clamp(min=0), key_blocks >= 0, start, block, scale, window)


def window_blocks(start: int, t: int, window: int, block: int, device) -> torch.Tensor:
    """(nq, ceil(window / block) + 1): the key blocks i - ceil(window / block) .. i that query block i
    of positions start..start+t-1 reads within its window, ascending (negative: before position 0)."""
    query_block = torch.arange(start // block, (start + t - 1) // block + 1, device=device)[:, None]
    return query_block - torch.arange(-(-window // block), -1, -1, device=device)


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
    """The tiles' key blocks, masks and chunks: N tiles (B G rows x nq query blocks) of R C query rows.
    A chunk never crosses a row, so its tiles are one strided slice (`tiles_of`) of a (B, H, nq C, .)
    tensor in head order: queries, outputs and their gradients are staged a chunk at a time through
    small reused buffers instead of whole tile-ordered copies (1 GiB each at 64K tokens, 8 x 512)."""

    def __init__(self, q, k, key_blocks, valid, first: int, block: int, window, key_pos=None, windowed=None, used=None):
        self.s, self.block, self.window = k.shape[1], block, window
        self.key_pos, self.windowed = key_pos, windowed
        self.n_blocks = -(-self.s // block)
        b, h, t, _ = q.shape
        self.g = k.shape[0] // b
        self.r, self.nq, self.first = h // self.g, t // block, first
        rows = torch.arange(key_blocks.shape[0], device=k.device) // self.nq  # each tile's (b, g) row
        self.index = rows[:, None] * self.n_blocks + key_blocks.clamp(0, self.n_blocks - 1)  # (N, K)
        self.key_blocks, self.valid = key_blocks, valid
        self.rows = self.r * block  # query rows per tile
        n_tiles, k_blocks = key_blocks.shape
        step = max(1, TILE_BYTES // (self.rows * k_blocks * block * 4))
        rows_start = range(0, n_tiles, self.nq)
        spans = [(a, min(a + step, row + self.nq)) for row in rows_start for a in range(row, row + self.nq, step)]
        need = [k_blocks] * n_tiles if used is None else used.tolist()
        self.chunks = [(a, z, max(need[a:z])) for a, z in spans]  # (first tile, end, key blocks computed)
        self.most = max(z - a for a, z in spans)

    def table(self, x):
        """x (B G, S, .) as whole blocks (B G n_blocks, C, .), zero-padded past S."""
        pad = self.n_blocks * self.block - self.s
        x = F.pad(x, (0, 0, 0, pad)) if pad else x
        return x.reshape(-1, self.block, x.shape[-1])

    def tiles_of(self, x, a: int, z: int) -> torch.Tensor:
        """Tiles a..z-1 of x (B, H, nq C, X) in head order: a strided (z - a, R, C, X) view."""
        row, i = divmod(a, self.nq)
        b, g = divmod(row, self.g)
        heads = x[b, g * self.r : (g + 1) * self.r]  # (R, nq C, X)
        return heads.unflatten(1, (self.nq, self.block))[:, i : i + z - a].transpose(0, 1)

    def stage(self, x, a: int, z: int, buffer: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Tiles a..z-1 of x (B, H, nq C, X), times `scale`, copied into `buffer`: (z - a, R C, X)."""
        n = z - a
        staged = buffer[:n]
        torch.mul(self.tiles_of(x, a, z), scale, out=staged.view(n, self.r, self.block, -1))
        return staged

    def scratch(self, x, dtype=None) -> torch.Tensor:
        """A reused (most tiles, R C, x's width) buffer."""
        return x.new_empty(self.most, self.rows, x.shape[-1], dtype=dtype or x.dtype)

    def buffers(self, k, v):
        """Reused buffers for the largest chunk's gathered key and value blocks."""
        most = self.most * self.key_blocks.shape[1]
        return (x.new_empty(most, self.block, x.shape[-1]) for x in (k, v))

    def logits(self, q) -> torch.Tensor:
        """A reused flat buffer for the largest chunk's logits (most tiles x R C x K C), fp32 or wider."""
        return q.new_empty(self.most * self.rows * self.key_blocks.shape[1] * self.block, dtype=wide_dtype(q))

    def logits_of(self, buffer: torch.Tensor, n: int, kc: int) -> torch.Tensor:
        """n tiles' (n, R C, kc C) logits in `buffer`'s storage."""
        return buffer[: n * self.rows * kc * self.block].view(n, self.rows, kc * self.block)

    def picks(self, a: int, z: int, kc: int) -> torch.Tensor:
        """The rows of the block table that tiles a..z-1 read: their first kc key blocks, flattened."""
        return self.index[a:z, :kc].flatten()

    def gather(self, table, a: int, z: int, kc: int, out: torch.Tensor) -> torch.Tensor:
        """Tiles a..z-1's first kc key blocks of `table`, (z - a, kc C, .), in `out`'s storage."""
        picked = out[: (z - a) * kc]
        torch.index_select(table, 0, self.picks(a, z, kc), out=picked)
        return picked.view(z - a, kc * self.block, -1)

    def hidden(self, a: int, z: int, kc: int):
        """(hidden (n, C, kc C) bool, blind (n, C) or None): the masked logits of tiles a..z-1 over
        their first kc key blocks, and the rows that see no key at all (None when every row sees one)."""
        c = self.block
        device = self.key_blocks.device
        offsets = torch.arange(c, device=device)
        query_pos = ((self.first + torch.arange(a, z, device=device) % self.nq) * c)[:, None] + offsets  # (n, C)
        token = (self.key_blocks[a:z, :kc, None] * c + offsets).flatten(1)  # (n, kc C)
        ok = self.valid[a:z, :kc].repeat_interleave(c, dim=1) & (token < self.s)
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
    """softmax(Q K^T + M) in `logits` (n, R C, kc C), its dtype fp32 (or fp64 for fp64); blind rows 0."""
    n = q_c.shape[0]
    logits = TILE_PRODUCTS(q_c, k_c.transpose(1, 2), out=logits)
    c = hidden.shape[1]
    folded = logits.view(n, -1, c, logits.shape[-1])  # (n, R, C, K C)
    folded.masked_fill_(hidden[:, None], float("-inf"))
    torch.softmax(logits, dim=-1, out=logits)
    if blind is not None:
        folded.masked_fill_(blind[:, None, :, None], 0.0)
    return logits


class BlockSparseAttention(torch.autograd.Function):
    """O (B, H, nq C, d_v) from q (B, H, nq C, d) at positions from first * C, k (B G, S, d), v (B G, S,
    d_v) and each tile's key blocks and validity (B G nq, K): tile n is query block first + n % nq of
    KV row n // nq. Queries are staged scaled into the tiles' layout a chunk at a time, outputs and
    gradients written back likewise."""

    @staticmethod
    def forward(ctx, q, k, v, key_blocks, valid, first: int, block: int, scale: float, window, key_pos, windowed, used):
        ctx.input_dtypes = (q.dtype, k.dtype, v.dtype)
        dtype = compute_dtype(q)  # autocast's for fp32 q; fp64 stays fp64
        with torch.autocast(q.device.type, enabled=False):
            wide = wide_dtype(q)  # the logits' inputs and products: q, k as given (fp32 here under autocast)
            k, v = k.to(wide), v.to(dtype)
            plan = TilePlan(q, k, key_blocks, valid, first, block, window, key_pos, windowed, used)
            out = BlockSparseAttention.attend(plan, q, k, v, scale)
        ctx.save_for_backward(q, k, v, key_blocks, valid, key_pos, windowed, used)
        ctx.meta = (first, block, window, scale)
        return out

    @staticmethod
    def attend(plan: TilePlan, q, k, v, scale: float):
        """The output (B, H, nq C, d_v), tile chunk by tile chunk."""
        k_table, v_table = plan.table(k), plan.table(v)
        out = v.new_empty(*q.shape[:-1], v.shape[-1])
        q_buf, o_buf = plan.scratch(q, wide_dtype(q)), plan.scratch(v)
        k_buf, v_buf = plan.buffers(k, v)
        logits = plan.logits(q)
        for a, z, kc in plan.chunks:
            hidden, blind = plan.hidden(a, z, kc)
            q_c = plan.stage(q, a, z, q_buf, scale)
            p = tile_probs(q_c, plan.gather(k_table, a, z, kc, k_buf), hidden, blind, plan.logits_of(logits, z - a, kc))
            o_c = torch.bmm(p.to(v.dtype), plan.gather(v_table, a, z, kc, v_buf), out=o_buf[: z - a])
            plan.tiles_of(out, a, z).copy_(o_c.view(z - a, plan.r, plan.block, -1))
        return out

    @staticmethod
    def backward(ctx, d_out):
        with torch.autocast(d_out.device.type, enabled=False):  # backward may run inside the caller's autocast
            return BlockSparseAttention.grads(ctx, d_out)

    @staticmethod
    def grads(ctx, d_out):
        q, k, v, key_blocks, valid, key_pos, windowed, used = ctx.saved_tensors
        first, block, window, scale = ctx.meta
        plan = TilePlan(q, k, key_blocks, valid, first, block, window, key_pos, windowed, used)
        wide = wide_dtype(q)
        k_table, v_table = plan.table(k), plan.table(v)
        dk_table, dv_table = torch.zeros_like(k_table), torch.zeros_like(v_table, dtype=wide)
        dq = q.new_empty(q.shape, dtype=wide)
        q_buf, dq_buf, do_buf = plan.scratch(q, wide), plan.scratch(q, wide), plan.scratch(v)
        k_buf, v_buf = plan.buffers(k, v)
        logits, d_logits = plan.logits(q), plan.logits(q)
        for a, z, kc in plan.chunks:
            n = z - a
            hidden, blind = plan.hidden(a, z, kc)
            k_c, v_c = plan.gather(k_table, a, z, kc, k_buf), plan.gather(v_table, a, z, kc, v_buf)
            q_c, do_c = plan.stage(q, a, z, q_buf, scale), plan.stage(d_out, a, z, do_buf)
            p = tile_probs(q_c, k_c, hidden, blind, plan.logits_of(logits, n, kc))
            dp = plan.logits_of(d_logits, n, kc)
            if do_c.dtype == wide:
                TILE_PRODUCTS(do_c, v_c.transpose(1, 2), out=dp)
            else:  # dO V^T in the compute dtype (as explicit_attention's autograd computes it), then widened
                dp.copy_(torch.bmm(do_c, v_c.transpose(1, 2)))
            delta = (p * dp).sum(-1, keepdim=True)  # rowsum(P * dP) = rowsum(dO * O), exact in fp32
            ds = dp.sub_(delta).mul_(p)  # dS = P (dP - delta), in fp32
            dq_c = TILE_PRODUCTS(ds, k_c, out=dq_buf[:n])
            torch.mul(dq_c.view(n, plan.r, block, -1), scale, out=plan.tiles_of(dq, a, z))  # Q was scaled
            index = plan.picks(a, z, kc)
            dk = TILE_PRODUCTS(ds.transpose(1, 2), q_c)
            dk_table.index_add_(0, index, dk.view(-1, block, k.shape[-1]))
            dv = torch.bmm(p.to(do_c.dtype).transpose(1, 2), do_c)
            dv_table.index_add_(0, index, dv.view(-1, block, v.shape[-1]).to(wide))
        s = k.shape[1]
        dk = dk_table.view(k.shape[0], -1, k.shape[-1])[:, :s]
        dv = dv_table.view(v.shape[0], -1, v.shape[-1])[:, :s]
        grads = (x.to(dtype) for x, dtype in zip((dq, dk, dv), ctx.input_dtypes))
        return *grads, None, None, None, None, None, None, None, None, None
