"""The routed experts of DeepSeekMoE: E SwiGLU experts stored as stacked weights.

    Expert_e(x) = W2_e (SiLU(W1_e x) * W3_e x)      ([W1_e; W3_e] = gate_up_proj[e], W2_e = down_proj[e])
    (V4 clamps the pre-activations at `swiglu_limit`, as model/ffn.py's `swiglu`)

`forward` takes the M token copies sorted by expert and runs each expert's rows as one batched
matmul pair (a loop over the experts, not the tokens); `per_pair` (decoding, a few tokens) gathers
each copy's expert weights and runs one batched matmul for all copies. The model's default training
path is `nanoseek.kernels.grouped_mm.GroupedExperts` (one grouped matmul for all experts).

Names follow Hugging Face in memory: `experts.gate_up_proj` [E, 2I, D] (gate rows first),
`experts.down_proj` [E, D, I].

    >>> experts = RoutedExperts(4, 8, 16)
    >>> _ = torch.nn.init.normal_(experts.gate_up_proj), torch.nn.init.normal_(experts.down_proj)
    >>> experts(torch.randn(5, 8), torch.tensor([2, 0, 3, 0])).shape
    torch.Size([5, 8])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.ffn import swiglu


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in at x: autocast's on x's device type when it is on, else x's (the
    experts cast their stacked weights to it themselves, as autocast would a linear's)."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as stacked weights."""

    def __init__(self, n_experts: int, dim: int, hidden: int, limit: float | None = None):
        super().__init__()
        self.hidden, self.limit = hidden, limit
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))

    def per_pair(self, x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        """sum_k w_nk Expert_{idx_nk}(x_n) with each pair's expert weights gathered (few tokens)."""
        n, k = idx_NK.shape
        dtype = matmul_dtype(x_ND)
        idx_P = idx_NK.flatten()
        # index_select copies the P experts' weights whole (advanced indexing w[idx] goes element by
        # element) and each pair is a row vector times W^T (a column-vector bmm is much slower)
        up_PXD = torch.index_select(self.gate_up_proj, 0, idx_P).to(dtype)
        down_PDI = torch.index_select(self.down_proj, 0, idx_P).to(dtype)
        x_P1D = x_ND.to(dtype).repeat_interleave(k, dim=0)[:, None, :]
        h_P1X = torch.bmm(x_P1D, up_PXD.transpose(1, 2))
        gate_P1I, up_P1I = h_P1X.split(self.hidden, dim=-1)
        y_PD = torch.bmm(swiglu(gate_P1I, up_P1I, self.limit), down_PDI.transpose(1, 2))[:, 0]
        return (y_PD.view(n, k, -1) * w_NK[..., None].to(dtype)).sum(1)

    def forward(
        self,
        x: torch.Tensor,
        counts_E: torch.Tensor,
        w_M: torch.Tensor | None = None,
        rows_M: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Expert outputs (M, D) for the M token copies sorted by expert. x: the copies (M, D), or
        with `rows_M` the tokens (N, D) and the token of each copy (x[rows_M] are the copies);
        counts_E: how many copies each expert owns; w_M: the router's weight of each copy, which
        scales its output (None: unweighted)."""
        dtype = matmul_dtype(x)
        x_MD = (x if rows_M is None else x.index_select(0, rows_M)).to(dtype)
        y = []
        for e, x_CD in enumerate(x_MD.split(counts_E.tolist())):  # expert e's C copies
            gate_CI, up_CI = F.linear(x_CD, self.gate_up_proj[e].to(dtype)).chunk(2, dim=-1)
            y.append(F.linear(swiglu(gate_CI, up_CI, self.limit), self.down_proj[e].to(dtype)))
        y_MD = torch.cat(y)
        return y_MD if w_M is None else y_MD * w_M[:, None].to(dtype)
