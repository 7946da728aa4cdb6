"""Pair tasks: couplets built from the poems and split by poem, the synthetic tasks, both batch layouts, the loader."""

import pytest
import torch

from nanoseek.data.couplets import couplet_pairs, couplet_split, read_poems
from nanoseek.data.pairs import PairData, decoder_batch, encoder_decoder_batch, load_pair_data, pair_texts
from nanoseek.data.synthetic import synthetic_split, synthetic_target
from nanoseek.data.tokenizer import CharTokenizer
from nanoseek.errors import NanoseekError


def test_a_couplet_is_two_clauses_of_equal_length():
    lines = [
        "秦川雄帝宅，函谷壯皇居。",  # the common form
        "何如肆轍跡？萬里賞瑤池。",  # a question ends the first line
        "長安道，人無衣，馬無草。",  # three clauses: not a couplet
        "近日毛雖暖聞弦心已驚。",  # one clause
        "太常具禮方告，成功。",  # unequal lengths
        "□□雄帝宅，函谷壯皇居。",  # a lost character
        "天地，日月。",  # too short
    ]
    assert couplet_pairs(lines) == [("秦川雄帝宅", "函谷壯皇居"), ("何如肆轍跡", "萬里賞瑤池")]


def test_title_and_author_lines_are_not_couplets(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text(
        "春曉，夜來。\n孟浩然\n春眠不覺曉，處處聞啼鳥。\n\n題\n某\n床前明月光，疑是地上霜。\n", encoding="utf-8"
    )
    assert read_poems([path]) == [["春眠不覺曉，處處聞啼鳥。"], ["床前明月光，疑是地上霜。"]]


def test_the_held_out_split_is_by_poem_fixed_and_without_repeats(poems_file, tmp_path):
    train, val = couplet_split([poems_file], 0.1)
    assert (train, val) == couplet_split([poems_file], 0.1)  # the same split for every run
    owner = {}
    for i in range(200):
        for pair in couplet_pairs(read_poems([poems_file])[i]):
            owner[pair] = i
    val_poems = {owner[p] for p in val}
    train_poems = {owner[p] for p in train}
    assert not val_poems & train_poems  # no poem on both sides
    assert len(val_poems) == 20 and len(val) == 40  # 10% of the poems, both couplets of each
    # a held-out couplet whose first line opens a training couplet (a repeated poem) is dropped
    repeated = tmp_path / "repeated.txt"
    repeated.write_text(poems_file.read_text(encoding="utf-8") * 2, encoding="utf-8")
    train2, val2 = couplet_split([repeated], 0.1)
    assert not {s for s, _ in val2} & {s for s, _ in train2}


def test_the_bundled_tang_poems_make_some_ninety_thousand_couplets():
    train, val = pair_texts("couplets", [], 0.1, 32)  # no --data: the bundled poems
    assert (train, val) == pair_texts("couplets", ["tang"], 0.1, 32)
    assert 75_000 < len(train) < 90_000 and 7_000 < len(val) < 10_000
    assert all(len(a) == len(b) >= 3 for a, b in train[:1000] + val[:1000])
    assert train[0] == ("秦川雄帝宅", "函谷壯皇居")


def test_synthetic_tasks():
    assert synthetic_target("copy", "3141") == "3141"
    assert synthetic_target("reverse", "3141") == "1413"
    assert synthetic_target("sort", "3141") == "1134"
    train, val = synthetic_split("sort", 6)
    assert (train, val) == synthetic_split("sort", 6)
    assert all(b == "".join(sorted(a)) and 1 <= len(a) <= 6 for a, b in train + val)
    assert not {a for a, _ in val} & {a for a, _ in train}


def test_the_two_layouts_of_a_batch():
    tok = CharTokenizer("abc")  # a b c = 0 1 2; <bos> 3, <eos> 4, <pad> 5
    pairs = [([0, 1], [2]), ([0], [1, 2])]
    source, inputs, targets = encoder_decoder_batch(pairs, tok)
    assert source.tolist() == [[0, 1], [0, 5]]
    assert inputs.tolist() == [[3, 2, 5], [3, 1, 2]]  # <bos> + target, padded
    assert targets.tolist() == [[2, 4, -1], [1, 2, 4]]  # target + <eos>, -1 on padding
    inputs, targets = decoder_batch(pairs, tok)
    assert inputs.tolist() == [[0, 1, 3, 2], [0, 3, 1, 2]]  # source <bos> target
    assert targets.tolist() == [[-1, -1, 2, 4], [-1, 1, 2, 4]]  # loss on the second line and <eos> only


def test_the_loader_is_a_function_of_seed_and_step():
    data = load_pair_data("copy", "encoder_decoder", [], 0.1, 12, "char")
    a, b = data.loader(8, seed=3), data.loader(8, seed=3)
    for _ in range(3):
        a.next()
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(a.next(), b.next()))
    ranks = [data.loader(4, seed=3, rank=r, world_size=2).indices(0) for r in range(2)]
    assert list(ranks[0]) + list(ranks[1]) == list(data.loader(8, seed=3).indices(0))


def test_pairs_longer_than_seq_len_are_left_out_of_training(poems_file):
    data = load_pair_data("couplets", "decoder", [str(poems_file)], 0.1, 11, "char")  # 5 + 1 + 5 = 11 fits
    assert data.dropped == 0 and len(data.train) == 360
    texts = couplet_split([poems_file], 0.1)
    assert PairData.build("couplets", "encoder_decoder", data.tokenizer, texts, 6).dropped == 0  # 5, and 1 + 5
    with pytest.raises(NanoseekError, match="no held-out pair fits data.seq_len=10"):
        PairData.build("couplets", "decoder", data.tokenizer, texts, 10)


def test_pair_task_errors_name_what_to_do():
    with pytest.raises(NanoseekError, match="drop --data"):
        pair_texts("copy", ["x.txt"], 0.1, 32)
    with pytest.raises(NanoseekError, match="too short"):
        pair_texts("reverse", [], 0.1, 2)
    with pytest.raises(NanoseekError, match="does not exist"):
        pair_texts("couplets", ["/nonexistent/poems.txt"], 0.1, 32)


def test_a_bpe_tokenizer_is_trained_on_the_pairs(tmp_path):
    data = load_pair_data("reverse", "encoder_decoder", [], 0.1, 10, "bpe", vocab_size=300, work_dir=tmp_path)
    assert data.tokenizer.name == "bpe" and (tmp_path / "pairs.txt").is_file()
    source, target = data.val_text[0]
    assert data.tokenizer.decode(data.val[0][0]) == source and data.tokenizer.decode(data.val[0][1]) == target
