"""The machinery of the reviewers' studies: masked batch statistics for variable-length
sequences, longer test sequences, and the per-step batch-norm statistics diagnostic."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normrnn import NORMS
from normrnn.methods.cells import LSTMLayer
from normrnn.methods.norms import linf_constant
from normrnn.pipeline.data import IGNORE, lm_batches, variable_length_batches
from normrnn.pipeline.diagnostics import batch_norm_statistics

EPS = 1e-5


def bn_term(name="bn", features=6, max_steps=5):
    return NORMS[name](hidden_size=features // 2, gates=2, max_steps=max_steps).x.double()


def random_mask(steps, batch, seed):
    """A (T, B) mask of sequences with lengths in 1..T, every step with two real examples."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, steps + 1, (batch,), generator=g)
    lengths[:2] = steps
    return torch.arange(steps).unsqueeze(1) < lengths.unsqueeze(0)


@pytest.mark.parametrize("name", ["bn", "l1bn", "linfbn"])
def test_masked_statistics_are_those_of_the_real_positions(name):
    """Reference: per step, the float64 statistic of the unpadded examples alone."""
    term = bn_term(name)
    a = torch.randn(5, 12, 6, dtype=torch.float64) * 2 + 0.5
    mask = random_mask(5, 12, seed=3)
    out = term(a, 0, mask).detach().numpy()
    gamma = term.weight.detach().numpy()
    for t in range(5):
        x = a[t][mask[t]].numpy()
        mu = x.mean(0)
        if name == "bn":
            scale = np.sqrt(((x - mu) ** 2).mean(0) + EPS)
            stat = ((x - mu) ** 2).mean(0)
        elif name == "l1bn":
            stat = math.sqrt(math.pi / 2) * np.abs(x - mu).mean(0)
            scale = stat + EPS
        else:
            stat = linf_constant(len(x)) * np.abs(x - mu).max(0)
            scale = stat + EPS
        # every position (padded ones too) is normalized with the real positions' statistics
        np.testing.assert_allclose(out[t], gamma * (a[t].numpy() - mu) / scale, rtol=1e-9)
        np.testing.assert_allclose(term.running_mean[t].numpy(), mu, rtol=1e-9)
        np.testing.assert_allclose(term.running_stat[t].numpy(), stat, rtol=1e-9)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), fill=st.floats(-1e3, 1e3))
def test_padding_does_not_reach_the_real_positions(seed, fill):
    """Whatever the padded inputs hold, a masked BN-LSTM's outputs at real steps are the same."""
    torch.manual_seed(0)
    layer = LSTMLayer(3, 4, norm="bn", max_steps=6).double()
    mask = random_mask(6, 8, seed)
    x = torch.randn(6, 8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    y1 = layer(x, mask=mask)[0]
    y2 = layer(x.masked_fill(~mask.unsqueeze(-1), fill), mask=mask)[0]
    real = mask.unsqueeze(-1).expand_as(y1)
    torch.testing.assert_close(y1[real], y2[real])


@pytest.mark.parametrize("norm", ["bn", "bn_shared", "bn_pooled", "l1bn", "ln"])
def test_an_all_ones_mask_equals_no_mask(norm):
    """The masked path (generic) against the unmasked one (torch's fused batch norm for L2):
    outputs, gradients and population statistics agree."""

    def run(mask):
        torch.manual_seed(0)
        layer = LSTMLayer(3, 5, norm=norm, max_steps=7).double()
        x = torch.randn(7, 6, 3, dtype=torch.float64, requires_grad=True)
        y = layer(x, mask=mask)[0]
        y.pow(2).sum().backward()
        return y, x.grad, layer.norm.state_dict()

    y0, g0, s0 = run(None)
    y1, g1, s1 = run(torch.ones(7, 6, dtype=torch.bool))
    torch.testing.assert_close(y0, y1)
    torch.testing.assert_close(g0, g1)
    for key in s0:
        torch.testing.assert_close(s0[key], s1[key], msg=key)


def test_masked_bn_passes_gradcheck():
    term = bn_term("bn", features=4, max_steps=3)
    mask = random_mask(3, 5, seed=1)
    a = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: term(a, 0, mask), (a,))


def test_variable_length_batches():
    ids = torch.arange(2000) % 50
    chunks = lm_batches(ids, 8, 40)
    g = torch.Generator().manual_seed(0)
    batches = variable_length_batches(chunks, g, min_fraction=0.25, pad_id=0)
    assert len(batches) == len(chunks)
    lengths_seen = set()
    for (x0, y0), (x, y, mask) in zip(chunks, batches, strict=True):
        lengths = mask.sum(0)
        lengths_seen.update(lengths.tolist())
        assert lengths.min() >= math.ceil(0.25 * x0.shape[0]) and lengths.max() <= x0.shape[0]
        assert x.shape[0] == lengths.max()  # cut to the longest sequence of the batch
        # a mask is a prefix: real steps first, then padding
        assert torch.equal(mask, torch.arange(x.shape[0]).unsqueeze(1) < lengths)
        assert torch.equal(x[mask], x0[: x.shape[0]][mask]) and (x[~mask] == 0).all()
        assert torch.equal(y[mask], y0[: x.shape[0]][mask]) and (y[~mask] == IGNORE).all()
    assert len(lengths_seen) > 5
    again = variable_length_batches(chunks, torch.Generator().manual_seed(0))
    assert all(torch.equal(a[2], b[2]) for a, b in zip(batches, again, strict=True))


def test_language_model_loss_counts_only_real_targets(chars_dir):
    from normrnn.methods.models import build_model
    from normrnn.pipeline.tasks import make_task

    params = {"batch_size": 4, "seq_len": 12, "train_lengths": "variable", "seed": 1}
    task = make_task(chars_dir, params)
    x, y, mask = task.batches("train", 0, 1)[0]
    torch.manual_seed(0)
    model = build_model("char_lm", vocab_size=task.meta["vocab_size"], hidden_size=8, norm="bn")
    loss, state, _, n = task.loss(model, (x, y, mask), "ignored", "cpu")
    assert state is None and n == int(mask.sum()) < mask.numel()
    torch.manual_seed(0)  # the reference: each real position's cross-entropy, by hand
    model = build_model("char_lm", vocab_size=task.meta["vocab_size"], hidden_size=8, norm="bn")
    logits = model(x, None, mask)[0]
    logp = torch.log_softmax(logits.double(), -1)
    ref = -torch.stack([logp[t, b, y[t, b]] for t, b in mask.nonzero().tolist()]).mean()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)


def test_length_metrics_of_a_uniform_model_are_log2_vocab(chars_dir):
    """Known answer: a model whose output layer is zero predicts uniformly, so its BPC is
    log2(V) at every test length, beyond T_max too."""
    from normrnn.methods.models import build_model
    from normrnn.pipeline.evaluation import length_metrics
    from normrnn.pipeline.tasks import make_task

    params = {"batch_size": 4, "seq_len": 10, "eval_seq_lens": [5, 10, 40]}
    task = make_task(chars_dir, params)
    vocab = task.meta["vocab_size"]
    model = build_model("char_lm", vocab_size=vocab, hidden_size=8, norm="bn", max_steps=10)
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    out = length_metrics(model, task, torch.device("cpu"), params)
    assert [m["length"] for m in out] == [5, 10, 40]
    for m in out:
        assert m["test_metric"] == pytest.approx(math.log2(vocab), rel=1e-6)


@pytest.mark.parametrize("norm", ["bn", "bn_shared", "bn_pooled", "l1bn"])
def test_batch_norm_statistics_by_hand(norm):
    """The diagnostic's population scale is the stored statistic's denominator at each step
    (constant when shared); its batch scale is the test batch's own, computed here anew."""
    torch.manual_seed(0)
    steps, batch = 6, 16
    layer = LSTMLayer(2, 3, norm=norm, max_steps=4).double()  # T_max 4 < 6 steps: reuse
    x = torch.randn(steps, batch, 2, dtype=torch.float64)
    for _ in range(2):
        layer(torch.randn(4, batch, 2, dtype=torch.float64))
    layer.eval()
    rows = batch_norm_statistics(layer, lambda: layer(x))
    terms = {r["term"] for r in rows}
    assert terms == {"x", "h", "c"}
    xt = [r for r in rows if r["term"] == "x"]
    assert [r["t"] for r in xt] == list(range(1, steps + 1))
    w_ih = layer.effective_weights()[0]
    a = (x @ w_ih.t()).detach()
    bn = layer.norm.x
    for r in xt:
        t = r["t"] - 1
        slot = 0 if norm in ("bn_shared", "bn_pooled") else min(t, 3)
        pop = bn.denominator(bn.running_stat[slot]).mean()
        assert r["population"] == pytest.approx(float(pop), rel=1e-9)
        centered = a[t] - a[t].mean(0)
        if norm == "l1bn":
            own = math.sqrt(math.pi / 2) * centered.abs().mean(0) + EPS
        else:
            own = (centered.pow(2).mean(0) + EPS).sqrt()
        assert r["batch"] == pytest.approx(float(own.mean()), rel=1e-9)
        assert r["batch_mean"] == pytest.approx(float(a[t].mean()), abs=1e-12)
    if norm in ("bn_shared", "bn_pooled"):
        assert len({r["population"] for r in rows if r["term"] == "h"}) == 1
    else:  # steps 5 and 6 reuse the statistics of step 4
        h = {r["t"]: r["population"] for r in rows if r["term"] == "h"}
        assert h[4] == h[5] == h[6] != h[1]


def test_no_batch_norm_no_statistics():
    layer = LSTMLayer(2, 3, norm="ln").eval()
    assert batch_norm_statistics(layer, lambda: layer(torch.randn(4, 5, 2))) == []
