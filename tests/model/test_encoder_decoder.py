"""The encoder-decoder Transformer: padding, causality, cached decoding, tying, label smoothing, config checks."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek.config import ModelConfig, build_train_config
from nanoseek.errors import NanoseekError
from nanoseek.model import EncoderDecoder, Transformer, make_model, model_info
from nanoseek.model.attention.core import sdpa

PAD = 0
VARIANTS = {
    "paper": {},  # post-norm, sinusoidal, ReLU, tied
    "modern": dict(
        norm_position="pre",
        final_norm=True,
        position="rope",
        norm="rmsnorm",
        ffn="swiglu",
        attention="gqa",
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),  # fmt: skip
}


def tiny(variant: str = "paper", **changes) -> EncoderDecoder:
    torch.manual_seed(0)
    sizes = dict(vocab_size=50, hidden_size=32, intermediate_size=64, hidden_dropout=0.0, pad_token_id=PAD)
    cfg = ModelConfig.from_preset("vaswani-tiny-ed", **{**sizes, **VARIANTS[variant], **changes})
    return EncoderDecoder(cfg).eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_source_padding_never_changes_the_outputs(variant):
    model = tiny(variant)
    long_src, short_src = torch.randint(1, 50, (1, 7)), torch.randint(1, 50, (1, 4))
    target = torch.randint(1, 50, (2, 5))
    padded = torch.cat([long_src, F.pad(short_src, (0, 3), value=PAD)])
    batch = model(padded, target).logits
    alone_long = model(long_src, target[:1]).logits
    alone_short = model(short_src, target[1:]).logits
    torch.testing.assert_close(batch[0], alone_long[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[1], alone_short[0], atol=1e-5, rtol=1e-5)


def test_an_explicit_source_mask_is_the_pad_mask():
    model = tiny(pad_token_id=None)  # no pad id: only the explicit mask hides the padding
    src = torch.tensor([[5, 6, 7, 9, 9]])
    target = torch.randint(1, 50, (1, 3))
    masked = model(src, target, source_mask=torch.tensor([[1, 1, 1, 0, 0]])).logits
    torch.testing.assert_close(masked, model(src[:, :3], target).logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(src, target).logits, masked, atol=1e-3)  # without a mask the pads count


def test_the_decoder_is_causal_and_the_encoder_sees_the_whole_source():
    model = tiny()
    src, target = torch.randint(1, 50, (1, 6)), torch.randint(1, 50, (1, 6))
    base = model(src, target).logits
    later = target.clone()
    later[0, 4] = (later[0, 4] + 1) % 50
    changed = model(src, later).logits
    torch.testing.assert_close(changed[:, :4], base[:, :4])  # positions before 4 never see token 4
    assert not torch.allclose(changed[:, 4:], base[:, 4:])
    last_source = src.clone()
    last_source[0, -1] = (last_source[0, -1] + 1) % 50 or 1
    assert not torch.allclose(model(last_source, target).logits[:, 0], base[:, 0])  # cross-attention reads it all


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_decoding_equals_recompute(variant):
    model = tiny(variant)
    src = torch.cat([torch.randint(1, 50, (2, 5)), torch.tensor([[PAD, PAD], [7, 8]])], dim=1)
    target = torch.randint(1, 50, (2, 6))
    full = model(src, target).logits
    memory = model.encode(src)
    cache = model.make_cache(2, 6)
    steps = [model(None, target[:, t : t + 1], memory=memory, cache=cache, start=t).logits for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    prefix = model(None, target[:, :3], memory=model.encode(src), cache=(c := model.make_cache(2, 6)), start=0).logits
    rest = model(None, target[:, 3:], memory=memory, cache=c, start=3).logits
    torch.testing.assert_close(torch.cat([prefix, rest], dim=1), full, atol=1e-5, rtol=1e-5)


def test_cross_attention_keys_are_projected_once_per_layer():
    model = tiny()
    calls = []
    for layer in model.decoder:
        layer.encoder_attn.kv_proj.register_forward_hook(lambda *a: calls.append(1))
    memory = model.encode(torch.randint(1, 50, (1, 4)))
    cache = model.make_cache(1, 5)
    for t in range(5):
        model(None, torch.tensor([[3]]), memory=memory, cache=cache, start=t)
    assert len(calls) == len(model.decoder)


def test_one_table_embeds_source_and_target_and_is_the_output_projection():
    model = tiny()
    assert model.lm_head.weight is model.embed_tokens.weight
    assert not any("embed" in name and "pos" not in name for name, _ in model.encoder.named_parameters())
    loss = model(torch.randint(1, 50, (2, 4)), torch.randint(1, 50, (2, 3)), torch.randint(0, 50, (2, 3))).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())  # both stacks learn from the target loss


def test_label_smoothing_is_the_mixture_of_one_hot_and_uniform():
    model = tiny()
    src, inputs = torch.randint(1, 50, (2, 4)), torch.randint(1, 50, (2, 3))
    targets = torch.tensor([[3, 4, -1], [5, -1, -1]])
    eps = 0.1
    logits = model(src, inputs).logits.flatten(0, 1)[targets.flatten() >= 0]
    logp = torch.log_softmax(logits, -1)
    kept = targets.flatten()[targets.flatten() >= 0]
    expected = ((1 - eps) * -logp.gather(1, kept[:, None])[:, 0] + eps * -logp.mean(-1)).mean()
    for return_logits in (True, False):
        loss = model(src, inputs, targets, label_smoothing=eps, return_logits=return_logits).loss
        torch.testing.assert_close(loss, expected)


def test_make_model_and_info_follow_the_architecture():
    base = ModelConfig.from_preset("vaswani-base-ed")
    info = model_info(base)
    assert info["encoder_layers"] == info["decoder_layers"] == 6
    assert 60e6 < info["params_total"] < 66e6  # the paper's base model: 65M with its 37K vocabulary
    assert isinstance(make_model(ModelConfig.from_preset("vaswani-tiny")), Transformer)
    with pytest.raises(ValueError, match="decoder-only"):
        Transformer(ModelConfig.from_preset("vaswani-tiny-ed"))


def test_encoder_layers_default_to_the_decoder_depth():
    cfg = ModelConfig.from_preset("vaswani-tiny-ed", encoder_layers=None, num_hidden_layers=3)
    assert len(EncoderDecoder(cfg).encoder) == 3
    assert len(EncoderDecoder(cfg.replace(encoder_layers=1)).encoder) == 1


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(architecture="seq2seq"), "architecture"),
        (dict(attention="mla", position="rope"), "attention='mla'"),
        (dict(ffn="moe", n_routed_experts=4), "ffn='moe'"),
        (dict(fusion="dwa", norm_position="pre"), "fusion='dwa'"),
        (dict(sparse="sliding"), "sparse='sliding'"),
        (dict(encoder_layers=0), "encoder_layers=0"),
    ],
)
def test_config_names_the_field_an_encoder_decoder_cannot_take(change, match):
    with pytest.raises(NanoseekError, match=match):
        ModelConfig.from_preset("vaswani-tiny-ed", **change)


def test_an_encoder_decoder_needs_a_pair_task():
    with pytest.raises(NanoseekError, match="data.task"):
        build_train_config(preset="vaswani-tiny-ed")
    with pytest.raises(NanoseekError, match="data.task='poems'"):
        build_train_config(preset="vaswani-tiny-ed", overrides={"data.task": "poems"})
    with pytest.raises(NanoseekError, match="label_smoothing"):
        build_train_config(preset="vaswani-tiny-ed", overrides={"data.task": "copy", "train.label_smoothing": 1.0})
    assert build_train_config(preset="vaswani-tiny-ed", overrides={"data.task": "copy"}).train.label_smoothing == 0.1


def test_cross_attention_takes_grouped_heads_with_a_mask():
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)[:, None, None]
    out = sdpa(q, k, v, attn_mask=mask)
    expanded = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    torch.testing.assert_close(out, expanded)
