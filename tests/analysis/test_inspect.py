"""`nanoseek inspect`: what the figures hold (labels, colour bar, mask legend, integer axes), read from
matplotlib's objects, and where `--out` writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.analysis.attention import (
    ALLOWED,
    LATER,
    LEFT_OUT,
    attention_figure,
    attention_picture,
    mask_categories,
    reconfigured,
)
from nanoseek.analysis.figures import image_path, save_figure, thinned_ticks, visible
from nanoseek.analysis.fusion import fusion_figure, fusion_picture
from nanoseek.data.tokenizer import CharTokenizer
from nanoseek.errors import NanoseekError

PROMPT = "to be or not to be"
TOK = CharTokenizer.train(["to be or not to be, that is the question: whether 'tis nobler"])


def model(preset: str, **overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset(preset, vocab_size=TOK.vocab_size, **overrides)).eval()


@pytest.fixture(autouse=True)
def close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def ticks(ax, axis: str) -> list[str]:
    labels = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    return [t.get_text() for t in labels]


# ---------------------------------------------------------------------------- --out


def test_out_is_a_file_or_a_folder_as_meant(tmp_path):
    assert image_path(None, "attention.png").as_posix() == "attention.png"
    assert image_path(tmp_path, "attention.png") == tmp_path / "attention.png"  # an existing folder
    assert image_path(f"{tmp_path}/new/", "fusion.png") == tmp_path / "new" / "fusion.png"
    assert image_path(tmp_path / "run1", "fusion.png") == tmp_path / "run1" / "fusion.png"  # no suffix
    assert image_path(tmp_path / "a.svg", "fusion.png") == tmp_path / "a.svg"
    with pytest.raises(NanoseekError, match="not an image type"):
        image_path(tmp_path / "a.txt", "fusion.png")
    (tmp_path / "plain").write_text("x")
    with pytest.raises(NanoseekError, match="without an image suffix"):
        image_path(tmp_path / "plain", "fusion.png")


def test_an_unwritable_out_is_one_line_and_leaves_nothing(tmp_path):
    import matplotlib.pyplot as plt

    (tmp_path / "plain").write_text("x")
    with pytest.raises(NanoseekError, match="cannot write there"):
        save_figure(plt.figure(), image_path(tmp_path / "plain" / "sub/", "attention.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


def test_inspect_command_writes_into_a_folder_and_says_where(tmp_path, capsys):
    from nanoseek.cli import main

    m = model("llama-tiny", fusion="mhc", hc_mult=2)
    m.save_pretrained(tmp_path / "ckpt")
    TOK.save(tmp_path / "ckpt")
    out = tmp_path / "pictures"
    assert main(["inspect", "attention", str(tmp_path / "ckpt"), "--prompt", PROMPT, "--out", f"{out}/"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(out / "attention.png")
    assert main(["inspect", "fusion", str(tmp_path / "ckpt"), "--prompt", PROMPT, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["attention.png", "fusion.png"]
    assert not (tmp_path / "pictures.png").exists()


# ---------------------------------------------------------------------------- attention


def test_attention_figure_has_token_labels_a_colour_bar_and_a_mask_legend():
    pic = attention_picture(model("llama-tiny", sparse="sliding", sliding_window=4), TOK, PROMPT, 0)
    fig = attention_figure(pic, 2)
    weights_ax, mask_ax, colour_bar = fig.axes
    labels = [visible(c) for c in PROMPT]
    assert labels[2] == "␣" and len(labels) == len(PROMPT)
    for ax in (weights_ax, mask_ax):
        assert ticks(ax, "x") == labels and ticks(ax, "y") == labels
    assert "weight" in colour_bar.get_ylabel()
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "attended",
        "earlier, left out by the sparse pattern",
        "later (causal mask)",
    ]
    assert "layer 0 (of 0..1): sliding window" in fig._suptitle.get_text()
    assert "last 4 keys" in fig._suptitle.get_text() and not pic.note


@pytest.mark.parametrize(
    "preset,overrides,layer,title",
    [
        ("llama-tiny", dict(sparse="nsa", nsa_block=4, nsa_topn=3, sliding_window=4), 0, "NSA"),
        ("deepseek-v4-tiny", {}, 0, "CSA"),
        ("deepseek-v4-tiny", {}, 1, "HCA"),
        ("deepseek-v32-tiny", dict(index_topk=4), 1, "DSA"),
    ],
)
def test_sparse_kinds_name_themselves_and_show_left_out_keys(preset, overrides, layer, title):
    prompt = PROMPT + ", that is"
    pic = attention_picture(model(preset, **overrides), TOK, prompt, layer)
    fig = attention_figure(pic, 2)
    suptitle = fig._suptitle.get_text()
    assert title in suptitle and all(len(line) < 250 for line in suptitle.splitlines())
    assert (pic.categories == LEFT_OUT).any() and not pic.note
    if preset == "deepseek-v4-tiny":  # compressed entries after the token keys, labelled cJ
        n = len(prompt)
        assert ticks(fig.axes[0], "x")[n : n + 2] == ["c0", "c1"]


def test_a_window_longer_than_the_prompt_is_said_and_an_override_draws_the_pattern(tmp_path):
    from nanoseek.analysis import plot_attention

    m = model("llama-tiny", sparse="sliding", sliding_window=512)
    pic = attention_picture(m, TOK, PROMPT, 0)
    assert not (pic.categories == LEFT_OUT).any()
    assert "window (512)" in pic.note and "--model.sliding_window=4" in pic.note
    out, pic = plot_attention(m, TOK, PROMPT, 0, tmp_path, {"sliding_window": 4})
    assert out == tmp_path / "attention.png" and out.stat().st_size > 5000
    assert (pic.categories == LEFT_OUT).any() and not pic.note
    assert (pic.allowed.sum(-1) <= 4).all()


def test_only_fields_that_keep_the_weights_can_change_for_a_picture():
    m = model("llama-tiny", sparse="nsa", nsa_block=4)
    assert reconfigured(m, {"nsa_topn": 3}).config.nsa_topn == 3
    with pytest.raises(NanoseekError, match="model.nsa_block"):
        reconfigured(m, {"nsa_block": 8})


def test_mask_categories_close_a_compressed_entry_at_its_last_token():
    allowed = torch.zeros(8, 8 + 2, dtype=torch.bool)
    allowed[:, :8] = torch.ones(8, 8).tril().bool()
    grid = mask_categories(allowed, n_tokens=8, rate=4)
    assert grid[3, 8] == LEFT_OUT and grid[2, 8] == LATER  # entry 0 = tokens 0..3
    assert grid[7, 9] == LEFT_OUT and grid[6, 9] == LATER
    assert (grid[:, :8] == np.where(np.tri(8, dtype=bool), ALLOWED, LATER)).all()


def test_characters_no_font_draws_are_labelled_by_code_point_with_a_hint():
    from nanoseek.analysis.figures import font_note

    assert visible("\ue000") == "U+E000" and visible("\n") == "\\n"  # a private-use character
    assert font_note("ROMEO") == "" and "font" in font_note("x\ue000")


def test_long_prompts_thin_their_labels():
    assert thinned_ticks(64) == (list(range(64)), 1)
    positions, step = thinned_ticks(200)
    assert step == 4 and len(positions) == 50
    pic = attention_picture(model("llama-tiny"), TOK, PROMPT * 6, 0)
    ax = attention_figure(pic, 2).axes[0]
    assert len(ticks(ax, "x")) == 54 and "one label per 2 tokens" in ax.get_xlabel()


# ---------------------------------------------------------------------------- fusion


def fusion_of(fusion: str, layers: int = 2):
    m = model("llama-tiny", fusion=fusion, hc_mult=2, num_hidden_layers=layers)
    return fusion_picture(m, torch.tensor([TOK.encode(PROMPT)]), [visible(c) for c in PROMPT])


def test_a_residual_model_has_nothing_to_draw():
    with pytest.raises(NanoseekError, match="nothing to draw"):
        fusion_of("residual")


def test_dwa_one_panel_with_named_integer_axes():
    pic = fusion_of("dwa", layers=3)
    (panel,) = pic.panels
    assert panel.cols == ["embedding", "layer 0", "layer 1", "layer 2"]
    assert panel.rows == ["after layer 0", "after layer 1", "after layer 2"]
    assert np.isnan(panel.grid[0, 2:]).all() and panel.grid[2, 3] == 1.0  # identity at init
    ax = fusion_figure(pic, PROMPT).axes[0]
    assert ticks(ax, "x") == panel.cols and ticks(ax, "y") == panel.rows
    assert ax.get_xticks().tolist() == [0, 1, 2, 3]


def test_dynamic_effective_weights_sum_to_one_per_stream():
    mean, per_token = fusion_of("dynamic").panels
    np.testing.assert_allclose(np.nansum(mean.grid, axis=1), 1.0, rtol=1e-5)
    assert per_token.token_rows and per_token.grid.shape == (len(PROMPT), 3)


@pytest.mark.parametrize("fusion", ["hyper", "mhc"])
def test_stream_fusions_read_write_and_mix_per_sublayer(fusion):
    pic = fusion_of(fusion)
    read, write, mix = pic.panels
    sublayers = ["layer 0 attention", "layer 0 FFN", "layer 1 attention", "layer 1 FFN"]
    assert write.rows == mix.rows == sublayers
    assert read.rows == sublayers + (["final head"] if fusion == "mhc" else [])
    assert read.cols == ["0", "1"] and read.col_name == "stream" and mix.cols == ["0→0", "0→1", "1→0", "1→1"]
    if fusion == "mhc":  # comb is doubly stochastic: each row of the 2x2 sums to 1
        np.testing.assert_allclose(mix.grid.reshape(4, 2, 2).sum(-1), 1.0, atol=1e-3)
    fig = fusion_figure(pic, PROMPT)
    assert len(fig.axes) == 6  # three panels, three colour bars
    assert ticks(fig.axes[0], "x") == ["0", "1"] and fig.axes[0].get_xticks().tolist() == [0, 1]
