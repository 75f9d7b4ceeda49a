"""What the LSTM and GRU sequence Functions share: the terms' parameters and steps, the input
term in stacks of steps, the weight and term gradients, and the Functions' forward and
backward around a body on a workspace (through a CUDA graph where one applies)."""

from __future__ import annotations

from functools import partial

import torch

from ...methods.norms.base import Recurrence
from .. import graphs
from . import workspace
from .workspace import Workspace

# Elements of the input term per call of its step (see _parts): 16 steps at B=64, H=100.
STACK = 16 * 64 * 400


def _params(term) -> tuple:
    """A term's gains and shift, the tensors autograd must see as the Function's inputs."""
    return (None, None) if term is None else (term.weight, term.bias)


def _input_params(rec: Recurrence, bias, w_ih) -> tuple:
    """The bias, the input weights and the input term's gains and shift: none of them
    without ``rec.input`` (then ``x`` is the whole input term, bias included)."""
    if (rec.input is None) != (w_ih is None) or (rec.input is None and bias is not None):
        raise ValueError(
            "the input weights and a separate bias go with an input term (rec.input), "
            "and only with one"
        )
    return (None, None, None, None) if w_ih is None else (bias, w_ih, *_params(rec.input))


def _project(ws, x, w_ih) -> torch.Tensor:
    """W_x x for all steps, into the workspace (without an input term, ``x`` is that)."""
    if w_ih is None:
        return x
    steps, batch, _ = x.shape
    out = ws("xp", steps * batch, w_ih.shape[0])
    return torch.mm(x.reshape(steps * batch, -1), w_ih.t(), out=out).view(steps, batch, -1)


def _term_step(term, a, t, saved: list, xhat: list) -> torch.Tensor:
    """``term``'s x̂ of ``a`` at step ``t``; appends it to ``xhat`` (for the gains' gradient)
    and what its backward needs to ``saved``."""
    xx, s = term.step(a, t)
    saved.append(s)
    xhat.append(xx)
    return xx


def _input_steps(rec, xp, saved: list, xhat: list) -> list:
    """The steps of the projected input, normalized (x̂) by ``rec.input``, a part per call
    of its step (:func:`_parts`; see :func:`_term_step` for ``saved`` and ``xhat``). The x̂
    of each part, in ``xhat``, tells the backward the parts."""
    if rec.input is None:
        return list(xp.unbind(0))
    steps = []
    for part in _parts(rec.input, xp):
        xx = _term_step(rec.input, part, rec.t0 + len(steps), saved, xhat)
        steps += xx.view(-1, *xp.shape[1:]).unbind(0)
    return steps


def _parts(term, x: torch.Tensor) -> list:
    """``x`` (T, B, F) in the parts ``term`` normalizes per call of its step: the block as
    one step of T·B rows where the term is not ``stepwise``; else stacks (C, B, F) of as many
    steps as ``STACK`` elements hold, or single steps (B, F) where two do not fit. Stacks cut
    the calls, each a dozen ops or more for the batch norms, and stay in cache, which the
    whole block does not; a step of torch's kernels is faster than a stack of one."""
    if not term.stepwise:
        return [x.flatten(0, 1)]
    per = STACK // x[0].numel()
    return list(x.unbind(0)) if per < 2 else list(x.split(per))


def _input_step(rec, xs, t, bias, w_x, b_x, out) -> torch.Tensor:
    """Step ``t``'s input term: ``xs[t]``, or with ``rec.input``, ``bias + w_x x̂ + b_x``
    written into ``out`` (``xs`` from :func:`_input_steps`)."""
    xx = xs[t]
    if rec.input is None:
        return xx
    if bias is None:
        torch.mul(xx, w_x, out=out)
    else:
        torch.addcmul(bias, xx, w_x, out=out)
    return out if b_x is None else out.add_(b_x)


def _input_grads(rec, ws, x, need_x, w_ih, saved: list, w_x, d_pre, xhat, spare) -> list:
    """The gradients of ``x`` (``d_pre`` itself without ``rec.input``, never a workspace
    buffer then; else only if ``need_x``), the bias, the input weights and the
    input term's gains and shift, from ``d_pre``, the gradient of the steps' input terms;
    ``spare`` a buffer of its shape."""
    if rec.input is None:
        return [d_pre, None, None, None, None]
    d_xp = torch.mul(d_pre, w_x, out=ws("d_xp", *d_pre.shape)).flatten(0, 1)
    width = d_xp.shape[-1]
    if len(xhat) == 1:  # one part (the block, or all steps in one stack): no copy back
        d_xp = rec.input.step_backward(d_xp.view(xhat[0].shape), saved[0]).view(-1, width)
    else:
        rows = [part.numel() // width for part in xhat]  # the forward's parts (x̂ each)
        for d, part, s in zip(d_xp.split(rows), xhat, saved, strict=True):
            d = d.view(part.shape)
            d.copy_(rec.input.step_backward(d, s))
    d_x = torch.mm(d_xp, w_ih).view(x.shape) if need_x else None
    d_w_ih = torch.mm(d_xp.t(), x.reshape(d_xp.shape[0], -1))
    bias = d_pre.sum((0, 1))
    return [d_x, bias, d_w_ih, *_term_grads(rec.input, xhat, d_pre, spare)]


def _affine(xhat, weight, bias):
    return xhat * weight if bias is None else torch.addcmul(bias, xhat, weight)


def _weight_grad(d_a: list, d_plain: torch.Tensor, hs: torch.Tensor, ws: Workspace):
    """dW_h = Σ_t da_tᵀ h_{t-1} as one product; ``d_a`` holds the hidden term's input
    gradients from the last step to the first, or is empty without a hidden norm (then the
    gradient is ``d_plain``)."""
    if d_a:
        d_a.reverse()
        d_plain = torch.stack(d_a, out=ws("d_a", *d_plain.shape))
    return torch.mm(d_plain.flatten(0, 1).t(), hs[:-1].flatten(0, 1))


def _term_grads(term, xhat: list, dy: torch.Tensor, out: torch.Tensor) -> list:
    """The gradients of a term's gains (Σ dy x̂) and shift (Σ dy); ``xhat`` the x̂ of all
    steps in order, in one tensor or several (a step or a stack of steps each); ``out`` a
    spare buffer of dy's shape."""
    if term is None:
        return [None, None]
    if len(xhat) == 1:
        rows = xhat[0]
    else:
        width = dy.shape[-1]
        rows = torch.cat([v.reshape(-1, width) for v in xhat], out=out.view(-1, width))
    weight = torch.mul(rows.view(dy.shape), dy, out=out).sum((0, 1))
    return [weight, dy.sum((0, 1)) if term.bias is not None else None]


def _tanh_into(x: torch.Tensor) -> torch.Tensor:
    """In place on a sigmoid's output of 2x: tanh(x) = 2 σ(2x) - 1. The gate blocks are strided
    views, on which torch's tanh kernel runs several times slower than its sigmoid."""
    return x.mul_(2).sub_(1)


def _rec_signature(rec: Recurrence) -> tuple:
    """What a graph of ``rec``'s loops depends on besides its tensor inputs."""
    terms = tuple(
        None if t is None else (id(t), t.training) for t in (rec.input, rec.hidden, rec.cell)
    )
    scales = (rec.candidate_scale, rec.cell_scale, rec.output_scale, rec.carry_scale)
    return terms + scales + (rec.t0,)


def _terms(rec: Recurrence) -> tuple:
    return tuple(t for t in (rec.input, rec.hidden, rec.cell) if t is not None)


def _forward(ctx, kind, body, rec, grad, inputs, names, saved):
    """The forward of a sequence Function: runs ``body`` (``_lstm_forward``/``_gru_forward``)
    on a workspace, through a CUDA graph where one applies, and keeps for the backward the
    first input (x) where there is an input term, the inputs named in ``saved`` (``inputs``
    are named by ``names``) and all h_t. Returns y and the final state (the last row of each
    state sequence the body returns before the terms' saved steps)."""
    x, w_hh = inputs[:2]
    key = (kind, *x.shape, *w_hh.shape, x.dtype, x.device)
    owner = object()
    ws = workspace.POOL.take(key, x, owner)
    (*states, kept), used, entry = graphs.run(
        ws.graphs, partial(body, rec, ws), inputs, _terms(rec), _rec_signature(rec)
    )
    hs = states[0]
    if grad and any(ctx.needs_input_grad):  # (under no_grad these stay set)
        ctx.rec, ctx.key, ctx.ws, ctx.owner, ctx.entry = rec, key, ws, owner, entry
        ctx.kept = kept  # what the body keeps for its backward (its named record)
        x = used[0] if rec.input is not None else None  # on a graph: its static inputs
        used = dict(zip(names, used, strict=True))
        ctx.save_for_backward(x, *(used[name] for name in saved), hs)
    else:
        workspace.POOL.give(key, ws)
    y = hs[1:] if entry is None else hs[1:].clone()  # never a buffer someone reuses
    return y, *(s[-1].clone() for s in states)


def _backward(ctx, body, grads_out) -> tuple:
    """The backward of a sequence Function: ``body`` (``_lstm_backward``/``_gru_backward``)
    on the forward's workspace, eagerly after an eager forward, else on the graph that
    belongs to the forward's (captured at its first use). The gradients are copied out of a
    graph's static outputs: autograd may keep one as a parameter's ``.grad``, and the next
    replay would overwrite it."""
    ws = ctx.ws
    if not workspace.POOL.reclaim(ctx.key, ws, ctx.owner):
        raise RuntimeError(
            f"a second backward through the {ctx.key[0].upper()} sequence path after another "
            "forward of the same shape: its buffers were reused; run it on layer.path = 'loop'"
        )
    need_x = ctx.needs_input_grad[2]  # (the backward's graph differs without dx)
    body = partial(body, ctx.rec, ws, ctx.kept, need_x, *ctx.saved_tensors)
    if ctx.entry is None:
        grads = body(*grads_out)
    else:
        grads = graphs.run(ctx.entry.children, body, grads_out, extra=(need_x,), warmup=False)[0]
        grads = [g if g is None else g.clone() for g in grads]
    workspace.POOL.give(ctx.key, ws)
    return (None, None, *grads)  # rec and grad first
