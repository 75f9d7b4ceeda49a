"""The layer-wise norms, per gate block or over a term's whole vector: layer norm (Ba et al.
2016), RMSNorm and pRMSNorm (Zhang & Sennrich 2019), and their steps for the sequence path."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .base import LoopSpec, TermNorm, compiled_steps


class RowSaved(NamedTuple):
    """What an RMS step keeps for its backward: x̂, 1/rms per row, the k units the RMS is
    taken over and, with ε outside the root, the factor of its gradient's second term."""

    xhat: torch.Tensor
    rstd: torch.Tensor
    k: int
    factor: torch.Tensor | None = None


class _GroupNorm(TermNorm):
    """Normalizes each gate block with the torch function ``normalize``, then the gains."""

    normalize = None

    def __init__(self, *args, eps=1e-5, **kw):
        super().__init__(*args, **kw)
        self.eps = eps

    def forward(self, a, t0=0, mask=None):
        normalize = type(self).normalize
        return self.affine(self.per_group(a, lambda g: normalize(g, g.shape[-1:], eps=self.eps)))


class GroupLayerNorm(_GroupNorm):
    """Layer norm (Ba et al. 2016) per gate block, via ``F.layer_norm``."""

    normalize = F.layer_norm

    def step(self, a, t):
        g = self.grouped(a)
        xhat, mean, rstd = torch.native_layer_norm(g, g.shape[-1:], None, None, self.eps)
        return xhat.view(a.shape), (g, mean, rstd)

    def loop(self, batch):
        return LoopSpec("ln", self.groups, self.features // self.groups, self.eps, 0.0)

    def step_backward(self, gx, saved):
        g, mean, rstd = saved
        mask = [True, False, False]
        da = torch.ops.aten.native_layer_norm_backward(
            gx.view(g.shape), g, g.shape[-1:], mean, rstd, None, None, mask
        )[0]
        return da.view(gx.shape)


def rms_step(g: torch.Tensor, k: int, eps: float):
    """x̂ = g / sqrt(mean(g[..., :k]²) + eps) over the last dim, and its saved values (on a
    GPU with Triton, one kernel: ``triton_steps.rms_step``)."""
    kernels = compiled_steps(g)
    if kernels is not None and kernels.applies_rows(g):
        xhat, rstd = kernels.rms_step(g, k, eps)
        return xhat, RowSaved(xhat, rstd, k)
    part = g if k == g.shape[-1] else g[..., :k]
    rstd = part.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    xhat = g * rstd
    return xhat, RowSaved(xhat, rstd, k)


def rms_outside_step(g: torch.Tensor, k: int, eps: float):
    """x̂ = g / (sqrt(mean(g[..., :k]²)) + eps): ε added to the RMS (Zhang & Sennrich's torch
    code) rather than under the root; saved values as :func:`rms_step`'s, with the factor
    (rms + ε) / rms that its gradient's second term carries: 0 where the RMS is 0 (a zero
    initial state), where torch's norm takes the subgradient 0, as their code's does."""
    rms = g[..., :k].pow(2).mean(-1, keepdim=True).sqrt_()
    rstd = (rms + eps).reciprocal_()
    xhat = g * rstd
    factor = torch.where(rms > 0, eps / rms + 1, 0.0)
    return xhat, RowSaved(xhat, rstd, k, factor)


def rms_step_backward(gx: torch.Tensor, saved) -> torch.Tensor:
    """The gradient of :func:`rms_step`: (gx - 1[j<k] x̂ Σ(gx x̂) / k) / rms (times the
    saved factor of :func:`rms_outside_step` on the second term)."""
    xhat, rstd, k, factor = saved
    kernels = compiled_steps(xhat)
    if factor is None and kernels is not None and kernels.applies_rows(xhat):
        return kernels.rms_step_backward(gx, xhat, rstd, k)
    gx = gx.view(xhat.shape)
    dot = (gx * xhat).sum(-1, keepdim=True).div_(k)
    if factor is not None:
        dot.mul_(factor)
    if k == xhat.shape[-1]:
        return torch.addcmul(gx, xhat, dot, value=-1).mul_(rstd)
    da = gx * rstd
    da[..., :k].addcmul_(xhat[..., :k], dot.mul_(rstd), value=-1)
    return da


class GroupRMSNorm(_GroupNorm):
    """RMSNorm (Zhang & Sennrich 2019) per gate block: a / sqrt(mean(a²) + eps), via F.rms_norm."""

    normalize = F.rms_norm

    def step(self, a, t):
        g = self.grouped(a)
        xhat, saved = rms_step(g, g.shape[-1], self.eps)
        return xhat.view(a.shape), saved

    def loop(self, batch):
        return LoopSpec("rms", self.groups, self.features // self.groups, self.eps, 0.0)

    def step_backward(self, gx, saved):
        return rms_step_backward(gx, saved).view(gx.shape)


class PartialRMSNorm(TermNorm):
    """pRMSNorm: the RMS is estimated from the first k = int(n p) units of each block.
    ``eps_outside``: ε is added to the RMS (their torch code) instead of under the root."""

    def __init__(self, *args, p=0.0625, eps=1e-5, eps_outside=False, **kw):
        super().__init__(*args, **kw)
        if not 0 < p <= 1:
            raise ValueError(f"prms: p must be in (0, 1], got {p}")
        self.eps, self.eps_outside, self.p = eps, eps_outside, p
        self.k = max(1, int(self.features // self.groups * p))

    def forward(self, a, t0=0, mask=None):
        def normalize(g):
            part = g[..., : max(1, int(g.shape[-1] * self.p))]
            if self.eps_outside:  # (the norm's gradient at 0 is 0; sqrt's would be NaN)
                rms = torch.linalg.vector_norm(part, dim=-1, keepdim=True) / part.shape[-1] ** 0.5
                return g / (rms + self.eps)
            return g / part.pow(2).mean(-1, keepdim=True).add(self.eps).sqrt()

        return self.affine(self.per_group(a, normalize))

    def step(self, a, t):
        step = rms_outside_step if self.eps_outside else rms_step
        xhat, saved = step(self.grouped(a), self.k, self.eps)
        return xhat.view(a.shape), saved

    def loop(self, batch):
        return None if self.eps_outside else LoopSpec("rms", self.groups, self.k, self.eps, 0.0)

    def step_backward(self, gx, saved):
        return rms_step_backward(gx, saved).view(gx.shape)
