"""Normalizations for recurrent cells (SPEC §1), selectable by name from ``NORMS``.

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

    def __init__(self, hidden_size: int, gates: int, max_steps: int = 1):
        super().__init__()
        self.hidden_size, self.gates, self.max_steps = hidden_size, gates, max_steps

    def init_weights(self, w_ih: torch.Tensor, w_hh: torch.Tensor) -> None:
        """Called once with the initial effective (quantized) weights."""

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
class TermNorm(nn.Module):
    """Normalizes a (T, B, features) block of consecutive steps starting at step ``t0``.

    Gains ``weight`` (init ``gamma_init``) and, if ``bias``, shifts (init 0) per feature.
    ``groups`` splits the features into equal blocks (the gates) normalized separately by the
    layer-wise norms; batch norms are per feature and ignore it. ``forward(a, t0, mask)``:
    only the batch norms read ``mask`` (their statistics skip padded positions).
    """

    def __init__(self, features, groups=1, max_steps=1, gamma_init=1.0, bias=False):
        super().__init__()
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.features, self.groups, self.max_steps = features, groups, max_steps
        self.weight = nn.Parameter(torch.full((features,), float(gamma_init)))
        self.bias = nn.Parameter(torch.zeros(features)) if bias else None

    def affine(self, y: torch.Tensor) -> torch.Tensor:
        y = y * self.weight
        return y if self.bias is None else y + self.bias

    def grouped(self, a: torch.Tensor) -> torch.Tensor:
        return a.reshape(*a.shape[:-1], self.groups, self.features // self.groups)

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

    def loop_statistics(self, mean: torch.Tensor, stat: torch.Tensor) -> None:
        """The loop's per-step statistics (T, features) of a sequence, after it ran."""

    @property
    def has_step(self) -> bool:
        return type(self).step is not TermNorm.step

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
        g = self.grouped(a)
        return self.affine(type(self).normalize(g, g.shape[-1:], eps=self.eps).reshape(a.shape))


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


def rms_step_backward(gx: torch.Tensor, saved) -> torch.Tensor:
    """The gradient of :func:`rms_step`: (gx - 1[j<k] x̂ Σ(gx x̂) / k) / rms."""
    xhat, rstd, k = saved
    if triton_steps.applies_rows(xhat):
        return triton_steps.rms_step_backward(gx, xhat, rstd, k)
    gx = gx.view(xhat.shape)
    dot = (gx * xhat).sum(-1, keepdim=True).div_(k)
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
    """pRMSNorm: the RMS is estimated from the first k = int(n p) units of each block."""

    def __init__(self, *args, p=0.0625, eps=1e-5, **kw):
        super().__init__(*args, **kw)
        if not 0 < p <= 1:
            raise ValueError(f"prms: p must be in (0, 1], got {p}")
        self.eps = eps
        self.k = max(1, int(self.features // self.groups * p))

    def forward(self, a, t0=0, mask=None):
        g = self.grouped(a)
        rms = g[..., : self.k].pow(2).mean(-1, keepdim=True).add(self.eps).sqrt()
        return self.affine((g / rms).reshape(a.shape))

    def step(self, a, t):
        xhat, saved = rms_step(self.grouped(a), self.k, self.eps)
        return xhat.view(a.shape), saved

    def loop(self, batch):
        return "rms", self.groups, self.k, self.eps, 0.0

    def step_backward(self, gx, saved):
        return rms_step_backward(gx, saved).view(gx.shape)


class BatchNormTerm(TermNorm):
    """Batch norm (Cooijmans et al. 2016) with per-time-step statistics.

    Training normalizes with the batch statistics of each step; population statistics are an
    exponential average per step: the k-th update has weight max(``momentum``, 1/k), so the
    first batch replaces the initial values and the average has no start-up bias (with
    ``momentum = 0`` it is the exact mean over all updates, which
    :func:`estimate_population_statistics` uses). In eval mode step ``t`` uses
    the population statistics of ``min(t, T_max - 1)`` where T_max is the number of steps seen
    in training (at most ``max_steps``). With ``shared=True`` one set of statistics serves
    every step: batch statistics over all steps of the block, one population average.
    Subclasses change the scale estimator (:meth:`statistic` and :meth:`denominator`).

    With a ``mask`` (variable-length sequences), the statistics of step ``t`` are taken over
    the sequences that are still running at ``t``; padded positions are normalized with them
    but do not enter them.
    """

    native = "l2"  # the compiled step of this class's own statistic (native.KINDS)

    def __init__(self, *args, eps=1e-5, momentum=0.05, shared=False, **kw):
        super().__init__(*args, **kw)
        self.eps, self.momentum, self.shared = eps, momentum, shared
        self._pending: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        slots = 1 if shared else self.max_steps
        self.register_buffer("running_mean", torch.zeros(slots, self.features))
        self.register_buffer("running_stat", torch.ones(slots, self.features))
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
        x = a.reshape(1, -1, a.shape[-1]) if self.shared else a
        if self.training:
            if mask is None and type(self).statistic is BatchNormTerm.statistic:
                y, mean, stat = self._fused(x)  # L2 without a mask: torch's fused kernel
            else:
                w = None if mask is None else mask.reshape(x.shape[:2]).unsqueeze(-1).to(x.dtype)
                mean = batch_mean(x, w)
                stat = self.statistic(x - mean, w)
                y = None
            record = (mean[:, 0].detach(), stat[:, 0].detach(), t0)
            self._pending.append(record) if defer else self._update(*record)
            if y is not None:
                return y.reshape(a.shape)
            centered = x - mean
        else:
            idx = self._slots(t0, x.shape[0], x.device)
            mean, stat = self.running_mean[idx, None], self.running_stat[idx, None]
            centered = x - mean
        return self.affine((centered / self.denominator(stat)).reshape(a.shape))

    @property
    def has_step(self) -> bool:
        """The L2 statistic steps through torch's kernel; another estimator needs
        ``sub_denominator_grad`` from the class that defines its ``statistic``, or the
        layer loops."""
        owner = _statistic_owner(type(self))
        return owner is BatchNormTerm or "sub_denominator_grad" in vars(owner)

    @property
    def stepwise(self) -> bool:
        """In training, shared statistics of a block are taken over all its steps at once,
        that is, over its T·B rows as one step."""
        return not (self.shared and self.training)

    def loop(self, batch):
        """In training, batch statistics with a compiled estimator; in eval mode the
        population statistics (:meth:`population`)."""
        if not self.training:
            return "population", 1, 0, self.eps, 0.0
        kind = self.native_kind
        return None if kind is None else (kind, 1, 0, self.eps, self.native_constant(batch))

    def population(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The population mean and denominator (steps, features) that eval mode normalizes
        steps 0 to ``steps - 1`` with."""
        idx = self._slots(0, steps, self.running_mean.device)
        mean, den = self.running_mean[idx], self.denominator(self.running_stat[idx])
        return mean.expand(steps, -1).contiguous(), den.expand(steps, -1).contiguous()

    def loop_statistics(self, mean, stat):
        self._pending.append((mean, stat, 0))

    def step(self, a, t):
        rows = (-1, 1, a.shape[-1]) if a.dim() == 3 else (1, a.shape[-1])  # a row per step
        if not self.training:
            idx = self._slots(t, len(a) if a.dim() == 3 else 1, a.device)
            den = self.denominator(self.running_stat[idx]).view(rows)
            return (a - self.running_mean[idx].view(rows)) / den, ("population", den)
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
        stat = self.statistic(xhat)
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

    @torch.no_grad()
    def _update(self, mean, stat, t0):
        if self.shared:
            return self._update_shared(mean.mean(0, keepdim=True), stat.mean(0, keepdim=True))
        end = min(t0 + mean.shape[0], self.running_mean.shape[0])
        if end <= t0:
            return
        n = end - t0
        self.updates[t0:end] += 1
        weight = self.updates[t0:end].reciprocal().clamp(min=self.momentum).unsqueeze(1)
        # under autocast the statistics may come in a lower precision than the buffers
        self.running_mean[t0:end].lerp_(mean[:n].to(self.running_mean.dtype), weight)
        self.running_stat[t0:end].lerp_(stat[:n].to(self.running_stat.dtype), weight)
        self.steps_seen.clamp_(min=end)

    @torch.no_grad()
    def _update_shared(self, means, stats):
        """The shared slot updated with each row in turn (x ← x + w_k (m_k - x), w_k =
        max(1/count, momentum)) in a few batched ops: x_n = x_0 Π(1 - w_k) + Σ_k w_k m_k
        Π_{j>k} (1 - w_j)."""
        counts = self.updates[0] + torch.arange(1, len(means) + 1, device=means.device)
        w = counts.reciprocal().clamp(min=self.momentum).to(self.running_mean.dtype)
        keep = torch.cumprod((1 - w).flip(0), 0).flip(0)  # Π_{j>=k} (1 - w_j)
        coef = (w * torch.cat([keep[1:], keep.new_ones(1)]))[:, None]
        for buf, rows in ((self.running_mean, means), (self.running_stat, stats)):
            buf[0] = keep[0] * buf[0] + (coef * rows.to(buf.dtype)).sum(0)
        self.updates[0] += len(means)
        self.steps_seen.clamp_(min=1)

    def reset_population_statistics(self) -> None:
        self.running_mean.zero_()
        self.running_stat.fill_(1.0)
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


@torch.no_grad()
def estimate_population_statistics(model: nn.Module, batches, forward) -> int:
    """Cooijmans et al.'s population statistics: the exact mean of the batch statistics over
    ``batches`` (training data, train-mode forward passes without gradients). Returns the
    number of batch-norm modules updated."""
    bns = [m for m in model.modules() if isinstance(m, BatchNormTerm)]
    if not bns:
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    was_training = model.training
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    for m in bns:
        m.reset_population_statistics()
        m.momentum = 0.0
    for batch in batches:
        forward(batch)
    for m, (momentum, _) in zip(bns, saved, strict=True):
        m.momentum = momentum
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


# --------------------------------------------------------------------------- cell norms
class ActivationNorm(CellNorm):
    """Normalizes ``W_x x`` and ``W_h h`` separately with one ``term`` module each and, when
    ``norm_cell``, ``c_t`` before the output tanh (with a shift β_c, as in Cooijmans et al.)."""

    def __init__(
        self,
        term,
        hidden_size,
        gates,
        max_steps=1,
        *,
        gamma_init=1.0,
        norm_cell=False,
        **term_opts,
    ):
        super().__init__(hidden_size, gates, max_steps)
        size = gates * hidden_size
        make = partial(term, max_steps=max_steps, gamma_init=gamma_init, **term_opts)
        self.x = make(size, groups=gates)
        self.h = make(size, groups=gates)
        self.c = make(hidden_size, groups=1, bias=True) if norm_cell else None

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
                input=self.x if self.x.has_step else None,
                hidden=self.h,
                cell=self.c,
            )
        return None


class WeightNorm(CellNorm):
    """Weight norm (Salimans & Kingma 2016) per output row of W_x and W_h: g_j v_j / ||v_j||.

    The gains start at the row norms of the initial (quantized) weights, so the initial cell
    equals the unnormalized one. ``fixed_scale`` freezes them (Hoffer et al.'s bounded WN).
    """

    def __init__(self, hidden_size, gates, max_steps=1, fixed_scale=False):
        super().__init__(hidden_size, gates, max_steps)
        self.fixed_scale = fixed_scale
        size = gates * hidden_size
        self.g_ih = nn.Parameter(torch.ones(size, 1), requires_grad=not fixed_scale)
        self.g_hh = nn.Parameter(torch.ones(size, 1), requires_grad=not fixed_scale)

    @torch.no_grad()
    def init_weights(self, w_ih, w_hh):
        self.g_ih.copy_(w_ih.norm(dim=1, keepdim=True))
        self.g_hh.copy_(w_hh.norm(dim=1, keepdim=True))

    def weight_ih(self, w):
        return self.g_ih * unit_rows(w)

    def weight_hh(self, w):
        return self.g_hh * unit_rows(w)


def unit_rows(w: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit L2 norm; an all-zero row (ternary weights can give one) stays zero."""
    return w / w.norm(dim=1, keepdim=True).clamp_min(eps)


def tanh_variance(gamma: float) -> float:
    """Var[tanh(γ z)], z ~ N(0, 1): the trapezoid rule on [-12, 12], which converges
    exponentially for this smooth, fast-decaying integrand (Gauss-Hermite does not at large γ)."""
    z = np.linspace(-12.0, 12.0, 24_001)
    pdf = np.exp(-(z**2) / 2) / math.sqrt(2 * math.pi)
    return float(np.trapezoid(np.tanh(gamma * z) ** 2 * pdf, z))


class NormProp(CellNorm):
    """Normalized LSTM (Laurent et al. 2017): normalization propagation, no batch statistics.

    Rows of W_x and W_h are normalized and scaled by fixed gains γ_x and γ_h; the candidate is
    ``tanh(g) / sqrt(Var[tanh(γ_g z)])`` with γ_g = sqrt(γ_x² + γ_h²), the standard deviation
    of the pre-activation when the inputs have unit variance; ``h_t = σ(o) tanh(γ_c c_t) /
    sqrt(Var[tanh(γ_c z)])``. The variances are computed by quadrature.
    """

    def __init__(self, hidden_size, gates, max_steps=1, gamma_x=1.0, gamma_h=1.0, gamma_c=1.0):
        super().__init__(hidden_size, gates, max_steps)
        self.gamma_x, self.gamma_h, self.gamma_c = gamma_x, gamma_h, gamma_c
        self.std_g = math.sqrt(tanh_variance(math.hypot(gamma_x, gamma_h)))
        self.std_c = math.sqrt(tanh_variance(gamma_c))

    def weight_ih(self, w):
        return self.gamma_x * unit_rows(w)

    def weight_hh(self, w):
        return self.gamma_h * unit_rows(w)

    def candidate(self, g):
        return torch.tanh(g) / self.std_g

    def cell_output(self, c, t, mask=None):
        return torch.tanh(self.gamma_c * c) / self.std_c

    def recurrence(self):
        return Recurrence(
            candidate_scale=1 / self.std_g, cell_scale=self.gamma_c, output_scale=1 / self.std_c
        )


def _activation(term, **defaults):
    return partial(ActivationNorm, term, **defaults)


def activation_term(name: str) -> type | None:
    """The term class of a registered activation norm (``GroupLayerNorm`` for ``ln``, ...),
    or None for the norms that are not built by :func:`_activation` (none, wn, normprop)."""
    impl = NORMS[name]
    if isinstance(impl, partial) and impl.func is ActivationNorm:
        return impl.args[0]
    return None


def uses_batch_norm(name: str) -> bool:
    """Whether the norm keeps batch statistics (its term subclasses BatchNormTerm)."""
    term = activation_term(name)
    return term is not None and issubclass(term, BatchNormTerm)


NORMS.register("bn", _activation(BatchNormTerm, gamma_init=0.1, norm_cell=True))
NORMS.register("bn_shared", _activation(BatchNormTerm, gamma_init=0.1, norm_cell=True, shared=True))
NORMS.register("ln", _activation(GroupLayerNorm))
NORMS.register("rms", _activation(GroupRMSNorm))
NORMS.register("prms", _activation(PartialRMSNorm))
NORMS.register("l1bn", _activation(L1BatchNorm, gamma_init=0.1, norm_cell=True))
NORMS.register("linfbn", _activation(LinfBatchNorm, gamma_init=0.1, norm_cell=True))
NORMS.register("wn", WeightNorm)
NORMS.register("normprop", NormProp)
