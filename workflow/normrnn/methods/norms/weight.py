"""The norms that act on the weights: weight norm (Salimans & Kingma 2016), with Hoffer et
al.'s bounded form, and normalization propagation (Laurent et al. 2017)."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
from torch import nn

from .base import CellNorm, GainTerm, Recurrence


class WeightNorm(CellNorm):
    """Weight norm (Salimans & Kingma 2016) per output row of W_x and W_h: g_j v_j / ||v_j||.

    ``gain_init``: the gains start at the row norms of the initial full-precision weights
    (``full_precision``, Hou et al.; the default: binary rows start at the scale of the
    real-valued ones, not at sqrt(fan-in), the exploding regime of an unnormalized binary
    cell), or at those of the quantized weights (``quantized``: the initial cell equals the
    unnormalized one). With full-precision weights the two are the same. ``eps``: None divides
    by the norm (an all-zero row stays zero), a number divides by norm + eps (Hou et al.:
    1e-8). ``fixed_scale`` freezes the gains; ``bounded`` (Hoffer et al.'s bounded weight norm)
    trains them but rescales each matrix's gain vector to its initial norm in every forward.
    """

    def __init__(
        self,
        hidden_size,
        gates,
        max_steps=1,
        fixed_scale=False,
        bounded=False,
        gain_init="full_precision",
        eps=None,
    ):
        super().__init__(hidden_size, gates, max_steps)
        if gain_init not in ("quantized", "full_precision"):
            raise ValueError(f"gain_init must be quantized or full_precision, got {gain_init!r}")
        self.fixed_scale, self.bounded, self.gain_init, self.eps = (
            fixed_scale,
            bounded,
            gain_init,
            eps,
        )
        size = gates * hidden_size
        self.g_ih = nn.Parameter(torch.ones(size, 1), requires_grad=not fixed_scale)
        self.g_hh = nn.Parameter(torch.ones(size, 1), requires_grad=not fixed_scale)
        if bounded:  # ρ: each gain vector's initial norm
            self.register_buffer("rho", torch.ones(2))

    @torch.no_grad()
    def init_weights(self, w_ih, w_hh, full=None):
        if self.gain_init == "full_precision":
            if full is None:
                raise ValueError("wn gain_init full_precision needs the full-precision weights")
            w_ih, w_hh = full
        self.g_ih.copy_(w_ih.norm(dim=1, keepdim=True))
        self.g_hh.copy_(w_hh.norm(dim=1, keepdim=True))
        if self.bounded:
            self.rho.copy_(torch.stack([self.g_ih.norm(), self.g_hh.norm()]))

    def _gain(self, g, i):
        return g if not self.bounded else g * (self.rho[i] / g.norm())

    def weight_ih(self, w):
        return self._gain(self.g_ih, 0) * unit_rows(w, self.eps)

    def weight_hh(self, w):
        return self._gain(self.g_hh, 1) * unit_rows(w, self.eps)


def unit_rows(w: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """Rows scaled to unit L2 norm; an all-zero row (ternary weights can give one) stays
    zero, and its gradient is a unit-norm row's (divided by 1: a norm clamped at a tiny floor
    multiplied it by the floor's inverse, 1e12, and clipping then zeroed every other
    gradient). With ``eps``, rows divided by their norm + eps instead (Hou et al.'s code: a
    zero row's gradient is then 1/eps times its upstream one)."""
    norm = w.norm(dim=1, keepdim=True)
    if eps is not None:
        return w / (norm + eps)
    return w / torch.where(norm > 0, norm, torch.ones_like(norm))


def tanh_variance(gamma: float) -> float:
    """Var[tanh(γ z)], z ~ N(0, 1): the trapezoid rule on [-12, 12], which converges
    exponentially for this smooth, fast-decaying integrand (Gauss-Hermite does not at large γ)."""
    z = np.linspace(-12.0, 12.0, 24_001)
    pdf = np.exp(-(z**2) / 2) / math.sqrt(2 * math.pi)
    return float(np.trapezoid(np.tanh(gamma * z) ** 2 * pdf, z))


# Var[tanh(γ z)] as Laurent et al.'s code tabulates it, from sampling (penntreebank.py on their
# `norm` branch, norm_tanh_gamma): γ = 0.1, 0.8, 1.0.
TANH_VARIANCE_TABLE = {0.1: 0.0098, 0.8: 0.3141, 1.0: 0.3944}


class NormProp(CellNorm):
    """Normalized LSTM (Laurent et al. 2017): normalization propagation, no batch statistics.

    Rows of W_x and W_h are normalized and scaled by gains γ_x and γ_h; the candidate is
    ``tanh(g) / sqrt(Var[tanh(γ_g z)])``, the standard deviation of the pre-activation when
    the inputs have unit variance; ``h_t = σ(o) tanh(γ_c c_t) / sqrt(Var[tanh(γ_c z)])``.

    The project's form (the defaults): fixed scalar gains, γ_g = sqrt(γ_x² + γ_h²), variances
    by quadrature. The authors' form (``per_unit_gains``, ``sqrt2``, ``variance="table"``,
    all gains starting at ``gamma_init``): trainable gains per unit for W_x, W_h and c_t; the
    sum of the two terms and c_t divided by √2 (so c_t = (σ(f) c_{t-1} + σ(i) g)/√2); both
    variances those of γ = ``gamma_init`` from the code's table; their input and recurrent
    terms (γ z each, halved in variance by the √2) have the standard deviation γ.
    """

    def __init__(
        self,
        hidden_size,
        gates,
        max_steps=1,
        gamma_x=1.0,
        gamma_h=1.0,
        gamma_c=1.0,
        per_unit_gains=False,
        sqrt2=False,
        gamma_init=None,
        variance="quadrature",
    ):
        super().__init__(hidden_size, gates, max_steps)
        if gamma_init is not None:
            gamma_x = gamma_h = gamma_c = gamma_init
        self.gamma_x, self.gamma_h, self.gamma_c = gamma_x, gamma_h, gamma_c
        self.halve = 1 / math.sqrt(2) if sqrt2 else 1.0
        var = partial(_tanh_variance_of, variance)
        if sqrt2:  # each term γ z halved in variance: the sum's std is γ (γ_x = γ_h = γ)
            self.std_g = math.sqrt(var(math.hypot(gamma_x, gamma_h) * self.halve))
        else:
            self.std_g = math.sqrt(var(math.hypot(gamma_x, gamma_h)))
        self.std_c = math.sqrt(var(gamma_c))
        self.carry_scale = self.halve
        self.per_unit_gains = per_unit_gains
        if per_unit_gains:
            size = gates * hidden_size
            self.g_x = nn.Parameter(torch.full((size, 1), float(gamma_x)))
            self.g_h = nn.Parameter(torch.full((size, 1), float(gamma_h)))
            self.c = GainTerm(hidden_size, gamma_init=gamma_c)

    def weight_ih(self, w):
        gain = self.g_x if self.per_unit_gains else self.gamma_x
        return (gain * self.halve) * unit_rows(w)

    def weight_hh(self, w):
        gain = self.g_h if self.per_unit_gains else self.gamma_h
        return (gain * self.halve) * unit_rows(w)

    def candidate(self, g):
        return torch.tanh(g) * (self.halve / self.std_g)

    def cell_output(self, c, t, mask=None):
        scaled = self.c(c) if self.per_unit_gains else self.gamma_c * c
        return torch.tanh(scaled) / self.std_c

    def recurrence(self):
        if self.per_unit_gains:
            return Recurrence(
                cell=self.c,
                candidate_scale=self.halve / self.std_g,
                carry_scale=self.carry_scale,
                output_scale=1 / self.std_c,
            )
        return Recurrence(
            candidate_scale=self.halve / self.std_g,
            cell_scale=self.gamma_c,
            output_scale=1 / self.std_c,
            carry_scale=self.carry_scale,
        )


def _tanh_variance_of(variance: str, gamma: float) -> float:
    """Var[tanh(γ z)] by quadrature, or (``table``) as the authors tabulated it."""
    if variance == "quadrature":
        return tanh_variance(gamma)
    key = round(gamma, 6)
    if variance != "table" or key not in TANH_VARIANCE_TABLE:
        raise ValueError(
            f"normprop variance {variance!r} for γ = {gamma}: 'quadrature', or 'table' for "
            f"γ in {sorted(TANH_VARIANCE_TABLE)}"
        )
    return TANH_VARIANCE_TABLE[key]
