"""What every norm is: the cell's hooks (:class:`CellNorm`), a term module (:class:`TermNorm`)
and the activation norms built of them (:class:`ActivationNorm`); and the small types a norm
hands the fast paths: :class:`Recurrence` (what a step does besides the plain cell) and
:class:`LoopSpec` (a term's form in the compiled loop).

Imports no backend: the compiled steps register themselves in :data:`KERNELS` when their
module loads (``native`` for the CPU, ``triton_steps`` for CUDA; the sequence path imports
both), and a term asks :func:`compiled_steps` for those of its tensor's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
from torch import nn

KERNELS: dict = {}  # device type ("cpu", "cuda") -> the compiled steps registered for it


def compiled_steps(a: torch.Tensor):
    """The compiled steps for ``a``'s device (C++ on the CPU, Triton on a GPU), or None where
    none registered; each says where it ``applies``."""
    return KERNELS.get(a.device.type)


class LoopSpec(NamedTuple):
    """A term's form in the compiled recurrence (``native.loop``): ``kind`` one of
    ``native.TERM_KINDS`` (a batch norm's estimator l2, l1 or linf; ln and rms per row
    group; population: a batch norm in eval mode), its ``groups``, the row norms' ``k`` (the
    first k units of a group give the RMS), ``eps`` and the estimator's constant ``c``."""

    kind: str
    groups: int
    k: int
    eps: float
    c: float


@dataclass(frozen=True)
class Recurrence:
    """What a step does besides the plain cell: ``input`` normalizes ``W_x x_t``,
    ``hidden`` normalizes ``W_h h_{t-1}`` and ``cell`` normalizes ``c_t`` (term modules,
    None = identity; ``input`` in stacks of steps, or as one step of all T·B rows where its
    ``stepwise`` is false); the cell input is ``candidate_scale · tanh(g)``, the cell
    ``c_t = carry_scale · σ(f) c_{t-1} + σ(i) · cell input`` and the output
    ``h_t = σ(o) · output_scale · tanh(cell_scale · c_t)`` (normalization propagation's
    rescaling; the compiled loop runs ``carry_scale`` 1 only). ``sequence/`` runs it."""

    input: nn.Module | None = None
    hidden: nn.Module | None = None
    cell: nn.Module | None = None
    candidate_scale: float = 1.0
    cell_scale: float = 1.0
    output_scale: float = 1.0
    carry_scale: float = 1.0
    t0: int = 0  # the first step's index (a batch norm's statistics slot)


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
        """The per-step hooks in the form the hand-written LSTM recurrence (``sequence/lstm.py``)
        runs, or None if it cannot (the layer then loops over the hooks)."""
        return Recurrence() if self.weight_only else None

    @property
    def weight_only(self) -> bool:
        """True if the norm only transforms the weights (its activation hooks are the plain
        cell's), so that the layer may run the fused LSTM/GRU kernel."""
        hooks = ("input_term", "hidden_term", "candidate", "cell_output", "end_sequence")
        return all(getattr(type(self), h) is getattr(CellNorm, h) for h in hooks)


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

    def loop(self, batch: int) -> LoopSpec | None:
        """This term in the compiled recurrences (``native.loop``) at a batch of
        ``batch``; None where the loop has no form of it (the sequence path then steps in
        Python)."""
        return None

    def loop_statistics(self, mean: torch.Tensor, stat: torch.Tensor, t0: int = 0) -> None:
        """The loop's per-step statistics (T, features) of a sequence from step ``t0``,
        after it ran."""

    keeps_statistics = False  # batch norms: a step's statistics wait for flush()

    def flush(self) -> None:
        """Write what the time loop deferred (the batch norms' statistics)."""

    @property
    def has_step(self) -> bool:
        return type(self).step is not TermNorm.step and self.equal_groups

    @property
    def stepwise(self) -> bool:
        """Whether normalizing a block of steps equals normalizing each step alone (then the
        sequence path steps through the input term too); if not, the block is normalized as
        one step of all its T·B rows (``step`` on the flattened block)."""
        return True


class GainTerm(TermNorm):
    """No normalization, gains only (and a shift with ``bias``): ``γ ⊙ a``."""

    def forward(self, a, t0=0, mask=None):
        return self.affine(a)

    def step(self, a, t):
        return a, None

    def step_backward(self, gx, saved):
        return gx


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
        if term.keeps_statistics:
            return term(a.unsqueeze(0), t, mask, defer=True)[0]
        return term(a.unsqueeze(0), t, mask)[0]

    def end_sequence(self):
        for term in (self.x, self.h, self.c):
            if term is not None:
                term.flush()

    def recurrence(self):
        if all(term is None or term.has_step for term in (self.h, self.c)):
            return Recurrence(
                input=self.x if self.x.has_step and not self.bias_in_input else None,
                hidden=self.h,
                cell=self.c,
            )
        return None
