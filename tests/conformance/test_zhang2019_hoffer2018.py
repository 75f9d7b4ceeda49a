"""Conformance with Zhang & Sennrich 2019 and Hoffer et al. 2018: the ``zhang`` and ``hoffer``
studies' norms (the default config under the ``zhang2019`` and ``hoffer2018`` recipes, sizes
made small) against ref_zhang2019 and ref_hoffer2018, float64 transcriptions of the authors'
code: Zhang's RMS-LSTM and RMS-GRU (outputs, final cell, every gradient); Hoffer's batch norms
over two consecutive batches (outputs, gradients, the smoothed top-k statistic and the
population averages carried from the first to the second) and in evaluation; the bounded
weight norm (1e-10)."""

import pytest
import ref_hoffer2018
import ref_zhang2019
import torch
from study_models import assert_close, blocks, leaves, study_params

from normrnn.methods.cells import CELLS
from normrnn.methods.norms import NORMS
from normrnn.pipeline.training import norm_options

H, B, T, IN = 5, 9, 6, 4
ZHANG = (0, 1, 3, 2)  # our gate blocks (i, f, g, o) in Zhang's order (i, f, o, c~)


def _perturbed(module, scale=0.3, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _layer(study, norm, cell="lstm", quant="fp", perturb=True, **opts):
    """The recurrent layer a study's run builds for ``norm`` (its recipe's options), float64,
    its parameters moved off their initial values (``perturb``)."""
    params = study_params(study, "ptb_char", norm, quant, hidden_size=H)
    options = {**norm_options(params), **opts}
    torch.manual_seed(0)
    layer = CELLS[cell](IN, H, norm=norm, quant=quant, max_steps=T, norm_opts=options,
                        init=params["init"], forget_bias=params["forget_bias"])  # fmt: skip
    return _perturbed(layer.double()) if perturb else layer.double()


def _grads_of(module) -> dict:
    return {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("norm", ["rms_zhang", "prms_zhang"])
def test_rms_lstm_equals_zhangs(norm):
    """The RMS-LSTM of layers.py:652-744: rln over each term's whole 4H vector, b inside the
    input term's rln and once more after it, c_t normalized for the output only. pRMS: the
    torch module's partial RMS (ε 1e-8 on the RMS) in the same places."""
    opts = {"p": 0.5} if norm == "prms_zhang" else {}  # (k = int(4H p) units of 20)
    layer = _layer("zhang", norm, **opts)
    x = torch.randn(T, B, IN, dtype=torch.float64)
    h0, c0 = (torch.randn(B, H, dtype=torch.float64) for _ in range(2))
    y, (_, c) = layer(x, (h0, c0))
    r = torch.randn_like(y)
    ((y * r).sum() + c.sum()).backward()
    n = layer.norm
    p = leaves({
        "W": blocks(layer.weight_ih, ZHANG).t(), "U": blocks(layer.weight_hh, ZHANG).t(),
        "b": blocks(layer.bias, ZHANG), "s1": blocks(n.x.weight, ZHANG),
        "s2": blocks(n.h.weight, ZHANG), "s3": n.c.weight,
    })  # fmt: skip
    if norm == "rms_zhang":
        ys, c_ref = ref_zhang2019.rlnlstm_sequence(p, x, h0, c0)
    else:
        ys, c_ref = _prms_lstm(p, x, h0, c0, 0.5)
    assert_close(y.detach(), ys.detach(), "h")
    assert_close(c.detach(), c_ref.detach(), "c")
    ((ys * r).sum() + c_ref.sum()).backward()
    ours = _grads_of(layer)
    mine = {"W": blocks(ours["weight_ih"], ZHANG).t(), "U": blocks(ours["weight_hh"], ZHANG).t(),
            "b": blocks(ours["bias"], ZHANG), "s1": blocks(ours["norm.x.weight"], ZHANG),
            "s2": blocks(ours["norm.h.weight"], ZHANG), "s3": ours["norm.c.weight"]}  # fmt: skip
    for name, leaf in p.items():
        assert_close(mine[name], leaf.grad, name)


def _prms_lstm(p, x, h0, c0, fraction):
    """layers.py's RMS-LSTM step with its rln replaced by their torch module's partial RMS
    (rmsnorm_torch.py), as prms_zhang places it."""

    def rms(v, s):
        return ref_zhang2019.rmsnorm_torch(v, s, p=fraction, eps=1e-8)

    h, c, out = h0, c0, []
    xw = x @ p["W"] + p["b"]
    for t in range(x.shape[0]):
        z = rms(h @ p["U"], p["s2"]) + rms(xw[t], p["s1"]) + p["b"]
        i, f, o, g = z.chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(rms(c, p["s3"]))
        out.append(h)
    return torch.stack(out), c


def test_rms_gru_equals_zhangs():
    """The RMS-GRU of layers.py:287-357: the r, u part and the candidate part of each term
    normalized apart, the biases inside the input's rln only, no recurrent bias, r applied to
    the normalized recurrent candidate term."""
    layer = _layer("zhang", "rms_zhang", cell="gru")
    assert "bias_hn" not in dict(layer.named_parameters()) and not layer.bias_hn.any()
    x = torch.randn(T, B, IN, dtype=torch.float64)
    h0 = torch.randn(B, H, dtype=torch.float64)
    y, _ = layer(x, (h0,))
    r = torch.randn_like(y)
    (y * r).sum().backward()
    n = layer.norm
    w_ih, w_hh, b = layer.weight_ih, layer.weight_hh, layer.bias
    p = leaves({
        "W": w_ih[: 2 * H].t(), "Wx": w_ih[2 * H :].t(), "b": b[: 2 * H], "bx": b[2 * H :],
        "U": w_hh[: 2 * H].t(), "Ux": w_hh[2 * H :].t(), "s1": n.x.weight[: 2 * H],
        "s2": n.x.weight[2 * H :], "s3": n.h.weight[: 2 * H], "s4": n.h.weight[2 * H :],
    })  # fmt: skip
    ys = ref_zhang2019.rlngru_sequence(p, x, h0)
    assert_close(y.detach(), ys.detach(), "h")
    (ys * r).sum().backward()
    g = _grads_of(layer)
    mine = {"W": g["weight_ih"][: 2 * H].t(), "Wx": g["weight_ih"][2 * H :].t(),
            "b": g["bias"][: 2 * H], "bx": g["bias"][2 * H :], "U": g["weight_hh"][: 2 * H].t(),
            "Ux": g["weight_hh"][2 * H :].t(), "s1": g["norm.x.weight"][: 2 * H],
            "s2": g["norm.x.weight"][2 * H :], "s3": g["norm.h.weight"][: 2 * H],
            "s4": g["norm.h.weight"][2 * H :]}  # fmt: skip
    for name, leaf in p.items():
        assert_close(mine[name], leaf.grad, name)


HOFFER = {
    "linfbn_ghost": lambda x, s, w, b: ref_hoffer2018.ghost_topk_bn(x, s, w, b, k=10),
    "linfbn": lambda x, s, w, b: ref_hoffer2018.topk_bn(x, s, w, b, k=1),
    "l1bn": ref_hoffer2018.l1_bn,
    "bn": lambda x, s, w, b: ref_hoffer2018.lp_bn(x, s, w, b, p=2),
}


@pytest.mark.parametrize("norm", sorted(HOFFER))
def test_hoffers_batch_norms_over_two_batches_and_in_evaluation(norm):
    """lp_norm.py's batch norms on a fully connected layer's output (N, C), the ``hoffer``
    study's terms at one time step: two training batches in turn (outputs, the gradients of
    the input, gains and shifts; the ghost norm's smoothed top-k statistic carries from the
    first to the second), then evaluation with the population averages (running = 0.1 old +
    0.9 new from zeros, the inverse scale kept)."""
    params = study_params("hoffer", "ptb_char", norm, hidden_size=H)
    options = norm_options(params)
    assert options["average"] == "inverse_scale" and options["momentum"] == 0.9
    torch.manual_seed(0)
    term = _perturbed(NORMS[norm](hidden_size=4, gates=1, max_steps=3, **options).x.double())
    state = {k: torch.zeros(4, dtype=torch.float64) for k in ("running_mean", "running_var")}
    state["meanTOPK"] = torch.zeros(4, dtype=torch.float64)
    for batch in range(2):
        term.zero_grad()
        x = (torch.randn(32, 4, dtype=torch.float64) * (1 + batch) + 0.5).requires_grad_()
        ours = term(x[None], 0)[0]
        r = torch.randn_like(ours)
        (ours * r).sum().backward()
        p = leaves({"x": x, "w": term.weight, "b": term.bias})
        theirs, state = HOFFER[norm](p["x"], state, p["w"], p["b"])
        (theirs * r).sum().backward()
        assert_close(ours.detach(), theirs.detach(), f"batch {batch} output")
        for name, got in (("x", x.grad), ("w", term.weight.grad), ("b", term.bias.grad)):
            assert_close(got, p[name].grad, f"batch {batch} gradient of {name}")
        assert_close(term.running_mean[0], state["running_mean"], "population mean")
        assert_close(term.running_stat[0], state["running_var"], "population inverse scale")
        if norm == "linfbn_ghost":
            assert_close(term.ghost[0], state["meanTOPK"], "smoothed top-k statistic")
    term.eval()
    x = torch.randn(16, 4, dtype=torch.float64)
    theirs = ref_hoffer2018._eval(x, state, term.weight.detach(), term.bias.detach())[0]
    assert_close(term(x[None], 0)[0].detach(), theirs, "evaluation")


def test_bounded_weight_norm_equals_hoffers():
    """bwn.py's BoundedWeighNorm: the gains from the initial rows' norms, trained, rescaled to
    their initial norm in every forward (W_x and W_h each), as ``wn_bounded`` does."""
    layer = _layer("hoffer", "wn_bounded", perturb=False)
    n = layer.norm
    for i, w in enumerate((layer.weight_ih, layer.weight_hh)):
        g, rho = ref_hoffer2018.bounded_weight_norm_init(w.detach())
        assert_close((n.g_ih, n.g_hh)[i].detach()[:, 0], g.reshape(-1), "initial gains", 1e-6)
        assert_close(n.rho[i].reshape(1), rho, "ρ", 1e-6)
    _perturbed(layer)
    v = layer.weight_hh
    p = leaves({"v": v, "g": n.g_hh})
    ours = n.weight_hh(v)
    r = torch.randn_like(ours)
    (ours * r).sum().backward()
    theirs = ref_hoffer2018.bounded_weight_norm(p["v"], p["g"], n.rho[1].reshape(1))
    assert_close(ours.detach(), theirs.detach(), "weight")
    (theirs * r).sum().backward()
    assert_close(v.grad, p["v"].grad, "v gradient")
    assert_close(n.g_hh.grad, p["g"].grad, "g gradient")
