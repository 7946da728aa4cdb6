"""Conformance with Hugging Face transformers (optional extra `hf`): logits equal to 1e-4 in fp32."""

import json

import pytest
import torch

from nanoseek import ModelConfig, Transformer, generate, load_model
from nanoseek.errors import NanoseekError

transformers = pytest.importorskip("transformers", reason="needs the optional extra: pip install -e '.[hf]'")
pytestmark = pytest.mark.hf

YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    initializer_range=0.1,
    tie_word_embeddings=False,
)
MLA = dict(
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    moe_intermediate_size=32,
    n_routed_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
)

CASES = {
    "v3_group_limited_yarn": (
        "DeepseekV3Config",
        dict(TINY, **MLA, q_lora_rank=24, n_group=2, topk_group=1, routed_scaling_factor=2.5, rope_scaling=YARN),
    ),
    "v3_no_q_lora": ("DeepseekV3Config", dict(TINY, **MLA, q_lora_rank=None, n_group=1, topk_group=1)),
    "v2_greedy": (
        "DeepseekV2Config",
        dict(TINY, **MLA, q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1),
    ),
    "v2_group_limited": (
        "DeepseekV2Config",
        dict(
            TINY,
            **{**MLA, "n_routed_experts": 8},
            q_lora_rank=24,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=16.0,
        ),
    ),
    "llama_gqa": ("LlamaConfig", dict(TINY, num_key_value_heads=2)),
    "gpt2": (
        "GPT2Config",
        dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=0.1),
    ),
    # V3.2: 24-token inputs, each query keeps its top 6 keys by the lightning indexer. 16 indexer
    # heads: a score is exactly 0 only when all 16 ReLUs are, so ties at the k-th score (nanoseek
    # takes the earliest keys, transformers' top-k whichever its row length leads to) do not occur
    "v32_dsa": (
        "DeepseekV32Config",
        dict(TINY, **MLA, q_lora_rank=24, n_group=2, topk_group=1, index_topk=6, index_n_heads=16, index_head_dim=16),
    ),
}


def hf_model(case):
    cls_name, kwargs = CASES[case]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)
    return model


@pytest.fixture(params=sorted(CASES))
def saved(request, tmp_path):
    model = hf_model(request.param)
    model.save_pretrained(tmp_path)
    return model, tmp_path


def test_hf_to_nanoseek_logits_and_greedy(saved):
    hf, path = saved
    ours = load_model(path)
    x = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(x).logits
    got = ours(x).logits
    assert (got - expected).abs().max().item() <= 1e-4
    prompt = x[:1, :8]
    hf.generation_config.eos_token_id = None  # compare 16 tokens, eos or not
    hf_new = hf.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, 8:]
    assert generate(ours, prompt[0], max_new_tokens=16, temperature=0).tolist() == hf_new.tolist()


@pytest.mark.parametrize(
    "preset", ["deepseek-v3-tiny", "deepseek-v2-tiny", "llama-tiny", "deepseek-v32-tiny", "gpt2-tiny"]
)
def test_nanoseek_to_hf_logits(preset, tmp_path):
    torch.manual_seed(0)
    no_ties = {"index_n_heads": 16} if preset == "deepseek-v32-tiny" else {}  # as in CASES["v32_dsa"]
    ours = Transformer(ModelConfig.from_preset(preset, initializer_range=0.1, **no_ties)).eval()
    with torch.no_grad():
        for name, buf in ours.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)
        for name, p in ours.named_parameters():
            if name.endswith("bias"):  # zero at init: make a misplaced one show
                p.normal_(0, 0.1)
    ours.save_pretrained(tmp_path, format="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    x = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        assert (hf(x).logits - ours(x).logits).abs().max().item() <= 1e-4
    again = load_model(tmp_path)  # and back, MTP modules included
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_bf16_load_matches_transformers_in_bf16(saved):
    model, path = saved
    ours = load_model(path, dtype=torch.bfloat16)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16).eval()
    assert ours.embed_tokens.weight.dtype == torch.bfloat16
    x = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    choices = {"ours": [], "hf": []}  # each MoE layer's expert set per token: (layer, token) -> set
    hooks = [
        m.register_forward_hook(lambda mod, args, out, who=who: choices[who].append(routed_sets(out)))
        for who, net in (("ours", ours), ("hf", hf))
        for name, m in net.named_modules()
        if name.endswith("mlp.gate")
    ]
    with torch.no_grad():
        a, b = ours(x).logits.float(), hf(x).logits.float()
    for h in hooks:
        h.remove()
    if model.config.model_type == "deepseek_v32":
        # bf16 rounding moves near-tied indexer scores across the top-k cut, which changes the
        # selected keys (a discontinuity, not an error); before index_topk every key is selected
        a, b = a[:, : model.config.index_topk], b[:, : model.config.index_topk]
    scale = b.abs().max().item()
    off = ((a - b).abs().amax(-1) > 0.02 * scale)[0]  # bf16: 8 mantissa bits
    # bf16 rounding can move a near-tied router choice (a discontinuity: that position's logits then
    # differ by far more than rounding): a position may differ only where the routing differs
    rerouted = {
        t
        for ours_l, hf_l in zip(choices["ours"], choices["hf"])
        for t, (o, h) in enumerate(zip(ours_l, hf_l))
        if o != h
    }
    assert set(off.nonzero().flatten().tolist()) <= rerouted, (a - b).abs().amax(-1)
    assert len(rerouted) <= 2


def routed_sets(out) -> list:
    """A router's chosen experts per token, as sets: nanoseek's gate returns (indices, weights, scores),
    transformers' (logits, weights, indices)."""
    idx = out[0] if out[0].dtype == torch.long and out[0].dim() == 2 else out[-1]
    return [frozenset(row) for row in idx.reshape(-1, idx.shape[-1]).tolist()]


def test_sharded_checkpoint_loads(tmp_path):
    hf = hf_model("v3_group_limited_yarn")
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    x = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert (load_model(tmp_path)(x).logits - hf(x).logits).abs().max().item() <= 1e-4


def test_gpt2_folder_in_openai_layout_loads(tmp_path):
    """OpenAI's GPT-2 folders name tensors without `transformer.` and store each layer's causal mask."""
    from safetensors.torch import load_file, save_file

    hf = hf_model("gpt2")
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    state.update({f"h.{i}.attn.bias": torch.ones(1, 1, 256, 256).tril() for i in range(2)})
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    x = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert (load_model(tmp_path)(x).logits - hf(x).logits).abs().max().item() <= 1e-4


def test_bad_folders_are_clear_errors(tmp_path):
    hf = hf_model("llama_gqa")
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(NanoseekError, match="unknown model_type"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(NanoseekError, match="model.safetensors"):
        load_model(tmp_path)
    weights.unlink()
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(NanoseekError, match="pickle"):
        load_model(tmp_path)


def test_refuses_to_export_what_transformers_cannot_express(tmp_path):
    model = Transformer(ModelConfig.from_preset("vaswani-tiny"))
    with pytest.raises(NanoseekError, match="cannot save in HF format"):
        model.save_pretrained(tmp_path, format="hf")
    assert not (tmp_path / "config.json").exists()


def test_mhc_equals_transformers_deepseek_v4_hyper_connection():
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as v4

    from nanoseek.model.fusion import ManifoldHyperConnection, StreamHead

    hf_cfg = transformers.DeepseekV4Config(
        hidden_size=32, hc_mult=3, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6
    )
    ours_cfg = ModelConfig.from_preset("deepseek-v3-tiny", hidden_size=32, fusion="mhc", hc_mult=3)
    torch.manual_seed(0)
    hf_hc, ours_hc = v4.DeepseekV4HyperConnection(hf_cfg), ManifoldHyperConnection(ours_cfg)
    hf_head, ours_head = v4.DeepseekV4HyperHead(hf_cfg), StreamHead(ours_cfg)
    with torch.no_grad():
        for name in ("fn", "base", "scale"):
            getattr(hf_hc, name).copy_(torch.randn_like(getattr(hf_hc, name)) * 0.5)
            getattr(ours_hc, name).copy_(getattr(hf_hc, name))
        for name in ("hc_fn", "hc_base", "hc_scale"):
            getattr(hf_head, name).copy_(torch.randn_like(getattr(hf_head, name)) * 0.5)
            getattr(ours_head, name).copy_(getattr(hf_head, name))
    streams = torch.randn(2, 5, 3, 32)
    layer = torch.nn.Linear(32, 32)
    post, comb, collapsed = hf_hc(streams)
    expected = post.unsqueeze(-1) * layer(collapsed).unsqueeze(-2) + comb.transpose(-1, -2) @ streams
    torch.testing.assert_close(ours_hc(streams, layer), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_head(streams), hf_head(streams), atol=1e-6, rtol=1e-6)


V4_TINY = dict(
    vocab_size=128,
    hidden_size=64,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    head_dim=32,
    partial_rotary_factor=0.25,
    q_lora_rank=24,
    o_groups=2,
    o_lora_rank=16,
    index_n_heads=8,
    index_head_dim=16,
    index_topk=4,
    sliding_window=8,
    hc_mult=2,
    layer_types=["compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    mlp_layer_types=["hash_moe", "moe", "moe"],
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    max_position_embeddings=256,
    initializer_range=0.1,
    rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1),
)


def v4_hf_model():
    torch.manual_seed(0)
    model = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**V4_TINY)).eval()
    with torch.no_grad():  # the parts transformers initializes to zero or one must matter too
        for name, p in model.named_parameters():
            if name.endswith(("sinks", "position_bias", "base")):
                p.normal_(0, 0.5)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.1)
            if name.endswith("tid2eid"):
                buf.copy_(torch.rand(buf.shape[0], 4).argsort(-1)[:, :2])
    return model


def test_deepseek_v4_from_transformers(tmp_path):
    """CSA (top 4 of up to 9 entries), HCA and sliding layers, hash and biased routing, mHC."""
    hf = v4_hf_model()
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.sparse_layers == ["csa", "hca", "sliding"] and ours.config.num_hash_layers == 1
    x = torch.randint(0, 128, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(x).logits
        assert (ours(x).logits - expected).abs().max().item() <= 1e-4
    prompt = x[:1, :10]
    hf.generation_config.eos_token_id = None
    hf_new = hf.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, 10:]
    assert generate(ours, prompt[0], max_new_tokens=16, temperature=0).tolist() == hf_new.tolist()


def test_deepseek_v4_to_transformers(tmp_path):
    torch.manual_seed(0)
    ours = Transformer(ModelConfig.from_preset("deepseek-v4-tiny", initializer_range=0.1, index_n_heads=8)).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith(("sinks", "position_bias", "base")):
                p.normal_(0, 0.5)
    ours.save_pretrained(tmp_path, format="hf")
    reference = v4_hf_model()
    reference.save_pretrained(tmp_path / "hf")
    from safetensors import safe_open

    names = {k.split(".", 3)[-1] for k in safe_open(str(tmp_path / "model.safetensors"), "pt").keys()}
    hf_names = {k.split(".", 3)[-1] for k in safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt").keys()}
    assert names <= hf_names  # the names transformers itself writes
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    x = torch.randint(0, 128, (2, 30))
    with torch.no_grad():
        assert (hf(x).logits - ours(x).logits).abs().max().item() <= 1e-4
    again = load_model(tmp_path)
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
