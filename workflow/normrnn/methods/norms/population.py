"""A batch norm's population statistics (Cooijmans et al. 2016): per-step (or with
``shared``, one) exponential averages of the batch statistics that eval mode normalizes with,
the deferred updates a sequence's steps leave, and the two ways the pipeline drives them
(:func:`frozen_statistics`, :func:`estimate_population_statistics`)."""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import nn


class Statistics(NamedTuple):
    """A step's (or block's) batch statistics, waiting for the population update: the mean
    and the statistic, or with ``invstd`` 1/std as torch's L2 kernel gives it."""

    mean: torch.Tensor
    stat: torch.Tensor
    t0: int
    invstd: bool = False


class PopulationAverage:
    """The population-average half of :class:`~normrnn.methods.norms.batch.BatchNormTerm`:
    the slots eval mode reads and their updates. The host module holds the buffers
    ``running_mean``, ``running_stat`` (slots, features), ``updates`` (slots) and
    ``steps_seen``, the settings ``shared``, ``momentum``, ``warm_start``, ``average``,
    ``track``, ``eps``, ``features``, the records ``_pending``, and the estimator's
    ``denominator`` and ``_averaged`` (the statistic as the average keeps it)."""

    def population_denominator(self, idx: torch.Tensor) -> torch.Tensor:
        """The population denominator of the slots ``idx`` (len(idx), features)."""
        if self.average == "inverse_scale":
            return self.running_stat[idx].reciprocal()
        return self.denominator(self.running_stat[idx])

    def population(self, steps: int, t0: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The population mean and denominator (steps, features) that eval mode normalizes
        steps ``t0`` to ``t0 + steps - 1`` with."""
        idx = self._slots(t0, steps, self.running_mean.device)
        mean, den = self.running_mean[idx], self.population_denominator(idx)
        return mean.expand(steps, -1).contiguous(), den.expand(steps, -1).contiguous()

    def _slots(self, t0, steps, device):
        if self.shared:
            return torch.zeros(1, dtype=torch.long, device=device)
        last = (self.steps_seen - 1).clamp(min=0)  # on the device: no sync, a graph replays it
        return torch.arange(t0, t0 + steps, device=device).clamp(max=last)

    def flush(self) -> None:
        """Write the deferred per-step statistics (consecutive steps) in one update."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        mean, stat = self._rows(pending)
        if self.shared:  # one update per record (a step, or a block as one), in turn
            self._update_shared(mean, stat)
        else:
            self._update(mean, stat, pending[0].t0)

    def _rows(self, pending: list) -> tuple:
        """The records' means and statistics, a row per step. The L2 steps' records hold the
        mean and 1/std as they come (torch's kernel's are 1-D: ``invstd``), converted here
        for all steps at once rather than in the loop. A record holds F values per step it
        covers, in any shape."""
        width = self.features
        if all(p.invstd for p in pending):
            invstd = torch.cat([p.stat.view(-1, width) for p in pending])
            mean = torch.cat([p.mean.view(-1, width) for p in pending])
            return mean, invstd.pow_(-2).sub_(self.eps)
        rows = [
            (p.mean.view(-1, width), p.stat.view(-1, width))
            if not p.invstd
            else (p.mean.view(-1, width), p.stat.view(-1, width).pow(-2) - self.eps)
            for p in pending
        ]
        return tuple(torch.cat(r) for r in zip(*rows, strict=True))

    def _weights(self, counts: torch.Tensor) -> torch.Tensor:
        """The weight of the update that is the ``counts``-th of its slot."""
        if self.warm_start:
            return counts.reciprocal().clamp(min=self.momentum)
        return torch.full_like(counts, self.momentum)

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


@contextlib.contextmanager
def frozen_statistics(model: nn.Module):
    """Within: the batch norms normalize as in training (batch statistics) but leave their
    population averages as they are (validation with batch statistics)."""
    bns = [m for m in model.modules() if isinstance(m, PopulationAverage)]
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
    bns = [m for m in model.modules() if isinstance(m, PopulationAverage)]
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
