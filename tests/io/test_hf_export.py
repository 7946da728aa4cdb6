"""HF exports are complete: AutoTokenizer + AutoModelForCausalLM + pipeline("text-generation") on the
folder `nanoseek convert --to hf` writes give the text `nanoseek sample --temperature 0` gives."""

import json

import pytest
import torch

from nanoseek import ModelConfig, Transformer, load_model
from nanoseek.cli import main as cli_main
from nanoseek.data import BUNDLED_CORPUS
from nanoseek.data.tokenizer import CharTokenizer, load_tokenizer, train_tokenizer
from nanoseek.generation.chat import load_chat_template, render_chat
from nanoseek.io import save_model

transformers = pytest.importorskip("transformers", reason="needs the optional extra: pip install -e '.[hf]'")
pytestmark = pytest.mark.hf

PROMPT = "KING HENRY:\nWhat say"


def make_run(tmp_path, kind: str, preset: str):
    """A nanoseek checkpoint (tiny random model + a tokenizer trained on a slice of the bundled corpus)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(BUNDLED_CORPUS.read_text()[:20_000])
    tok = train_tokenizer(kind, [corpus], vocab_size=320)
    tok.save(tmp_path / "tok")
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(preset, vocab_size=tok.vocab_size, initializer_range=0.2)).eval()
    with torch.no_grad():  # never choose a token that is no text alone (a lone byte >= 0x80, a special)
        for i in range(tok.vocab_size):
            piece = tok.decode_bytes([i])
            if not piece or any(b >= 0x80 for b in piece):
                model.lm_head.weight[i].zero_()
    save_model(model, tmp_path / "run", "nanoseek", tokenizer_dir=tmp_path / "tok")
    return tmp_path / "run", tok


def sample_greedy(ckpt, capsys, n: int = 24) -> str:
    capsys.readouterr()
    args = ["sample", str(ckpt), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", str(n)]
    assert cli_main(args) == 0
    return capsys.readouterr().out[: -len("\n")]


@pytest.mark.parametrize(
    "kind,preset",
    [
        ("char", "llama-tiny"),
        ("bpe", "deepseek-v3-tiny"),
        pytest.param("char", "deepseek-v3-tiny", marks=pytest.mark.slow),
        pytest.param("bpe", "llama-tiny", marks=pytest.mark.slow),
        pytest.param("char", "gpt2-tiny", marks=pytest.mark.slow),
    ],
)
def test_export_generates_what_nanoseek_samples(kind, preset, tmp_path, capsys):
    run, tok = make_run(tmp_path, kind, preset)
    out = tmp_path / "hf"
    assert cli_main(["convert", str(run), str(out), "--to", "hf"]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (out / name).is_file(), name
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.eos_id
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in (PROMPT, "naïve 中文 <|eos|>\n"):  # unknown characters: byte fallback; typed specials: text
        assert hf_tok(text)["input_ids"] == tok.encode(text)
        assert hf_tok.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    pipe = transformers.pipeline("text-generation", model=hf, tokenizer=hf_tok, device="cpu")
    got = pipe(PROMPT, max_new_tokens=24, do_sample=False)[0]["generated_text"]
    assert got == sample_greedy(run, capsys)
    assert sample_greedy(out, capsys) == got  # and nanoseek reads the export back


def test_char_tokenizer_in_hf_format_reads_back_as_itself(tmp_path):
    tok = CharTokenizer.train(["To be, or not to be: that is the question.\n"])
    (tmp_path / "tokenizer.json").write_text(tok.to_hf_json_str())
    again = load_tokenizer(tmp_path)
    assert isinstance(again, CharTokenizer) and again.chars == tok.chars
    assert again.encode("be 中") == tok.encode("be 中")


def test_chat_template_is_nanoseeks_transcript(tmp_path, capsys):
    run, _ = make_run(tmp_path, "char", "llama-tiny")
    assert cli_main(["convert", str(run), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == render_chat(messages) == render_chat(messages, load_chat_template(tmp_path / "hf"))


def test_mtp_layers_kept_by_default_and_dropped_on_request(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("deepseek-v3-tiny")).eval()
    assert model.config.num_nextn_predict_layers == 1
    model.save_pretrained(tmp_path / "native")
    assert cli_main(["convert", str(tmp_path / "native"), str(tmp_path / "keep"), "--to", "hf"]) == 0
    assert cli_main(["convert", str(tmp_path / "native"), str(tmp_path / "drop"), "--to", "hf", "--drop-mtp"]) == 0
    assert len(load_model(tmp_path / "keep").mtp) == 1
    assert len(load_model(tmp_path / "drop").mtp) == 0
    assert json.loads((tmp_path / "drop" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    _, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "drop", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    _, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "keep", output_loading_info=True)
    assert all(k.startswith("model.layers.2.") for k in info["unexpected_keys"]) and not info["missing_keys"]
    assert cli_main(["convert", str(tmp_path / "native"), str(tmp_path / "x"), "--to", "nanoseek", "--drop-mtp"]) == 2


def test_a_tokenizer_nanoseek_does_not_run_is_passed_on(tmp_path):
    """A SentencePiece-style tokenizer.json (no byte-level step) and its files go over unchanged."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf_tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "▁": 2}, merges=[], byte_fallback=False))
    hf_tok.pre_tokenizer = pre_tokenizers.Metaspace()
    src = tmp_path / "src"
    src.mkdir()
    hf_tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizerFast"}))
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("llama-tiny")).eval()
    save_model(model, tmp_path / "hf", "hf", tokenizer_dir=src)
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text()) == {
        "tokenizer_class": "LlamaTokenizerFast"
    }
