"""Layer fusion: residual, dwa, dynamic, hyper, mhc; Sinkhorn; scalar-mix embeddings; inspect."""

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.generation.loop import decode_step, prefill
from nanoseek.model.fusion import sinkhorn

KINDS = ["residual", "dwa", "dynamic", "hyper", "mhc"]


def make(fusion, preset="llama-tiny", **kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset(preset, fusion=fusion, hc_mult=2, **kw))


@pytest.mark.parametrize("fusion", KINDS)
def test_shapes_and_every_parameter_learns(fusion):
    model = make(fusion)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randint(0, 128, (2, 10))
    for _ in range(2):  # zero-initialized gates pass gradient on to their inputs after one step
        opt.zero_grad()
        out = model(x, targets=x)
        assert out.logits.shape == (2, 10, 128)
        out.loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("fusion", ["dwa", "dynamic"])
def test_at_init_equals_the_plain_residual(fusion):
    base = make("residual").eval()
    model = make(fusion).eval()
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("fusions.") for k in missing)
    x = torch.randint(0, 128, (2, 12))
    torch.testing.assert_close(model(x).logits, base(x).logits, atol=1e-6, rtol=1e-6)


def test_static_hyper_connections_at_init_equal_the_plain_residual():
    base = make("residual").eval()
    model = make("hyper").eval()
    model.load_state_dict(base.state_dict(), strict=False)
    x = torch.randint(0, 128, (1, 12))
    # every stream carries the residual stream (a_m one-hot, A_r = I, b = 1); the head averages them
    torch.testing.assert_close(model(x).logits, base(x).logits, atol=1e-5, rtol=1e-5)


def test_sinkhorn_is_doubly_stochastic():
    torch.manual_seed(0)
    m = sinkhorn(torch.randn(100, 4, 4), iters=20, eps=1e-6)  # V4's 20 iterations, logits of scale 1
    torch.testing.assert_close(m.sum(-1), torch.ones(100, 4), atol=1e-3, rtol=0)
    torch.testing.assert_close(m.sum(-2), torch.ones(100, 4), atol=1e-5, rtol=0)  # the last step is a column step
    assert (m > 0).all()
    peaked = torch.randn(100, 4, 4) * 3  # sharper logits converge slower: more iterations, tighter rows
    err = [(sinkhorn(peaked, it, 1e-6).sum(-1) - 1).abs().max() for it in (5, 20, 100)]
    assert err[0] > err[1] > err[2]


@pytest.mark.parametrize("fusion", KINDS)
def test_cached_decode_equals_full_recompute(fusion):
    model = make(fusion).eval()
    seq = torch.randint(0, 128, (1, 10))
    full = model(seq).logits
    cache = model.make_cache(1, 10)
    with torch.no_grad():
        got = [prefill(model, seq[:, :6], cache)] + [
            decode_step(model, seq[:, p : p + 1], cache, p) for p in range(6, 9)
        ]
    for i, logits in enumerate(got):
        torch.testing.assert_close(logits, full[:, 5 + i], atol=2e-5, rtol=1e-4)


def test_mhc_stays_finite_at_a_high_learning_rate():
    model = make("mhc", preset="deepseek-v3-tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        x = torch.randint(0, 128, (4, 16), generator=g)
        out = model(x[:, :-1], targets=x[:, 1:])
        loss = out.loss + sum(out.aux.values())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_balance_bias(out.expert_load)


def test_embed_returns_unit_vectors_that_rank_by_similarity():
    from nanoseek.analysis.embed import embed

    class Bytes:
        def encode(self, text):
            return list(text.encode())

    model = make("residual", vocab_size=256)
    vecs = embed(model, Bytes(), ["to be or not to be", "to be or not to be!", "zzzz qqqq"])
    assert vecs.shape == (3, 64)
    torch.testing.assert_close(vecs.norm(dim=-1), torch.ones(3))
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2]


@pytest.mark.parametrize("fusion", KINDS[1:])
def test_inspect_fusion_writes_a_png(fusion, tmp_path):
    from nanoseek.analysis import fusion_picture, plot_fusion

    class Bytes:
        def encode(self, text):
            return list(text.encode())

        def decode(self, ids):
            return bytes(ids).decode(errors="replace")

    model = make(fusion, vocab_size=256).eval()
    pic = fusion_picture(model, torch.tensor([list(b"hello")]))
    assert pic.panels and all(p.grid.ndim == 2 for p in pic.panels)
    if fusion == "dynamic":
        assert pic.panels[-1].grid.shape[0] == 5  # per token
    out, _ = plot_fusion(model, Bytes(), "hello", tmp_path / "f.png")
    assert out.stat().st_size > 2000


def test_muon_optimizer_trains_and_resumes_exactly(tmp_path):
    from nanoseek.config import OptimConfig
    from nanoseek.train.optim import Muon, make_optimizer

    model = make("residual")
    opt = make_optimizer(model, OptimConfig(name="muon", lr=1e-3))
    assert isinstance(opt, Muon) and any(g["muon"] for g in opt.param_groups)
    x = torch.randint(0, 128, (4, 16))
    first = None
    for _ in range(20):
        loss = model(x[:, :-1], targets=x[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or loss.item()
    assert loss.item() < first - 0.5
