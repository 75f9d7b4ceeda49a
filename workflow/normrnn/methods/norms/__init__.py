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

Activation normalizations (BN, LN, RMS, ...) are one *term* module each, wrapped by
:class:`ActivationNorm` which puts one instance on the input term, one on the hidden term and,
optionally, one on ``c_t``. The modules by family: ``base`` (the hooks, the term module, the
types the fast paths read), ``layerwise`` (LN, RMS, pRMS), ``batch`` (BN), ``population``
(BN's population statistics), ``lp_batch`` (L1, L∞ and ghost batch norm), ``weight`` (WN,
normalization propagation).
"""

from __future__ import annotations

import inspect
from functools import partial

from ...registry import Registry
from .base import (
    KERNELS,
    ActivationNorm,
    CellNorm,
    GainTerm,
    LoopSpec,
    Recurrence,
    TermNorm,
    compiled_steps,
    initial_gains,
)
from .batch import BatchNormTerm, batch_mean
from .layerwise import (
    GroupLayerNorm,
    GroupRMSNorm,
    PartialRMSNorm,
    rms_outside_step,
    rms_step,
    rms_step_backward,
)
from .lp_batch import L1_CONSTANT, GhostLinfBatchNorm, L1BatchNorm, LinfBatchNorm, linf_constant
from .population import estimate_population_statistics, frozen_statistics
from .weight import TANH_VARIANCE_TABLE, NormProp, WeightNorm, tanh_variance, unit_rows

__all__ = [
    "KERNELS",
    "L1_CONSTANT",
    "NORMS",
    "TANH_VARIANCE_TABLE",
    "ActivationNorm",
    "BatchNormTerm",
    "CellNorm",
    "GainTerm",
    "GhostLinfBatchNorm",
    "GroupLayerNorm",
    "GroupRMSNorm",
    "L1BatchNorm",
    "LinfBatchNorm",
    "LoopSpec",
    "NormProp",
    "PartialRMSNorm",
    "Recurrence",
    "TermNorm",
    "WeightNorm",
    "activation_term",
    "batch_mean",
    "compiled_steps",
    "estimate_population_statistics",
    "frozen_statistics",
    "initial_gains",
    "linf_constant",
    "norm_options",
    "rms_outside_step",
    "rms_step",
    "rms_step_backward",
    "tanh_variance",
    "unit_rows",
    "uses_batch_norm",
]

NORMS = Registry("norm")
NORMS.register("none", CellNorm)


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
