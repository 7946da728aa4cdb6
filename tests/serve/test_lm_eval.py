"""lm-evaluation-harness scores a model through `nanoseek serve` (its `local-completions` model).

Two local tasks (tests/serve/lm_eval_tasks: YAML + JSONL, no hub): multiple choice (loglikelihood)
and generate_until. The harness finds the tokenizer through /tokenizer_info and /tokenize (its
"remote" tokenizer backend); its loglikelihoods equal the in-process model's within 1e-4 and its
generations equal local greedy decoding.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval's [api] extra: what its API models need

from serving import CONTEXT  # noqa: E402

from nanoseek.generation.streaming import complete  # noqa: E402

TASKS = Path(__file__).parent / "lm_eval_tasks"


def reference_loglikelihood(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """The harness's split of (context, continuation) into tokens, scored by one plain forward."""
    spaces = len(context) - len(context.rstrip())
    if spaces:  # the harness moves the context's trailing spaces into the continuation
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok.encode(context + continuation)
    n = len(tok.encode(context))
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    rows = lp[n - 1 : len(whole) - 1]
    targets = torch.tensor(whole[n:])
    total = rows.gather(-1, targets[:, None]).sum().item()
    return total, bool((rows.argmax(-1) == targets).all())


def test_lm_eval_local_completions_against_nanoseek_serve(server, local, tmp_path, monkeypatch):
    import datasets
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.chdir(TASKS)  # the task YAMLs name their JSONL files relative to here
    model, tok = local
    args = f"base_url={server.url}/v1/completions,model=tiny-chat,tokenizer_backend=remote,max_length={CONTEXT}"
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=args,
        tasks=["nanoseek_choice", "nanoseek_gen"],
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
        log_samples=True,
    )
    assert 0 <= results["results"]["nanoseek_choice"]["acc,none"] <= 1
    scored = [(s["arguments"], s["resps"]) for s in results["samples"]["nanoseek_choice"]]
    assert len(scored) == 4
    for arguments, responses in scored:
        for (context, continuation), [(loglikelihood, greedy)] in zip(arguments, responses):
            expected, expected_greedy = reference_loglikelihood(model, tok, context, continuation)
            assert abs(loglikelihood - expected) < 1e-4
            assert greedy == expected_greedy
    generated = results["samples"]["nanoseek_gen"]
    assert len(generated) == 3
    for sample in generated:
        context, options = sample["arguments"][0]
        text, _ = complete(model, tok, context, max_new_tokens=options["max_gen_toks"], temperature=0, stop=["\n"])
        assert sample["resps"][0][0] == text
