"""Batch norm with per-time-step statistics (Cooijmans et al. 2016) and Hou et al.'s shared
form, and what a step keeps for its backward on the sequence path; the population averages
are ``population``'s."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .base import LoopSpec, TermNorm, compiled_steps
from .population import PopulationAverage, Statistics


class Population(NamedTuple):  # eval mode: the population denominator
    den: torch.Tensor


class Compiled(NamedTuple):  # a compiled step (native or triton_steps) of estimator ``kind``
    kernels: object
    kind: str
    xhat: torch.Tensor
    den: torch.Tensor
    c: float


class L2Kernel(NamedTuple):  # one step through torch's batch-norm kernel
    a: torch.Tensor
    mean: torch.Tensor
    invstd: torch.Tensor


class L2Stack(NamedTuple):  # a stack of L2 steps in torch's ops
    xhat: torch.Tensor
    invstd: torch.Tensor


class Estimated(NamedTuple):  # another estimator in torch's ops (its sub_denominator_grad)
    xhat: torch.Tensor
    den: torch.Tensor


class BatchNormTerm(PopulationAverage, TermNorm):
    """Batch norm (Cooijmans et al. 2016) with per-time-step statistics.

    Training normalizes with the batch statistics of each step; population statistics are an
    exponential average per step: the k-th update has weight max(``momentum``, 1/k), so the
    first batch replaces the initial values and the average has no start-up bias (with
    ``momentum = 0`` it is the exact mean over all updates, which
    ``population.estimate_population_statistics`` uses). ``warm_start=False`` gives every
    update the weight ``momentum`` from the initial values on (torch's ``F.batch_norm``, which
    Hou et al. use); ``unbiased`` averages the L2 statistic as the unbiased variance (torch again);
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
    keeps_statistics = True

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
        self._pending: list[Statistics] = []
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
            record = Statistics(mean[:, 0].detach(), stat[:, 0].detach(), t0)
            self._pending.append(record) if defer else self._update(*record[:3])
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
            return LoopSpec("population", 1, 0, self.eps, 0.0)
        self._loop_batch = batch
        kind = self.native_kind
        return None if kind is None else LoopSpec(kind, 1, 0, self.eps, self.native_constant(batch))

    def loop_statistics(self, mean, stat, t0=0):
        self._batch = self._loop_batch
        self._pending.append(Statistics(mean, stat, t0))

    def step(self, a, t):
        rows = (-1, 1, a.shape[-1]) if a.dim() == 3 else (1, a.shape[-1])  # a row per step
        if not self.training:
            idx = self._slots(t, len(a) if a.dim() == 3 else 1, a.device)
            den = self.population_denominator(idx).view(rows)
            return (a - self.running_mean[idx].view(rows)) / den, Population(den)
        self._batch = a.shape[-2]
        kind, kernels = self.native_kind, compiled_steps(a)
        if kind is not None and kernels is not None and kernels.applies(a, kind):
            c = self.native_constant(a.shape[-2])
            xhat, mean, stat, den = kernels.step(kind, a, self.eps, c)
            self._pending.append(Statistics(mean, stat, t))
            return xhat, Compiled(kernels, kind, xhat, den, c)
        if type(self).statistic is BatchNormTerm.statistic:  # L2
            if a.dim() == 2:  # torch's kernel
                xhat, mean, invstd = torch.native_batch_norm(
                    a, None, None, None, None, True, 0.0, self.eps
                )
                self._pending.append(Statistics(mean, invstd, t, invstd=True))  # (see _rows)
                return xhat, L2Kernel(a, mean, invstd)
            mean = a.mean(1, keepdim=True)  # (var_mean over dim 1 is several times slower)
            xhat = a - mean
            invstd = torch.mul(xhat, xhat).mean(1, keepdim=True).add_(self.eps).rsqrt_()
            self._pending.append(Statistics(mean, invstd, t, invstd=True))
            return xhat.mul_(invstd), L2Stack(xhat, invstd)
        x = a.view(-1, *a.shape[-2:])
        mean = x.mean(1, keepdim=True)
        xhat = x - mean  # centered, divided in place: the backward needs x̂ and den only
        stat = self.batch_statistic(xhat, None, t)
        den = self.denominator(stat)
        self._pending.append(Statistics(mean, stat, t))
        return xhat.div_(den).view(a.shape), Estimated(xhat.view(a.shape), den.view(rows))

    def step_backward(self, gx, saved):
        if isinstance(saved, Population):
            return gx / saved.den
        if isinstance(saved, Compiled):
            return saved.kernels.step_backward(saved.kind, gx, saved.xhat, saved.den, saved.c)
        if isinstance(saved, L2Kernel):
            mask = [True, False, False]
            return torch.ops.aten.native_batch_norm_backward(
                gx, saved.a, None, None, None, saved.mean, saved.invstd, True, self.eps, mask
            )[0]
        if isinstance(saved, L2Stack):  # (gx - mean(gx) - x̂ mean(gx x̂)) / std, over each batch
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

    def _averaged(self, stat: torch.Tensor) -> torch.Tensor:
        """A statistic as the population average keeps it (see ``unbiased``, ``average``)."""
        if self.unbiased and _statistic_owner(type(self)) is BatchNormTerm:
            stat = stat * (self._batch / max(self._batch - 1, 1))
        if self.average == "inverse_scale":
            stat = self.denominator(stat).reciprocal()
        return stat


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
