"""benchmarks/long_range.py at a tiny budget: the task's layout, one row per kind and seed, curves, a plot."""

import json

import torch


def test_batch_puts_every_answer_in_the_second_half_and_back_to_its_fact(load_benchmark):
    lr = load_benchmark("long_range")
    x, y = lr.make_batch(3, 32, torch.Generator().manual_seed(0))
    assert (y[:, :32] == -1).all() and (y[:, 32:] >= lr.FILLER).all()
    for row in range(3):
        for t in range(32, 64):
            asked = int(x[row, t]) - lr.FILLER - lr.KEYS * lr.VALUES
            fact = int(y[row, t])
            assert (fact - lr.FILLER) // lr.VALUES == asked  # the fact of the asked key
            assert fact in x[row, :16].tolist()  # written in the first quarter


def test_tiny_run_gives_a_curve_per_kind_and_seed_and_a_plot(tmp_path, capsys, load_benchmark):
    png = tmp_path / "curves.png"
    argv = "--steps 4 --n 16 --tokens 128 --kinds dense-mha,nsa --seeds 0,1 --eval-every 2 --threads 1"
    rows = load_benchmark("long_range").main([*argv.split(), "--plot", str(png)])
    assert [(r["kind"], r["seed"]) for r in rows] == [("dense-mha", 0), ("dense-mha", 1), ("nsa", 0), ("nsa", 1)]
    for r in rows:
        assert [p[0] for p in r["curve"]] == [2, 4] and r["curve"][-1][2] == r["accuracy"]
        assert r["curve"][0][1] <= r["curve"][1][1]  # training seconds accumulate
    assert rows[0]["curve"] != rows[1]["curve"]  # the seed changes data and weights
    assert "coverage" not in rows[0]
    assert rows[2]["coverage"]["fact_seen"] == 1.0  # 32 tokens, 8 blocks of 32 selected: every key
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == rows and png.stat().st_size > 0
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    replotted = load_benchmark("long_range").main(["--replot", str(jsonl), "--plot", str(tmp_path / "again.png")])
    assert replotted == rows


def test_selection_coverage_sees_every_fact_densely_and_none_through_a_short_window(load_benchmark):
    """Facts 33+ tokens back: dense attention sees each one in every layer, a window of 32 in none."""
    from nanoseek import Transformer

    lr = load_benchmark("long_range")
    torch.manual_seed(0)
    dense = lr.selection_coverage(Transformer(lr.config("dense", 64)), 64, batches=1)
    assert dense["fact_seen"] == 1.0 and dense["fact_seen_by_layer"] == [1.0, 1.0]
    assert dense["accuracy_when_missed"] is None and 0 <= dense["accuracy_when_seen"] <= 1
    window = lr.selection_coverage(Transformer(lr.config("sliding", 64)), 64, batches=1)
    assert window["fact_seen"] == 0.0 and window["fact_seen_by_layer"] == [0.0, 0.0]
    assert window["accuracy_when_seen"] is None
