"""Evaluating a sequence-to-sequence checkpoint on its task's held-out pairs (shared with `nanoseek eval`).

The held-out sources are decoded (greedy, or beam search with a length penalty; generation/seq2seq.py)
and the outputs compared with the references by sacrebleu:

    BLEU (Papineni et al. 2002)  corpus-level geometric mean of the modified n-gram precisions, n = 1..4,
                                 times the brevity penalty; Chinese is cut into characters (sacrebleu's
                                 "zh" tokenizer), the digit tasks too ("char")
    chrF (Popovic 2015)          F-score (beta = 2) of character n-grams, n = 1..6
    exact_length_rate            outputs as long (in characters) as their reference: a couplet's second
                                 line is as long as its first
    exact_match                  outputs equal to their reference

and the teacher-forced loss on the same pairs (nats per target token, `loss` / `perplexity` / `tokens`,
as the language-model evaluation reports them).

    >>> scores = score_texts(["函谷壯皇居"], ["函谷壯皇居"], "couplets")
    >>> scores["bleu"], scores["chrf"], scores["exact_length_rate"]
    (100.0, 100.0, 1.0)
"""

from __future__ import annotations

from pathlib import Path

from nanoseek.data.corpora import corpus_path
from nanoseek.data.pairs import PairData, pair_texts
from nanoseek.errors import NanoseekError
from nanoseek.generation.seq2seq import is_encoder_decoder, translate
from nanoseek.io.checkpoint import STATE_FILE, read_json
from nanoseek.train.evaluate import evaluate

BLEU_TOKENIZE = {"couplets": "zh"}  # the digit tasks: "char"


def sacrebleu():
    try:
        import sacrebleu as module
    except ImportError:
        raise NanoseekError("BLEU and chrF need sacrebleu: pip install 'nanoseek[seq2seq]'") from None
    return module


def score_texts(hyps: list[str], refs: list[str], task: str) -> dict:
    """BLEU, chrF, exact-length and exact-match rates of outputs `hyps` against references `refs`."""
    sb = sacrebleu()
    n = max(len(refs), 1)
    return {
        "bleu": round(sb.corpus_bleu(hyps, [refs], tokenize=BLEU_TOKENIZE.get(task, "char")).score, 2),
        "chrf": round(sb.corpus_chrf(hyps, [refs]).score, 2),
        "exact_length_rate": round(sum(len(h) == len(r) for h, r in zip(hyps, refs)) / n, 4),
        "exact_match": round(sum(h == r for h, r in zip(hyps, refs)) / n, 4),
    }


def run_config(folder: Path) -> dict:
    """The training config saved with a checkpoint ({} when it has none)."""
    state = Path(folder) / STATE_FILE
    return read_json(state).get("config", {}) if state.is_file() else {}


def checkpoint_task(folder: Path) -> str:
    """The `data.task` the checkpoint was trained on ("lm" when unknown)."""
    return run_config(folder).get("data", {}).get("task", "lm")


def evaluate_pairs(
    model,
    tok,
    data: PairData,
    texts: list[tuple[str, str]],
    beam_size: int = 1,
    length_penalty: float = 0.6,
    batch_size: int = 64,
) -> tuple[dict, list[str]]:
    """(scores, outputs) of `model` on the source/reference `texts`; `data` gives the loss batches."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        hyps = translate(model, tok, [s for s, _ in texts], beam_size, length_penalty, batch_size=batch_size)
    finally:
        model.train(was_training)
    loss = evaluate(model, data.eval_batches(batch_size), tok.token_byte_lengths(), device)
    scores = {
        "task": data.task,
        "sentences": len(texts),
        "beam": beam_size,
        "length_penalty": length_penalty,
        **score_texts(hyps, [r for _, r in texts], data.task),
        "loss": loss.loss,
        "perplexity": loss.perplexity,
        "tokens": loss.tokens,
    }
    return scores, hyps


def evaluate_pair_checkpoint(
    model,
    tok,
    folder: Path,
    data_path=None,
    max_sentences: int | None = 1000,
    beam_size: int = 1,
    length_penalty: float = 0.6,
    batch_size: int = 64,
) -> tuple[dict, list[tuple[str, str, str]]]:
    """Scores of a pair-task checkpoint on the first `max_sentences` held-out pairs of its run (all for
    None), and (source, reference, output) of each."""
    cfg = run_config(folder)
    data_cfg = cfg.get("data", {})
    task = data_cfg.get("task", "lm")
    if task == "lm":
        raise NanoseekError(f"{folder} was not trained on a pair task (data.task is 'lm')")
    files = [corpus_path(f) for f in ([str(data_path)] if data_path else data_cfg.get("path") or [])]
    for f in files:
        if not Path(f).is_file():
            raise NanoseekError(f"data file {f} is gone; pass --data PATH")
    seq_len = data_cfg.get("seq_len", model.config.max_position_embeddings)
    train_texts, val_texts = pair_texts(task, files, data_cfg.get("val_fraction", 0.1), seq_len)
    texts = val_texts[:max_sentences] if max_sentences else val_texts
    layout = "encoder_decoder" if is_encoder_decoder(model) else "decoder"
    data = PairData.build(task, layout, tok, ([], texts), min(seq_len, model.config.max_position_embeddings))
    scores, hyps = evaluate_pairs(model, tok, data, texts, beam_size, length_penalty, batch_size)
    return scores, [(s, r, h) for (s, r), h in zip(texts, hyps)]
