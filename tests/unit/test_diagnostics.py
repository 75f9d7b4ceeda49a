"""Diagnostics on cases with a known answer."""

import math

import pytest
import torch

from normrnn import build_model
from normrnn.methods.cells import LSTMLayer
from normrnn.pipeline.diagnostics import (
    gradient_norms,
    hidden_gradient_norms,
    largest_singular_value,
    spectral_norms,
)


def test_largest_singular_value_of_a_known_matrix():
    u, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    s = torch.tensor([3.5, 2.0, 1.0, 0.5, 0.1, 0.0], dtype=torch.float64)
    assert largest_singular_value(u @ torch.diag(s) @ v.T) == pytest.approx(3.5, rel=1e-12)


@pytest.mark.parametrize("rho", [0.5, 0.9, 1.0, 1.2])
def test_gradient_norms_of_a_linear_rnn_with_known_spectral_radius(rho):
    # h_t = rho Q h_{t-1} + x_t with Q orthogonal and L = v·h_T: ‖∂L/∂h_t‖ = rho^(T-t) ‖v‖
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    xs = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(5, dtype=torch.float64)
    h, hs = torch.zeros(5, dtype=torch.float64), []
    for x in xs:
        h = rho * q @ h + x
        hs.append(h)
    norms = gradient_norms(hs, v @ hs[-1])
    expected = [rho ** (7 - t) * float(v.norm()) for t in range(8)]
    assert norms == pytest.approx(expected, rel=1e-10)


def test_lstm_hidden_gradients_vanish_without_recurrence():
    # with W_h = 0 the loss on the last output depends on h_t (t < T) through nothing
    model = build_model("classifier", num_classes=3, hidden_size=4, input_size=2)
    layer = model.rnn.layers[0]
    with torch.no_grad():
        layer.weight_hh.zero_()
    x, y = torch.randn(6, 5, 2), torch.randint(0, 3, (5,))
    norms = hidden_gradient_norms(
        model, layer, lambda: torch.nn.functional.cross_entropy(model(x)[0], y)
    )
    assert len(norms) == 6 and all(n == 0 for n in norms[:-1]) and norms[-1] > 0
    assert layer.recorded is None  # recording ends with the context


def test_spectral_norms_before_and_after_quantization():
    layer = LSTMLayer(3, 16, quant="bc")
    out = spectral_norms(layer)
    # four stacked orthogonal blocks: W^T W = 4 I, so λ1 = 2 exactly
    assert out["lambda1_hh_fp"] == pytest.approx(2.0, rel=1e-6)
    # binary blocks: λ1 ≥ sqrt(d) for each 16×16 gate block (docs/methods.md)
    assert all(v >= math.sqrt(16) - 1e-9 for v in out["lambda1_gates_effective"])
    assert out["lambda1_hh_quantized"] >= math.sqrt(16)
    opts = {"gain_init": "quantized"}
    wn = spectral_norms(LSTMLayer(3, 16, quant="bc", norm="wn", norm_opts=opts))
    # weight norm with gains at the initial quantized row norms changes nothing at init
    assert wn["lambda1_hh_effective"] == pytest.approx(wn["lambda1_hh_quantized"], rel=1e-6)
    assert wn["gain_hh_mean"] == pytest.approx(4.0)  # rows of ±1 with 16 entries
    # by default the gains are the full-precision rows' norms (1: orthogonal blocks), so the
    # binary matrix is scaled by 1/4 to the full-precision rows' scale
    fp = spectral_norms(LSTMLayer(3, 16, quant="bc", norm="wn"))
    assert fp["gain_hh_mean"] == pytest.approx(1.0)
    assert fp["lambda1_hh_effective"] == pytest.approx(fp["lambda1_hh_quantized"] / 4, rel=1e-6)
