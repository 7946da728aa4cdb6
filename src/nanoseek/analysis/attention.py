"""`nanoseek inspect attention`: for one layer and one prompt, who attends to whom.

Two panels, rows = queries and columns = keys, both labelled with the prompt's tokens:
    weights   the attention weights averaged over heads (what the layer computes), with a colour bar
    allowed   which keys each query may attend to at all, in three colours (a legend says which):
              attended; earlier but left out by the sparse pattern; later (the causal mask)
The patterns: the causal triangle (dense), the band (sliding), the indexer's top-k (DSA), selected
blocks plus a window (NSA), and for DeepSeek-V4 (CSA / HCA) a window over the tokens followed by
columns cJ, the compressed entries (entry J stands for tokens J*m .. J*m+m-1).

A short prompt often fits inside a window of 512 keys, and then every earlier key is allowed: the
picture says so, and `--model.sliding_window=N` (or `index_topk`, `nsa_topn`) draws the layer as if
it used N, with the same weights. Fields that would change the weights cannot be set here.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import numpy as np
import torch

from nanoseek.analysis.figures import image_path, label_axis, pyplot, save_figure, token_labels
from nanoseek.errors import NanoseekError

# the fields a picture may change: they shape which keys are read, not the weights
PICTURE_FIELDS = ("sliding_window", "index_topk", "nsa_topn")
KIND_NAMES = {
    "dense": "dense (causal)",
    "sliding": "sliding window",
    "nsa": "NSA (native sparse attention)",
    "dsa": "DSA (DeepSeek-V3.2 sparse attention)",
    "csa": "CSA (DeepSeek-V4 compressed sparse attention)",
    "hca": "HCA (DeepSeek-V4 heavily compressed attention)",
}
LATER, LEFT_OUT, ALLOWED = 0, 1, 2
MASK_COLOURS = {LATER: "#ffffff", LEFT_OUT: "#f4a582", ALLOWED: "#2166ac"}
MASK_NAMES = {
    ALLOWED: "attended",
    LEFT_OUT: "earlier, left out by the sparse pattern",
    LATER: "later (causal mask)",
}


@dataclass
class AttentionPicture:
    """What the figure draws for one layer and prompt."""

    layer: int
    kind: str
    weights: torch.Tensor  # (T, K): mean over heads; K = T token keys (+ compressed entries for V4)
    allowed: torch.Tensor  # (T, K) bool
    categories: np.ndarray  # (T, K): LATER, LEFT_OUT or ALLOWED
    query_labels: list[str]  # T
    key_labels: list[str]  # K
    pattern: str  # one sentence: which keys the layer reads
    note: str = ""  # set when the pattern allows every earlier key on this prompt


@torch.inference_mode()
def attention_maps(model, input_ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(weights (T, K) averaged over heads, allowed (T, K), the layer's kind) for one prompt."""
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
    return weights[0].float().mean(0), allowed[0], model.config.layer_sparse(layer)


class _Captured(Exception):
    """Stops the forward pass once the layer's input is in hand."""


def reconfigured(model, changes: dict):
    """The model as if its config had `changes` (PICTURE_FIELDS only), with the same weights."""
    if not changes:
        return model
    for key in changes:
        if key not in PICTURE_FIELDS:
            raise NanoseekError(
                f"--model.{key}: inspect can change only fields that leave the weights as they are: "
                + ", ".join(f"model.{f}" for f in PICTURE_FIELDS)
            )
    from nanoseek.model import Transformer

    param = next(model.parameters())
    twin = Transformer(model.config.replace(**changes)).to(device=param.device, dtype=param.dtype)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def compress_rate(config, kind: str) -> int:
    return {"csa": config.compress_rate_csa, "hca": config.compress_rate_hca}.get(kind, 0)


def mask_categories(allowed: torch.Tensor, n_tokens: int, rate: int) -> np.ndarray:
    """LATER / LEFT_OUT / ALLOWED per (query, key). Token key s is later than query t when s > t;
    compressed entry J (V4) is later until its last token J*rate + rate - 1 has been read."""
    t, k = allowed.shape
    query = torch.arange(t)[:, None]
    last_token = torch.arange(k)
    if k > n_tokens:
        last_token[n_tokens:] = torch.arange(k - n_tokens) * rate + rate - 1
    earlier = last_token[None, :] <= query
    grid = torch.full((t, k), LATER)
    grid[earlier] = LEFT_OUT
    grid[allowed.bool()] = ALLOWED
    return grid.numpy()


def describe_pattern(config, kind: str) -> str:
    w, k, m = config.sliding_window, config.index_topk, compress_rate(config, kind)
    return {
        "dense": "every earlier key (causal)",
        "sliding": f"the last {w} keys (sliding window)",
        "dsa": f"the indexer's top-{k} earlier keys",
        "nsa": f"blocks of {config.nsa_block} tokens: the top {config.nsa_topn} (first, previous and own included), "
        f"plus a window of {w}; weights = the 3 gated branches, the compressed one spread over its block",
        "csa": f"a window of {w} tokens, plus the indexer's top-{k} compressed entries of {m} tokens; "
        "the rest of each row's weight goes to the learned sink",
        "hca": f"a window of {w} tokens, plus every closed compressed entry of {m} tokens; "
        "the rest of each row's weight goes to the learned sink",
    }.get(kind, kind)


def invisible_pattern_note(config, kind: str, categories: np.ndarray, n_tokens: int) -> str:
    """Why a sparse layer allows every earlier key on this prompt, and the override that shows its pattern."""
    if kind == "dense" or (categories == LEFT_OUT).any():
        return ""
    smaller = max(2, n_tokens // 4)
    if kind == "dsa":
        return (
            f"top-{config.index_topk} covers this {n_tokens}-token prompt, so every earlier key is attended; "
            f"--model.index_topk={smaller} draws the layer with {smaller} keys per query"
        )
    if kind == "nsa":
        block = config.nsa_block
        if n_tokens > 3 * block:
            fix = f"--model.sliding_window={smaller} --model.nsa_topn=3"
        else:
            fix = (
                f"--model.sliding_window={smaller} narrows the window; blocks of {block} tokens are part of the "
                f"weights, so only a prompt longer than {config.nsa_topn * block} tokens shows the block selection"
            )
        return f"the window ({config.sliding_window}) and blocks cover this {n_tokens}-token prompt; {fix}"
    return (
        f"the window ({config.sliding_window}) covers this {n_tokens}-token prompt, so every earlier key is "
        f"attended; --model.sliding_window={smaller} draws the layer with a window of {smaller}"
    )


def attention_picture(model, tokenizer, prompt: str, layer: int) -> AttentionPicture:
    ids = tokenizer.encode(prompt)[: model.config.max_position_embeddings]
    if not ids:
        raise NanoseekError("--prompt is empty")
    weights, allowed, kind = attention_maps(model, torch.tensor([ids]), layer)
    n, k = len(ids), weights.shape[1]
    labels = token_labels(tokenizer, ids)
    categories = mask_categories(allowed, n, compress_rate(model.config, kind))
    return AttentionPicture(
        layer=layer,
        kind=kind,
        weights=weights,
        allowed=allowed,
        categories=categories,
        query_labels=labels,
        key_labels=labels + [f"c{j}" for j in range(k - n)],
        pattern=describe_pattern(model.config, kind),
        note=invisible_pattern_note(model.config, kind, categories, n),
    )


def attention_figure(pic: AttentionPicture, n_layers: int, changed: dict | None = None):
    """The two-panel figure (weights with a colour bar; allowed keys with a legend)."""
    from matplotlib.colors import ListedColormap, PowerNorm
    from matplotlib.patches import Patch

    plt = pyplot()
    t, k = pic.weights.shape
    n_tokens = len(pic.query_labels)
    cell = min(0.2, 8.5 / max(t, k))  # inches per token: the labels' font fits up to 64 tokens
    width = 2 * k * cell + 3.4
    lines = [
        f"layer {pic.layer} (of 0..{n_layers - 1}): {KIND_NAMES.get(pic.kind, pic.kind)}",
        f"keys read: {pic.pattern}",
    ]
    if changed:
        lines.append("drawn as if " + ", ".join(f"{f}={v}" for f, v in changed.items()) + " (same weights)")
    if pic.note:
        lines.append("note: " + pic.note)
    title = "\n".join(textwrap.fill(line, int(13 * width)) for line in lines)
    height = t * cell + 2.2 + 0.2 * title.count("\n")
    fig, (ax_w, ax_m) = plt.subplots(1, 2, figsize=(width, height), layout="constrained")
    fig.suptitle(title, fontsize=10)

    # grey where nothing is read (NSA's compressed branch reads blocks the selection left out: not grey)
    weights = np.ma.masked_where(~pic.allowed.numpy() & (pic.weights.numpy() == 0), pic.weights.numpy())
    viridis = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")
    image = ax_w.imshow(weights, cmap=viridis, norm=PowerNorm(0.5, vmin=0.0), interpolation="nearest")
    fig.colorbar(image, ax=ax_w, shrink=0.9, label="weight, mean over heads (sqrt scale)")
    ax_w.set_title("attention weights (grey: not read)", fontsize=10)

    colours = ListedColormap([MASK_COLOURS[c] for c in (LATER, LEFT_OUT, ALLOWED)])
    ax_m.imshow(pic.categories, cmap=colours, vmin=-0.5, vmax=2.5, interpolation="nearest")
    ax_m.set_title("keys each query may attend to", fontsize=10)
    present = [c for c in (ALLOWED, LEFT_OUT, LATER) if (pic.categories == c).any()]
    handles = [Patch(facecolor=MASK_COLOURS[c], edgecolor="#555555", label=MASK_NAMES[c]) for c in present]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9, title="allowed keys")

    key_name = "key" if k == n_tokens else "key (tokens | cJ = compressed entry J)"
    for ax in (ax_w, ax_m):
        label_axis(ax, "x", pic.key_labels, key_name)
        label_axis(ax, "y", pic.query_labels, "query")
        if k > n_tokens:
            ax.axvline(n_tokens - 0.5, color="#d6604d", linewidth=1.2)
    return fig


def plot_attention(model, tokenizer, prompt: str, layer: int, out=None, changes: dict | None = None):
    """Draw layer `layer` on `prompt` into `out` (a file, or a folder: attention.png in it).
    Returns (the path written, the picture)."""
    path = image_path(out, "attention.png")
    model = reconfigured(model, changes or {})
    pic = attention_picture(model, tokenizer, prompt, layer)
    fig = attention_figure(pic, len(model.layers), changes)
    return save_figure(fig, path, dpi=110), pic
