"""Tensor names and layouts between a Hugging Face folder and nanoseek's module tree, both directions.

    model.embed_tokens.weight                      -> embed_tokens.weight
    model.layers.i.{input_layernorm,post_attention_layernorm,self_attn.*}  -> layers.i.(same)
    model.layers.i.self_attn.{q,k,v}_proj (llama) -> layers.i.self_attn.qkv_proj   (concatenated rows)
    model.layers.i.mlp.{gate,up}_proj              -> layers.i.mlp.gate_up_proj      (gate rows first)
    model.layers.i.mlp.experts.e.{gate,up,down}_proj (per expert on disk)
                                                   -> layers.i.mlp.experts.{gate_up_proj [E,2I,D], down_proj [E,D,I]}
    model.layers.(L+k).{enorm,hnorm,eh_proj,shared_head.norm, block keys}  -> mtp.k.*  (MTP after the last layer)
    model.norm.weight, lm_head.weight              -> norm.weight, lm_head.weight

DeepSeek-V4 names go through `nanoseek.io.hf.v4` first; the fusing and stacking is the same. GPT-2's
(`nanoseek.io.hf.gpt2`) map one to one, Conv1D weights transposed.
"""

from __future__ import annotations

import re

import torch

from nanoseek.config import ModelConfig
from nanoseek.errors import NanoseekError
from nanoseek.io.hf.files import TensorSource, load_tensor
from nanoseek.io.hf.gpt2 import gpt2_key_to_nanoseek, gpt2_state
from nanoseek.io.hf.v4 import v4_key_to_hf, v4_key_to_nanoseek


def hf_key_to_nanoseek(key: str, n_layers: int) -> str | None:
    """Map one HF key to its nanoseek name (None = a key nanoseek does not store)."""
    if key in ("lm_head.weight",):
        return key
    if key.startswith("model.") and not key.startswith("model.layers."):
        return key[len("model.") :]
    m = re.match(r"model\.layers\.(\d+)\.(.*)", key)
    if not m:
        return None
    i, rest = int(m.group(1)), m.group(2)
    if i < n_layers:
        return f"layers.{i}.{rest}"
    k = i - n_layers  # MTP modules stored after the last decoder layer
    if rest in ("embed_tokens.weight", "shared_head.head.weight"):
        return None  # shared with the main model
    if rest.split(".")[0] in ("enorm", "hnorm", "eh_proj", "shared_head"):
        return f"mtp.{k}.{rest}"
    return f"mtp.{k}.block.{rest}"


def mtp_layers_on_disk(source: TensorSource, n_layers: int) -> int:
    """How many MTP modules a folder stores after its `n_layers` decoder layers."""
    indices = {int(m.group(1)) for k in source.keys() if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    return len([i for i in indices if i >= n_layers])


def read_state(source: TensorSource, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Every nanoseek tensor, built from the HF keys (fused / stacked where nanoseek fuses)."""
    n = config.num_hidden_layers
    raw_keys = [k for k in source.keys() if not k.endswith("weight_scale_inv")]
    grouped: dict[str, dict[str, str]] = {}  # nanoseek target -> {part: hf key}
    state: dict[str, torch.Tensor] = {}
    v4, gpt2 = config.attention == "v4", config.position == "learned"
    for key in raw_keys:
        if gpt2:
            name, transpose = gpt2_key_to_nanoseek(key)
            if name is not None:
                state[name] = load_tensor(source, key).t() if transpose else load_tensor(source, key)
            continue
        name = v4_key_to_nanoseek(key) if v4 else hf_key_to_nanoseek(key, n)
        if name is None:
            continue
        if name.startswith("mtp.") and int(name.split(".")[1]) >= config.num_nextn_predict_layers:
            continue  # more MTP layers on disk than the config asks for
        target, part = fused_target(name, config)
        if target is None:
            state[name] = load_tensor(source, key)
        else:
            grouped.setdefault(target, {})[part] = key
    for target, parts in grouped.items():
        state[target] = assemble(source, target, parts, config)
    return state


def fused_target(name: str, config: ModelConfig) -> tuple[str | None, str | None]:
    """(fused nanoseek key, part) for keys nanoseek stores fused or stacked."""
    m = re.match(r"(.*)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", name)
    if m:
        which = "down_proj" if m.group(3) == "down_proj" else "gate_up_proj"
        return f"{m.group(1)}.experts.{which}", f"{m.group(2)}.{m.group(3)}"
    m = re.match(r"(.*\.mlp(?:\.shared_experts)?)\.(gate_proj|up_proj)\.(weight|bias)$", name)
    if m:
        return f"{m.group(1)}.gate_up_proj.{m.group(3)}", m.group(2)
    m = re.match(r"(.*self_attn)\.(q_proj|k_proj|v_proj)\.(weight|bias)$", name)
    if m and config.attention != "mla":
        return f"{m.group(1)}.qkv_proj.{m.group(3)}", m.group(2)
    return None, None


def assemble(source: TensorSource, target: str, parts: dict[str, str], config: ModelConfig) -> torch.Tensor:
    """One fused nanoseek tensor from its HF parts (q/k/v rows, gate then up rows, experts stacked)."""
    if target.endswith("qkv_proj.weight") or target.endswith("qkv_proj.bias"):
        _require(parts, ("q_proj", "k_proj", "v_proj"), target)
        return torch.cat([load_tensor(source, parts[p]) for p in ("q_proj", "k_proj", "v_proj")])
    if target.endswith(("gate_up_proj.weight", "gate_up_proj.bias")):
        _require(parts, ("gate_proj", "up_proj"), target)
        return torch.cat([load_tensor(source, parts["gate_proj"]), load_tensor(source, parts["up_proj"])])
    n_experts = config.n_routed_experts
    if target.endswith("experts.gate_up_proj"):
        rows = []
        for e in range(n_experts):
            _require(parts, (f"{e}.gate_proj", f"{e}.up_proj"), target)
            rows.append(
                torch.cat([load_tensor(source, parts[f"{e}.gate_proj"]), load_tensor(source, parts[f"{e}.up_proj"])])
            )
        return torch.stack(rows)
    _require(parts, tuple(f"{e}.down_proj" for e in range(n_experts)), target)
    return torch.stack([load_tensor(source, parts[f"{e}.down_proj"]) for e in range(n_experts)])


def _require(parts: dict, names: tuple, target: str):
    for name in names:
        if name not in parts:
            raise NanoseekError(f"checkpoint is missing {name!r} needed for {target}")


def nanoseek_to_hf_state(model, mtp: bool = True) -> dict[str, torch.Tensor]:
    """The HF on-disk layout of a nanoseek model's weights (experts unpacked, fusions split); `mtp=False`
    leaves the MTP modules out."""
    config = model.config
    if config.position == "learned":
        return gpt2_state(model)
    n = config.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("scalar_mix."):  # nanoseek's embedding mix has no place in transformers
            continue
        if name.startswith("mtp.") and not mtp:
            continue
        tensor = tensor.detach().contiguous()
        if config.attention == "v4":
            for key, value in split_fused(name, tensor, config).items():
                out[v4_key_to_hf(key)] = value.contiguous()
            continue
        if name == "lm_head.weight":
            if not config.tie_word_embeddings:  # a tied head is the embedding (HF re-ties on load)
                out[name] = tensor
            continue
        m = re.match(r"mtp\.(\d+)\.(block\.)?(.*)", name)
        if m:
            hf = f"model.layers.{n + int(m.group(1))}.{m.group(3)}"
        else:
            hf = "model." + name
        for key, value in split_fused(hf, tensor, config).items():
            out[key] = value.contiguous()
    head = out.get("lm_head.weight", out["model.embed_tokens.weight"])
    for k in range(config.num_nextn_predict_layers if mtp else 0):  # MTP layers store their own copies
        out[f"model.layers.{n + k}.embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
        out[f"model.layers.{n + k}.shared_head.head.weight"] = head.clone()
    return out


def split_fused(key: str, tensor: torch.Tensor, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of `assemble`: one fused tensor -> its HF parts (views)."""
    if key.endswith("experts.gate_up_proj"):
        base, i = key[: -len("gate_up_proj")], config.moe_intermediate_size
        out = {}
        for e in range(tensor.shape[0]):
            out[f"{base}{e}.gate_proj.weight"] = tensor[e, :i]
            out[f"{base}{e}.up_proj.weight"] = tensor[e, i:]
        return out
    if key.endswith("experts.down_proj"):
        base = key[: -len("down_proj")]
        return {f"{base}{e}.down_proj.weight": tensor[e] for e in range(tensor.shape[0])}
    m = re.match(r"(.*)gate_up_proj\.(weight|bias)$", key)
    if m:
        half, base, kind = tensor.shape[0] // 2, m.group(1), m.group(2)
        return {f"{base}gate_proj.{kind}": tensor[:half], f"{base}up_proj.{kind}": tensor[half:]}
    m = re.match(r"(.*)\.qkv_proj\.(weight|bias)$", key)
    if m:
        hd = config.attn_head_dim
        sizes = [config.num_attention_heads * hd, config.n_kv_heads * hd, config.n_kv_heads * hd]
        q, k, v = tensor.split(sizes)
        return {f"{m.group(1)}.{p}.{m.group(2)}": t for p, t in zip(("q_proj", "k_proj", "v_proj"), (q, k, v))}
    return {key: tensor}
