"""The compiled loop's side of the sequence path: whether it takes a recurrence
(:func:`loop_specs`), and the per-call setup its LSTM and GRU wrappers share."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ...methods.norms.base import Recurrence
from .. import native
from .steps import _input_steps, _project


def loop_specs(rec: Recurrence, x: torch.Tensor, cell: bool = True) -> tuple | None:
    """The terms' forms in the compiled loop (:func:`loop_form`), or None where the loop does
    not run: not on ``x``'s device or dtype (``native.loop_applies``), or no form."""
    if x.shape[0] == 0 or not native.loop_applies(x):
        return None
    return loop_form(rec, x.shape[1], cell)


def loop_form(rec: Recurrence, batch: int, cell: bool = True) -> tuple | None:
    """The hidden and (with ``cell``: the LSTM) cell terms' forms in the compiled loop at
    ``batch`` (``TermNorm.loop``; None for an absent term), or None where a term has none
    (or the LSTM's carry is scaled)."""
    if cell and rec.carry_scale != 1.0:
        return None
    terms = (rec.hidden, rec.cell if cell else None)
    specs = tuple(None if t is None else t.loop(batch) for t in terms)
    if any(t is not None and s is None for t, s in zip(terms, specs, strict=True)):
        return None
    return specs


class CompiledSteps(NamedTuple):
    """What a compiled forward keeps for its backward: the input term's saved steps and x̂
    (as :func:`_input_steps` fills them), and the hidden and cell terms' LoopTerms (None
    where a term is absent; the GRU has no cell)."""

    saved_x: list
    xhat_x: list
    hidden: native.LoopTerm | None
    cell: native.LoopTerm | None = None


def _loop_term(ws, name, term, spec, weight, bias, steps, batch, features, t0=0):
    """A term's :class:`~normrnn.compute.native.LoopTerm`: its spec and its gains, shift and the
    arrays the loop writes (x̂; the batch norms' mean and statistic, fresh tensors that the
    term keeps for its population statistics, and denominator; the row norms' mean and 1/std
    or 1/rms), or with population statistics, reads (their mean and denominator)."""
    if spec is None:
        return None
    xhat = ws(f"{name}_xhat", steps, batch, features)
    if spec.kind == "population":
        mean, den = term.population(steps, t0)
        stat = None
    elif spec.kind in native.KINDS:
        mean, stat = weight.new_empty(2, steps, features).unbind(0)
        den = ws(f"{name}_den", steps, features)
    else:
        rows = batch * spec.groups
        mean = ws(f"{name}_rows_mean", steps, rows) if spec.kind == "ln" else None
        stat, den = None, ws(f"{name}_rows_den", steps, rows)
    bias = None if bias is None else bias.contiguous()
    return native.LoopTerm(spec, weight.contiguous(), bias, xhat, mean, stat, den)


def _keep_statistics(t0, *pairs) -> None:
    """Hands each (term module, its LoopTerm) pair's batch statistics (steps from ``t0``)
    to the term."""
    for term, args in pairs:
        if args is not None and args.stat is not None:
            term.loop_statistics(args.mean, args.stat, t0)


def _xhat(args) -> list:
    """A LoopTerm's x̂ of all steps, as :func:`_term_grads` takes them."""
    return [] if args is None else [args.xhat]


def _loop_work(ws, batch, size) -> torch.Tensor:
    """The loop's scratch (``Loop.work`` in ``csrc/recurrence.cpp``): with G = 4H gates,
    3 B·G + 3 B·H + 5 G values cover either cell and direction."""
    return ws("loop_work", 12 * batch * size + 3 * batch * size + 20 * size)


def _scales(rec: Recurrence) -> tuple:
    return rec.candidate_scale, rec.cell_scale, rec.output_scale


def _loop_input(rec, ws, xp, bias, w_x, b_x, saved_x: list, xhat_x: list) -> torch.Tensor:
    """The input term of all steps for the loop: ``xp`` itself without ``rec.input``, else
    normalized as :func:`_input_steps` does (``saved_x``, ``xhat_x`` as there), with its
    gains, shift and the bias, into the workspace."""
    if rec.input is None:
        return xp.contiguous()
    steps, batch, gates = xp.shape
    _input_steps(rec, xp, saved_x, xhat_x)
    xin = ws("loop_xin", steps, batch, gates)  # (the GRU's steps have an "xin" of one step)
    parts = xin.split([part.numel() // (batch * gates) for part in xhat_x])
    for out, part in zip(parts, xhat_x, strict=True):
        part = part.view(out.shape)
        if bias is None:
            torch.mul(part, w_x, out=out)
        else:
            torch.addcmul(bias, part, w_x, out=out)
        if b_x is not None:
            out.add_(b_x)
    return xin


def _loop_begin(rec, ws, x, h0, bias, w_ih, w_x, b_x, gates: int):
    """What both cells' compiled forwards start with: the input term of all steps
    (:func:`_loop_input`), the gates' buffer ``act`` and all h_t from ``h0`` (saved for
    backward: never a workspace buffer). Returns (steps, batch, size), the input term,
    ``act``, the h_t, and the input term's saved steps and x̂."""
    xp = _project(ws, x, w_ih)
    steps, batch, width = xp.shape
    saved_x, xhat_x = [], []
    xin = _loop_input(rec, ws, xp, bias, w_x, b_x, saved_x, xhat_x)
    act = ws("act", steps, batch, width)
    hs = xp.new_empty(steps + 1, batch, width // gates)
    hs[0] = h0
    return (steps, batch, width // gates), xin, act, hs, (saved_x, xhat_x)
