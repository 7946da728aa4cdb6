"""The training loop: one explicit loop from data to checkpoint.

    for step:  lr = peak * schedule(step, progress) * plateau scale * spike-guard scale
               for micro in accumulation:  loss = model(x, y) / accum;  loss.backward()
               g = clip(grads, max_norm)     (the pre-clip norm is logged)
               spike guard (optional): a spike skips the step or rolls back (train/adaptive.py)
               optimizer.step();  model.update_balance_bias(the forwards' expert load, summed)  (MoE)
               log / eval / checkpoint;  stop on steps, tokens, wall-clock, Ctrl-C or a non-finite loss

A pair task (`data.task` couplets, copy, reverse, sort; data/pairs.py) trains on (source, target) batches
laid out for the configured architecture; its loss counts the target tokens only.

Outputs under `out`: metrics.jsonl (one JSON object per logged step and per eval), loss.png,
train_config.json (the full TrainConfig), tokenizer.json, data/ (token shards) and checkpoints/.
Resume (`resume=True`) restores weights, optimizer moments, RNG, data position and counters, so a
run interrupted after step N continues with bitwise-identical losses (fp32, same thread count).
The folder `out` belongs to one run (train/run_folder.py): a fresh run refuses a folder holding
another unless `overwrite=True`. The final checkpoint is written before the final evaluation, so a
failing evaluation loses no training.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nanoseek.config import TrainConfig
from nanoseek.data import BUNDLED_CORPUS, CORPORA, corpus_path
from nanoseek.data.files import atomic_write_text
from nanoseek.data.pairs import PairData, load_pair_data
from nanoseek.data.shards import BatchLoader, TokenDataset, prepare_corpus
from nanoseek.data.tokenizer import load_tokenizer, train_tokenizer
from nanoseek.device import autocast, bf16_support
from nanoseek.errors import NanoseekError
from nanoseek.io import checkpoint as ckpt_io
from nanoseek.model import make_model
from nanoseek.parallel import dist
from nanoseek.train import run_folder
from nanoseek.train.adaptive import PlateauController, SpikeGuard
from nanoseek.train.evaluate import evaluate, fixed_batches
from nanoseek.train.metrics import MetricsLog, eval_record, plot_losses
from nanoseek.train.optim import eval_weights, lr_multiplier, make_optimizer, set_lr
from nanoseek.train.schedule_free import ScheduleFreeAdamW


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left intact."""


@dataclass
class RunState:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens consumed (global)
    elapsed: float = 0.0  # seconds of training across resumes


# ------------------------------------------------------------------------------------ setup


def setup_tokenizer(cfg: TrainConfig, out: Path, files: list[str]):
    saved = out / "tokenizer.json"
    if saved.is_file():
        return load_tokenizer(saved)
    kind = cfg.data.tokenizer
    if kind in ("char", "bpe"):
        tok = train_tokenizer(kind, files, cfg.data.vocab_size, holdout_fraction=cfg.data.val_fraction)
    else:
        tok = load_tokenizer(kind)
    tok.save(saved)
    return tok


def setup_data(cfg: TrainConfig, out: Path):
    if cfg.data.task != "lm":
        return setup_pairs(cfg, out)
    files = [corpus_path(f) for f in cfg.data.path] or [str(BUNDLED_CORPUS)]
    for f in files:
        if not Path(f).is_file():
            raise NanoseekError(f"data file {f} does not exist (bundled corpora by name: {', '.join(CORPORA)})")
        if Path(f).stat().st_size == 0:
            raise NanoseekError(f"data file {f} is empty")
    tok = setup_tokenizer(cfg, out, files)
    shard_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else out / "data"
    prepare_corpus(files, shard_dir, tok, val_fraction=cfg.data.val_fraction)
    return tok, TokenDataset(shard_dir)


def setup_pairs(cfg: TrainConfig, out: Path) -> tuple:
    """A pair task's tokenizer (made from its texts once, then reused from OUT) and its data in the layout
    of the configured architecture."""
    saved = out / "tokenizer.json"
    tok = load_tokenizer(saved) if saved.is_file() else cfg.data.tokenizer
    d = cfg.data
    data = load_pair_data(
        d.task, cfg.model.architecture, d.path, d.val_fraction, d.seq_len, tok, d.vocab_size, out / "data"
    )
    if not saved.is_file():
        data.tokenizer.save(saved)
    return data.tokenizer, data


def data_streams(cfg: TrainConfig, data, ctx) -> tuple:
    """(the training loader, a function giving the fixed validation batches) of a token corpus or a pair task."""
    t, e = cfg.train, cfg.eval
    if isinstance(data, PairData):
        loader = data.loader(t.batch_size, t.seed, ctx.rank, ctx.world)
        return loader, lambda: data.eval_batches(e.batch_size, e.batches)
    loader = BatchLoader(
        data.split("train"), t.batch_size, cfg.data.seq_len, seed=t.seed, rank=ctx.rank, world_size=ctx.world
    )
    val_tokens = data.split("val")
    return loader, lambda: fixed_batches(val_tokens, e.batch_size, cfg.data.seq_len, e.batches, seed=t.seed + 1)


def progress_fraction(cfg: TrainConfig, state: RunState, reserve: float = 0.0) -> float:
    """How much of the budget is spent: the largest of steps, tokens and seconds (`reserve`: seconds the
    run still needs after its last step, the final evaluation and checkpoint, counted as spent)."""
    limits = cfg.train
    parts = []
    if limits.max_steps:
        parts.append(state.step / limits.max_steps)
    if limits.max_tokens:
        parts.append(state.tokens / limits.max_tokens)
    if limits.max_seconds:
        parts.append((state.elapsed + reserve) / limits.max_seconds)
    return max(parts) if parts else 0.0


def finished(cfg: TrainConfig, state: RunState, reserve: float = 0.0) -> bool:
    return progress_fraction(cfg, state, reserve) >= 1.0


def step_label(cfg: TrainConfig, state: RunState, fraction: float) -> str:
    """'step 120/2000' for a step budget, else 'step 120/~800' (the total the budget spent so far implies)."""
    if cfg.train.max_steps and state.step / cfg.train.max_steps >= fraction - 1e-9:
        return f"step {state.step}/{cfg.train.max_steps}"
    if fraction > 0.02 and state.step:
        return f"step {state.step}/~{max(state.step, round(state.step / fraction))}"
    return f"step {state.step}"


def budget_reached(cfg: TrainConfig, state: RunState) -> str | None:
    """The limit that ends the run ("max_steps", "max_tokens" or "max_seconds"); None while none has."""
    used = {"max_steps": state.step, "max_tokens": state.tokens, "max_seconds": state.elapsed}
    return next(
        (
            name
            for name in run_folder.BUDGETS
            if getattr(cfg.train, name) and used[name] / getattr(cfg.train, name) >= 1.0
        ),
        None,
    )


# ------------------------------------------------------------------------------------ the loop


class StopFlag:
    """Ctrl-C (SIGINT) sets a flag; the loop saves a checkpoint after the current step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:  # second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def build_model(cfg: TrainConfig, vocab_size: int) -> torch.nn.Module:
    """The configured model (decoder-only or encoder-decoder), its vocabulary grown to the tokenizer's."""
    model_cfg = cfg.model
    if model_cfg.vocab_size < vocab_size:
        model_cfg = model_cfg.replace(vocab_size=vocab_size)
        cfg.model = model_cfg
    torch.manual_seed(cfg.train.seed)
    return make_model(model_cfg)


def maybe_compile(model, enabled: bool):
    if not enabled:
        return model
    try:
        return torch.compile(model)
    except Exception as e:  # noqa: BLE001 - any backend failure falls back to eager
        print(f"torch.compile unavailable ({e}); running eager")
        return model


@dataclass
class Adaptive:
    """The state-driven parts of the learning rate (None when not configured)."""

    plateau: PlateauController | None
    guard: SpikeGuard | None

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Adaptive:
        plateau = PlateauController(cfg.schedule) if cfg.schedule.name == "plateau" else None
        return cls(plateau, SpikeGuard(cfg.schedule) if cfg.schedule.spike_guard else None)

    def scale(self) -> float:
        return (self.plateau.scale if self.plateau else 1.0) * (self.guard.scale if self.guard else 1.0)

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in (("plateau", self.plateau), ("guard", self.guard)) if part}

    def load_state_dict(self, state: dict):
        for name, part in (("plateau", self.plateau), ("guard", self.guard)):
            if part and name in state:
                part.load_state_dict(state[name])


def restore(ckpt: Path, model, optimizer, loader, adaptive: Adaptive | None = None) -> RunState:
    """Weights, optimizer moments, RNG and data position of `ckpt` into this run; its counters back."""
    weights = ckpt_io.read_safetensors(ckpt / ckpt_io.MODEL_FILE)
    ckpt_io.check_state(model, dist.local_model_state(model, weights), ckpt / ckpt_io.MODEL_FILE)
    saved, optimizer_state = ckpt_io.load_training_state(ckpt)
    dist.load_full_state(model, optimizer, ckpt_io.with_tied_head(weights, model), optimizer_state)
    loader.load_state_dict(saved["loader"])
    if isinstance(optimizer, ScheduleFreeAdamW):  # the saved weights are x; training continues from y
        optimizer.restore_y()
    if adaptive is not None:
        adaptive.load_state_dict(saved.get("adaptive", {}))
    return RunState(saved["step"], saved["tokens"], saved["elapsed"])


def final_eval(metrics: MetricsLog, step: int, run_eval, checkpoint: Path, quiet: bool, ctx) -> dict:
    """The validation at the end (the one already logged at this step, when a resumed run has it)."""
    logged = [r for r in metrics.records if r.get("step") == step and "val_loss" in r]
    if dist.any_rank(bool(logged), ctx):  # rank 0 holds the log: every rank follows its answer
        return logged[-1] if logged else {}
    try:
        return run_eval()
    except BaseException:
        if not quiet:
            print(
                f"the final evaluation did not complete; the trained model is saved in {checkpoint} "
                f"(`nanoseek train --out {checkpoint.parent.parent} --resume` evaluates it again)",
                file=sys.stderr,
            )
        raise


def describe_budget(cfg: TrainConfig) -> str:
    """'budget: 2,000 steps or 60 s, whichever comes first (the seconds count the whole command ...)'."""
    limits = cfg.train
    parts = [f"{limits.max_steps:,} steps"] if limits.max_steps else []
    parts += [f"{limits.max_tokens:,} tokens"] if limits.max_tokens else []
    parts += [f"{limits.max_seconds:g} s"] if limits.max_seconds else []
    text = "budget: " + " or ".join(parts) + (", whichever comes first" if len(parts) > 1 else "")
    if limits.max_seconds:
        text += " (the seconds count the whole command: tokenizer, tokenizing, training, evaluations, final checkpoint)"
    return text


def describe_run(cfg: TrainConfig, model, params: dict, vocab_size: int, ctx, resume_step: int | None) -> str:
    """The lines printed when a run starts: model size, data, device, output, budget, ranks."""
    source = ", ".join(cfg.data.path) or "the bundled tinyshakespeare.txt"
    if cfg.data.task != "lm":
        source = f"{cfg.data.task} pairs" + (f" from {', '.join(cfg.data.path)}" if cfg.data.path else "")
    size = f"{params['total'] / 1e6:.2f}M parameters"
    if params["active"] != params["total"]:
        size += f" ({params['active'] / 1e6:.2f}M active per token)"
    if params["mtp"]:
        size += f" + MTP {params['mtp'] / 1e6:.2f}M"
    text = (
        f"training {cfg.preset or 'custom'}: {size}, vocab {vocab_size}, on {source}, {ctx.device}"
        + (", bf16 autocast" if cfg.train.dtype == "bfloat16" else "")
        + f" -> {cfg.out}"
        + (f" (resuming at step {resume_step})" if resume_step is not None else "")
        + "\n"
        + describe_budget(cfg)
    )
    if ctx.enabled:
        ep = (
            f", expert parallel: {cfg.model.n_routed_experts // ctx.world} of "
            f"{cfg.model.n_routed_experts} routed experts per rank"
            if dist.is_expert_sharded(model)
            else ""
        )
        text += f"\ndistributed: {ctx.world} ranks, {ctx.strategy}{ep}"
    return text


def train(
    cfg: TrainConfig,
    resume: bool = False,
    quiet: bool = False,
    stop_after: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Run training as configured (one process, or one rank under torchrun); return a summary dict.

    `resume`: continue the run in `cfg.out` from its latest checkpoint (from scratch when it has none);
    a run that already reached its budgets returns its summary. `overwrite`: replace a run in `cfg.out`.
    `stop_after`: behave as if Ctrl-C arrived during that step (scripted interruption).
    """
    command_t0 = time.perf_counter()  # a wall-clock budget counts from here: setup, tokenizing, evals included
    ctx = dist.init_distributed(cfg.dist.strategy, cfg.train.device)
    if cfg.train.dtype == "auto":  # resolved before the run's config is written
        cfg.train.dtype = bf16_support(ctx.device)["recommended_dtype"]
    quiet = quiet or not ctx.is_main
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = Path(cfg.out)
    run_folder.claim(out, resume, overwrite)  # every rank checks before any of them writes
    dist.barrier(ctx)
    if ctx.is_main:
        run_folder.prepare(out, overwrite, cfg.to_json())
    if ctx.is_main:  # rank 0 tokenizes; the others then find its caches
        tok, data = setup_data(cfg, out)
    dist.barrier(ctx)
    if not ctx.is_main:
        tok, data = setup_data(cfg, out)
    if cfg.data.task != "lm":  # a pair task's model records them: the encoder masks <pad> in the source
        cfg.model = cfg.model.replace(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    model = build_model(cfg, tok.vocab_size).to(ctx.device)
    model.gradient_checkpointing = cfg.dist.activation_checkpointing
    params = model.num_params()  # of the whole model, before expert parallelism shards it
    wrapped = dist.wrap_model(
        model, ctx, mixed_precision=cfg.dist.mixed_precision, expert_parallel=cfg.dist.expert_parallel
    )
    optimizer = make_optimizer(model, cfg.optim)
    adaptive = Adaptive.from_config(cfg)
    loader, val_batches = data_streams(cfg, data, ctx)
    byte_lengths = tok.token_byte_lengths()
    state = RunState()

    resume_from = ckpt_io.latest_checkpoint(out) if resume else None
    if resume and resume_from is None and not quiet:
        print(f"no complete checkpoint under {out}; starting from scratch", file=sys.stderr)
    if resume_from is not None:
        state = restore(resume_from, model, optimizer, loader, adaptive)
        done_summary = run_folder.finished_summary(out) if budget_reached(cfg, state) else None
        if done_summary is not None:  # nothing to add: no second final evaluation, no rewritten files
            if not quiet:
                print(
                    f"{out} already finished at step {state.step} (stopped by {budget_reached(cfg, state)}); "
                    f"raise a budget (e.g. --max-steps) to continue it",
                    file=sys.stderr,
                )
            dist.shutdown(ctx)
            return done_summary
    saved_step = state.step if resume_from is not None else None  # the step of the newest checkpoint
    if adaptive.guard and resume_from is not None:  # the snapshot an uninterrupted run took at that save
        adaptive.guard.snapshot(model, optimizer, state.step)
    if ctx.is_main:
        (out / run_folder.SUMMARY).unlink(missing_ok=True)  # a run under way has no summary
        atomic_write_text(out / run_folder.RUN_CONFIG, cfg.to_json())
    metrics = MetricsLog(out / "metrics.jsonl" if ctx.is_main else None, state.step if resume_from else None)
    step_fn = maybe_compile(wrapped, cfg.train.compile)
    tokenizer_json = (out / "tokenizer.json").read_text()

    def save():
        nonlocal saved_step
        if adaptive.guard:  # a resumed run rolls back to this same state
            adaptive.guard.maybe_snapshot(model, optimizer, state.step, force=True)
        with eval_weights(optimizer):  # schedule-free: the checkpoint holds x
            model_state = dist.full_model_state(wrapped)  # collective: every rank takes part
            optimizer_state = dist.full_optimizer_state(wrapped, optimizer)
        path = None
        if ctx.is_main:
            train_state = {
                "step": state.step,
                "tokens": state.tokens,
                "elapsed": state.elapsed,
                "loader": loader.state_dict(),
                "config": cfg.to_dict(),
                "world_size": ctx.world,
                "adaptive": adaptive.state_dict(),
            }
            path = ckpt_io.save_checkpoint(
                out,
                state.step,
                model,
                optimizer_state,
                train_state,
                tokenizer_json,
                cfg.checkpoint.keep_last,
                model_state=model_state,
            )
        dist.barrier(ctx)
        saved_step = state.step
        return path or ckpt_io.checkpoint_path(out, state.step)

    def run_eval():
        with eval_weights(optimizer):
            result = evaluate(wrapped, val_batches(), byte_lengths, ctx.device, cfg.train.dtype)
        rec = eval_record(state.step, result)
        metrics.write(rec)
        return rec

    if not quiet:
        print(
            describe_run(cfg, model, params, tok.vocab_size, ctx, state.step if resume_from else None), file=sys.stderr
        )

    state.elapsed += time.perf_counter() - command_t0  # this command's setup spends budget too
    # the bar counts percent of the budget (steps, tokens or seconds, whichever ends first)
    bar = tqdm(
        total=100.0,
        initial=100 * progress_fraction(cfg, state),
        disable=quiet or not cfg.log.progress,
        dynamic_ncols=True,
        desc=step_label(cfg, state, progress_fraction(cfg, state)),
        unit="%",
        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]",
    )
    model.train()
    last_eval: dict = {}
    stopped_by = None
    window_t0, window_tokens = time.perf_counter(), 0
    clock = time.perf_counter()  # elapsed is wall-clock: evaluations and checkpoints spend the budget too
    reserve = Reserve(cfg)  # the final evaluation's and checkpoint's seconds, kept out of the training time
    eval_point = int(progress_fraction(cfg, state) * cfg.eval.points)
    with StopFlag() as stop:
        while state.step == 0 or not dist.any_rank(finished(cfg, state, reserve.seconds), ctx):
            t0 = time.perf_counter()
            model.set_dsa_warmup(state.step < cfg.train.dsa_warmup_steps)
            progress = progress_fraction(cfg, state, reserve.seconds)
            lr = cfg.optim.lr * lr_multiplier(cfg.schedule, state.step, progress) * adaptive.scale()
            set_lr(optimizer, lr)
            loss_sum = 0.0
            aux_log: dict = {}
            expert_load = None  # MoE: tokens per expert, summed over the micro-batches
            step_tokens = 0  # target tokens (a pair task's padding and sources are not targets)
            for _ in range(cfg.train.grad_accum):
                *inputs, y = loader.next()  # (x, y), or (source, x, y) for an encoder-decoder
                step_tokens += int((y >= 0).sum())
                inputs, y = [t.to(ctx.device, non_blocking=True) for t in inputs], y.to(ctx.device, non_blocking=True)
                with autocast(ctx.device, cfg.train.dtype):
                    # head + loss fused (kernels/cross_entropy.py) where no label smoothing asks for the logits
                    output = step_fn(*inputs, y, return_logits=False, label_smoothing=cfg.train.label_smoothing)
                    loss = output.loss
                    for value in output.aux.values():
                        if isinstance(value, torch.Tensor) and value.requires_grad:
                            loss = loss + value
                (loss / cfg.train.grad_accum).backward()
                loss_sum += output.loss.item()
                for k, v in output.aux.items():  # mean over the micro-batches (and ranks, below)
                    aux_log[k] = aux_log.get(k, 0.0) + v.detach().item() / cfg.train.grad_accum
                if output.expert_load is not None:
                    expert_load = output.expert_load if expert_load is None else expert_load + output.expert_load
            loss_value = dist.all_reduce_mean(loss_sum / cfg.train.grad_accum, ctx)
            aux_log = {k: dist.all_reduce_mean(v, ctx) for k, v in aux_log.items()}
            if not math.isfinite(loss_value) and not adaptive.guard:
                bar.close()
                kept = (
                    f"the last good checkpoint (step {saved_step}) is kept in {out}"
                    if saved_step is not None
                    else "no checkpoint had been saved yet"
                )
                raise TrainingDiverged(
                    f"loss became {loss_value} at step {state.step + 1}; stopping: {kept} "
                    f"(try a lower --optim.lr, currently {cfg.optim.lr})"
                )
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = dist.clip_grad_norm(model, clip).item()
            spike = adaptive.guard.check(loss_value, grad_norm) if adaptive.guard else None
            balance_stats = {}
            if spike is None:
                optimizer.step()
                expert_load = dist.sync_expert_load(expert_load, ctx)  # one router bias for all ranks
                balance_stats = model.update_balance_bias(expert_load, update=state.step >= cfg.train.dsa_warmup_steps)
            elif spike["action"] == "rollback":
                spike["rolled_back_to"] = adaptive.guard.rollback(model, optimizer)
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            if spike is not None:
                metrics.write({"step": state.step, "event": "spike", **spike})
                bar.write(f"step {state.step}: {spike['spike']} spike ({spike['action']}), lr x{spike['lr_scale']:.3g}")
            elif adaptive.guard:
                adaptive.guard.maybe_snapshot(model, optimizer, state.step)
            state.tokens += step_tokens * ctx.world
            now = time.perf_counter()
            state.elapsed, clock = state.elapsed + now - clock, now
            reserve.step_took(now - t0)
            window_tokens += step_tokens * ctx.world
            fraction = progress_fraction(cfg, state, reserve.seconds)
            bar.set_description_str(step_label(cfg, state, fraction), refresh=False)
            bar.update(min(100.0, 100 * fraction) - bar.n)

            if state.step % cfg.log.every == 0 or finished(cfg, state, reserve.seconds):
                now = time.perf_counter()
                tps = window_tokens / max(now - window_t0, 1e-9)
                window_t0, window_tokens = now, 0
                rec = {
                    "step": state.step,
                    "loss": loss_value,
                    "lr": lr,
                    "tokens_per_s": tps,
                    "grad_norm": grad_norm,
                    "tokens": state.tokens,
                    "elapsed_s": round(state.elapsed, 3),
                }
                rec.update(aux_log)
                rec.update(balance_stats)
                metrics.write(rec)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
            done = dist.any_rank(finished(cfg, state, reserve.seconds), ctx)
            point = int(fraction * cfg.eval.points)
            every = not cfg.eval.points and cfg.eval.every and state.step % cfg.eval.every == 0
            if (every or point > eval_point) and not done:
                eval_point = point
                eval_t0 = time.perf_counter()
                last_eval = run_eval()
                reserve.eval_took(time.perf_counter() - eval_t0)
                if adaptive.plateau and adaptive.plateau.observe(last_eval["val_loss"]):
                    metrics.write({"step": state.step, "event": "plateau", "lr_scale": adaptive.plateau.scale})
                    bar.write(f"step {state.step}: validation plateau, lr x{adaptive.plateau.scale:.3g}")
                bar.write(
                    f"step {state.step}: val loss {last_eval['val_loss']:.4f}, "
                    f"{last_eval['val_bits_per_byte']:.3f} bits/byte",
                    file=sys.stderr,  # stdout is the command's result (--json: JSON only)
                )
                window_t0 = time.perf_counter()  # evaluation time is not training throughput
            if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0 and not done:
                save_t0 = time.perf_counter()
                save()
                reserve.save_took(time.perf_counter() - save_t0)
                window_t0 = time.perf_counter()
            if dist.any_rank(stop.requested or state.step == stop_after, ctx) and not done:  # done: ends anyway
                stopped_by = "interrupt"
                break
    bar.close()
    if stopped_by is None and not budget_reached(cfg, state) and finished(cfg, state, reserve.seconds):
        state.elapsed = cfg.train.max_seconds  # the budget's rest goes to the final checkpoint and evaluation
    stopped_by = stopped_by or budget_reached(cfg, state)
    # the trained weights reach the disk before anything else can fail
    path = save() if saved_step != state.step else ckpt_io.checkpoint_path(out, state.step)
    if stopped_by != "interrupt":
        last_eval = final_eval(metrics, state.step, run_eval, path, quiet, ctx)
    if cfg.log.plot and ctx.is_main:
        plot_losses(
            metrics.records,
            out / "loss.png",
            title=f"{cfg.preset} on {', '.join(map(str, cfg.data.path)) or 'tinyshakespeare'}",
        )
    import resource  # POSIX only

    summary = {
        "step": state.step,
        "tokens": state.tokens,
        "elapsed_s": round(state.elapsed, 2),
        "checkpoint": str(path),
        "checkpoint_step": saved_step,
        "stopped_by": stopped_by,
        "params_total": params["total"],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "world_size": ctx.world,
        **{k: v for k, v in last_eval.items() if k != "step"},  # an interrupted run's last eval is older
    }
    if ctx.is_main:
        atomic_write_text(out / run_folder.SUMMARY, json.dumps(summary, indent=2))
    dist.shutdown(ctx)
    return summary


class Reserve:
    """Seconds a wall-clock budget keeps for what is still to come: the next step (so the last one
    does not overshoot), the final evaluation (as long as the last one took, or estimated from the
    step time: a forward is about a third of a training step) and the final checkpoint (as long as
    the last save took)."""

    def __init__(self, cfg: TrainConfig):
        self.enabled = bool(cfg.train.max_seconds)
        per_step = cfg.train.batch_size * cfg.train.grad_accum
        self.eval_steps = cfg.eval.batches * cfg.eval.batch_size / per_step / 3  # eval cost in training steps
        self.step_s = self.eval_s = self.save_s = None
        self.steps = 0

    def step_took(self, seconds: float):
        """A moving average of the step time; the first step (allocations, warm-up) only until a second."""
        self.steps += 1
        self.step_s = seconds if self.steps <= 2 else 0.9 * self.step_s + 0.1 * seconds

    def eval_took(self, seconds: float):
        self.eval_s = seconds

    def save_took(self, seconds: float):
        self.save_s = seconds

    @property
    def seconds(self) -> float:
        if not self.enabled:
            return 0.0
        step_s = self.step_s or 0.0
        eval_s = self.eval_s if self.eval_s is not None else step_s * self.eval_steps
        return step_s + eval_s + (self.save_s or 0.0)
