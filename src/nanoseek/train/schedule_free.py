"""Schedule-free AdamW (Defazio et al., "The Road Less Scheduled", 2024): no decay schedule to choose.

Three sequences per parameter. The gradient is taken at y, the base step moves z, and x is the
running average of z that the model is evaluated and saved at:
    y_t     = (1 - b1) z_t + b1 x_t
    v_t     = b2 v_{t-1} + (1 - b2) g_t^2,          g_t = grad f(y_t)
    z_{t+1} = z_t - lr_t (g_t / (sqrt(v_t / (1 - b2^t)) + eps) + wd y_t)
    c_{t+1} = lr_t^2 / sum_{i<=t} lr_i^2               (warmup steps weigh less in the average)
    x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}
During training the parameters hold y; `eval_weights()` swaps x in for evaluation and saving.
Checkpoints store x as the model's weights (what inference wants) and z, v in the optimizer state;
`y` is rebuilt from them on load with the same formula, so resuming is exact.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class ScheduleFreeAdamW(torch.optim.Optimizer):
    def __init__(self, groups, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, lr_sq_sum=0.0, k=0))
        self.holds_x = False  # True inside eval_weights(): the parameters then hold x

    @torch.no_grad()
    def step(self, closure=None):
        if self.holds_x:
            raise RuntimeError("schedule-free step while the parameters hold x (inside eval_weights)")
        for group in self.param_groups:
            b1, b2 = group["betas"]
            group["k"] += 1
            lr = group["lr"]
            group["lr_sq_sum"] += lr * lr
            c = lr * lr / group["lr_sq_sum"] if group["lr_sq_sum"] > 0 else 0.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["z"] = p.detach().clone()
                    state["x"] = p.detach().clone()
                    state["exp_avg_sq"] = torch.zeros_like(p)
                z, x, v = state["z"], state["x"], state["exp_avg_sq"]
                g = p.grad
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v / (1 - b2 ** group["k"])).sqrt_().add_(group["eps"])
                z.add_(p, alpha=-lr * group["weight_decay"])  # decay at y, as the paper's AdamW form
                z.addcdiv_(g, denom, value=-lr)
                x.lerp_(z, c)
                p.copy_(interpolate_y(z, x, b1))

    @contextmanager
    def eval_weights(self):
        """Parameters hold x (the average) inside the block, y again after it."""
        if self.holds_x:
            yield
            return
        self._swap_to_x()
        try:
            yield
        finally:
            self.restore_y()

    @torch.no_grad()
    def _swap_to_x(self):
        for p, state in self._params_with_state():
            p.copy_(state["x"])
        self.holds_x = True

    @torch.no_grad()
    def restore_y(self):
        """Parameters <- y = (1 - b1) z + b1 x (also after loading a checkpoint whose weights are x)."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    p.copy_(interpolate_y(state["z"], state["x"], group["betas"][0]))
        self.holds_x = False

    def _params_with_state(self):
        for group in self.param_groups:
            for p in group["params"]:
                if self.state.get(p):
                    yield p, self.state[p]


def interpolate_y(z: torch.Tensor, x: torch.Tensor, beta1: float) -> torch.Tensor:
    return torch.lerp(z, x, beta1)  # (1 - b1) z + b1 x
