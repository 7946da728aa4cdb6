"""AdamW with parameter groups, and the learning-rate schedules ("adaptive learning rate").

AdamW (Loshchilov & Hutter): m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
    w -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * w)
Weight decay applies to matrices only: norms, biases and embedding tables are not decayed.

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

import math

import torch
from torch import nn

from ..config import OptimConfig, ScheduleConfig


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
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             foreach=True)


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
    if cfg.name == "constant":
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


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
