"""Learning rates driven by the training state: reduce-on-plateau and the loss-spike guard.

Reduce on plateau (schedule.name="plateau"), after each evaluation with validation loss L:
    improved  = L < best * (1 - threshold)
    bad       = 0 if improved else bad + 1            (not counted during a cooldown)
    if bad > patience:  scale = max(scale * factor, min_ratio);  bad = 0;  cooldown = cooldown_evals
The learning rate is  peak * warmup(step) * scale.

Spike guard (schedule.spike_guard=true, any schedule), before each optimizer step with loss l and
pre-clip gradient norm g, keeping exponential moving means and variances of both:
    spike  = l or g not finite,  or  (n >= min_steps  and  x > mean_x + k * std_x  for x in {l, g})
    spike  -> skip the update ("skip") or restore the last good snapshot of weights and optimizer
              ("rollback"), then  guard_scale *= lr_factor.  "auto" skips an isolated spike (a bad
              batch: the lr is not to blame and stays) and rolls back, lowering the lr, a non-finite
              spike or one within `repeat_window` steps of the last (the weights themselves went bad)
    normal -> update the statistics;  guard_scale = min(1, guard_scale * lr_factor^(-1/recover_steps))
The learning rate is multiplied by guard_scale, so it returns to the schedule's value after
`recover_steps` quiet steps. A rollback snapshot is one copy of the parameters and the optimizer
state (for AdamW: 3x the parameters' memory, copied in one pass: cheap next to a training step),
with the running statistics, taken every `snapshot_every` quiet steps and at every
checkpoint, so a resumed run rolls back to the same state an uninterrupted one would.

Both controllers keep plain numbers only: `state_dict()` goes into the checkpoint's train_state.
"""

from __future__ import annotations

import copy
import math

import torch

from nanoseek.config import ScheduleConfig


class PlateauController:
    """Reduce-on-plateau of the validation loss; `scale` multiplies the learning rate."""

    def __init__(self, cfg: ScheduleConfig):
        self.factor, self.patience, self.cooldown_evals = cfg.plateau_factor, cfg.plateau_patience, cfg.plateau_cooldown
        self.threshold, self.min_ratio = cfg.plateau_threshold, cfg.plateau_min_ratio
        self.best = math.inf
        self.bad = 0
        self.cooldown = 0
        self.scale = 1.0

    def observe(self, val_loss: float) -> bool:
        """Take one evaluation's loss; True when it lowered the learning rate."""
        if val_loss < self.best * (1 - self.threshold):
            self.best, self.bad = val_loss, 0
        elif self.cooldown == 0:
            self.bad += 1
        if self.cooldown:
            self.cooldown -= 1
            return False
        if self.bad > self.patience and self.scale > self.min_ratio:
            self.scale = max(self.scale * self.factor, self.min_ratio)
            self.bad, self.cooldown = 0, self.cooldown_evals
            return True
        return False

    def state_dict(self) -> dict:
        best = self.best if math.isfinite(self.best) else None  # JSON has no infinity
        return {"best": best, "bad": self.bad, "cooldown": self.cooldown, "scale": self.scale}

    def load_state_dict(self, state: dict):
        self.best = math.inf if state["best"] is None else float(state["best"])
        self.bad = int(state["bad"])
        self.cooldown, self.scale = int(state["cooldown"]), float(state["scale"])


class RunningStat:
    """Exponential moving mean and variance (West's update): mean += a d;  var = (1 - a)(var + a d^2)."""

    def __init__(self, decay: float):
        self.decay, self.mean, self.var, self.n = decay, 0.0, 0.0, 0

    def update(self, x: float):
        self.n += 1
        if self.n == 1:
            self.mean = x
            return
        a = 1 - self.decay
        d = x - self.mean
        self.mean += a * d
        self.var = (1 - a) * (self.var + a * d * d)

    def limit(self, k: float) -> float:
        return self.mean + k * math.sqrt(self.var)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "n": self.n}

    def load_state_dict(self, state: dict):
        self.mean, self.var, self.n = float(state["mean"]), float(state["var"]), int(state["n"])


class SpikeGuard:
    """Detects loss / gradient-norm spikes, skips or rolls back the update, lowers then recovers the lr."""

    def __init__(self, cfg: ScheduleConfig):
        self.cfg = cfg
        self.loss = RunningStat(cfg.spike_ema)
        self.grad = RunningStat(cfg.spike_ema)
        self.scale = 1.0
        self.events = 0
        self.quiet_steps = 0  # steps since the last snapshot
        self.since_event: int | None = None  # steps since the last spike
        self._snapshot: tuple[dict, dict, dict] | None = None
        self.snapshot_step: int | None = None

    def check(self, loss: float, grad_norm: float) -> dict | None:
        """None for a normal step (statistics updated); otherwise the spike's description."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            reason = "non-finite"
        elif self.loss.n >= self.cfg.spike_min_steps and loss > self.loss.limit(self.cfg.spike_k):
            reason = "loss"
        elif self.grad.n >= self.cfg.spike_min_steps and grad_norm > self.grad.limit(self.cfg.spike_k):
            reason = "grad_norm"
        else:
            self.loss.update(loss)
            self.grad.update(grad_norm)
            self.since_event = None if self.since_event is None else self.since_event + 1
            self.scale = min(1.0, self.scale * self.cfg.spike_lr_factor ** (-1.0 / self.cfg.spike_recover_steps))
            return None
        self.events += 1
        action = self.cfg.spike_action
        if action == "auto":
            repeated = self.since_event is not None and self.since_event < self.cfg.spike_repeat_window
            action = "rollback" if reason == "non-finite" or repeated else "skip"
        if action == "rollback" or self.cfg.spike_action == "skip":  # auto: a lone bad batch keeps the lr
            self.scale *= self.cfg.spike_lr_factor
        self.since_event = 0
        return {
            "spike": reason,
            "action": action,
            "spike_loss": loss,
            "spike_grad_norm": grad_norm,
            "loss_limit": self.loss.limit(self.cfg.spike_k),
            "grad_norm_limit": self.grad.limit(self.cfg.spike_k),
            "lr_scale": self.scale,
        }

    # ---------------------------------------------------------------- snapshots (rollback)

    def maybe_snapshot(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, force=False):
        """Keep a copy of weights and optimizer state every `snapshot_every` quiet steps (or now)."""
        if self.cfg.spike_action == "skip":
            return
        self.quiet_steps += 1
        if force or self._snapshot is None or self.quiet_steps >= self.cfg.spike_snapshot_every:
            self.snapshot(model, optimizer, step)

    def snapshot(self, model, optimizer, step: int):
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        stats = {"loss": self.loss.state_dict(), "grad": self.grad.state_dict()}
        self._snapshot = (weights, copy.deepcopy(optimizer.state_dict()), stats)
        self.snapshot_step, self.quiet_steps = step, 0

    def rollback(self, model, optimizer) -> int | None:
        """Restore the last snapshot's weights, optimizer state and running statistics; its step (None
        when there is none). The learning-rate scale stays lowered."""
        if self._snapshot is None:
            return None
        weights, opt_state, stats = self._snapshot
        self.loss.load_state_dict(stats["loss"])
        self.grad.load_state_dict(stats["grad"])
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(weights[k])
        optimizer.load_state_dict(copy.deepcopy(opt_state))
        return self.snapshot_step

    def state_dict(self) -> dict:
        return {
            "loss": self.loss.state_dict(),
            "grad": self.grad.state_dict(),
            "scale": self.scale,
            "events": self.events,
            "quiet_steps": self.quiet_steps,
            "since_event": self.since_event,
        }

    def load_state_dict(self, state: dict):
        self.loss.load_state_dict(state["loss"])
        self.grad.load_state_dict(state["grad"])
        self.scale, self.events = float(state["scale"]), int(state["events"])
        self.quiet_steps = int(state["quiet_steps"])
        self.since_event = state.get("since_event")
