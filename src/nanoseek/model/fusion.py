"""Adaptive layer fusion: how the outputs of the layers are combined into the stream the next reads.

X_0 = the embeddings, X_i = the output of block i (for `residual`, X_i = h_{i-1} + Attn + FFN).

residual   h_i = X_i                                           (the plain pre-norm residual stream)
dwa        h_i = sum_{j<=i} a_ij X_j,   a_ii = 1, a_ij = 0 else at init   (DenseFormer depth-weighted average)
dynamic    h_i = X_i + g_i (sum_{j<=i} w_ij(x) X_j - X_i),  w_i(x) = softmax(W_i RMSNorm(X_i)) per token,
           g_i = 0 at init                                  (input-conditioned weights over earlier outputs)
hyper      n residual streams H (n x D).  For each sublayer F (attention, FFN):
               x_in = a_m(H)^T H,   y = F(x_in),   H' = A_r(H)^T H + b(H) y^T
           with static parts (a_m = e_{layer mod n}, A_r = I, b = 1 at init) plus dynamic parts
           tanh(RMSNorm(H) W) * s, W = 0, s = 0.01 at init  (Hyper-Connections, Zhu et al.);
           the streams are averaged before the final norm
mhc        DeepSeek-V4's manifold-constrained hyper-connections, from M = RMSNorm(flat H) fn^T:
               pre = sigmoid(M_pre s0 + b_pre) + eps,  post = 2 sigmoid(M_post s1 + b_post),
               comb = Sinkhorn(softmax(M_comb s2 + b_comb) + eps)   (rows and columns sum to 1),
               x_in = sum_j pre_j H_j,  y = F(x_in),  H'_k = post_k y + sum_j comb_jk H_j
           and the streams are fused by an input-dependent sigmoid head before the final norm.

A final-representation scalar mix, `ScalarMix`: e = gamma * sum_j softmax(w)_j RMSNorm(X_j), is what
`embed()` mean-pools into sentence vectors.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig


def rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Unweighted RMSNorm in fp32."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


# ------------------------------------------------------------------------------------ block-level fusion


class DepthWeightedAverage(nn.Module):
    """DenseFormer: after block i, the stream is a learned weighted sum of X_0..X_i."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        init = torch.zeros(layer + 2)
        init[-1] = 1.0
        self.alpha = nn.Parameter(init)

    def forward(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(outputs, dim=0)
        return torch.einsum("j,j...->...", self.alpha.to(stacked.dtype), stacked)

    def weights(self, outputs) -> torch.Tensor:
        return self.alpha.detach()[None].expand(outputs[0].shape[1], -1)


class DynamicFusion(nn.Module):
    """Per-token softmax weights over X_0..X_i computed from X_i; a zero-initialized gate."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, layer + 2, bias=True)
        self.gate = nn.Parameter(torch.zeros(1))
        self.eps = config.rms_norm_eps

    def reset_extra_parameters(self, std: float, out_std: float):
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        nn.init.zeros_(self.gate)

    def mix(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """Softmax weights (B, T, i+2) from the newest output."""
        return self.proj(rms(outputs[-1], self.eps).to(outputs[-1].dtype)).float().softmax(-1)

    def forward(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        w = self.mix(outputs).to(outputs[-1].dtype)
        stacked = torch.stack(outputs, dim=-1)  # (B, T, D, i+2)
        mixed = (stacked * w[..., None, :]).sum(-1)
        return outputs[-1] + self.gate.to(mixed.dtype) * (mixed - outputs[-1])

    def weights(self, outputs) -> torch.Tensor:
        return self.mix(outputs)[0].detach()


BLOCK_FUSIONS = {"dwa": DepthWeightedAverage, "dynamic": DynamicFusion}


# ------------------------------------------------------------------------------------ multi-stream fusion


class HyperConnection(nn.Module):
    """Hyper-connections around one sublayer: static + dynamic width (a_m, A_r) and depth (b) maps."""

    def __init__(self, config: ModelConfig, sublayer_index: int):
        super().__init__()
        n, d = config.hc_mult, config.hidden_size
        self.n, self.eps = n, config.rms_norm_eps
        static_m = torch.zeros(n)
        static_m[sublayer_index % n] = 1.0
        self.static_m = nn.Parameter(static_m)  # width: which streams feed the sublayer
        self.static_r = nn.Parameter(torch.eye(n))  # width: stream -> stream
        self.static_b = nn.Parameter(torch.ones(n))  # depth: where the output is written
        self.dynamic_proj = nn.Linear(d, 1 + n + 1, bias=False)  # a_m, A_r rows, b per stream
        self.dynamic_scale = nn.Parameter(torch.full((3,), 0.01))

    def reset_extra_parameters(self, std: float, out_std: float):
        nn.init.zeros_(self.dynamic_proj.weight)  # tanh(0) = 0: the static maps alone at init
        nn.init.constant_(self.dynamic_scale, 0.01)

    def maps(self, streams: torch.Tensor):
        """a_m (B,T,n), A_r (B,T,n,n), b (B,T,n)."""
        dyn = torch.tanh(self.dynamic_proj(rms(streams, self.eps).to(streams.dtype))).float()  # (B,T,n,n+2)
        a_m = self.static_m + self.dynamic_scale[0] * dyn[..., 0]
        a_r = self.static_r + self.dynamic_scale[1] * dyn[..., 1 : 1 + self.n]
        b = self.static_b + self.dynamic_scale[2] * dyn[..., -1]
        return a_m, a_r, b

    def forward(self, streams: torch.Tensor, sublayer) -> torch.Tensor:
        a_m, a_r, b = self.maps(streams)
        x_in = torch.einsum("btn,btnd->btd", a_m.to(streams.dtype), streams)
        y = sublayer(x_in)
        mixed = torch.einsum("btjk,btjd->btkd", a_r.to(streams.dtype), streams)
        return mixed + b.to(streams.dtype)[..., None] * y[:, :, None]


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Doubly stochastic projection, DeepSeek-V4 order: row softmax (+eps), column-normalize, then
    iters-1 rounds of (row-normalize, column-normalize)."""
    m = logits.softmax(-1) + eps
    m = m / (m.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(-1, keepdim=True) + eps)
        m = m / (m.sum(-2, keepdim=True) + eps)
    return m


class ManifoldHyperConnection(nn.Module):
    """DeepSeek-V4 mHC around one sublayer (all maps in fp32). Names follow HF: fn, base, scale."""

    def __init__(self, config: ModelConfig, sublayer_index: int = 0):
        super().__init__()
        n, d = config.hc_mult, config.hidden_size
        self.n, self.eps = n, config.rms_norm_eps
        self.hc_eps, self.iters = config.hc_eps, config.hc_sinkhorn_iters
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * d))
        self.base = nn.Parameter(torch.zeros((2 + n) * n))
        self.scale = nn.Parameter(torch.ones(3))

    def reset_extra_parameters(self, std: float, out_std: float):
        nn.init.normal_(self.fn, 0.0, std)
        nn.init.zeros_(self.base)
        nn.init.ones_(self.scale)

    def maps(self, streams: torch.Tensor):
        b, t, n, d = streams.shape
        flat = rms(streams.reshape(b, t, n * d), self.eps)
        m = flat @ self.fn.float().T
        m_pre, m_post, m_comb = m.split([n, n, n * n], dim=-1)
        b_pre, b_post, b_comb = self.base.float().split([n, n, n * n])
        pre = torch.sigmoid(m_pre * self.scale[0] + b_pre) + self.hc_eps
        post = 2 * torch.sigmoid(m_post * self.scale[1] + b_post)
        comb = sinkhorn((m_comb * self.scale[2] + b_comb).view(b, t, n, n), self.iters, self.hc_eps)
        return pre, post, comb

    def forward(self, streams: torch.Tensor, sublayer) -> torch.Tensor:
        pre, post, comb = self.maps(streams)
        x_in = torch.einsum("btn,btnd->btd", pre, streams.float()).to(streams.dtype)
        y = sublayer(x_in)
        mixed = torch.einsum("btjk,btjd->btkd", comb, streams.float())
        return (post[..., None] * y.float()[:, :, None] + mixed).to(streams.dtype)


class StreamHead(nn.Module):
    """Fuse the n streams into one before the final norm: V4's input-dependent hc_head for mhc, the mean
    for hyper (so that static hyper-connections at init equal the plain residual exactly)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        n, d = config.hc_mult, config.hidden_size
        self.n, self.eps, self.hc_eps = n, config.rms_norm_eps, config.hc_eps
        self.input_dependent = config.fusion == "mhc"
        if self.input_dependent:
            self.hc_fn = nn.Parameter(torch.empty(n, n * d))
            self.hc_base = nn.Parameter(torch.zeros(n))
            self.hc_scale = nn.Parameter(torch.ones(1))

    def reset_extra_parameters(self, std: float, out_std: float):
        if not self.input_dependent:
            return
        nn.init.normal_(self.hc_fn, 0.0, std)
        nn.init.zeros_(self.hc_base)
        nn.init.ones_(self.hc_scale)

    def weights(self, streams: torch.Tensor) -> torch.Tensor:
        b, t, n, d = streams.shape
        if not self.input_dependent:  # hyper: the streams' mean (the paper sums; the final norm makes it equal)
            return streams.new_full((b, t, n), 1.0 / n, dtype=torch.float32)
        flat = rms(streams.reshape(b, t, n * d), self.eps)
        return torch.sigmoid(flat @ self.hc_fn.float().T * self.hc_scale + self.hc_base) + self.hc_eps

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        w = self.weights(streams)
        return torch.einsum("btn,btnd->btd", w, streams.float()).to(streams.dtype)


STREAM_FUSIONS = {"hyper": HyperConnection, "mhc": ManifoldHyperConnection}


# ------------------------------------------------------------------------------------ embeddings


class ScalarMix(nn.Module):
    """e = gamma * sum_j softmax(w)_j RMSNorm(X_j) over the embedding and every block output (ELMo).

    The weights are a persistent buffer (uniform at init): they are not part of the LM loss."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.register_buffer("logits", torch.zeros(config.num_hidden_layers + 1))
        self.register_buffer("gamma", torch.ones(1))

    def forward(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        w = self.logits.softmax(0)
        return self.gamma * sum(wj * rms(x) for wj, x in zip(w, outputs))
