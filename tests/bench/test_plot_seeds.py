"""benchmarks/plot_seeds.py: runs grouped by NAME-sSEED, mean ± half-range, paired differences, the plot."""

import json
from pathlib import Path

import pytest


def fake_run(folder: Path, name: str, finals: list[float]):
    """A run folder with train records every 2 steps and evaluations at steps 3 and 6 (odd: no train record)."""
    run = folder / name
    run.mkdir(parents=True)
    records = [{"step": s, "loss": 3.0, "tokens": 100 * s} for s in (2, 4, 6)]
    records += [{"step": 3, "val_loss": finals[0]}, {"step": 6, "val_loss": finals[1]}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "summary.json").write_text(json.dumps({"val_loss": finals[1]}))


@pytest.fixture
def ablation(tmp_path):
    folder = tmp_path / "corpus"
    fake_run(folder, "base-s1", [2.5, 2.0])
    fake_run(folder, "base-s2", [2.6, 2.2])
    fake_run(folder, "new-s1", [2.4, 1.9])
    fake_run(folder, "new-s2", [2.5, 2.0])
    fake_run(folder, "unseeded", [9.0, 9.0])  # not NAME-sSEED: left out
    return folder


def test_runs_grouped_with_tokens_of_every_evaluation(ablation, load_benchmark):
    runs = load_benchmark("plot_seeds").read_runs(ablation)
    assert sorted((r["group"], r["seed"]) for r in runs) == [("base", 1), ("base", 2), ("new", 1), ("new", 2)]
    base1 = next(r for r in runs if r["name"] == "base-s1")
    assert base1["val_curve"] == [[300, 2.5], [600, 2.0]]  # step 3 has no train record: 100 tokens a step
    assert base1["final_val_loss"] == 2.0 and base1["best_val_loss"] == 2.0


def test_table_mean_half_range_and_paired_difference(ablation, load_benchmark):
    script = load_benchmark("plot_seeds")
    text = script.table(script.read_runs(ablation), baseline="base")
    base = next(line for line in text.splitlines() if "| base |" in line)
    new = next(line for line in text.splitlines() if "| new |" in line)
    assert "2.1000 ± 0.1000" in base and "+0.0000 [+0.0000, +0.0000]" in base
    assert "1.9500 ± 0.0500" in new and "-0.1500 [-0.2000, -0.1000]" in new  # -0.1 (seed 1), -0.2 (seed 2)


def test_plot_written(ablation, tmp_path, load_benchmark):
    script = load_benchmark("plot_seeds")
    script.plot(script.read_runs(ablation), tmp_path / "seeds.png", "title", zoom=0.6)
    assert (tmp_path / "seeds.png").stat().st_size > 0
