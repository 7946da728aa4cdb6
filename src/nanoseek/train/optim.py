"""AdamW with parameter groups, and the learning-rate schedules ("adaptive learning rate").

AdamW (Loshchilov & Hutter): m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
    w -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * w)
Weight decay applies to matrices only: norms, biases and embedding tables are not decayed.
Muon (optim.name="muon") orthogonalizes the momentum of the hidden matrices (Newton-Schulz) and
keeps AdamW for embeddings, head, norms and biases. optim.name="schedule_free" is schedule-free
AdamW (train/schedule_free.py). schedule.name="plateau" and the spike guard react to the training
state (train/adaptive.py); their factor multiplies the one below.

A schedule maps the step (and the fraction of training done, p in [0, 1]) to a multiplier of the
peak learning rate. All start with a linear warmup over `warmup_steps` (except inverse_sqrt, whose
warmup is part of its formula):
    constant:      1
    cosine:        floor + (1 - floor) * (1 + cos(pi p)) / 2
    wsd:           1 until p = 1 - decay_fraction, then linear down to floor (warmup-stable-decay)
    multistep:     gamma^(number of milestones passed); DeepSeek: x0.316 at 80% and 90% of tokens
    inverse_sqrt:  min(step / warmup, sqrt(warmup / step))   (Vaswani: d^-0.5 min(s^-0.5, s w^-1.5))

The fraction p counts whichever budget ends training first (steps, tokens or seconds).

    >>> lr_multiplier(ScheduleConfig(name="cosine", warmup_steps=0), step=0, progress=1.0)
    0.1
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from nanoseek.config import OptimConfig, ScheduleConfig
from nanoseek.train.schedule_free import ScheduleFreeAdamW


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay 2-D+ weights of Linear layers; never norms, biases or embedding tables."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() >= 2 and id(p) not in embeddings and "pos_embed" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "muon":
        return Muon(
            muon_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, momentum=cfg.muon_momentum
        )
    groups = parameter_groups(model, cfg.weight_decay)
    if cfg.name == "schedule_free":
        return ScheduleFreeAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    # the fused kernel updates each tensor in one pass with no temporaries (foreach allocates a
    # copy of every parameter per elementwise op); it needs floating CPU/CUDA parameters
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused or None,
        foreach=None if fused else True,
    )


def lr_multiplier(cfg: ScheduleConfig, step: int, progress: float) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based), `progress` in [0, 1]."""
    warmup = cfg.warmup_steps
    if cfg.name == "inverse_sqrt":
        s = step + 1
        return min(s / warmup, math.sqrt(warmup / s)) if warmup else 1.0 / math.sqrt(s)
    if warmup and step < warmup:
        return (step + 1) / warmup
    p = min(max(progress, 0.0), 1.0)
    floor = cfg.min_lr_ratio
    if cfg.name in ("constant", "plateau"):  # plateau: its controller scales this (train/adaptive.py)
        return 1.0
    if cfg.name == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
    if cfg.name == "wsd":
        start = 1.0 - cfg.decay_fraction
        if p <= start:
            return 1.0
        return 1.0 - (1.0 - floor) * (p - start) / max(cfg.decay_fraction, 1e-12)
    if cfg.name == "multistep":
        return cfg.gamma ** sum(p >= m for m in cfg.milestones)
    raise ValueError(f"unknown schedule {cfg.name!r}")


def eval_weights(optimizer: torch.optim.Optimizer):
    """A context in which the parameters hold the weights to evaluate and save (schedule-free: x)."""
    return optimizer.eval_weights() if isinstance(optimizer, ScheduleFreeAdamW) else contextlib.nullcontext()


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr  # Muon groups scale it by their own lr_scale


# ------------------------------------------------------------------------------------ Muon


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately orthogonalize g (the nearest U V^T of its SVD) with a quintic iteration."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float() / (g.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for the hidden matrices, AdamW for everything else, in one optimizer.

    Muon (matrix groups): m = mu m + g;  u = NS5(g + mu m);  w -= lr (u sqrt(max(1, rows/cols)) + wd w)
    AdamW (other groups): as torch's AdamW. A group's "muon" flag picks the rule.
    """

    def __init__(self, groups: list[dict], lr: float, betas=(0.9, 0.95), eps: float = 1e-8, momentum: float = 0.95):
        super().__init__(
            groups, dict(lr=lr, betas=betas, eps=eps, momentum=momentum, weight_decay=0.0, muon=False, lr_scale=1.0)
        )

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr = group["lr"] * group["lr_scale"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if group["muon"]:
                    self._muon(p, state, lr, group)
                else:
                    self._adamw(p, state, lr, group)

    def _muon(self, p, state, lr, group):
        buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
        buf.mul_(group["momentum"]).add_(p.grad)
        update = newton_schulz(p.grad + group["momentum"] * buf)
        update = update * max(1.0, p.shape[0] / p.shape[1]) ** 0.5
        p.mul_(1 - lr * group["weight_decay"]).add_(update.to(p.dtype), alpha=-lr)

    def _adamw(self, p, state, lr, group):
        b1, b2 = group["betas"]
        if not state:
            state["step"] = torch.zeros(())
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"].item()
        state["exp_avg"].lerp_(p.grad, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(group["eps"])
        p.mul_(1 - lr * group["weight_decay"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1**t))


def muon_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """2-D weights inside the blocks -> Muon; embeddings, head, norms, biases, routers -> AdamW."""
    adam = parameter_groups(model, cfg.weight_decay)
    not_muon = {id(model.lm_head.weight)} | {
        id(p)
        for n, p in model.named_parameters()
        if n.endswith("gate.weight") or "_hc." in n or n.startswith("stream_head.")
    }
    muon, decay = [], []
    for p in adam[0]["params"]:
        (muon if p.dim() == 2 and id(p) not in not_muon else decay).append(p)
    scale = cfg.muon_lr / cfg.lr  # the schedule multiplies every group's lr alike
    return [
        {"params": muon, "weight_decay": cfg.weight_decay, "muon": True, "lr_scale": scale},
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": adam[1]["params"], "weight_decay": 0.0},
    ]
