"""Normalizations for recurrent cells (docs/methods.md), selectable by name from ``NORMS``.

A norm is a :class:`CellNorm`: a module whose hooks the cell calls at fixed places.

* ``weight_ih(w)``, ``weight_hh(w)``: transform the (already quantized) weights, once per
  sequence (weight norm, normalization propagation).
* ``input_term(a, t0, mask)``: normalize ``W_x x`` for all steps at once, ``a`` is
  (T, B, gates*H).
* ``hidden_term(a, t, mask)``: normalize ``W_h h_{t-1}`` at step ``t``, ``a`` is (B, gates*H).
* ``candidate(g)``: the cell-input nonlinearity (tanh).
* ``cell_output(c, t, mask)``: ``tanh`` of (optionally normalized) ``c_t`` for ``h_t``.

``mask`` (None, or (T, B) / (B,) with 1 at real and 0 at padded positions) marks the steps of
variable-length sequences: batch statistics are taken over the real positions only.

Activation normalizations (BN, LN, RMS, ...) are one *term* module each (below), wrapped by
:class:`ActivationNorm` which puts one instance on the input term, one on the hidden term and,
optionally, one on ``c_t``. Adding a normalization means one term class and one registry line.
"""

from __future__ import annotations

import contextlib
import functools
import math
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import native, triton_steps
from .registry import Registry
from .sequence import Recurrence

NORMS = Registry("norm")


class CellNorm(nn.Module):
    """The plain cell: every hook is the identity (or tanh)."""

    bias_in_input = False  # the cell's bias joins W_x x before the input term (Zhang)
    carry_scale = 1.0  # c_t = carry_scale · σ(f) c_{t-1} + σ(i) candidate(g) (Laurent: 1/√2)

    def __init__(self, hidden_size: int, gates: int, max_steps: int = 1):
        super().__init__()
        self.hidden_size, self.gates, self.max_steps = hidden_size, gates, max_steps

    def init_weights(self, w_ih: torch.Tensor, w_hh: torch.Tensor, full=None) -> None:
        """Called once with the initial quantized weights, and as ``full`` the
        full-precision weights (W_x, W_h) they came from."""

    def weight_ih(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def weight_hh(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def input_term(self, a: torch.Tensor, t0: int = 0, mask=None) -> torch.Tensor:
        return a

    def hidden_term(self, a: torch.Tensor, t: int, mask=None) -> torch.Tensor:
        return a

    def candidate(self, g: torch.Tensor) -> torch.Tensor:
        return torch.tanh(g)

    def cell_output(self, c: torch.Tensor, t: int, mask=None) -> torch.Tensor:
        return torch.tanh(c)

    def end_sequence(self) -> None:
        """Called by the layer after its time loop (batch norms write their statistics)."""

    def recurrence(self) -> Recurrence | None:
        """The per-step hooks in the form the hand-written LSTM recurrence (``sequence.py``)
        runs, or None if it cannot (the layer then loops over the hooks)."""
        return Recurrence() if self.weight_only else None

    @property
    def weight_only(self) -> bool:
        """True if the norm only transforms the weights (its activation hooks are the plain
        cell's), so that the layer may run the fused LSTM/GRU kernel."""
        hooks = ("input_term", "hidden_term", "candidate", "cell_output", "end_sequence")
        return all(getattr(type(self), h) is getattr(CellNorm, h) for h in hooks)


NORMS.register("none", CellNorm)


# --------------------------------------------------------------------------- term modules
def initial_gains(features: int, gamma_init) -> torch.Tensor:
    """Gains γ: all ``gamma_init``, or with ``"uniform"`` drawn from U(0, 1) (torch ≤ 1.1's
    batch-norm default, which Hou et al.'s BN gains start from)."""
    if gamma_init == "uniform":
        return torch.rand(features)
    return torch.full((features,), float(gamma_init))


class TermNorm(nn.Module):
    """Normalizes a (T, B, features) block of consecutive steps starting at step ``t0``.

    Gains ``weight`` (init ``gamma_init``) and, if ``bias``, shifts (init 0) per feature.
    ``groups`` splits the features into equal blocks (the gates), or blocks of the given
    sizes, normalized separately by the layer-wise norms; batch norms are per feature and
    ignore it. ``forward(a, t0, mask)``: only the batch norms read ``mask`` (their statistics
    skip padded positions).
    """

    def __init__(self, features, groups=1, max_steps=1, gamma_init=1.0, bias=False):
        super().__init__()
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        sizes = (features // groups,) * groups if isinstance(groups, int) else tuple(groups)
        if sum(sizes) != features:
            raise ValueError(f"group sizes {sizes} do not add up to {features} features")
        self.features, self.sizes, self.max_steps = features, sizes, max_steps
        self.groups = len(sizes)
        self.weight = nn.Parameter(initial_gains(features, gamma_init))
        self.bias = nn.Parameter(torch.zeros(features)) if bias else None

    def affine(self, y: torch.Tensor) -> torch.Tensor:
        y = y * self.weight
        return y if self.bias is None else y + self.bias

    def grouped(self, a: torch.Tensor) -> torch.Tensor:
        """``a`` with its groups as a dimension (equal groups only)."""
        return a.reshape(*a.shape[:-1], self.groups, self.features // self.groups)

    def per_group(self, a: torch.Tensor, fn) -> torch.Tensor:
        """``fn`` applied to each group of ``a``'s last dimension (a view per group)."""
        if self.equal_groups:
            return fn(self.grouped(a)).reshape(a.shape)
        return torch.cat([fn(part) for part in a.split(self.sizes, -1)], -1)

    @property
    def equal_groups(self) -> bool:
        return len(set(self.sizes)) == 1

    # The hand-written recurrence's interface (no autograd): one step, (B, features), or
    # consecutive steps stacked, (C, B, features), each normalized as its own step.
    def step(self, a: torch.Tensor, t: int):
        """The normalized ``a`` (step ``t``, or steps ``t`` to ``t + C - 1``) before the gains
        (x̂) and what :meth:`step_backward` needs."""
        raise NotImplementedError

    def step_backward(self, gx: torch.Tensor, saved) -> torch.Tensor:
        """dL/da from ``gx`` = dL/dx̂ (the gains' factor already applied)."""
        raise NotImplementedError

    def loop(self, batch: int) -> tuple | None:
        """This term in the compiled recurrences (``native.loop``) at a batch of
        ``batch``: (kind, groups, k, eps, c) with kind in ``native.TERM_KINDS``; None where
        the loop has no form of it (the sequence path then steps in Python)."""
        return None

    def loop_statistics(self, mean: torch.Tensor, stat: torch.Tensor, t0: int = 0) -> None:
        """The loop's per-step statistics (T, features) of a sequence from step ``t0``,
        after it ran."""

    @property
    def has_step(self) -> bool:
        return type(self).step is not TermNorm.step and self.equal_groups

    @property
    def stepwise(self) -> bool:
        """Whether normalizing a block of steps equals normalizing each step alone (then the
        sequence path steps through the input term too); if not, the block is normalized as
        one step of all its T·B rows (``step`` on the flattened block)."""
        return True


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
        return "ln", self.groups, self.features // self.groups, self.eps, 0.0

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
    if triton_steps.applies_rows(g):
        xhat, rstd = triton_steps.rms_step(g, k, eps)
        return xhat, (xhat, rstd, k)
    part = g if k == g.shape[-1] else g[..., :k]
    rstd = part.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    xhat = g * rstd
    return xhat, (xhat, rstd, k)


def rms_outside_step(g: torch.Tensor, k: int, eps: float):
    """x̂ = g / (sqrt(mean(g[..., :k]²)) + eps): ε added to the RMS (Zhang & Sennrich's torch
    code) rather than under the root; saved values as :func:`rms_step`'s, with the factor
    (rms + ε) / rms that its gradient's second term carries: 0 where the RMS is 0 (a zero
    initial state), where torch's norm takes the subgradient 0, as their code's does."""
    rms = g[..., :k].pow(2).mean(-1, keepdim=True).sqrt_()
    rstd = (rms + eps).reciprocal_()
    xhat = g * rstd
    factor = torch.where(rms > 0, eps / rms + 1, 0.0)
    return xhat, (xhat, rstd, k, factor)


def rms_step_backward(gx: torch.Tensor, saved) -> torch.Tensor:
    """The gradient of :func:`rms_step`: (gx - 1[j<k] x̂ Σ(gx x̂) / k) / rms (times the
    saved factor of :func:`rms_outside_step` on the second term)."""
    xhat, rstd, k, *factor = saved
    if not factor and triton_steps.applies_rows(xhat):
        return triton_steps.rms_step_backward(gx, xhat, rstd, k)
    gx = gx.view(xhat.shape)
    dot = (gx * xhat).sum(-1, keepdim=True).div_(k)
    if factor:
        dot.mul_(factor[0])
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
        return "rms", self.groups, self.features // self.groups, self.eps, 0.0

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
        return None if self.eps_outside else ("rms", self.groups, self.k, self.eps, 0.0)

    def step_backward(self, gx, saved):
        return rms_step_backward(gx, saved).view(gx.shape)


class BatchNormTerm(TermNorm):
    """Batch norm (Cooijmans et al. 2016) with per-time-step statistics.

    Training normalizes with the batch statistics of each step; population statistics are an
    exponential average per step: the k-th update has weight max(``momentum``, 1/k), so the
    first batch replaces the initial values and the average has no start-up bias (with
    ``momentum = 0`` it is the exact mean over all updates, which
    :func:`estimate_population_statistics` uses). ``warm_start=False`` gives every update the
    weight ``momentum`` from the initial values on (torch's ``F.batch_norm``, which Hou et al.
    use); ``unbiased`` averages the L2 statistic as the unbiased variance (torch again);
    ``average="inverse_scale"`` averages 1/denominator instead of the statistic, from zeros
    (Hoffer et al.'s batch norms). In eval mode step ``t`` uses the population statistics of
    ``min(t, T_max - 1)`` where T_max is the number of steps seen in training (at most
    ``max_steps``). With ``shared=True`` one population average serves every step (Hou et
    al.'s "BN shared"): training still normalizes each step with its own batch statistics,
    and each step's statistics update the one average in turn. ``pooled=True`` (with
    ``shared``) also takes the training statistics over all steps of the block at once.
    Subclasses change the scale estimator (:meth:`statistic` and :meth:`denominator`).

    With a ``mask`` (variable-length sequences), the statistics of step ``t`` are taken over
    the sequences that are still running at ``t``; padded positions are normalized with them
    but do not enter them.
    """

    native = "l2"  # the compiled step of this class's own statistic (native.KINDS)

    def __init__(
        self,
        *args,
        eps=1e-5,
        momentum=0.05,
        shared=False,
        pooled=False,
        warm_start=True,
        unbiased=False,
        average="statistic",
        **kw,
    ):
        super().__init__(*args, **kw)
        if pooled and not shared:
            raise ValueError("pooled batch statistics need shared=True (one population slot)")
        if average not in ("statistic", "inverse_scale"):
            raise ValueError(f"average must be 'statistic' or 'inverse_scale', got {average!r}")
        self.eps, self.momentum, self.shared, self.pooled = eps, momentum, shared, pooled
        self.warm_start, self.unbiased, self.average = warm_start, unbiased, average
        self._pending: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self._batch = 2  # examples behind the latest statistics (for ``unbiased``)
        self.track = True  # update the population averages (see frozen_statistics)
        slots = 1 if shared else self.max_steps
        start = 0.0 if average == "inverse_scale" else 1.0
        self.register_buffer("running_mean", torch.zeros(slots, self.features))
        self.register_buffer("running_stat", torch.full((slots, self.features), start))
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("updates", torch.zeros(slots))

    def statistic(self, centered: torch.Tensor, w=None) -> torch.Tensor:
        """Per-feature statistic over dim 1 (the batch) that the population average keeps;
        ``w`` (T, B, 1) weighs the examples (the mask), None = all."""
        return batch_mean(centered.pow(2), w)

    def denominator(self, stat: torch.Tensor) -> torch.Tensor:
        return (stat + self.eps).sqrt()

    def native_constant(self, n: int) -> float:
        """The compiled step's constant c for a batch of ``n`` (``native.step``)."""
        return 1.0

    @property
    def native_kind(self) -> str | None:
        """The compiled step's estimator: ``native`` of the class that defines the
        ``statistic`` in use, so that a subclass with an estimator of its own runs torch's
        ops until it names its own; None without one."""
        return vars(_statistic_owner(type(self))).get("native")

    def forward(self, a, t0=0, mask=None, defer=False):
        """``defer``: keep this step's statistics until :meth:`flush` (the layer's time loop
        writes them all at once after the loop)."""
        x = a.reshape(1, -1, a.shape[-1]) if self.pooled else a
        if self.training:
            if mask is None and self._plain_l2:
                y, mean, stat = self._fused(x)  # L2 without a mask: torch's fused kernel
            else:
                w = None if mask is None else mask.reshape(x.shape[:2]).unsqueeze(-1).to(x.dtype)
                mean = batch_mean(x, w)
                stat = self.batch_statistic(x - mean, w, t0)
                y = None
            self._batch = x.shape[1]
            record = (mean[:, 0].detach(), stat[:, 0].detach(), t0)
            self._pending.append(record) if defer else self._update(*record)
            if y is not None:
                return y.reshape(a.shape)
            centered = x - mean
        else:
            idx = self._slots(t0, x.shape[0], x.device)
            mean, den = self.running_mean[idx, None], self.population_denominator(idx)[:, None]
            return self.affine(((x - mean) / den).reshape(a.shape))
        return self.affine((centered / self.denominator(stat)).reshape(a.shape))

    @property
    def _plain_l2(self) -> bool:
        return type(self).batch_statistic is BatchNormTerm.batch_statistic and (
            type(self).statistic is BatchNormTerm.statistic
        )

    def batch_statistic(self, centered, w, t0):
        """The training statistic of a block starting at step ``t0`` (what the forward
        divides by, through :meth:`denominator`, and what the population average keeps)."""
        return self.statistic(centered, w)

    def population_denominator(self, idx: torch.Tensor) -> torch.Tensor:
        """The population denominator of the slots ``idx`` (len(idx), features)."""
        if self.average == "inverse_scale":
            return self.running_stat[idx].reciprocal()
        return self.denominator(self.running_stat[idx])

    @property
    def has_step(self) -> bool:
        """The L2 statistic steps through torch's kernel; another estimator needs
        ``sub_denominator_grad`` from the class that defines its ``statistic``, or the
        layer loops."""
        owner = _statistic_owner(type(self))
        return owner is BatchNormTerm or "sub_denominator_grad" in vars(owner)

    @property
    def stepwise(self) -> bool:
        """In training, pooled statistics of a block are taken over all its steps at once,
        that is, over its T·B rows as one step."""
        return not (self.pooled and self.training)

    def loop(self, batch):
        """In training, batch statistics with a compiled estimator; in eval mode the
        population statistics (:meth:`population`)."""
        if not self.training:
            return "population", 1, 0, self.eps, 0.0
        self._loop_batch = batch
        kind = self.native_kind
        return None if kind is None else (kind, 1, 0, self.eps, self.native_constant(batch))

    def population(self, steps: int, t0: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The population mean and denominator (steps, features) that eval mode normalizes
        steps ``t0`` to ``t0 + steps - 1`` with."""
        idx = self._slots(t0, steps, self.running_mean.device)
        mean, den = self.running_mean[idx], self.population_denominator(idx)
        return mean.expand(steps, -1).contiguous(), den.expand(steps, -1).contiguous()

    def loop_statistics(self, mean, stat, t0=0):
        self._batch = self._loop_batch
        self._pending.append((mean, stat, t0))

    def step(self, a, t):
        rows = (-1, 1, a.shape[-1]) if a.dim() == 3 else (1, a.shape[-1])  # a row per step
        if not self.training:
            idx = self._slots(t, len(a) if a.dim() == 3 else 1, a.device)
            den = self.population_denominator(idx).view(rows)
            return (a - self.running_mean[idx].view(rows)) / den, ("population", den)
        self._batch = a.shape[-2]
        kind, steps = self.native_kind, compiled_steps(a)
        if kind is not None and steps.applies(a, kind):
            c = self.native_constant(a.shape[-2])
            xhat, mean, stat, den = steps.step(kind, a, self.eps, c)
            self._pending.append((mean, stat, t))
            return xhat, ("native", kind, xhat, den, c)
        if type(self).statistic is BatchNormTerm.statistic:  # L2
            if a.dim() == 2:  # torch's kernel
                xhat, mean, invstd = torch.native_batch_norm(
                    a, None, None, None, None, True, 0.0, self.eps
                )
                self._pending.append((mean, invstd, t, "invstd"))  # (see _rows)
                return xhat, ("l2", a, mean, invstd)
            mean = a.mean(1, keepdim=True)  # (var_mean over dim 1 is several times slower)
            xhat = a - mean
            invstd = torch.mul(xhat, xhat).mean(1, keepdim=True).add_(self.eps).rsqrt_()
            self._pending.append((mean, invstd, t, "invstd"))
            return xhat.mul_(invstd), ("l2 stack", xhat, invstd)
        x = a.view(-1, *a.shape[-2:])
        mean = x.mean(1, keepdim=True)
        xhat = x - mean  # centered, divided in place: the backward needs x̂ and den only
        stat = self.batch_statistic(xhat, None, t)
        den = self.denominator(stat)
        self._pending.append((mean, stat, t))
        return xhat.div_(den).view(a.shape), ("batch", xhat.view(a.shape), den.view(rows))

    def step_backward(self, gx, saved):
        kind, *saved = saved
        if kind == "population":
            return gx / saved[0]
        if kind == "native":
            estimator, xhat, den, c = saved
            return compiled_steps(gx).step_backward(estimator, gx, xhat, den, c)
        if kind == "l2":
            a, mean, invstd = saved
            mask = [True, False, False]
            return torch.ops.aten.native_batch_norm_backward(
                gx, a, None, None, None, mean, invstd, True, self.eps, mask
            )[0]
        if kind == "l2 stack":  # (gx - mean(gx) - x̂ mean(gx x̂)) / std, over each batch
            xhat, invstd = saved
            dot = (gx * xhat).mean(-2, keepdim=True)
            centered = gx - gx.mean(-2, keepdim=True)
            return centered.addcmul_(xhat, dot, value=-1).mul_(invstd)
        xhat, den = saved
        coef = (gx * xhat).sum(-2, keepdim=True).div_(den)  # -dL/d den
        du = self.sub_denominator_grad(gx / den, coef, xhat)
        return du.sub_(du.mean(-2, keepdim=True))  # (a fresh tensor: one allocation less)

    def sub_denominator_grad(self, du, coef, xhat):
        """``du - coef · ∂den/∂centered`` in place, for one unmasked step or a stack of them:
        ``xhat`` (B, F) or (C, B, F) is centered / den, with the signs and the order of the
        centered values in each column (den > 0), ``coef`` (1, F) or (C, 1, F); each
        feature's denominator depends on its column only."""
        raise NotImplementedError

    def _slots(self, t0, steps, device):
        if self.shared:
            return torch.zeros(1, dtype=torch.long, device=device)
        last = (self.steps_seen - 1).clamp(min=0)  # on the device: no sync, a graph replays it
        return torch.arange(t0, t0 + steps, device=device).clamp(max=last)

    def _fused(self, x):
        """L2 batch norm of a (T, B, F) block with per-step statistics in one call of
        ``torch.native_batch_norm``: the block is viewed as B examples of T·F channels. Returns
        the affine output and the (T, 1, F) batch mean and (biased) variance."""
        steps, batch, features = x.shape
        flat = x.transpose(0, 1).reshape(batch, steps * features)
        weight = self.weight.repeat(steps)
        bias = None if self.bias is None else self.bias.repeat(steps)
        y, mean, invstd = torch.native_batch_norm(
            flat, weight, bias, None, None, True, 0.0, self.eps
        )
        var = invstd.detach().pow(-2) - self.eps
        shape = (steps, 1, features)
        return y.view(batch, steps, features).transpose(0, 1), mean.view(shape), var.view(shape)

    def flush(self) -> None:
        """Write the deferred per-step statistics (consecutive steps) in one update."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        mean, stat = self._rows(pending)
        if self.shared:  # one update per record (a step, or a block as one), in turn
            self._update_shared(mean, stat)
        else:
            self._update(mean, stat, pending[0][2])

    def _rows(self, pending: list) -> tuple:
        """The records' means and statistics, a row per step. The L2 steps' records hold the
        mean and 1/std as they come (torch's kernel's are 1-D), converted here for all steps
        at once rather than in the loop: (mean, invstd, t, "invstd"); the others (mean, stat,
        t). A record holds F values per step it covers, in any shape."""
        width = self.features
        if all(len(p) == 4 for p in pending):
            invstd = torch.cat([p[1].view(-1, width) for p in pending])
            mean = torch.cat([p[0].view(-1, width) for p in pending])
            return mean, invstd.pow_(-2).sub_(self.eps)
        rows = [
            (p[0].view(-1, width), p[1].view(-1, width))
            if len(p) == 3
            else (p[0].view(-1, width), p[1].view(-1, width).pow(-2) - self.eps)
            for p in pending
        ]
        return tuple(torch.cat(r) for r in zip(*rows, strict=True))

    def _weights(self, counts: torch.Tensor) -> torch.Tensor:
        """The weight of the update that is the ``counts``-th of its slot."""
        if self.warm_start:
            return counts.reciprocal().clamp(min=self.momentum)
        return torch.full_like(counts, self.momentum)

    def _averaged(self, stat: torch.Tensor) -> torch.Tensor:
        """A statistic as the population average keeps it (see ``unbiased``, ``average``)."""
        if self.unbiased and _statistic_owner(type(self)) is BatchNormTerm:
            stat = stat * (self._batch / max(self._batch - 1, 1))
        if self.average == "inverse_scale":
            stat = self.denominator(stat).reciprocal()
        return stat

    @torch.no_grad()
    def _update(self, mean, stat, t0):
        if not self.track:
            return
        if self.shared:
            return self._update_shared(mean, stat)
        end = min(t0 + mean.shape[0], self.running_mean.shape[0])
        if end <= t0:
            return
        n = end - t0
        self.updates[t0:end] += 1
        weight = self._weights(self.updates[t0:end]).unsqueeze(1)
        # under autocast the statistics may come in a lower precision than the buffers
        stat = self._averaged(stat[:n].to(self.running_stat.dtype))
        self.running_mean[t0:end].lerp_(mean[:n].to(self.running_mean.dtype), weight)
        self.running_stat[t0:end].lerp_(stat, weight)
        self.steps_seen.clamp_(min=end)

    @torch.no_grad()
    def _update_shared(self, means, stats):
        """The shared slot updated with each row in turn (x ← x + w_k (m_k - x), w_k from
        :meth:`_weights`) in a few batched ops: x_n = x_0 Π(1 - w_k) + Σ_k w_k m_k
        Π_{j>k} (1 - w_j)."""
        if not self.track:
            return
        counts = self.updates[0] + torch.arange(1, len(means) + 1, device=means.device)
        w = self._weights(counts).to(self.running_mean.dtype)
        keep = torch.cumprod((1 - w).flip(0), 0).flip(0)  # Π_{j>=k} (1 - w_j)
        coef = (w * torch.cat([keep[1:], keep.new_ones(1)]))[:, None]
        stats = self._averaged(stats.to(self.running_stat.dtype))
        for buf, rows in ((self.running_mean, means), (self.running_stat, stats)):
            buf[0] = keep[0] * buf[0] + (coef * rows.to(buf.dtype)).sum(0)
        self.updates[0] += len(means)
        self.steps_seen.clamp_(min=1)

    def reset_population_statistics(self) -> None:
        self.running_mean.zero_()
        self.running_stat.fill_(0.0 if self.average == "inverse_scale" else 1.0)
        self.updates.zero_()
        self.steps_seen.zero_()


def compiled_steps(a: torch.Tensor):
    """The batch norms' compiled steps for ``a``'s device: Triton kernels on a GPU
    (``triton_steps``), C++ loops on the CPU (``native``); each says where it ``applies``."""
    return triton_steps if a.is_cuda else native


@functools.cache
def _statistic_owner(cls) -> type:
    """The class in ``cls``'s MRO that defines the scale estimator (``statistic``) in use:
    what goes with it (a step backward, a compiled step) must come from that class."""
    return next(c for c in cls.__mro__ if "statistic" in vars(c))


def batch_mean(v: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over dim 1 (the batch) of a (T, B, F) tensor, weighted by ``w`` (T, B, 1) if
    given; a step with no weight gives 0."""
    if w is None:
        return v.mean(1, keepdim=True)
    return (v * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)


@contextlib.contextmanager
def frozen_statistics(model: nn.Module):
    """Within: the batch norms normalize as in training (batch statistics) but leave their
    population averages as they are (validation with batch statistics)."""
    bns = [m for m in model.modules() if isinstance(m, BatchNormTerm)]
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.training]
    for m in bns:
        m.track = False
    for m in dropouts:
        m.eval()
    try:
        yield
    finally:
        for m in bns:
            m.track = True
        for m in dropouts:
            m.train()


@torch.no_grad()
def estimate_population_statistics(model: nn.Module, batches, forward) -> int:
    """Cooijmans et al.'s population statistics: the exact mean of the batch statistics over
    ``batches`` (training data, train-mode forward passes without gradients). Returns the
    number of batch-norm modules updated."""
    bns = [m for m in model.modules() if isinstance(m, BatchNormTerm)]
    if not bns:
        return 0
    saved = [(m.momentum, m.warm_start) for m in bns]
    was_training = model.training
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    for m in bns:
        m.reset_population_statistics()
        m.momentum, m.warm_start = 0.0, True
    for batch in batches:
        forward(batch)
    for m, (momentum, warm_start) in zip(bns, saved, strict=True):
        m.momentum, m.warm_start = momentum, warm_start
    model.train(was_training)
    return len(bns)


L1_CONSTANT = math.sqrt(math.pi / 2)  # σ / mean|x - μ| for a Gaussian


class L1BatchNorm(BatchNormTerm):
    """L1 batch norm (Hoffer et al. 2018): σ ≈ sqrt(π/2) mean|x - μ|."""

    native = "l1"

    def native_constant(self, n):
        return L1_CONSTANT

    def statistic(self, centered, w=None):
        return L1_CONSTANT * batch_mean(centered.abs(), w)

    def denominator(self, stat):
        return stat + self.eps

    def sub_denominator_grad(self, du, coef, xhat):
        scale = coef * (L1_CONSTANT / xhat.shape[-2])
        return du.addcmul_(xhat.sign(), scale, value=-1)


def linf_constant(n):
    """C(n) = 0.5 (1 + sqrt(π ln 4)) / sqrt(2 ln n) (Hoffer et al. 2018); ``n`` an int or a
    tensor of counts (masked statistics: fewer than 2 counts as 2)."""
    c = 0.5 * (1 + math.sqrt(math.pi * math.log(4)))
    if isinstance(n, torch.Tensor):
        return c / torch.sqrt(2 * torch.log(n.clamp_min(2)))
    if n < 2:
        raise ValueError(f"L-inf batch norm needs at least 2 elements per unit, got {n}")
    return c / math.sqrt(2 * math.log(n))


class LinfBatchNorm(L1BatchNorm):
    """L∞ (top-k) batch norm (Hoffer et al. 2018): σ ≈ C(n) · mean of the k largest |x - μ|."""

    native = "linf"  # (k = 1 only)

    def __init__(self, *args, k=1, **kw):
        super().__init__(*args, **kw)
        self.k = k

    def native_constant(self, n):
        return linf_constant(n)

    @property
    def native_kind(self):
        return super().native_kind if self.k == 1 else None

    def statistic(self, centered, w=None):
        n = centered.shape[1]
        size = centered.abs() if w is None else centered.abs() * w  # padded: 0, never on top
        if self.k == 1:  # the same number as topk's, from a plain reduction (faster, on GPU)
            top = size.amax(1, keepdim=True)
        else:
            top = size.topk(min(self.k, n), dim=1).values.mean(1, keepdim=True)
        return (linf_constant(n) if w is None else linf_constant(w.sum(1, keepdim=True))) * top

    def sub_denominator_grad(self, du, coef, xhat):
        """Only the k largest |centered| of each column enter the denominator. With k = 1,
        the rows equal to the column's maximum (ties share it, as amax's gradient does;
        argmax over the batch dimension is several times slower than the whole step);
        otherwise a scatter onto the top k rows. Read from x̂, two centered values that
        differ in their last bit may round to one: then they share it as a tie."""
        n = xhat.shape[-2]
        k = min(self.k, n)
        size = xhat.abs()
        scale = coef * (linf_constant(n) / k)
        if k == 1:  # u = ±1 exactly where |x̂| is the maximum, |u| < 1 elsewhere
            u = xhat / size.amax(-2, keepdim=True).clamp_min_(torch.finfo(size.dtype).tiny)
            hit = torch.mul(u, u).floor_()  # (float ops: bool masks and trunc are slow here)
            scale = scale / hit.sum(-2, keepdim=True).clamp_min_(1)
            return du.addcmul_(u.mul_(hit), scale, value=-1)
        where = size.topk(k, dim=-2).indices
        return du.scatter_add_(-2, where, xhat.gather(-2, where).sign_().mul_(scale).neg_())


class GhostLinfBatchNorm(LinfBatchNorm):
    """Hoffer et al.'s ghost top-k batch norm: the top-k statistic smoothed across batches.

    In training the statistic of step t is ``s_t = C(n) (β b_t + (1 - β) m_t)`` with m_t the
    batch's mean of the k largest |x - μ| (k = 10) and b_t the previous batch's s_t at that
    step (a buffer from zeros; only m_t carries a gradient), β = 0.75. The buffer holds s_t,
    C(n) included, so C(n) applies again at the next batch, as the authors' code does. Its
    step is L∞'s in torch's ops (no compiled step), the denominator's gradient scaled by
    1 - β, the fresh statistic's share.
    """

    def __init__(self, *args, k=10, smoothing=0.75, **kw):
        super().__init__(*args, k=k, **kw)
        self.smoothing = smoothing
        slots = 1 if self.shared else self.max_steps
        self.register_buffer("ghost", torch.zeros(slots, self.features))

    @property
    def native_kind(self):
        return None

    def sub_denominator_grad(self, du, coef, xhat):
        return super().sub_denominator_grad(du, coef * (1 - self.smoothing), xhat)

    def batch_statistic(self, centered, w, t0):
        n = centered.shape[1]
        c = linf_constant(n) if w is None else linf_constant(w.sum(1, keepdim=True))
        fresh = self.statistic(centered, w)  # C(n) · top-k mean
        steps, slots = centered.shape[0], self.ghost.shape[0]
        idx = torch.arange(t0, t0 + steps, device=centered.device).clamp(max=slots - 1)
        mixed = self.smoothing * c * self.ghost[idx, None] + (1 - self.smoothing) * fresh
        if self.track:
            with torch.no_grad():
                self.ghost[idx] = mixed[:, 0].to(self.ghost.dtype)
        return mixed


# --------------------------------------------------------------------------- cell norms
class ActivationNorm(CellNorm):
    """Normalizes ``W_x x`` and ``W_h h`` separately with one ``term`` module each and, when
    ``norm_cell``, ``c_t`` before the output tanh (with a shift β_c, as in Cooijmans et al.).

    ``layout``: ``per_gate`` normalizes each gate block of a term on its own (Hou et al.'s
    eight norms); ``whole`` normalizes a term's whole vector (Ba et al.'s LN-LSTM, Zhang &
    Sennrich's RMS-LSTM), or for the GRU, as Zhang's RMS-GRU does, the r, z part and the
    candidate part apart (they are two matrices in their code). ``bias`` gives the input and
    hidden terms shifts of their own (torch's LayerNorm and BatchNorm1d have them; the cell's
    bias b is kept beside them); ``cell_bias`` gives c_t's norm one (β_c; Zhang's has none).
    ``bias_in_input``: the cell adds its bias b to W_x x before
    the input term normalizes it (Zhang's cells; the LSTM adds b once more after it).
    """

    def __init__(
        self,
        term,
        hidden_size,
        gates,
        max_steps=1,
        *,
        gamma_init=1.0,
        norm_cell=False,
        layout="per_gate",
        bias=False,
        cell_bias=True,
        bias_in_input=False,
        **term_opts,
    ):
        super().__init__(hidden_size, gates, max_steps)
        size = gates * hidden_size
        groups = {"per_gate": gates, "whole": (2 * hidden_size, hidden_size) if gates == 3 else 1}
        if layout not in groups:
            raise ValueError(f"layout must be one of {sorted(groups)}, got {layout!r}")
        self.bias_in_input = bias_in_input
        make = partial(term, max_steps=max_steps, gamma_init=gamma_init, **term_opts)
        self.x = make(size, groups=groups[layout], bias=bias)
        self.h = make(size, groups=groups[layout], bias=bias)
        self.c = make(hidden_size, groups=1, bias=cell_bias) if norm_cell else None

    def input_term(self, a, t0=0, mask=None):
        return self.x(a, t0, mask)

    def hidden_term(self, a, t, mask=None):
        return self._step(self.h, a, t, mask)

    def cell_output(self, c, t, mask=None):
        return torch.tanh(c if self.c is None else self._step(self.c, c, t, mask))

    @staticmethod
    def _step(term, a, t, mask):
        mask = None if mask is None else mask.unsqueeze(0)
        if isinstance(term, BatchNormTerm):
            return term(a.unsqueeze(0), t, mask, defer=True)[0]
        return term(a.unsqueeze(0), t, mask)[0]

    def end_sequence(self):
        for term in (self.x, self.h, self.c):
            if isinstance(term, BatchNormTerm):
                term.flush()

    def recurrence(self):
        if all(term is None or term.has_step for term in (self.h, self.c)):
            return Recurrence(
                input=self.x if self.x.has_step and not self.bias_in_input else None,
                hidden=self.h,
                cell=self.c,
            )
        return None


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


class GainTerm(TermNorm):
    """No normalization, gains only (and a shift with ``bias``): ``γ ⊙ a``."""

    def forward(self, a, t0=0, mask=None):
        return self.affine(a)

    def step(self, a, t):
        return a, None

    def step_backward(self, gx, saved):
        return gx


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


def _activation(term, **defaults):
    return partial(ActivationNorm, term, **defaults)


def activation_term(name: str) -> type | None:
    """The term class of a registered activation norm (``GroupLayerNorm`` for ``ln``, ...),
    or None for the norms that are not built by :func:`_activation` (none, wn, normprop)."""
    impl = NORMS[name]
    if isinstance(impl, partial) and impl.func is ActivationNorm:
        return impl.args[0]
    return None


def norm_options(name: str) -> set[str]:
    """The options ``norm_opts[name]`` may set: the keyword arguments of the norm's class
    and, for an activation norm, of its term class and every class above it."""
    import inspect

    impl = NORMS[name]
    classes = [impl.func if isinstance(impl, partial) else impl]
    term = activation_term(name)
    if term is not None:
        classes += [c for c in term.__mro__ if issubclass(c, TermNorm)]
    fixed = {
        "self",
        "term",
        "hidden_size",
        "gates",
        "max_steps",
        "features",
        "groups",
        "args",
        "kw",
    }
    names = set()
    for cls in classes:
        names |= {
            p.name
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }
    return names - fixed


def uses_batch_norm(name: str) -> bool:
    """Whether the norm keeps batch statistics (its term subclasses BatchNormTerm)."""
    term = activation_term(name)
    return term is not None and issubclass(term, BatchNormTerm)


_BN = {"gamma_init": 0.1, "norm_cell": True}
_ZHANG = {"layout": "whole", "norm_cell": True, "cell_bias": False, "bias_in_input": True}
NORMS.register("bn", _activation(BatchNormTerm, **_BN))
NORMS.register("bn_shared", _activation(BatchNormTerm, **_BN, shared=True))
NORMS.register("bn_pooled", _activation(BatchNormTerm, **_BN, shared=True, pooled=True))
NORMS.register("ln", _activation(GroupLayerNorm))
NORMS.register("rms", _activation(GroupRMSNorm))
NORMS.register("prms", _activation(PartialRMSNorm))
NORMS.register("rms_zhang", _activation(GroupRMSNorm, **_ZHANG))
NORMS.register("prms_zhang", _activation(PartialRMSNorm, **_ZHANG, eps=1e-8, eps_outside=True))
NORMS.register("l1bn", _activation(L1BatchNorm, **_BN))
NORMS.register("linfbn", _activation(LinfBatchNorm, **_BN))
NORMS.register("linfbn_ghost", _activation(GhostLinfBatchNorm, **_BN))
NORMS.register("wn", WeightNorm)
NORMS.register("wn_bounded", partial(WeightNorm, bounded=True))
NORMS.register("normprop", NormProp)
