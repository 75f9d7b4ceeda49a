"""Weight quantizers (Hou et al. 2019; docs/methods.md) with a straight-through estimator.

``QUANTIZERS[name](w, d=None)`` returns the quantized tensor; its gradient with respect to
``w`` is the identity (straight-through). ``d`` is the diagonal preconditioner that the
loss-aware quantizers use (``sqrt(v) + 1e-8`` with ``v`` Adam's second moment); ``None`` means
all ones. Each call quantizes the tensor as one block; cells call it once per gate block.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..registry import Registry

QUANTIZERS = Registry("quantizer")


@dataclass(frozen=True)
class Quantizer:
    """A registered weight quantizer.

    ``bits`` is the storage cost per weight, ``scales`` the number of float32 scaling factors
    per block, ``uses_preconditioner`` whether ``d`` changes the result.
    """

    name: str
    forward: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    bits: int
    scales: int = 0
    uses_preconditioner: bool = False

    def __call__(self, w: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
        if self.name == "fp":
            return w
        with torch.no_grad():
            q = self.forward(w.detach(), None if d is None else d.detach())
        # q + (w - w) is exactly q in the forward pass and the identity in the backward pass.
        return q + (w - w.detach())

    def storage_bits(self, numel: int, blocks: int) -> int:
        return self.bits * numel + 32 * self.scales * blocks


def quantizer(name: str, bits: int, scales: int = 0, uses_preconditioner: bool = False):
    def deco(fn):
        QUANTIZERS.register(name, Quantizer(name, fn, bits, scales, uses_preconditioner))
        return fn

    return deco


def _sign(w: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1, so that binary weights stay in {-1, +1}."""
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)


def _ternary(w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return (w > delta).to(w.dtype) - (w < -delta).to(w.dtype)


def _delta(w: torch.Tensor) -> torch.Tensor:
    return 0.7 * w.abs().mean()


@quantizer("fp", bits=32)
def full_precision(w, d):
    return w


@quantizer("bc", bits=1)
def binary_connect(w, d):
    return _sign(w)


@quantizer("bwn", bits=1, scales=1)
def binary_weight_network(w, d):
    return w.abs().mean() * _sign(w)


@quantizer("lab", bits=1, scales=1, uses_preconditioner=True)
def loss_aware_binarization(w, d):
    d = torch.ones_like(w) if d is None else d
    alpha = (d * w).abs().sum() / d.abs().sum()
    return alpha * _sign(w)


@quantizer("tc", bits=2)
def ter_connect(w, d):
    return _ternary(w, _delta(w))


@quantizer("twn", bits=2, scales=1)
def ternary_weight_network(w, d):
    delta = _delta(w)
    mask = w.abs() > delta
    alpha = w.abs()[mask].mean() if mask.any() else w.new_zeros(())
    return alpha * _ternary(w, delta)


@quantizer("lat", bits=2, scales=1, uses_preconditioner=True)
def loss_aware_ternarization(w, d, tol: float = 1e-6, max_iter: int = 100):
    d = torch.ones_like(w) if d is None else d
    b = _sign(w)
    alpha = w.new_zeros(())
    for _ in range(max_iter):
        denom = (b * d).abs().sum()
        new_alpha = (b * d * w).abs().sum() / denom if denom > 0 else w.new_zeros(())
        b = _ternary(w, new_alpha / 2)
        done = (new_alpha - alpha).abs() < tol
        alpha = new_alpha
        if done:
            break
    return alpha * b


def alternating(w: torch.Tensor, bits: int, iters: int = 3) -> torch.Tensor:
    """Alternating multi-bit quantization (Xu et al. 2018): w ≈ Σ_i α_i b_i, b_i ∈ {±1}.

    Greedy initialisation, then alternate least-squares α given the codes and the nearest of
    the 2^bits levels given α.
    """
    flat = w.reshape(-1, 1).double()
    residual, alphas, codes = flat[:, 0].clone(), [], []
    for _ in range(bits):
        b = _sign(residual)
        a = residual.abs().mean()
        alphas.append(a)
        codes.append(b)
        residual = residual - a * b
    alpha = torch.stack(alphas)
    B = torch.stack(codes, 1)
    signs = list(itertools.product([-1.0, 1.0], repeat=bits))
    combos = torch.tensor(signs, dtype=flat.dtype, device=flat.device)
    for _ in range(iters):
        # least squares through the bits × bits normal equations: the pseudo-inverse gives the
        # same minimum-norm answer on every device (CUDA's lstsq assumes full rank)
        alpha = (torch.linalg.pinv(B.t() @ B) @ (B.t() @ flat))[:, 0]
        levels = combos @ alpha
        B = combos[(flat - levels[None, :]).abs().argmin(1)]
    return (B @ alpha).to(w.dtype).reshape(w.shape)


@quantizer("alt2", bits=2, scales=2)
def alternating_2bit(w, d):
    return alternating(w, 2)


@quantizer("alt3", bits=3, scales=3)
def alternating_3bit(w, d):
    return alternating(w, 3)


@quantizer("bf16", bits=16)
def bfloat16(w, d):
    return w.to(torch.bfloat16).to(w.dtype)


@quantizer("fp16", bits=16)
def float16(w, d):
    return w.to(torch.float16).to(w.dtype)


def quantize_blocks(
    q: Quantizer, w: torch.Tensor, blocks: int, d: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize each of ``blocks`` equal row blocks (gate blocks) of ``w`` separately."""
    if q.name == "fp":
        return w
    ds = [None] * blocks if d is None else d.chunk(blocks, 0)
    return torch.cat([q(wb, db) for wb, db in zip(w.chunk(blocks, 0), ds, strict=True)], 0)
