"""Quantizers: values, scaling factors and thresholds against the formulas (docs/methods.md)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normrnn import QUANTIZERS, UnknownNameError, quantize_blocks

W = torch.tensor([[0.5, -1.0], [2.0, -0.1]])


def test_every_quantizer_passes_the_gradient_straight_through():
    for name, q in QUANTIZERS.items():
        w = torch.randn(6, 5, requires_grad=True)
        c = torch.randn(6, 5)
        (q(w, torch.rand(6, 5) + 0.1) * c).sum().backward()
        torch.testing.assert_close(w.grad, c, msg=f"{name}: STE gradient")


def test_binary_connect_is_sign_without_scale():
    assert QUANTIZERS["bc"](W).tolist() == [[1.0, -1.0], [1.0, -1.0]]
    assert set(QUANTIZERS["bc"](torch.zeros(3)).tolist()) == {1.0}


def test_bwn_scale_is_mean_absolute_value():
    alpha = (0.5 + 1.0 + 2.0 + 0.1) / 4
    torch.testing.assert_close(QUANTIZERS["bwn"](W), alpha * torch.tensor([[1.0, -1], [1, -1]]))


def test_lab_scale_uses_the_preconditioner():
    d = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    alpha = (0.5 * 1 + 1.0 * 2 + 2.0 * 3 + 0.1 * 4) / (1 + 2 + 3 + 4)
    torch.testing.assert_close(QUANTIZERS["lab"](W, d), alpha * torch.tensor([[1.0, -1], [1, -1]]))
    # without d it is BWN
    torch.testing.assert_close(QUANTIZERS["lab"](W), QUANTIZERS["bwn"](W))


def test_ternary_threshold_and_scale():
    delta = 0.7 * 0.9  # 0.7 mean|W|
    assert delta == pytest.approx(0.63)
    # |W| > Δ: 1.0 and 2.0
    assert QUANTIZERS["tc"](W).tolist() == [[0.0, -1.0], [1.0, 0.0]]
    torch.testing.assert_close(QUANTIZERS["twn"](W), torch.tensor([[0.0, -1.5], [1.5, 0.0]]))


def test_lat_reaches_its_fixed_point():
    w = torch.randn(40, 30)
    d = torch.rand(40, 30) + 0.5
    q = QUANTIZERS["lat"](w, d)
    alpha = q.abs().max()
    b = q / alpha
    assert set(b.unique().tolist()) <= {-1.0, 0.0, 1.0}
    # b = ternary(w, α/2) and α = Σ|b d w| / Σ|b d|, in float64
    w64, d64, b64 = w.double(), d.double(), b.double()
    expect_b = (w64 > alpha / 2).double() - (w64 < -alpha / 2).double()
    assert torch.equal(b64, expect_b)
    expect_alpha = (b64 * d64 * w64).abs().sum() / (b64 * d64).abs().sum()
    assert float(alpha) == pytest.approx(float(expect_alpha), rel=1e-5)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(8, 200))
def test_value_sets(seed, n):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g)
    levels = {"bc": 2, "bwn": 2, "lab": 2, "tc": 3, "twn": 3, "lat": 3, "alt2": 4, "alt3": 8}
    for name, k in levels.items():
        assert QUANTIZERS[name](w).unique().numel() <= k, name
    a = QUANTIZERS["bwn"](w).abs().unique()
    assert a.numel() == 1 and float(a) == pytest.approx(float(w.abs().mean()), rel=1e-6)


def test_alternating_error_decreases_with_bits():
    w = torch.randn(64, 64)
    err = {name: float((QUANTIZERS[name](w) - w).norm()) for name in ("bwn", "alt2", "alt3")}
    assert err["alt3"] < err["alt2"] < err["bwn"]
    # 2-bit codes: w ≈ α1 b1 + α2 b2 has exactly the levels ±α1 ± α2
    assert QUANTIZERS["alt2"](w).unique().numel() == 4


def test_alternating_refits_scales_by_least_squares():
    """One alternation against numpy in float64: greedy codes, α by numpy's lstsq, then each
    weight to the nearest of the levels ±α1 ± α2. Codes of rank one (a constant matrix) get
    the minimum-norm α and reproduce the matrix exactly, on any device's solver."""
    import numpy as np

    from normrnn.methods.quantizers import alternating

    w = torch.randn(40, 30)
    flat = w.double().numpy().ravel()
    r, codes = flat.copy(), []
    for _ in range(2):
        b = np.where(r >= 0, 1.0, -1.0)
        codes.append(b)
        r = r - np.abs(r).mean() * b
    alpha = np.linalg.lstsq(np.stack(codes, 1), flat, rcond=None)[0]
    levels = np.array([[-1, -1], [-1, 1], [1, -1], [1, 1]]) @ alpha
    expected = levels[np.abs(flat[:, None] - levels[None]).argmin(1)].reshape(w.shape)
    np.testing.assert_allclose(alternating(w, 2, iters=1).numpy(), expected, rtol=1e-6)
    const = torch.full((8, 8), 0.3)
    torch.testing.assert_close(alternating(const, 2), const)


def test_low_precision_rounding():
    w = torch.tensor([1.0 + 2**-10, 1.0 + 2**-12, 3.14159265])
    assert QUANTIZERS["fp16"](w).tolist() == w.half().float().tolist()
    assert QUANTIZERS["bf16"](w).tolist() == w.bfloat16().float().tolist()
    assert QUANTIZERS["bf16"](w)[0] == 1.0  # 2^-10 is below bf16's 8-bit mantissa


def test_blocks_get_their_own_scale():
    w = torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), -5.0)])
    q = quantize_blocks(QUANTIZERS["bwn"], w, 2)
    assert q[:2].unique().tolist() == [1.0] and q[2:].unique().tolist() == [-5.0]


def test_spectral_bound_of_binary_matrices():
    d = 32
    w = QUANTIZERS["bc"](torch.randn(d, d))
    assert float(torch.linalg.matrix_norm(w, 2)) >= math.sqrt(d) - 1e-5


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownNameError, match="valid names: .*bwn.*twn"):
        QUANTIZERS["ternary"]
