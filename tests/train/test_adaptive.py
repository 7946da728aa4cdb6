"""State-driven learning rates: reduce-on-plateau, the spike guard, schedule-free AdamW."""

import json
from pathlib import Path

import pytest
import torch
from run_configs import tiny_cfg

from nanoseek import ModelConfig, Transformer, load_model
from nanoseek.config import ScheduleConfig, build_train_config
from nanoseek.errors import NanoseekError
from nanoseek.train import loop
from nanoseek.train.adaptive import PlateauController, SpikeGuard
from nanoseek.train.optim import eval_weights, make_optimizer
from nanoseek.train.schedule_free import ScheduleFreeAdamW


def records(out) -> list[dict]:
    return [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ plateau


def test_plateau_lowers_the_lr_after_patience_bad_evaluations():
    p = PlateauController(ScheduleConfig(plateau_patience=2, plateau_factor=0.5, plateau_threshold=0.0))
    assert [p.observe(v) for v in (3.0, 2.0, 2.5, 2.1)] == [False, False, False, False]  # 2 bad: = patience
    assert p.observe(2.0) and p.scale == 0.5  # the third evaluation without improvement
    assert not p.observe(1.0) and p.scale == 0.5  # an improvement resets the count


def test_plateau_cooldown_and_floor():
    cfg = ScheduleConfig(plateau_patience=0, plateau_factor=0.1, plateau_cooldown=2, plateau_min_ratio=0.05)
    p = PlateauController(cfg)
    fired = [p.observe(1.0) for _ in range(7)]
    assert fired == [False, True, False, False, True, False, False]  # first sets best; cooldown of 2
    assert p.scale == 0.05  # 0.1 then 0.01 clipped to the floor


def test_plateau_needs_evaluations():
    with pytest.raises(NanoseekError, match="eval.every"):
        build_train_config(preset="gpt2-tiny", overrides={"schedule.name": "plateau", "eval.every": 0})


def test_resume_mid_plateau_equals_an_uninterrupted_run(small_corpus, tmp_path):
    plateau = {"schedule.name": "plateau", "eval.every": 2, "schedule.plateau_patience": 0}
    plateau["schedule.plateau_threshold"] = 0.5  # every evaluation after the first counts as a plateau
    full, part = tmp_path / "full", tmp_path / "part"
    loop.train(tiny_cfg(small_corpus, full, **plateau), quiet=True)
    loop.train(tiny_cfg(small_corpus, part, **plateau), quiet=True, stop_after=5)
    loop.train(tiny_cfg(small_corpus, part, **plateau), resume=True, quiet=True)
    steps = [(r["loss"], r["lr"]) for r in records(full) if "loss" in r]
    assert [(r["loss"], r["lr"]) for r in records(part) if "loss" in r] == steps  # exact
    assert [r["step"] for r in records(full) if r.get("event") == "plateau"] == [4, 6, 8, 10]
    assert steps[5][1] < steps[2][1]  # the lr had dropped before the interruption


# ------------------------------------------------------------------------------ spike guard


def guard_cfg(**kw):
    base = dict(spike_guard=True, spike_min_steps=3, spike_k=4.0, spike_snapshot_every=2, spike_lr_factor=0.5)
    return ScheduleConfig(**{**base, **kw})


def train_step(model, optimizer, guard, x, step, loss_scale=1.0):
    out = model(x, x)
    (out.loss * loss_scale).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()
    event = guard.check(out.loss.item() * loss_scale, grad_norm)
    if event is None:
        optimizer.step()
        guard.maybe_snapshot(model, optimizer, step)
    else:
        guard.rollback(model, optimizer)
    optimizer.zero_grad(set_to_none=True)
    return event


def test_spike_rollback_restores_the_pre_spike_weights_and_optimizer_exactly():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("gpt2-tiny"))
    optimizer = make_optimizer(model, build_train_config(preset="gpt2-tiny").optim)
    guard = SpikeGuard(guard_cfg(spike_snapshot_every=3, spike_action="rollback"))
    x = torch.randint(0, 64, (2, 16))
    for step in range(1, 6):  # snapshots after steps 1 and 4
        assert train_step(model, optimizer, guard, x, step) is None
    assert guard.snapshot_step == 4
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert not all(torch.equal(weights[k], v) for k, v in guard._snapshot[0].items())
    event = train_step(model, optimizer, guard, x, 6, loss_scale=1e6)  # the huge loss
    assert event["spike"] == "loss" and event["lr_scale"] == 0.5
    for k, v in model.state_dict().items():
        assert torch.equal(v, guard._snapshot[0][k]), k  # back at step 4 exactly
    moments = optimizer.state_dict()["state"]
    for i, s in guard._snapshot[1]["state"].items():
        assert all(torch.equal(s[n], moments[i][n]) for n in s)


def test_auto_skips_a_lone_spike_and_rolls_back_a_repeated_or_non_finite_one():
    guard = SpikeGuard(guard_cfg(spike_repeat_window=5, spike_min_steps=2, spike_k=3.0))
    for v in (1.0, 1.1, 0.9, 1.0):
        assert guard.check(v, 1.0) is None
    assert guard.check(50.0, 1.0)["action"] == "skip"  # a bad batch: nothing to undo
    assert guard.scale == 1.0  # nor is the lr to blame
    assert guard.check(1.0, 1.0) is None
    assert guard.check(50.0, 1.0)["action"] == "rollback"  # again, soon: the weights went bad
    assert guard.scale == 0.5
    for _ in range(6):
        guard.check(1.0, 1.0)
    assert guard.check(50.0, 1.0)["action"] == "skip"
    assert guard.check(float("inf"), 1.0)["action"] == "rollback"


def test_spike_guard_recovers_the_lr_geometrically():
    guard = SpikeGuard(guard_cfg(spike_recover_steps=4, spike_min_steps=1))
    for _ in range(3):
        guard.check(1.0, 1.0)
    assert guard.check(float("nan"), 1.0)["spike"] == "non-finite"
    assert guard.scale == 0.5
    for _ in range(4):
        guard.check(1.0, 1.0)
    assert guard.scale == pytest.approx(1.0)


def test_guard_keeps_a_too_high_lr_run_alive_and_logs_events(small_corpus, tmp_path):
    cfg = tiny_cfg(
        small_corpus,
        tmp_path,
        **{
            "optim.lr": 30.0,  # diverges without the guard
            "optim.grad_clip": 0.0,
            "schedule.warmup_steps": 0,
            "schedule.spike_guard": True,
            "schedule.spike_min_steps": 2,
            "schedule.spike_snapshot_every": 1,
            "train.max_steps": 16,
        },
    )
    summary = loop.train(cfg, quiet=True)
    events = [r for r in records(tmp_path) if r.get("event") == "spike"]
    assert summary["step"] == 16 and events
    assert all({"spike", "spike_loss", "spike_grad_norm", "lr_scale", "action"} <= set(e) for e in events)
    assert all("rolled_back_to" in e for e in events if e["action"] == "rollback")
    assert all(torch.isfinite(p).all() for p in load_model(tmp_path).parameters())


# ------------------------------------------------------------------------------ schedule-free


def test_schedule_free_follows_its_equations_on_a_quadratic():
    torch.manual_seed(0)
    a, b = torch.randn(5, 5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    w = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    b1, b2, eps, wd = 0.9, 0.99, 1e-8, 0.1
    opt = ScheduleFreeAdamW([{"params": [w], "weight_decay": wd}], lr=0.1, betas=(b1, b2), eps=eps)
    z, x, v, lr_sq = w.detach().clone(), w.detach().clone(), torch.zeros(5, dtype=torch.float64), 0.0
    for t, lr in enumerate([0.02, 0.05, 0.1, 0.1, 0.1, 0.1], start=1):  # a warmup, then constant
        for group in opt.param_groups:
            group["lr"] = lr
        y = (1 - b1) * z + b1 * x
        torch.testing.assert_close(w.detach(), y, rtol=0, atol=1e-15)
        loss = 0.5 * (a @ w - b).square().sum()
        loss.backward()
        g = a.T @ (a @ y - b)
        v = b2 * v + (1 - b2) * g * g
        z = z - lr * (g / ((v / (1 - b2**t)).sqrt() + eps) + wd * y)
        lr_sq += lr * lr
        c = lr * lr / lr_sq
        x = (1 - c) * x + c * z
        opt.step()
        opt.zero_grad()
    with eval_weights(opt):
        torch.testing.assert_close(w.detach(), x, rtol=0, atol=1e-14)
    torch.testing.assert_close(w.detach(), (1 - b1) * z + b1 * x, rtol=0, atol=1e-14)


def test_schedule_free_evaluates_and_saves_x_and_resumes_exactly(small_corpus, tmp_path):
    sf = {"optim.name": "schedule_free", "schedule.name": "constant", "eval.every": 4}
    full, part = tmp_path / "full", tmp_path / "part"
    loop.train(tiny_cfg(small_corpus, full, **sf), quiet=True)
    loop.train(tiny_cfg(small_corpus, part, **sf), quiet=True, stop_after=5)
    loop.train(tiny_cfg(small_corpus, part, **sf), resume=True, quiet=True)
    assert [r.get("loss", r.get("val_loss")) for r in records(part)] == [
        r.get("loss", r.get("val_loss")) for r in records(full)
    ]
    saved = load_model(full)  # the checkpoint holds x: it must give the logged final validation loss
    assert all(torch.equal(p, q) for p, q in zip(saved.state_dict().values(), load_model(part).state_dict().values()))


def test_schedule_free_rejects_a_decaying_schedule():
    with pytest.raises(NanoseekError, match="schedule_free"):
        build_train_config(preset="gpt2-tiny", overrides={"optim.name": "schedule_free", "schedule.name": "cosine"})
