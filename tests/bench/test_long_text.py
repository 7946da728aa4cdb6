"""benchmarks/long_text.py at a tiny budget: the JSON rows, the plot, the position buckets."""

import json

import pytest

TINY = "--seq 64 --steps 3 --tokens 128 --seeds 0 --val-windows 2 --threads 1"


def test_tiny_run_gives_one_row_per_kind_and_seed_and_a_plot(tmp_path, small_corpus, load_benchmark):
    out, png = tmp_path / "rows.jsonl", tmp_path / "plot.png"
    argv = [*TINY.split(), "--kinds", "dense,sliding", "--data", small_corpus, "--out", str(out), "--plot", str(png)]
    rows = load_benchmark("long_text").main(argv)
    assert [(r["kind"], r["seed"]) for r in rows] == [("dense", 0), ("sliding", 0)]
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    for row in rows:
        assert row["buckets"] == [[0, 2], [2, 8], [8, 32], [32, 64]]
        assert len(row["bucket_loss"]) == 4 and all(loss > 0 for loss in row["bucket_loss"])
        assert row["val_loss"] > 0 and row["steps"] == 3 and row["seconds_per_step"] > 0
        assert row["seq"] == 64 and row["val_windows"] == 2 and row["mode"] == "steps"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seconds_mode_reports_the_steps_it_took(small_corpus, load_benchmark):
    argv = [*TINY.split(), "--kinds", "dense", "--data", small_corpus, "--seconds", "0.01"]
    (row,) = load_benchmark("long_text").main(argv)
    assert row["mode"] == "seconds" and row["steps"] >= 1


@pytest.mark.parametrize(
    "seq, edges",
    [
        (2048, [(0, 64), (64, 256), (256, 1024), (1024, 2048)]),
        (512, [(0, 16), (16, 64), (64, 256), (256, 512)]),
        (8, [(0, 1), (1, 4), (4, 8)]),  # seq/32 and seq/8 coincide: merged
        (1, [(0, 1)]),
    ],
)
def test_buckets_derive_from_seq(seq, edges, load_benchmark):
    assert load_benchmark("long_text").buckets(seq) == edges


def test_sparse_gap_pairs_each_seed_with_its_dense_baseline(load_benchmark):
    rows = [
        {"kind": "dense-mha", "seed": 0, "bucket_loss": [2.0, 1.0]},
        {"kind": "dense-mha", "seed": 1, "bucket_loss": [3.0, 1.5]},
        {"kind": "nsa", "seed": 1, "bucket_loss": [3.5, 1.5]},
        {"kind": "nsa", "seed": 0, "bucket_loss": [2.25, 1.0]},
    ]
    assert load_benchmark("long_text").sparse_gaps(rows, "nsa") == [[0.5, 0.0], [0.25, 0.0]]


def test_unknown_kind_is_one_clear_error(load_benchmark, capsys):
    with pytest.raises(SystemExit) as exit_:
        load_benchmark("long_text").main(["--kinds", "dense,sparse"])
    assert exit_.value.code == 2 and "--kinds: unknown 'sparse'" in capsys.readouterr().err


def test_curriculum_lengths_end_at_seq(load_benchmark):
    length = load_benchmark("long_text").train_length
    assert [length(p, 2048) for p in (0.0, 0.39, 0.4, 0.69, 0.7, 0.99)] == [128, 128, 512, 512, 2048, 2048]
    assert length(0.99, 63) == 63  # an odd seq: never longer than seq


def test_curriculum_run_is_scored_at_seq(small_corpus, load_benchmark):
    argv = [*TINY.split(), "--kinds", "dsa", "--data", small_corpus, "--curriculum"]
    (row,) = load_benchmark("long_text").main(argv)
    assert row["curriculum"] and row["buckets"][-1] == [32, 64] and row["steps"] == 3


def test_v4_mix_alternates_csa_and_hca_and_is_scored_against_dense_v4(small_corpus, load_benchmark):
    bench = load_benchmark("long_text")
    config = bench.recall_config("v4", 32)
    assert [config.layer_sparse(i) for i in range(config.num_hidden_layers)] == ["csa", "hca"]
    assert bench.BASELINE["v4"] == "dense-v4" and "v4" in bench.WARMED
    (row,) = bench.main([*TINY.split(), "--kinds", "v4", "--data", small_corpus, "--curriculum"])
    assert row["kind"] == "v4" and row["val_loss"] > 0
