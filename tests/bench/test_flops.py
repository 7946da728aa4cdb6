"""Counted FLOPs (bench/flops.py) against hand formulas, and the bench's efficiency columns."""

import json

import torch
import torch.nn.functional as F

from nanoseek.bench.flops import attention_pairs, count_flops, flop_counter, flops_by_op


def test_causal_pairs_are_top_left_aligned():
    assert attention_pairs(4, 4, causal=True) == 10
    assert attention_pairs(3, 5, causal=True) == 6  # queries see 1, 2, 3 keys
    assert attention_pairs(5, 3, causal=True) == 6 + 2 * 3
    assert attention_pairs(3, 5, causal=False) == 15


def test_dense_causal_sdpa_counts_the_hand_formula_forward_and_backward():
    h, t, d = 4, 96, 16
    q = torch.randn(1, h, t, d, requires_grad=True)
    k, v = torch.randn(1, 1, t, d, requires_grad=True), torch.randn(1, 1, t, d, requires_grad=True)
    pairs = h * t * (t + 1) // 2
    with flop_counter() as counter:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert counter.get_total_flops() == 2 * pairs * d * 2  # QK^T and PV
    with flop_counter() as counter:
        out.sum().backward()
    assert counter.get_total_flops() == 2 * pairs * d * 5  # scores again, dP, dV, dQ, dK


def test_masked_sdpa_counts_every_pair_and_matmuls_count_too():
    q = torch.randn(1, 2, 8, 4)
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=mask)) == 2 * 2 * 64 * 4 * 2
    assert count_flops(lambda: torch.randn(3, 5) @ torch.randn(5, 7)) == 2 * 3 * 5 * 7


def test_bench_attention_reports_counted_flops_and_efficiency(capsys):
    from nanoseek import bench

    bench.main(
        "attention --seq 128 --kinds dense,sliding,dsa --layout 8x64 --heads 2 --head-dim 16 --index-heads 2 "
        "--index-dim 16 --window 32 --topk 16 --repeats 1 --threads 1".split()
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    dense = rows[0]
    assert dense["forward_flops"] == 2 * 2 * 128 * 129 // 2 * 16 * 2 and dense["forward_efficiency"] == 1.0
    for row in rows:
        assert row["dense_forward_flops"] == dense["forward_flops"] and row["forward_gflops_s"] > 0
        expected = dense["forward_s"] * row["forward_flops"] / dense["forward_flops"] / row["forward_s"]
        assert abs(row["forward_efficiency"] - expected) < 1e-2
    assert rows[1]["forward_flops"] < dense["forward_flops"] * 2  # the band: about T (C + w) pairs


def test_bench_attention_forward_only_times_and_counts_no_backward(capsys):
    from nanoseek import bench

    bench.main(
        "attention --seq 128 --kinds dense,sliding --layout 8x64 --heads 2 --head-dim 16 --window 32 "
        "--repeats 1 --threads 1 --forward-only".split()
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["backward_s"] for r in rows] == [None, None] and "backward_flops" not in rows[1]
    assert rows[1]["forward_efficiency"] > 0 and "backward_efficiency" not in rows[1]
    assert rows[1]["forward_over_dense"] > 0 and "backward_over_dense" not in rows[1]


def test_flops_by_op_splits_sdpa_from_matmuls():
    from nanoseek.bench.flops import flops_by_op

    q = torch.randn(1, 2, 8, 4)
    with flop_counter() as counter:
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
        torch.randn(3, 5) @ torch.randn(5, 7)
    assert flops_by_op(counter) == {"sdpa": 2 * 2 * 36 * 4 * 2, "mm": 2 * 3 * 5 * 7}


def test_the_cpp_gathered_attention_counts_what_its_pytorch_path_multiplies(monkeypatch):
    """The C++ kernel's ops count the matrix products the PyTorch path runs (forward and backward):
    pairs = rows x heads x picks, 2 pairs (X + V) forward and 2 pairs (3 X + 2 V) backward; of the
    picks only the valid ones, which are all the kernel computes."""
    from nanoseek.kernels import dsa

    assert dsa.native_ops(torch.zeros(1)) is not None, "the C++ kernel did not build (see the warning)"
    q = torch.randn(1, 4, 6, 16, requires_grad=True)
    k = torch.randn(1, 2, 10, 16, requires_grad=True)
    v = torch.randn(1, 2, 10, 8, requires_grad=True)
    picked = torch.randint(0, 10, (1, 6, 5))
    valid = torch.ones(1, 6, 5, dtype=torch.bool)

    def count():
        with flop_counter() as counter:
            dsa.GatheredAttention.apply(q, k, v, 8, picked, valid, 0.25).sum().backward()
        return counter

    native = count()
    monkeypatch.setattr(dsa, "native_ops", lambda q: None)
    pytorch = count()
    assert flops_by_op(native)["gathered_attention"] == native.get_total_flops()
    assert native.get_total_flops() == pytorch.get_total_flops() == 2 * 4 * 6 * 5 * (16 + 8 + 3 * 16 + 2 * 8)
    monkeypatch.undo()
    valid[0, :, 1:3] = False  # the kernel skips invalid picks: 2 key heads x 2 heads each x 18 valid picks
    assert count().get_total_flops() == 2 * 2 * 2 * 18 * (16 + 8 + 3 * 16 + 2 * 8)
