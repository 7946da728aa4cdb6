"""The training loop: one explicit loop from data to checkpoint.

    for step:  lr = peak * schedule(step, progress)
               for micro in accumulation:  loss = model(x, y) / accum;  loss.backward()
               g = clip(grads, max_norm)     (the pre-clip norm is logged)
               optimizer.step();  model.update_balance_bias(the forwards' expert load, summed)  (MoE)
               log / eval / checkpoint;  stop on steps, tokens, wall-clock, Ctrl-C or a non-finite loss

A pair task (`data.task` couplets, copy, reverse, sort; data/pairs.py) trains on (source, target) batches
laid out for the configured architecture; its loss counts the target tokens only.

Outputs under `out`: metrics.jsonl (one JSON object per logged step and per eval), loss.png,
train_config.json (the full TrainConfig), tokenizer.json, data/ (token shards) and checkpoints/.
Resume (`resume=True`) restores weights, optimizer moments, RNG, data position and counters, so a
run interrupted after step N continues with bitwise-identical losses (fp32, same thread count).
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
from nanoseek.data import BUNDLED_CORPUS
from nanoseek.data.pairs import PairData, load_pair_data
from nanoseek.data.shards import BatchLoader, TokenDataset, prepare_corpus
from nanoseek.data.tokenizer import load_tokenizer, train_tokenizer
from nanoseek.device import autocast
from nanoseek.errors import NanoseekError
from nanoseek.io import checkpoint as ckpt_io
from nanoseek.model import make_model
from nanoseek.parallel import dist
from nanoseek.train.evaluate import evaluate, fixed_batches
from nanoseek.train.metrics import MetricsLog, eval_record, plot_losses
from nanoseek.train.optim import lr_multiplier, make_optimizer, set_lr


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
        tok = train_tokenizer(kind, files, cfg.data.vocab_size)
    else:
        tok = load_tokenizer(kind)
    tok.save(saved)
    return tok


def setup_data(cfg: TrainConfig, out: Path):
    if cfg.data.task != "lm":
        return setup_pairs(cfg, out)
    files = cfg.data.path or [str(BUNDLED_CORPUS)]
    for f in files:
        if not Path(f).is_file():
            raise NanoseekError(f"data file {f} does not exist")
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


def progress_fraction(cfg: TrainConfig, state: RunState) -> float:
    limits = cfg.train
    parts = []
    if limits.max_steps:
        parts.append(state.step / limits.max_steps)
    if limits.max_tokens:
        parts.append(state.tokens / limits.max_tokens)
    if limits.max_seconds:
        parts.append(state.elapsed / limits.max_seconds)
    return max(parts) if parts else 0.0


def finished(cfg: TrainConfig, state: RunState) -> bool:
    return progress_fraction(cfg, state) >= 1.0


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


def build_model(cfg: TrainConfig, tok) -> torch.nn.Module:
    """The configured model, its vocabulary grown to the tokenizer's; a pair task's model also records
    the tokenizer's <bos>, <eos> and <pad> ids (the encoder masks <pad> in the source)."""
    model_cfg = cfg.model
    if model_cfg.vocab_size < tok.vocab_size:
        model_cfg = model_cfg.replace(vocab_size=tok.vocab_size)
    if cfg.data.task != "lm":
        model_cfg = model_cfg.replace(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
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


def restore(ckpt: Path, model, optimizer, loader) -> RunState:
    """Weights, optimizer moments, RNG and data position of `ckpt` into this run; its counters back."""
    weights = ckpt_io.read_safetensors(ckpt / ckpt_io.MODEL_FILE)
    ckpt_io.check_state(model, dist.local_model_state(model, weights), ckpt / ckpt_io.MODEL_FILE)
    saved, optimizer_state = ckpt_io.load_training_state(ckpt)
    dist.load_full_state(model, optimizer, ckpt_io.with_tied_head(weights, model), optimizer_state)
    loader.load_state_dict(saved["loader"])
    return RunState(saved["step"], saved["tokens"], saved["elapsed"])


def describe_run(cfg: TrainConfig, model, params: dict, vocab_size: int, ctx, resume_step: int | None) -> str:
    """The lines printed when a run starts: model size, data, device, output, ranks."""
    source = ", ".join(cfg.data.path) or "the bundled tinyshakespeare.txt"
    if cfg.data.task != "lm":
        source = f"{cfg.data.task} pairs" + (f" from {', '.join(cfg.data.path)}" if cfg.data.path else "")
    text = (
        f"training {cfg.preset or 'custom'}: {params['total'] / 1e6:.2f}M parameters "
        f"({params['active'] / 1e6:.2f}M active, MTP {params['mtp'] / 1e6:.2f}M), vocab {vocab_size}, "
        f"on {source}, {ctx.device} -> {cfg.out}"
        + (f" (resuming at step {resume_step})" if resume_step is not None else "")
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


def train(cfg: TrainConfig, resume: bool = False, quiet: bool = False, stop_after: int | None = None) -> dict:
    """Run training as configured (one process, or one rank under torchrun); return a summary dict.

    `stop_after`: behave as if Ctrl-C arrived during that step (scripted interruption).
    """
    ctx = dist.init_distributed(cfg.dist.strategy, cfg.train.device)
    quiet = quiet or not ctx.is_main
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if ctx.is_main:  # rank 0 tokenizes; the others then find its caches
        tok, data = setup_data(cfg, out)
    dist.barrier(ctx)
    if not ctx.is_main:
        tok, data = setup_data(cfg, out)
    model = build_model(cfg, tok).to(ctx.device)
    model.gradient_checkpointing = cfg.dist.activation_checkpointing
    params = model.num_params()  # of the whole model, before expert parallelism shards it
    wrapped = dist.wrap_model(
        model, ctx, mixed_precision=cfg.dist.mixed_precision, expert_parallel=cfg.dist.expert_parallel
    )
    optimizer = make_optimizer(model, cfg.optim)
    loader, val_batches = data_streams(cfg, data, ctx)
    byte_lengths = tok.token_byte_lengths()
    state = RunState()

    resume_from = ckpt_io.latest_checkpoint(out) if resume else None
    if resume and resume_from is None and not quiet:
        print(f"no checkpoint under {out}; starting from scratch", file=sys.stderr)
    if resume_from is not None:
        state = restore(resume_from, model, optimizer, loader)
    if ctx.is_main:
        (out / "train_config.json").write_text(cfg.to_json())
    metrics = MetricsLog(out / "metrics.jsonl" if ctx.is_main else None, state.step if resume_from else None)
    step_fn = maybe_compile(wrapped, cfg.train.compile)
    tokenizer_json = (out / "tokenizer.json").read_text()

    def save():
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
        return path or ckpt_io.checkpoint_path(out, state.step)

    def run_eval():
        rec = eval_record(state.step, evaluate(wrapped, val_batches(), byte_lengths, ctx.device, cfg.train.dtype))
        metrics.write(rec)
        return rec

    if not quiet:
        print(
            describe_run(cfg, model, params, tok.vocab_size, ctx, state.step if resume_from else None), file=sys.stderr
        )

    # the bar counts percent of the budget (steps, tokens or seconds, whichever ends first)
    bar = tqdm(
        total=100.0,
        initial=100 * progress_fraction(cfg, state),
        disable=quiet or not cfg.log.progress,
        dynamic_ncols=True,
        desc="train",
        unit="%",
        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]",
    )
    model.train()
    last_eval: dict = {}
    stopped_by = "budget"
    window_t0, window_tokens = time.perf_counter(), 0
    with StopFlag() as stop:
        while not dist.any_rank(finished(cfg, state), ctx):
            t0 = time.perf_counter()
            model.set_dsa_warmup(state.step < cfg.train.dsa_warmup_steps)
            lr = cfg.optim.lr * lr_multiplier(cfg.schedule, state.step, progress_fraction(cfg, state))
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
            if not math.isfinite(loss_value):
                bar.close()
                raise TrainingDiverged(
                    f"loss became {loss_value} at step {state.step + 1}; stopping. The last good checkpoint "
                    f"is kept in {out} (try a lower --optim.lr, currently {cfg.optim.lr})"
                )
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = dist.clip_grad_norm(model, clip).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            expert_load = dist.sync_expert_load(expert_load, ctx)  # one router bias for all ranks
            balance_stats = model.update_balance_bias(expert_load, update=state.step >= cfg.train.dsa_warmup_steps)
            state.step += 1
            state.tokens += step_tokens * ctx.world
            state.elapsed += time.perf_counter() - t0
            window_tokens += step_tokens * ctx.world
            bar.update(min(100.0, 100 * progress_fraction(cfg, state)) - bar.n)

            if state.step % cfg.log.every == 0 or finished(cfg, state):
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
            done = dist.any_rank(finished(cfg, state), ctx)
            if cfg.eval.every and state.step % cfg.eval.every == 0 and not done:
                last_eval = run_eval()
                bar.write(
                    f"step {state.step}: val loss {last_eval['val_loss']:.4f}, "
                    f"{last_eval['val_bits_per_byte']:.3f} bits/byte"
                )
                window_t0 = time.perf_counter()  # evaluation time is not training throughput
            if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0 and not done:
                save()
                window_t0 = time.perf_counter()
            if dist.any_rank(stop.requested or state.step == stop_after, ctx):
                stopped_by = "interrupt"
                break
    bar.close()
    if stopped_by == "budget":
        last_eval = run_eval()
    path = save()
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
        "stopped_by": stopped_by,
        "params_total": params["total"],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "world_size": ctx.world,
        **{k: v for k, v in last_eval.items() if k != "step"},  # an interrupted run's last eval is older
    }
    if ctx.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    dist.shutdown(ctx)
    return summary
