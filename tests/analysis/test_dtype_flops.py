"""Under bf16 autocast, a training step's matrix products run in bf16 (all but the routers, kept fp32)."""

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.analysis.dtype_flops import KEPT_FP32, MatmulCounter, count_training_step

FAMILIES = [
    ("vaswani-tiny", {}),
    ("gpt2-tiny", {}),
    ("llama-tiny", {}),
    ("deepseek-v2-tiny", {}),
    ("deepseek-v3-tiny", {}),
    ("deepseek-v32-tiny", {}),
    ("deepseek-v4-tiny", {}),
    ("llama-tiny", {"sparse": "nsa", "nsa_block": 8, "nsa_topn": 3}),
    ("llama-tiny", {"sparse": "sliding", "sliding_window": 8, "num_key_value_heads": 1}),
    ("deepseek-v3-tiny", {"fusion": "hyper"}),
]


@pytest.mark.parametrize(
    ("preset", "changes"), FAMILIES, ids=[p + "".join(f"-{v}" for v in c.values()) for p, c in FAMILIES]
)
def test_bf16_autocast_step_runs_its_matmuls_in_bf16(preset, changes):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset).replace(**changes)
    x = torch.randint(0, cfg.vocab_size, (2, 64 if changes.get("sparse") == "nsa" else 32))
    counter = count_training_step(Transformer(cfg), x, x)
    assert counter.bf16_fraction() >= 0.95, counter.not_bf16()
    kept = counter.kept_flops()
    # fp32 on purpose: the routers, the logits of bf16 attention on short rows on the CPU, the C++
    # gathered attention (DSA's sparse training on a CPU without AVX-512 BF16 computes it in fp32)
    # and the block-sparse tiles' logits and dS products (V4's HCA, NSA, sliding windows)
    suffixes = (".gate", ".AttentionLogits", ".gathered_attention", ".TileProducts")
    assert all(name.endswith(suffixes) for name in kept), kept
    if cfg.n_routed_experts:
        assert kept and all(r.dtype == "float32" for r in counter.records if r.module.endswith(".gate"))


def test_counter_counts_each_product_with_its_dtype():
    a, b = torch.randn(4, 8), torch.randn(8, 16)
    with MatmulCounter() as c:
        torch.addmm(torch.zeros(16), a, b)
        torch.bmm(a[None], b[None].bfloat16().float())
        torch.nn.functional.linear(a.bfloat16(), b.T.bfloat16())
    assert c.flops_by_dtype() == {"float32": 2 * 2 * 4 * 8 * 16, "bfloat16": 2 * 4 * 8 * 16}
    assert c.conversions[("", "float32", "bfloat16")] == (3, 8 * 16 + 4 * 8 + 8 * 16)


def test_an_fp32_product_outside_the_routers_fails_the_share():
    with MatmulCounter() as c:
        torch.randn(64, 64) @ torch.randn(64, 64)
        torch.randn(8, 8).bfloat16() @ torch.randn(8, 8).bfloat16()
    assert c.bf16_fraction(KEPT_FP32) < 0.01
