"""Normalizations against independent float64 references and torch built-ins (docs/methods.md)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from registry_lists import stepwise_norms
from scipy import integrate

from normrnn import NORMS, UnknownNameError, tanh_variance
from normrnn.methods.cells import LSTMLayer
from normrnn.methods.norms import linf_constant

EPS = 1e-5


def term(name, features=8, groups=2, max_steps=4, **opts):
    """The input-term module of a registered activation norm."""
    return NORMS[name](hidden_size=features // groups, gates=groups, max_steps=max_steps, **opts).x


def test_bn_per_step_statistics_by_hand():
    bn = term("bn").double()
    a = torch.randn(3, 16, 8, dtype=torch.float64) * 3 + 1
    out = bn(a).detach().numpy()
    x, gamma = a.numpy(), bn.weight.detach().numpy()
    assert gamma == pytest.approx(0.1)  # Cooijmans' initialisation
    for t in range(3):
        mu = x[t].mean(0)
        var = ((x[t] - mu) ** 2).mean(0)
        np.testing.assert_allclose(out[t], gamma * (x[t] - mu) / np.sqrt(var + EPS), rtol=1e-10)
        # the first update replaces the initial values (no start-up bias)
        np.testing.assert_allclose(bn.running_mean[t].numpy(), mu, rtol=1e-10)
        np.testing.assert_allclose(bn.running_stat[t].numpy(), var, rtol=1e-10)
    assert int(bn.steps_seen) == 3
    first_mean, first_var = bn.running_mean.clone(), bn.running_stat.clone()
    b = torch.randn(3, 16, 8, dtype=torch.float64)
    bn(b)
    y = b.numpy()
    for t in range(3):
        mu, var = y[t].mean(0), y[t].var(0)
        # the k-th update has weight max(momentum, 1/k): here 1/2
        expect_m = 0.5 * first_mean[t].numpy() + 0.5 * mu
        np.testing.assert_allclose(bn.running_mean[t].numpy(), expect_m, rtol=1e-10)
        expect_v = 0.5 * first_var[t].numpy() + 0.5 * var
        np.testing.assert_allclose(bn.running_stat[t].numpy(), expect_v, rtol=1e-10)
    for _ in range(30):  # past k = 20 the weight is the momentum, 0.05
        bn(torch.randn(1, 16, 8, dtype=torch.float64))
    before = bn.running_mean[0].clone()
    c = torch.randn(1, 16, 8, dtype=torch.float64)
    bn(c)
    torch.testing.assert_close(bn.running_mean[0], 0.95 * before + 0.05 * c[0].mean(0))

    # step 3 was never seen: untouched
    assert torch.equal(bn.running_mean[3], torch.zeros(8, dtype=torch.float64))


def test_bn_eval_uses_population_statistics_and_reuses_t_max():
    bn = term("bn", max_steps=10).double()
    for _ in range(5):
        bn(torch.randn(3, 32, 8, dtype=torch.float64) * 2 + 0.5)
    bn.eval()
    a = torch.randn(6, 4, 8, dtype=torch.float64)
    out = bn(a).detach()
    for t in range(6):
        s = min(t, 2)  # trained on 3 steps: T_max = 3
        ref = bn.weight * (a[t] - bn.running_mean[s]) / torch.sqrt(bn.running_stat[s] + EPS)
        torch.testing.assert_close(out[t], ref)
    # eval output of one example does not depend on the rest of the batch
    torch.testing.assert_close(bn(a[:, :1]), out[:, :1])


def test_population_statistics_are_the_mean_over_the_training_data():
    from normrnn.methods.norms import estimate_population_statistics

    layer = LSTMLayer(2, 4, norm="bn", max_steps=5).double()
    batches = [torch.randn(5, 8, 2, dtype=torch.float64) * (i + 1) for i in range(4)]
    n = estimate_population_statistics(layer, batches, layer)
    assert n == 3  # input term, hidden term, cell
    x = torch.stack([b for b in batches])  # (4, T, B, I)
    proj = x @ layer.weight_ih.detach().t()  # (4, T, B, 4H)
    torch.testing.assert_close(layer.norm.x.running_mean, proj.mean(2).mean(0))
    torch.testing.assert_close(layer.norm.x.running_stat, proj.var(2, unbiased=False).mean(0))
    assert layer.norm.x.momentum == 0.05


def test_bn_pooled_uses_statistics_over_all_steps():
    bn = term("bn_pooled").double()
    a = torch.randn(3, 16, 8, dtype=torch.float64)
    x = a.numpy().reshape(-1, 8)
    ref = bn.weight.detach().numpy() * (a.numpy() - x.mean(0)) / np.sqrt(x.var(0) + EPS)
    np.testing.assert_allclose(bn(a).detach().numpy(), ref, rtol=1e-10)
    assert bn.running_mean.shape == (1, 8)


def test_bn_shared_normalizes_each_step_and_shares_one_running_average():
    """Hou et al.'s "BN shared": each step normalized with its own batch statistics (float64
    formula), and the steps' statistics averaged into one slot in turn, torch's way
    (momentum 0.1 from (0, 1), unbiased variance), as nn.BatchNorm1d called per step does."""
    bn = term("bn_shared", momentum=0.1, warm_start=False, unbiased=True).double()
    a = torch.randn(3, 16, 8, dtype=torch.float64) * 2 + 1
    x = a.numpy()
    ref = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + EPS)
    got = bn(a).detach().numpy() / bn.weight.detach().numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-10)
    torch_bn = torch.nn.BatchNorm1d(8, momentum=0.1).double()
    for t in range(3):
        torch_bn(a[t])
    np.testing.assert_allclose(bn.running_mean[0], torch_bn.running_mean, rtol=1e-12)
    np.testing.assert_allclose(bn.running_stat[0], torch_bn.running_var, rtol=1e-12)
    assert bn.running_mean.shape == (1, 8) and bn.stepwise


def test_l1_bn_estimates_sigma_on_gaussian_data():
    bn = term("l1bn", features=64, groups=1)
    a = torch.randn(1, 8192, 64) * 2.0 + 3.0
    bn(a)
    sigma = bn.running_stat[0]  # the first update is the batch statistic
    assert sigma.mean().item() == pytest.approx(2.0, rel=0.03)
    out = bn(a).detach() / 0.1
    assert out.std().item() == pytest.approx(1.0, rel=0.03)


def test_linf_constant_and_estimate():
    n = 64
    hand = 0.5 * (1 + np.sqrt(np.pi * np.log(4))) / np.sqrt(2 * np.log(n))
    assert linf_constant(n) == pytest.approx(hand, rel=1e-12)
    assert linf_constant(n) == pytest.approx(0.5352, abs=1e-4)
    with pytest.raises(ValueError, match="at least 2"):
        linf_constant(1)
    bn = term("linfbn", features=512, groups=1).double()
    a = torch.randn(1, n, 512, dtype=torch.float64) * 2.0
    bn(a)
    est = bn.running_stat[0]
    top = (a - a.mean(1, keepdim=True)).abs().max(1).values[0]
    torch.testing.assert_close(est, linf_constant(n) * top)
    # the estimate is proportional to σ (here C(n) E max|x - μ| ≈ 1.4σ at n = 64: the learned
    # gain absorbs the constant factor)
    bn2 = term("linfbn", features=512, groups=1).double()
    bn2(a * 3)
    torch.testing.assert_close(bn2.running_stat[0], 3 * est)


def test_linf_top_k_averages_the_k_largest():
    bn = term("linfbn", features=4, groups=1, k=3).double()
    a = torch.randn(1, 20, 4, dtype=torch.float64)
    bn(a)
    c = (a - a.mean(1, keepdim=True)).abs()[0].sort(0, descending=True).values[:3].mean(0)
    torch.testing.assert_close(bn.running_stat[0], linf_constant(20) * c)


def test_rms_equals_torch_rmsnorm_per_gate():
    rms = term("rms", features=12, groups=3)
    with torch.no_grad():
        rms.weight.copy_(torch.randn(12))
    a = torch.randn(2, 5, 12)
    out = rms(a)
    for g in range(3):
        ref = torch.nn.RMSNorm(4, eps=EPS)
        with torch.no_grad():
            ref.weight.copy_(rms.weight[4 * g : 4 * g + 4])
        torch.testing.assert_close(out[..., 4 * g : 4 * g + 4], ref(a[..., 4 * g : 4 * g + 4]))


def test_ln_equals_torch_layernorm_per_gate():
    ln = term("ln", features=12, groups=3)
    a = torch.randn(2, 5, 12) * 4 + 2
    out = ln(a)
    for g in range(3):
        ref = torch.nn.LayerNorm(4, eps=EPS)
        torch.testing.assert_close(out[..., 4 * g : 4 * g + 4], ref(a[..., 4 * g : 4 * g + 4]))


def test_prms_uses_only_the_first_k_units():
    prms = term("prms", features=64, groups=2, p=0.25).double()  # H = 32, k = 8
    assert prms.k == 8
    a = torch.randn(1, 3, 64, dtype=torch.float64)
    g = a.numpy().reshape(1, 3, 2, 32)
    ref = g / np.sqrt((g[..., :8] ** 2).mean(-1, keepdims=True) + EPS)
    np.testing.assert_allclose(prms(a).detach().numpy().reshape(1, 3, 2, 32), ref, rtol=1e-10)
    b = a.clone()
    b[..., 8:32] *= 100  # units past k do not move the scale
    torch.testing.assert_close(prms(b)[..., :8], prms(a)[..., :8])


@pytest.mark.parametrize("gamma", [0.1, 0.5, 0.8, 1.0, 2.0])
def test_normprop_variance_matches_numerical_integration(gamma):
    def integrand(z):
        return np.tanh(gamma * z) ** 2 * np.exp(-(z**2) / 2) / np.sqrt(2 * np.pi)

    ref, _ = integrate.quad(integrand, -np.inf, np.inf)
    assert tanh_variance(gamma) == pytest.approx(ref, abs=1e-9)


def test_normprop_reference_constants():
    assert tanh_variance(0.1) == pytest.approx(0.0098, abs=1e-4)
    assert tanh_variance(0.8) == pytest.approx(0.3150, abs=1e-3)
    assert tanh_variance(1.0) == pytest.approx(0.3944, abs=1e-3)


def test_normprop_rows_have_the_fixed_gain():
    layer = LSTMLayer(3, 5, norm="normprop", norm_opts={"gamma_x": 0.7, "gamma_h": 0.3})
    w_ih, w_hh = layer.effective_weights()
    torch.testing.assert_close(w_ih.norm(dim=1), torch.full((20,), 0.7))
    torch.testing.assert_close(w_hh.norm(dim=1), torch.full((20,), 0.3))


def test_weight_norm_equals_torch_weight_norm():
    layer = LSTMLayer(3, 5, norm="wn")
    with torch.no_grad():
        layer.norm.g_hh.mul_(torch.rand(20, 1) + 0.5)
    ref = torch.nn.Linear(5, 20, bias=False)
    with torch.no_grad():
        ref.weight.copy_(layer.weight_hh)
    ref = torch.nn.utils.parametrizations.weight_norm(ref, dim=0)
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(layer.norm.g_hh)
    torch.testing.assert_close(layer.effective_weights()[1], ref.weight)
    # a row that ternary quantization zeroes stays zero instead of becoming NaN
    tw = LSTMLayer(3, 5, norm="wn", quant="tc")
    with torch.no_grad():
        tw.weight_hh[0] = 1e-3
    w_hh = tw.effective_weights()[1]
    assert torch.isfinite(w_hh).all() and w_hh[0].abs().sum() == 0
    # its gradient is a unit-norm row's: the gain times the upstream gradient, not 1e12 times
    upstream = torch.randn_like(w_hh)
    (w_hh * upstream).sum().backward()
    g0 = tw.norm.g_hh[0].item()
    torch.testing.assert_close(tw.weight_hh.grad[0], g0 * upstream[0])
    nonzero = tw.weight_hh.grad[1:].abs().max()
    assert nonzero < 10 * tw.norm.g_hh.abs().max() * upstream.abs().max()
    fixed = LSTMLayer(3, 5, norm="wn", norm_opts={"fixed_scale": True})
    assert not fixed.norm.g_ih.requires_grad


def cell_output(norm, scale_weights=1.0, seed=0):
    torch.manual_seed(seed)
    opts = {} if norm == "wn" else {"eps": 1e-12}
    layer = LSTMLayer(3, 6, norm=norm, max_steps=4, norm_opts=opts).double()
    with torch.no_grad():
        layer.weight_ih.mul_(scale_weights)
        layer.weight_hh.mul_(scale_weights)
    x = torch.randn(4, 16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return layer(x)[0]


@settings(max_examples=20, deadline=None)
@given(st.floats(0.2, 20.0), st.integers(0, 1000), st.sampled_from(["ln", "rms"]))
def test_layer_norms_are_invariant_to_input_scale(s, seed, norm):
    t = term(norm, features=16, groups=4, eps=0.0).double()
    a = torch.randn(2, 3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(t(a * s), t(a))


@settings(max_examples=20, deadline=None)
@given(st.floats(0.2, 20.0), st.integers(0, 1000), st.sampled_from(["bn", "wn", "l1bn"]))
def test_bn_and_wn_are_invariant_to_weight_scale(s, seed, norm):
    # eps is the only scale-dependent part: set to 1e-12 here
    ref = cell_output(norm, seed=seed)
    torch.testing.assert_close(cell_output(norm, scale_weights=s, seed=seed), ref)


def test_unknown_norm_lists_valid_names():
    with pytest.raises(
        UnknownNameError, match="unknown norm 'batchnorm'; valid names: bn, bn_pooled, bn_shared"
    ):
        NORMS["batchnorm"]


def test_invalid_norm_options_are_refused():
    with pytest.raises(ValueError, match="p must be"):
        term("prms", p=0.0)
    with pytest.raises(ValueError, match="max_steps"):
        term("bn", max_steps=0)
    assert math.isfinite(tanh_variance(3.0))


def test_shared_statistics_update_in_turn_by_hand():
    """Rows given at once update the shared slot as a hand loop of x += w (m - x) with
    w = max(1/count, momentum), in float64, from a slot that has seen updates before."""
    bn = term("bn_shared", features=3, groups=1, momentum=0.2).double()
    bn.updates[0] = 2
    bn.running_mean[0] = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    means, stats = torch.randn(7, 3, dtype=torch.float64), torch.rand(7, 3, dtype=torch.float64)
    x, v = bn.running_mean[0].clone(), bn.running_stat[0].clone()
    for k in range(7):
        w = max(1 / (3 + k), 0.2)
        x, v = x + w * (means[k] - x), v + w * (stats[k] - v)
    bn._update_shared(means, stats)
    torch.testing.assert_close(bn.running_mean[0], x)
    torch.testing.assert_close(bn.running_stat[0], v)
    assert int(bn.updates[0]) == 9 and int(bn.steps_seen) == 1


@pytest.mark.parametrize("norm", ["bn", "bn_shared", "bn_pooled", "l1bn", "linfbn"])
def test_deferred_statistics_equal_immediate_updates(norm, monkeypatch):
    """The step loop's per-step records, written by one flush after the loop, against an
    update at every step (on the loop: the sequence path has no immediate form)."""
    from normrnn.methods.norms import ActivationNorm

    def run():
        torch.manual_seed(0)
        layer = LSTMLayer(3, 5, norm=norm, max_steps=6).double()
        layer.path = "loop"
        for _ in range(3):
            layer(torch.randn(6, 8, 3, dtype=torch.float64))
        return {k: v.clone() for k, v in layer.norm.state_dict().items()}

    deferred = run()
    monkeypatch.setattr(
        ActivationNorm, "_step", staticmethod(lambda term, a, t, m: term(a.unsqueeze(0), t)[0])
    )
    immediate = run()
    for key, value in deferred.items():
        torch.testing.assert_close(value, immediate[key], msg=key)
    assert int(deferred["h.steps_seen"]) == (1 if norm in ("bn_shared", "bn_pooled") else 6)


@pytest.mark.parametrize("norm", ["bn", "bn_shared", "bn_pooled", "l1bn"])
def test_records_of_the_step_kernel_and_of_blocks_flush_alike(norm, bn_steps):
    """The L2 steps in torch's ops keep the mean and 1/std (torch's kernel's, or a stack of
    steps'), converted at the flush, the compiled steps the mean and statistic; a flush of
    such records, of the block form's, or of any mix in one list writes what an immediate
    update after each step does (float64). ``c``: steps 1 and 2 stacked in one call; ``s``:
    a step; ``b``: the block form."""
    torch.manual_seed(0)
    a = torch.randn(4, 16, 8, dtype=torch.float64) * 2 + 1
    immediate = term(norm, max_steps=4).double()
    for t in range(4):
        immediate(a[t : t + 1], t)
    for kinds in ("ssss", "bbbb", "sbsb", "sccb", "bccs"):
        x = term(norm, max_steps=4).double()
        t = calls = 0
        while t < 4:
            n = kinds.count("c") if kinds[t] == "c" else 1
            if kinds[t] == "b":
                x(a[t : t + n], t, defer=True)
            else:
                x.step(a[t : t + n] if kinds[t] == "c" else a[t], t)
            t, calls = t + n, calls + 1
        assert len(x._pending) == calls
        x.flush()
        for name, value in immediate.state_dict().items():
            torch.testing.assert_close(x.state_dict()[name], value, msg=f"{kinds} {name}")


POOLED = {"shared": True, "pooled": True}
STEPWISE_NORMS = stepwise_norms()
STEPWISE_CASES = [(n, {}) for n in STEPWISE_NORMS]
STEPWISE_CASES += [("l1bn", POOLED), ("linfbn", POOLED), ("linfbn", {"k": 3})]
STEPWISE_IDS = ["-".join([n, *(f"{k}={v}" for k, v in o.items())]) for n, o in STEPWISE_CASES]


@pytest.mark.parametrize("norm,opts", STEPWISE_CASES, ids=STEPWISE_IDS)
@pytest.mark.parametrize("training", [True, False])
def test_stepwise_terms_normalize_a_block_as_its_steps_alone(norm, opts, training, bn_steps):
    """The sequence path steps through the input term when ``stepwise`` says that doing so
    equals normalizing the whole block: a term that claims it must keep the promise, step
    by step and with steps 1 to 3 stacked in one call of its step (each its own step). Shared
    batch statistics (over all steps of a block, in training) must not claim it, and the
    path normalizes their block as one step of all its rows instead: that must equal the
    block too. The step backward of a stack, or of the block as one step, must equal
    autograd through the block form (float64)."""
    torch.manual_seed(0)
    x = term(norm, features=8, groups=2, max_steps=5, **opts).double()
    a = torch.randn(5, 16, 8, dtype=torch.float64) * torch.linspace(0.5, 3, 5)[:, None, None]
    x(torch.randn(5, 16, 8, dtype=torch.float64))  # population statistics for eval mode
    x.train(training)
    x.track = False  # (each call below sees the same averages: ghost BN's mix in the last)
    with torch.no_grad():
        block = x(a, 0)
        steps = torch.stack([x.affine(x.step(a[t], t)[0]) for t in range(5)])
        part = slice(1, 4) if x.stepwise else slice(None)
        given = a[part] if x.stepwise else a.flatten(0, 1)
        rows, saved = x.step(given, part.start or 0)
        rows = x.affine(rows).view(a[part].shape)
    if x.keeps_statistics:
        x._pending.clear()
    if x.stepwise:
        torch.testing.assert_close(steps, block, rtol=1e-10, atol=1e-12)
    else:
        assert (norm == "bn_pooled" or opts.get("pooled")) and training
        assert not torch.allclose(steps, block, atol=1e-3)
    torch.testing.assert_close(rows, block[part], rtol=1e-10, atol=1e-12)
    a.requires_grad_()
    gy = torch.randn_like(a)
    (expect,) = torch.autograd.grad(x(a, 0)[part], a, gy[part])
    got = x.step_backward((gy[part] * x.weight).view(given.shape), saved)
    torch.testing.assert_close(got.view(rows.shape), expect[part], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm", ["bn", "l1bn", "linfbn"])
def test_batch_norm_step_backward_matches_autograd_with_ties_and_constant_columns(norm, bn_steps):
    """The hand-written step backward against autograd through the block form, in float64,
    on the inputs sequential MNIST gives the input term: exact ties for the largest |x - μ|
    (pixels at exactly 1.0) and columns constant over the batch (corners always 0)."""
    x = term(norm, features=8, groups=2, max_steps=1).double()
    a = torch.randn(16, 8, dtype=torch.float64)
    a[:, 0] = 0.0  # constant column
    a[:5, 1], a[5:, 1] = 1.0, 0.0  # five tied maxima
    a[[2, 9], 2] = a[:, 2].abs().max() + 1  # two tied maxima
    a = a.requires_grad_()
    gy = torch.randn(16, 8, dtype=torch.float64)
    (expect,) = torch.autograd.grad(x(a[None], 0)[0], a, gy)
    x._pending.clear()
    with torch.no_grad():
        xhat, saved = x.step(a, 0)
        got = x.step_backward(gy * x.weight, saved)
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)
