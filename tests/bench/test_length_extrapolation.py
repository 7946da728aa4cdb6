"""benchmarks/length_extrapolation.py at a tiny budget: one row per kind and length, a plot."""

import json


def test_tiny_run_writes_rows_and_plot(tmp_path, capsys, load_benchmark):
    out, png = tmp_path / "rows.jsonl", tmp_path / "plot.png"
    tiny = "--steps 2 --batch 2 --train-len 16 --eval-lens 16,48 --eval-tokens 96 --width 32 --layers 1 --heads 2"
    kinds = "alibi,t5,rope+yarn,learned"
    argv = [*tiny.split(), "--threads", "1", "--kinds", kinds, "--out", str(out), "--plot", str(png)]
    rows = load_benchmark("length_extrapolation").main(argv)
    assert [(r["kind"], r["eval_len"]) for r in rows] == [
        (k, n) for k in ("alibi", "t5", "rope+yarn", "learned") for n in (16, 48)
    ]
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert png.stat().st_size > 0 and all(r["val_loss"] > 0 for r in rows)
    assert "clamped" in rows[-1]["note"]
