"""Pictures of what a trained model does: `nanoseek inspect fusion|attention CKPT --prompt TEXT`.

attention: for one layer, the head-averaged attention weights of every query over the keys
(rows = queries, columns = keys), and which keys each query may attend to at all: the causal
triangle for dense layers, the band for sliding layers, the indexer's top-k picks for DSA layers.

For each fusion kind, the weights the model gives to earlier representations:
    dwa       the learned matrix a_ij (layer i reads output j), one heatmap
    dynamic   per layer, the per-token softmax weights over X_0..X_i
    hyper     per sublayer, the per-token width weights a_m over the n streams
    mhc       per sublayer, the per-token pre weights over the n streams, and the token-averaged
              doubly stochastic mixing matrix
    residual  the scalar-mix weights (nothing is learned in the stream itself)
"""

from __future__ import annotations

from pathlib import Path

import torch

from nanoseek.errors import NanoseekError


@torch.inference_mode()
def fusion_weights(model, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """name -> 2-D tensor to draw, for one prompt (batch 1)."""
    kind = model.config.fusion
    out: dict[str, torch.Tensor] = {}
    if kind in ("residual",):
        out["scalar mix (embedding, layers)"] = model.scalar_mix.logits.softmax(0)[None]
        return out
    if kind == "dwa":
        n = len(model.fusions)
        grid = torch.zeros(n, n + 1)
        for i, f in enumerate(model.fusions):
            grid[i, : i + 2] = f.alpha.detach().float()
        out["dwa weights (layer x source)"] = grid
        return out
    if kind == "dynamic":
        outputs = model.layer_outputs(input_ids)  # X_0..X_L, the block outputs the fusions read
        for i, fusion in enumerate(model.fusions):
            out[f"layer {i}: token x source"] = fusion.weights(outputs[: i + 2])
        return out
    captured: list[tuple[str, torch.Tensor]] = []
    hooks = []
    for i, layer in enumerate(model.layers):
        for name in ("attn_hc", "ffn_hc"):
            module = getattr(layer, name)
            hooks.append(
                module.register_forward_pre_hook(
                    lambda mod, args, tag=f"layer {i} {name}": captured.append((tag, args[0]))
                )
            )
    try:
        model(input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    for tag, streams in captured:
        module = dict(model.named_modules())[_module_path(tag)]
        maps = module.maps(streams)
        out[f"{tag}: token x stream (input weights)"] = maps[0][0].float()
        if kind == "mhc":
            out[f"{tag}: mixing matrix (mean over tokens)"] = maps[2][0].mean(0).float()
    return out


def _module_path(tag: str) -> str:
    _, i, name = tag.split()
    return f"layers.{i}.{name}"


def plot_fusion(model, tokenizer, prompt: str, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = tokenizer.encode(prompt)[: model.config.max_position_embeddings]
    if not ids:
        raise NanoseekError("--prompt is empty")
    panels = fusion_weights(model, torch.tensor([ids]))
    cols = min(4, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, grid) in zip(axes.flat, panels.items()):
        image = ax.imshow(grid.cpu().numpy(), aspect="auto", cmap="viridis")
        ax.set_title(title, fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"fusion={model.config.fusion}: {prompt[:60]!r}", fontsize=10)
    return save_figure(fig, out, dpi=100)


def save_figure(fig, out: str | Path, dpi: int) -> Path:
    """Write a finished matplotlib figure to `out` (folders made) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


@torch.inference_mode()
def attention_maps(model, input_ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(weights (T, T) averaged over heads, allowed (T, T), the layer's kind) for one prompt."""
    if not 0 <= layer < len(model.layers):
        raise NanoseekError(f"--layer={layer}: the model has layers 0..{len(model.layers) - 1}")
    attn = model.layers[layer].self_attn
    captured = {}

    def grab(module, args):
        captured["x"], captured["rope"] = args[0], args[1] if len(args) > 1 else None
        raise _Captured

    hook = attn.register_forward_pre_hook(grab)
    try:
        model(input_ids)
    except _Captured:
        pass
    finally:
        hook.remove()
    weights, allowed = attn.attention_map(captured["x"], captured["rope"])
    return weights[0].mean(0), allowed[0], model.config.layer_sparse(layer)


class _Captured(Exception):
    """Stops the forward pass once the layer's input is in hand."""


def plot_attention(model, tokenizer, prompt: str, layer: int, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = tokenizer.encode(prompt)[: model.config.max_position_embeddings]
    if not ids:
        raise NanoseekError("--prompt is empty")
    weights, allowed, kind = attention_maps(model, torch.tensor([ids]), layer)
    labels = [tokenizer.decode([i]) for i in ids]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    axes[0].imshow(weights.numpy(), cmap="viridis", aspect="auto")
    axes[0].set_title(f"layer {layer} ({kind}): attention weights, mean over heads")
    axes[1].imshow(allowed.float().numpy(), cmap="Greys", aspect="auto", vmin=0, vmax=1)
    c = model.config
    picked = {
        "dense": "causal keys",
        "sliding": f"window of {c.sliding_window}",
        "dsa": f"indexer top-{c.index_topk}",
        "nsa": f"selected blocks of {c.nsa_block} + window of {c.sliding_window}; "
        "weights: gated branches, compressed spread over its blocks",
        "csa": f"window of {c.sliding_window}; columns past the last token: entries of "
        f"{c.compress_rate_csa} tokens, indexer top-{c.index_topk}",
        "hca": f"window of {c.sliding_window}; columns past the last token: entries of {c.compress_rate_hca} tokens",
    }.get(kind, kind)
    if weights.shape[1] > len(ids):  # V4: compressed entries after the token keys
        for ax in axes:
            ax.axvline(len(ids) - 0.5, color="red", linewidth=0.8)
    axes[1].set_title(f"keys each query may attend to ({picked})")
    for ax in axes:
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        if len(ids) <= 48:
            ax.set_xticks(range(len(ids)), [repr(c)[1:-1] for c in labels], fontsize=6, rotation=90)
            ax.set_yticks(range(len(ids)), [repr(c)[1:-1] for c in labels], fontsize=6)
    return save_figure(fig, out, dpi=120)
