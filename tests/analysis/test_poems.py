"""The Chinese poetry path: the bundled Tang corpus by name, the `deepseek-v3-poems` recipe, the
verse-regularity metric and `sample --format poem`."""

from __future__ import annotations

import re

import pytest

from nanoseek.analysis.poems import annotate, poem_report, verse_lengths
from nanoseek.config import build_train_config
from nanoseek.data import CORPORA, corpus_path

QUATRAIN = "靜夜思\n李白\n床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。\n"


def test_tang_is_a_bundled_corpus_by_name(tmp_path, monkeypatch):
    path = corpus_path("tang")
    assert path == str(CORPORA["tang"])
    with open(path, encoding="utf-8") as f:
        assert [next(f) for _ in range(3)] == ["帝京篇十首 一\n", "太宗皇帝\n", "秦川雄帝宅，函谷壯皇居。\n"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tang").write_text("mine")
    assert corpus_path("tang") == "tang"  # a file of that name wins


def test_verse_lengths_and_regularity():
    assert verse_lengths("床前明月光，疑是地上霜。") == [5, 5]
    assert verse_lengths("朝辭白帝彩雲間，千里江陵一日還。") == [7, 7]
    report = poem_report(QUATRAIN)
    assert report.verse_lengths == [[5, 5], [5, 5]] and report.regularity == 1.0  # title and poet skipped
    broken = poem_report("題\n床前明月光光，疑是霜。\n舉頭望明月，低頭思故鄉。\n無句讀的一行\n")
    assert broken.verse_lengths == [[6, 3], [5, 5]]
    assert (broken.verses, broken.regular_verses, broken.regularity) == (4, 2, 0.5)
    assert poem_report("no verses here\n").regularity == 0.0


def test_annotate_shows_each_lines_lengths_and_the_count():
    lines = annotate(QUATRAIN).splitlines()
    assert lines[0] == "    | 靜夜思" and lines[2] == "5 5 | 床前明月光，疑是地上霜。"
    assert lines[-1] == "4 of 4 verses have 5 or 7 characters (100%)"


def test_the_poem_recipe_builds_trains_and_samples_a_poem_report(tmp_path, capsys):
    from nanoseek.cli import main

    cfg = build_train_config(preset="deepseek-v3-poems")
    assert cfg.data.path == ["tang"] and cfg.data.tokenizer == "char" and cfg.data.seq_len == 128
    assert cfg.model.max_position_embeddings == cfg.data.seq_len and cfg.train.max_seconds == 300
    sample = tmp_path / "poems.txt"  # a slice of the corpus: the recipe, not its 5 minutes
    with open(CORPORA["tang"], encoding="utf-8") as f:
        sample.write_text(f.read(6000), encoding="utf-8")
    run = tmp_path / "run"
    args = ["train", "--preset", "deepseek-v3-poems", "--data", str(sample), "--out", str(run), "--max-steps", "3"]
    overrides = ["--train.batch_size=2", "--train.max_seconds=0", "--train.threads=1", "--eval.batches=1"]
    assert main([*args, *overrides, "--log.progress=false", "--log.plot=false", "--model.num_hidden_layers=2"]) == 0
    capsys.readouterr()
    prompt = "春望\n杜甫\n"
    sample_args = ["sample", str(run), "--prompt", prompt, "--max-new-tokens", "30", "--seed", "0", "--format", "poem"]
    assert main(sample_args) == 0
    out, err = capsys.readouterr()
    assert out.startswith(prompt)
    assert re.fullmatch(r"\d+ of \d+ verses have 5 or 7 characters \(\d+%\)|no poem lines.*", err.splitlines()[-1])


@pytest.mark.parametrize("bad", ["--format=verse"])
def test_sample_format_names_its_choices(bad, tmp_path, capsys):
    from nanoseek.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["sample", str(tmp_path), bad])
    assert exit_info.value.code == 2 and "poem" in capsys.readouterr().err
