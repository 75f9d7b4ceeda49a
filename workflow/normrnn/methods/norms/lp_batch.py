"""L1 and L∞ batch norm and the ghost top-k batch norm (Hoffer et al. 2018): batch norms
whose scale is estimated from absolute deviations."""

from __future__ import annotations

import math

import torch

from .batch import BatchNormTerm, batch_mean

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
