"""Checkpoints: a directory of safetensors + JSON, written atomically, never pickled.

    CKPT/config.json          {"model_type": "nanoseek", "nanoseek": {ModelConfig fields}}
    CKPT/model.safetensors    weights (a tied head is stored once, as the embedding)
    CKPT/tokenizer.json       the tokenizer the model was trained with
    CKPT/train_state.json     step, tokens, elapsed seconds, data-loader position, train config
    CKPT/optimizer.safetensors optimizer moments, step counters and the torch RNG state (CPU, and CUDA's)

A run directory holds `checkpoints/step-NNNNNNN/` and a `LATEST` file naming the newest one.
Saving writes everything into a temporary sibling directory (`.step-NNNNNNN.<random>.tmp`), fsyncs
each file, then renames it into place (`data.files.publish_dir`) and only then replaces `LATEST`
atomically, so `LATEST` only ever names a complete checkpoint and an interrupted save never leaves a
partial or overwritten one. Temporaries of interrupted saves are never read and are removed by the
next save (or `remove_stale_temporaries`). Checkpoints are ordered by their step number, never by
name. `resolve_checkpoint` accepts a checkpoint dir or a run dir.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from nanoseek.config import ModelConfig
from nanoseek.config.memory import check_memory
from nanoseek.data.files import atomic_write_text, publish_dir
from nanoseek.errors import NanoseekError
from nanoseek.io.safetensors import SafetensorsFile
from nanoseek.model import make_model

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "train_state.json"
OPTIM_FILE = "optimizer.safetensors"
TOKENIZER_FILE = "tokenizer.json"
LATEST = "LATEST"
CHECKPOINTS_DIR = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"step-(\d+)")
# what train_state.json must hold for a run to continue from it
TRAIN_STATE_KEYS = ("step", "tokens", "elapsed", "loader", "optimizer")


# ------------------------------------------------------------------------------------ paths


def checkpoint_step(path: Path) -> int | None:
    """The step of a `step-NNNNNNN` checkpoint folder name; None for anything else (temporaries included)."""
    match = _CHECKPOINT_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str | Path, complete: bool = True) -> list[Path]:
    """The run's checkpoint folders by step number, oldest first (only complete ones unless told)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    if complete:
        found = [p for p in found if (p / CONFIG_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def named_by_latest(run_dir: Path) -> Path | None:
    """The complete checkpoint `LATEST` names; None when it is absent, unreadable or names no such one."""
    try:
        name = (run_dir / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if checkpoint_step(Path(name)) is None or name != Path(name).name:
        return None
    ckpt = run_dir / CHECKPOINTS_DIR / name
    return ckpt if (ckpt / CONFIG_FILE).is_file() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir itself, or a run dir's latest checkpoint (LATEST, else the newest complete one)."""
    path = Path(path)
    if not path.exists():
        raise NanoseekError(f"checkpoint path {path} does not exist")
    if not path.is_dir():
        raise NanoseekError(f"checkpoint path {path} is a file; give a checkpoint, run or HF folder")
    if (path / CONFIG_FILE).is_file() and not (path / CHECKPOINTS_DIR).is_dir():
        return path
    found = latest_checkpoint(path)
    if found is not None:
        return found
    if (path / CHECKPOINTS_DIR).is_dir() or (path / LATEST).is_file():
        raise NanoseekError(f"{path} is a run folder without a complete checkpoint yet")
    raise NanoseekError(f"{path} is neither a checkpoint (no {CONFIG_FILE}) nor a run dir holding one")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: the one `LATEST` names, else the newest complete one; None when
    the run never completed a save (a temporary of an interrupted first save does not count)."""
    run_dir = Path(run_dir)
    complete = list_checkpoints(run_dir)
    return named_by_latest(run_dir) or (complete[-1] if complete else None)


def remove_stale_temporaries(run_dir: str | Path) -> None:
    """Delete what interrupted saves left behind: `.step-*` folders and `.LATEST.*` files."""
    run_dir = Path(run_dir)
    for stale in [*run_dir.glob(f".{LATEST}.*.tmp"), *(run_dir / CHECKPOINTS_DIR).glob(".step-*")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ writing


def model_state_for_save(model, state: dict | None = None) -> dict[str, torch.Tensor]:
    """The state dict with a tied head dropped (stored once, as the embedding)."""
    state = dict(model.state_dict() if state is None else state)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def write_model_files(model, directory: Path, tokenizer_json: str | None = None, state: dict | None = None):
    """config.json + model.safetensors (+ tokenizer.json) into an existing directory."""
    config = {"model_type": "nanoseek", "nanoseek": model.config.to_dict()}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file(model_state_for_save(model, state), str(directory / MODEL_FILE), metadata={"format": "pt"})
    if tokenizer_json is not None:
        (directory / TOKENIZER_FILE).write_text(tokenizer_json)


def optimizer_tensors(optimizer_state: dict) -> tuple[dict, dict]:
    """Split an optimizer state dict (keyed by parameter name) into tensors and JSON metadata."""
    tensors, scalars = {}, {}
    for param, state in optimizer_state["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{param}/{key}"] = value.detach().contiguous()
            else:
                scalars[f"{param}/{key}"] = value
    return tensors, {"param_groups": optimizer_state["param_groups"], "scalars": scalars}


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"step-{step:07d}"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model,
    optimizer_state: dict | None = None,
    train_state: dict | None = None,
    tokenizer_json: str | None = None,
    keep_last: int = 2,
    model_state: dict | None = None,
) -> Path:
    """Atomically write checkpoints/step-NNNNNNN under run_dir, update LATEST, prune old ones.

    `model_state` defaults to the model's own state dict (pass the gathered one under FSDP);
    `optimizer_state` is keyed by parameter name (torch.distributed.checkpoint's full form)."""
    final = checkpoint_path(run_dir, step)
    with publish_dir(final) as tmp:  # re-saving a step swaps the folder: never a gap without a checkpoint
        write_model_files(model, tmp, tokenizer_json, model_state)
        if optimizer_state is not None:
            tensors, meta = optimizer_tensors(optimizer_state)
            tensors["rng/torch"] = torch.get_rng_state()
            if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout on the GPU draws from its own
                tensors["rng/cuda"] = torch.cuda.get_rng_state()
            save_file(tensors, str(tmp / OPTIM_FILE))
            (train_state := dict(train_state or {}))["optimizer"] = meta
        if train_state is not None:
            (tmp / STATE_FILE).write_text(json.dumps(train_state, indent=2))
    atomic_write_text(Path(run_dir) / LATEST, final.name + "\n")
    prune_checkpoints(Path(run_dir), keep_last, step)
    return final


def prune_checkpoints(run_dir: Path, keep_last: int, newest_step: int):
    """Keep the `keep_last` checkpoints of the highest steps up to `newest_step` (the one just saved).

    Folders of steps above it belong to a timeline the run left when it resumed from an earlier
    checkpoint (a kill between publishing a folder and replacing LATEST): they go too, so the folder
    never holds a checkpoint newer than the one LATEST names."""
    found = list_checkpoints(run_dir, complete=False)
    kept = [p for p in found if checkpoint_step(p) <= newest_step][-max(keep_last, 1) :]
    for old in found:
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)
    remove_stale_temporaries(run_dir)


# ------------------------------------------------------------------------------------ reading


def read_json(path: Path) -> dict:
    """A JSON object from a file; every way the file can be wrong is one line naming it."""
    path = Path(path)
    if path.is_dir():
        raise NanoseekError(f"{path} is a folder, not a JSON file")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise NanoseekError(f"{path} is missing") from None
    except UnicodeDecodeError as e:
        raise NanoseekError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise NanoseekError(f"{path} is not valid JSON ({str(e) or 'nested too deeply'})") from None
    except OSError as e:
        raise NanoseekError(f"{path} cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise NanoseekError(f"{path} must hold a JSON object, not a {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; corrupt or truncated files name themselves."""
    return SafetensorsFile(path).load_all()


def model_config_from_json(cfg: dict, path: Path) -> ModelConfig:
    if cfg.get("model_type") != "nanoseek" or "nanoseek" not in cfg:
        raise NanoseekError(f"{path} is not a nanoseek config (model_type={cfg.get('model_type')!r})")
    try:
        return ModelConfig.from_dict(cfg["nanoseek"])
    except NanoseekError as e:
        raise NanoseekError(f"{path}: {e}") from None


def weight_bytes(dtype) -> int:
    """Bytes per parameter a load will hold: the dtype's, else 2 (bf16, the least a checkpoint
    stores), so that the memory check never refuses a checkpoint that fits."""
    return dtype.itemsize if dtype is not None else 2


# state that formats other than nanoseek's own do not carry; defaults are rebuilt on load
OPTIONAL_PREFIXES = ("scalar_mix.",)


def materialize_buffers(model):
    """Rebuild buffers left on the meta device (RoPE/sinusoid tables, optional state) from the config."""
    config = model.config
    for module in model.modules():
        if any(b.is_meta for b in module.buffers(recurse=False)):
            fresh = module.fresh() if hasattr(module, "fresh") else type(module)(config)
            for bname, buf in fresh.named_buffers(recurse=False):
                setattr(module, bname, buf)


def check_state(model, state: dict[str, torch.Tensor], source: Path):
    """Every key the model needs is there, nothing else is, and every shape matches."""
    expected = model.state_dict()
    tied = model.config.tie_word_embeddings
    missing = [
        k
        for k in expected
        if k not in state and not (tied and k == "lm_head.weight") and not k.startswith(OPTIONAL_PREFIXES)
    ]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        what = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise NanoseekError(f"{source}: {what} ({len(missing)} missing, {len(unexpected)} unexpected)")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise NanoseekError(
                f"{source}: key {key!r} has shape {tuple(tensor.shape)}, the config needs {tuple(expected[key].shape)}"
            )
        if expected[key].is_floating_point() != tensor.is_floating_point():
            raise NanoseekError(
                f"{source}: key {key!r} is stored as {str(tensor.dtype).replace('torch.', '')}; "
                f"the model needs {'floating-point' if expected[key].is_floating_point() else 'integer'} values there"
            )


def with_tied_head(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """The state dict as the module lists it (a tied head re-added, optional state filled in)."""
    full = dict(state)
    if model.config.tie_word_embeddings and "lm_head.weight" not in full:
        full["lm_head.weight"] = full["embed_tokens.weight"]
    for key, value in model.state_dict().items():
        if key.startswith(OPTIONAL_PREFIXES) and key not in full:
            full[key] = value.detach().clone()
    return full


def load_state_into(model, state: dict[str, torch.Tensor], source: Path, dtype=None):
    """Assign checked tensors into a model built on the meta device; re-tie the head."""
    check_state(model, state, source)
    for key, tensor in state.items():
        if dtype is not None and tensor.is_floating_point() and not _keep_fp32(key):
            state[key] = tensor.to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    materialize_buffers(model)


def _keep_fp32(key: str) -> bool:
    """Router weights and balancing biases stay fp32 (as HF keeps them)."""
    return key.endswith(("gate.weight", "e_score_correction_bias"))


def load_native_model(ckpt: Path, cfg: dict, dtype=None):
    """A nanoseek checkpoint folder (config.json's model_type "nanoseek") as a model in eval mode."""
    config = model_config_from_json(cfg, ckpt / CONFIG_FILE)
    check_memory(config, f"loading {ckpt}", weight_bytes(dtype))
    with torch.device("meta"):
        model = make_model(config)
    load_state_into(model, read_safetensors(ckpt / MODEL_FILE), ckpt / MODEL_FILE, dtype)
    return model.eval()


def check_training_state(state, source: Path) -> None:
    """train_state.json holds what resuming reads (a run's own checkpoint does); else one line naming the gap."""
    if not isinstance(state, dict):
        raise NanoseekError(f"{source} is not a JSON object")
    missing = [key for key in TRAIN_STATE_KEYS if key not in state]
    optimizer = state.get("optimizer")
    if not missing and not (isinstance(optimizer, dict) and {"param_groups", "scalars"} <= optimizer.keys()):
        missing = ["optimizer.param_groups/scalars"]
    if missing:
        raise NanoseekError(
            f"{source} has no {missing[0]!r} (it needs {', '.join(TRAIN_STATE_KEYS)}): "
            f"not a checkpoint a run can continue from; start a new run with --overwrite"
        )


def load_training_state(ckpt: Path) -> tuple[dict, dict]:
    """(train_state.json, optimizer state keyed by parameter name); restores the torch RNG."""
    state = read_json(ckpt / STATE_FILE)
    check_training_state(state, ckpt / STATE_FILE)
    tensors = read_safetensors(ckpt / OPTIM_FILE)
    if "rng/torch" not in tensors:
        raise NanoseekError(f"{ckpt / OPTIM_FILE} has no 'rng/torch' tensor: not a checkpoint a run can continue from")
    meta = state.pop("optimizer")
    opt_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("state/"):
            _, param, name = key.split("/", 2)
            opt_state.setdefault(param, {})[name] = value
    for key, value in meta["scalars"].items():
        param, name = key.rsplit("/", 1)
        opt_state.setdefault(param, {})[name] = value
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    return state, {"state": opt_state, "param_groups": meta["param_groups"]}
