"""`nanoseek inspect fusion`: the weights a model gives to earlier representations, on one prompt.

One figure, every panel a heatmap with named rows and columns and its own colour bar:
    dwa       weight of each source (embedding, layer 0, ...) in the stream after each layer: the
              learned a_ij
    dynamic   the same matrix with the per-token weights averaged over the prompt (the effective
              weights g_i w_ij(x) + (1 - g_i) [j = i]); then, per token, the last layer's row
    hyper     per sublayer (layer i attention / FFN) and stream, averaged over the prompt's tokens:
              how much each stream feeds the sublayer (read, a_m), where its output is written
              (write, b), and the stream-to-stream map (mix, A_r) with one column per pair j->k
    mhc       the same for DeepSeek-V4's pre / post / comb maps (comb is doubly stochastic), plus the
              final head's weights over the streams as the last row of "read"
A plain residual model has no fusion weights: there is nothing to draw, and the command says so.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

import numpy as np
import torch

from nanoseek.analysis.figures import MAX_LABELS, image_path, label_axis, pyplot, save_figure, token_labels
from nanoseek.errors import NanoseekError

DRAWN_KINDS = ("dwa", "dynamic", "hyper", "mhc")
FUSION_NAMES = {
    "dwa": "depth-weighted average (DenseFormer)",
    "dynamic": "dynamic fusion",
    "hyper": "hyper-connections",
    "mhc": "mHC (DeepSeek-V4 manifold-constrained hyper-connections)",
}
ANNOTATE_CELLS = 150  # write each cell's value in it up to this many cells


@dataclass
class Panel:
    """One heatmap: grid (rows, cols) with NaN where a cell does not exist."""

    title: str
    grid: np.ndarray
    rows: list[str]
    cols: list[str]
    row_name: str
    col_name: str
    value: str  # what the colour means
    token_rows: bool = False  # rows are the prompt's tokens (thinned past MAX_LABELS)


@dataclass
class FusionPicture:
    kind: str
    panels: list[Panel] = field(default_factory=list)


def sources(n_layers: int) -> list[str]:
    return ["embedding"] + [f"layer {j}" for j in range(n_layers)]


@torch.inference_mode()
def fusion_picture(model, input_ids: torch.Tensor, tokens: list[str] | None = None) -> FusionPicture:
    """The panels for `model`'s fusion kind on one prompt (batch 1)."""
    kind = model.config.fusion
    if kind not in DRAWN_KINDS:
        raise NanoseekError(
            f"fusion={kind}: the layers add into one residual stream with no learned fusion weights, so "
            f"there is nothing to draw; fusion pictures need a model trained with --model.fusion="
            + "|".join(DRAWN_KINDS)
        )
    if kind == "dwa":
        return FusionPicture(kind, [dwa_panel(model)])
    if kind == "dynamic":
        return FusionPicture(kind, dynamic_panels(model, input_ids, tokens))
    return FusionPicture(kind, stream_panels(model, input_ids))


def lower_triangle(n_layers: int) -> np.ndarray:
    """(L, L+1) of NaN: the cells a fusion after layer i may fill are j <= i + 1."""
    return np.full((n_layers, n_layers + 1), np.nan)


def dwa_panel(model) -> Panel:
    n = len(model.fusions)
    grid = lower_triangle(n)
    for i, fusion in enumerate(model.fusions):
        grid[i, : i + 2] = fusion.alpha.detach().float().cpu().numpy()
    return Panel(
        "weight of each source in the stream after each layer",
        grid,
        [f"after layer {i}" for i in range(n)],
        sources(n),
        "stream",
        "source",
        "weight a_ij",
    )


def dynamic_panels(model, input_ids: torch.Tensor, tokens: list[str] | None) -> list[Panel]:
    outputs = model.layer_outputs(input_ids)  # X_0..X_L, the block outputs the fusions read
    n = len(model.fusions)
    grid = lower_triangle(n)
    per_token = None
    rows = []
    for i, fusion in enumerate(model.fusions):
        gate = float(fusion.gate.detach().float())
        effective = gate * fusion.weights(outputs[: i + 2]).float()  # (T, i+2)
        effective[:, -1] += 1.0 - gate
        grid[i, : i + 2] = effective.mean(0).cpu().numpy()
        rows.append(f"after layer {i} (gate {gate:.2f})")
        per_token = effective
    mean = Panel(
        "effective weight of each source, mean over the prompt's tokens",
        grid,
        rows,
        sources(n),
        "stream",
        "source",
        "effective weight",
    )
    tokens = tokens or [str(t) for t in range(per_token.shape[0])]
    last = Panel(
        f"per token, the stream after layer {n - 1}",
        per_token.cpu().numpy(),
        tokens,
        sources(n),
        "token",
        "source",
        "effective weight",
        token_rows=True,
    )
    return [mean, last]


def stream_panels(model, input_ids: torch.Tensor) -> list[Panel]:
    """read / write / mix per sublayer, mean over tokens (hyper-connections and mHC)."""
    mhc = model.config.fusion == "mhc"
    captured: list[tuple[str, torch.nn.Module, torch.Tensor]] = []
    hooks = []
    for i, layer in enumerate(model.layers):
        for part, name in (("attention", "attn_hc"), ("FFN", "ffn_hc")):
            module = getattr(layer, name)
            hooks.append(
                module.register_forward_pre_hook(
                    lambda mod, args, tag=f"layer {i} {part}": captured.append((tag, mod, args[0]))
                )
            )
    if mhc:
        head = model.stream_head
        hooks.append(head.register_forward_pre_hook(lambda mod, args: captured.append(("final head", mod, args[0]))))
    try:
        model(input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    n = model.config.hc_mult
    reads, writes, mixes, tags = [], [], [], []
    for tag, module, streams in captured:
        if tag == "final head":
            reads.append(module.weights(streams)[0].float().mean(0))
            continue
        read, a_r_or_comb, write = _sublayer_maps(module, streams, mhc)
        tags.append(tag)
        reads.append(read)
        writes.append(write)
        mixes.append(a_r_or_comb.flatten())
    read_rows = tags + (["final head"] if mhc else [])
    streams_cols = [str(k) for k in range(n)]
    pairs = [f"{j}→{k}" for j in range(n) for k in range(n)]
    return [
        Panel(
            "read: weight of each stream in the sublayer's input" + (" (pre)" if mhc else " (a_m)"),
            torch.stack(reads).cpu().numpy(),
            read_rows,
            streams_cols,
            "sublayer",
            "stream",
            "weight",
        ),
        Panel(
            "write: how much of the sublayer's output each stream gets" + (" (post)" if mhc else " (b)"),
            torch.stack(writes).cpu().numpy(),
            tags,
            streams_cols,
            "sublayer",
            "stream",
            "weight",
        ),
        Panel(
            "mix: stream j → stream k" + (" (comb, doubly stochastic)" if mhc else " (A_r)"),
            torch.stack(mixes).cpu().numpy(),
            tags,
            pairs,
            "sublayer",
            "stream pair j→k",
            "weight",
        ),
    ]


def _sublayer_maps(module, streams: torch.Tensor, mhc: bool):
    """(read (n,), mix (n, n), write (n,)) of one sublayer, mean over the prompt's tokens."""
    maps = module.maps(streams)
    if mhc:
        pre, post, comb = maps
        return pre[0].float().mean(0), comb[0].float().mean(0), post[0].float().mean(0)
    a_m, a_r, b = maps
    return a_m[0].float().mean(0), a_r[0].float().mean(0), b[0].float().mean(0)


def fusion_figure(pic: FusionPicture, prompt: str):
    plt = pyplot()
    widths = [max(2.5, 0.55 * len(p.cols)) for p in pic.panels]
    tallest = max(len(p.rows) if not p.token_rows else min(len(p.rows), MAX_LABELS) for p in pic.panels)
    height = float(np.clip(0.4 * tallest + 2.8, 4.0, 12.0))
    label_room = 1.6  # the row labels' width
    fig, axes = plt.subplots(
        1,
        len(pic.panels),
        figsize=(sum(w + label_room + 1.0 for w in widths), height),
        gridspec_kw={"width_ratios": widths},
        squeeze=False,
        layout="constrained",
    )
    shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    where = (
        "learned constants: the same for every prompt"
        if pic.kind == "dwa"
        else f"on the prompt {shown!r}, means over its tokens"
    )
    fig.suptitle(f"layer fusion: {FUSION_NAMES[pic.kind]}\n{where}", fontsize=11)
    for ax, panel in zip(axes[0], pic.panels):
        draw_panel(fig, ax, panel)
    return fig


def draw_panel(fig, ax, panel: Panel) -> None:
    plt = pyplot()
    grid = np.ma.masked_invalid(panel.grid)
    # from 0 (or below): near-uniform weights look near-uniform
    bottom, top = min(0.0, float(np.nanmin(panel.grid))), max(1.0, float(np.nanmax(panel.grid)))
    viridis = plt.get_cmap("viridis").with_extremes(bad="#f0f0f0")
    image = ax.imshow(grid, cmap=viridis, aspect="auto", interpolation="nearest", vmin=bottom, vmax=top)
    fig.colorbar(image, ax=ax, label=panel.value, shrink=0.9)
    chars = int(6 * max(2.5, 0.55 * len(panel.cols)) + 10)
    ax.set_title(textwrap.fill(panel.title, chars), fontsize=9)
    ax.set_xticks(range(len(panel.cols)), panel.cols, rotation=45 if len(panel.cols) > 4 else 0, ha="right")
    ax.set_xlabel(panel.col_name)
    if panel.token_rows:
        label_axis(ax, "y", panel.rows, panel.row_name)
    else:
        ax.set_yticks(range(len(panel.rows)), panel.rows)
        ax.set_ylabel(panel.row_name)
    if grid.size <= ANNOTATE_CELLS and not panel.token_rows:
        for (r, c), value in np.ndenumerate(panel.grid):
            if not np.isnan(value):
                dark = (value - bottom) / (top - bottom) < 0.6
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if dark else "black")


def plot_fusion(model, tokenizer, prompt: str, out=None):
    """Draw `model`'s fusion weights on `prompt` into `out` (a file, or a folder: fusion.png in it).
    Returns (the path written, the picture)."""
    path = image_path(out, "fusion.png")
    ids = tokenizer.encode(prompt)[: model.config.max_position_embeddings]
    if not ids:
        raise NanoseekError("--prompt is empty")
    pic = fusion_picture(model, torch.tensor([ids]), token_labels(tokenizer, ids))
    return save_figure(fusion_figure(pic, prompt), path, dpi=110), pic
