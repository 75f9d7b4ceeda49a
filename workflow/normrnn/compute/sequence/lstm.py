"""The LSTM recurrence over a whole sequence: its autograd Function, the step loop forward
and backward in torch, and the compiled loop's wrappers."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ...methods.norms.base import Recurrence
from .. import native
from .loop import (
    CompiledSteps,
    _keep_statistics,
    _loop_begin,
    _loop_term,
    _loop_work,
    _scales,
    _xhat,
    loop_specs,
)
from .steps import (
    _affine,
    _backward,
    _forward,
    _input_grads,
    _input_params,
    _input_step,
    _input_steps,
    _params,
    _project,
    _tanh_into,
    _term_grads,
    _term_step,
    _weight_grad,
)

# The Function's inputs after rec and grad, and those its backward keeps (besides x and the h_t):
# SAVED are the names of _lstm_backward's parameters between need_x and hs.
INPUTS = ("x", "w_hh", "h0", "c0", "bias", "w_ih", "w_x", "b_x", "w_h", "b_h", "w_c", "b_c")
SAVED = ("w_hh", "w_ih", "w_x", "w_h", "w_c")


class LSTMSteps(NamedTuple):
    """What the torch step loop keeps for its backward: each term's per-step saved values
    (``TermNorm.step``'s) and its x̂ (empty lists for an absent term)."""

    saved_x: list
    saved_h: list
    saved_c: list
    xhat_x: list
    xhat_h: list
    xhat_c: list


def lstm_sequence(rec: Recurrence, x, w_hh, h0, c0, bias=None, w_ih=None):
    """Runs the LSTM over ``x`` from ``(h0, c0)``: the input term with its bias (T, B, 4H),
    or with ``rec.input``, the layer's input (T, B, I), projected by ``w_ih`` and normalized
    inside, then ``bias`` added. Returns the outputs (T, B, H) and the final ``(h, c)``."""
    terms = (*_input_params(rec, bias, w_ih), *_params(rec.hidden), *_params(rec.cell))
    y, h, c = _LSTMSequence.apply(rec, torch.is_grad_enabled(), x, w_hh, h0, c0, *terms)
    return y, (h, c)


class _LSTMSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rec, grad, *inputs):  # named by INPUTS
        return _forward(ctx, "lstm", _lstm_forward, rec, grad, inputs, INPUTS, SAVED)

    @staticmethod
    def backward(ctx, d_y, d_hT, d_cT):
        return _backward(ctx, _lstm_backward, (d_y, d_hT, d_cT))


def _lstm_forward(rec, ws, x, w_hh, h0, c0, bias, w_ih, w_x, b_x, w_h, b_h, w_c, b_c):
    """The forward loop: returns all h_t (from h0), all c_t, and the terms' saved steps.
    Where the compiled loop takes the recurrence (:func:`loop_specs`), it runs that."""
    specs = loop_specs(rec, x)
    if specs is not None:
        args = (x, w_hh, h0, c0, bias, w_ih, w_x, b_x, w_h, b_h, w_c, b_c)
        return _lstm_forward_compiled(rec, ws, specs, *args)
    xp = _project(ws, x, w_ih)
    steps, batch, gates = xp.shape
    size = gates // 4
    act = ws("act", steps, batch, gates)  # σ(i), σ(f), tanh(g) (unscaled), σ(o)
    cs = ws("cs", steps + 1, batch, size)
    tcs = ws("tcs", steps, batch, size)  # tanh of the (scaled or normalized) cell
    pre = ws("pre", batch, gates)  # this step's gate pre-activations
    hs = xp.new_empty(steps + 1, batch, size)  # saved for backward: never a workspace buffer
    hs[0], cs[0] = h0, c0
    hidden, cell = rec.hidden, rec.cell
    saved_x, saved_h, saved_c, xhat_x, xhat_h, xhat_c = [], [], [], [], [], []
    pre_g = pre[:, 2 * size : 3 * size]
    i, f, g, o = (v.unbind(0) for v in act.chunk(4, 2))
    xs = _input_steps(rec, xp, saved_x, xhat_x)
    acts, tc, h_out, c_out = (v.unbind(0) for v in (act, tcs, hs[1:], cs[1:]))
    wt = w_hh.t()
    h, c = hs[0], cs[0]
    for t in range(steps):
        a = torch.mm(h, wt)
        x_t = _input_step(rec, xs, t, bias, w_x, b_x, pre)
        if hidden is None:
            torch.add(x_t, a, out=pre)
        else:
            xh = _term_step(hidden, a, rec.t0 + t, saved_h, xhat_h)
            torch.addcmul(x_t, xh, w_h, out=pre)
            if b_h is not None:
                pre.add_(b_h)
        pre_g.mul_(2)
        torch.sigmoid(pre, out=acts[t])
        cand = _tanh_into(g[t])
        if rec.candidate_scale != 1.0:
            cand = cand * rec.candidate_scale
        kept = f[t] * c if rec.carry_scale == 1.0 else f[t] * c * rec.carry_scale
        c = torch.addcmul(kept, i[t], cand, out=c_out[t])
        if cell is not None:
            xc = _term_step(cell, c, rec.t0 + t, saved_c, xhat_c)
            torch.tanh(_affine(xc, w_c, b_c), out=tc[t])
        else:
            torch.tanh(c if rec.cell_scale == 1.0 else c * rec.cell_scale, out=tc[t])
        h = torch.mul(o[t], tc[t], out=h_out[t])
        if rec.output_scale != 1.0:
            h.mul_(rec.output_scale)
    return hs, cs, LSTMSteps(saved_x, saved_h, saved_c, xhat_x, xhat_h, xhat_c)


def _lstm_backward(rec, ws, kept, need_x, x, w_hh, w_ih, w_x, w_h, w_c, hs, d_y, d_hT, d_cT):
    """The backward of :func:`_lstm_forward`: the gradients of the Function's inputs."""
    if isinstance(kept, CompiledSteps):
        args = (x, w_hh, w_ih, w_x, hs, d_y, d_hT, d_cT)
        return _lstm_backward_compiled(rec, ws, kept, need_x, *args)
    act, cs, tcs = ws.buffers["act"], ws.buffers["cs"], ws.buffers["tcs"]
    saved_h, saved_c = kept.saved_h, kept.saved_c
    steps, batch, gates = act.shape
    size = gates // 4
    i, f, g, o = act.chunk(4, 2)
    # What does not depend on the recurrence, for all steps at once, in place (σ' = σ - σ²).
    # k: d h_t / d(tanh input) = σ(o) · s_out · (1 - tc²) (· s_c without a cell norm)
    k = ws("k", steps, batch, size)
    torch.mul(tcs, tcs, out=k).sub_(1).mul_(o).mul_(-rec.output_scale)
    if rec.cell is None and rec.cell_scale != 1.0:
        k.mul_(rec.cell_scale)
    # p: d pre / d c_t for i, f, g and d pre / d h_t for o
    p = ws("p", steps, batch, gates)
    p_i, p_f, p_g, p_o = p.chunk(4, 2)
    torch.addcmul(i, i, i, value=-1, out=p_i).mul_(g).mul_(rec.candidate_scale)
    torch.addcmul(f, f, f, value=-1, out=p_f).mul_(cs[:-1]).mul_(rec.carry_scale)
    torch.mul(g, g, out=p_g).sub_(1).mul_(i).mul_(-rec.candidate_scale)
    torch.addcmul(o, o, o, value=-1, out=p_o).mul_(tcs).mul_(rec.output_scale)

    # the pre-activations' gradient; x's without an input term: never a workspace buffer then
    d_pre = torch.empty_like(act) if rec.input is None else ws("d_pre", *act.shape)
    blocks = (steps, batch, 4, size)
    dp_ifg, dp_o = d_pre.view(blocks)[:, :, :3].unbind(0), d_pre.view(blocks)[:, :, 3].unbind(0)
    p_ifg, p_o = p.view(blocks)[:, :, :3].unbind(0), p.view(blocks)[:, :, 3].unbind(0)
    d_pres, d_ys, ks, fs = d_pre.unbind(0), d_y.unbind(0), k.unbind(0), f.unbind(0)
    d_cn = ws("d_cn", steps, batch, size) if rec.cell is not None else None
    d_cns = d_cn.unbind(0) if d_cn is not None else None
    hidden, cell = rec.hidden, rec.cell
    d_a = []
    dc, da = d_cT, None
    for t in range(steps - 1, -1, -1):
        dh = d_ys[t] + d_hT if da is None else torch.addmm(d_ys[t], da, w_hh)
        if cell is None:
            dc = torch.addcmul(dc, dh, ks[t])
        else:
            dcn = torch.mul(dh, ks[t], out=d_cns[t])
            dc = dc + cell.step_backward(dcn * w_c, saved_c[t])
        torch.mul(dc.unsqueeze(1), p_ifg[t], out=dp_ifg[t])
        torch.mul(dh, p_o[t], out=dp_o[t])
        if hidden is None:
            da = d_pres[t]
        else:
            da = hidden.step_backward(d_pres[t] * w_h, saved_h[t])
            d_a.append(da)
        dc = dc * fs[t] if rec.carry_scale == 1.0 else dc * fs[t] * rec.carry_scale
    d_w = _weight_grad(d_a, d_pre, hs, ws)
    # p and k, no longer needed, hold the terms' products
    d_x, *d_input = _input_grads(rec, ws, x, need_x, w_ih, kept.saved_x, w_x, d_pre, kept.xhat_x, p)
    grads = [d_x, d_w, torch.mm(da, w_hh), dc, *d_input]
    grads += _term_grads(hidden, kept.xhat_h, d_pre, p)
    return grads + _term_grads(cell, kept.xhat_c, d_cn, k)


def _lstm_forward_compiled(rec, ws, specs, x, w_hh, h0, c0, bias, w_ih, *terms):
    """:func:`_lstm_forward` in the compiled loop: the input term for all steps (normalized
    as :func:`_input_steps` does, with its gains and the bias), then one call."""
    w_x, b_x, w_h, b_h, w_c, b_c = terms
    dims, xin, act, hs, saved = _loop_begin(rec, ws, x, h0, bias, w_ih, w_x, b_x, gates=4)
    steps, batch, size = dims
    cs = ws("cs", steps + 1, batch, size)
    tcs = ws("tcs", steps, batch, size)
    cs[0] = c0
    hidden = _loop_term(ws, "h", rec.hidden, specs[0], w_h, b_h, steps, batch, 4 * size, rec.t0)
    cell = _loop_term(ws, "c", rec.cell, specs[1], w_c, b_c, steps, batch, size, rec.t0)
    native.loop(
        "lstm", False, dims, _scales(rec), hidden, cell,
        x=xin, w=w_hh.contiguous(), hs=hs, cs=cs, act=act, tcs=tcs,
        work=_loop_work(ws, batch, size),
    )  # fmt: skip
    _keep_statistics(rec.t0, (rec.hidden, hidden), (rec.cell, cell))
    return hs, cs, CompiledSteps(*saved, hidden, cell)


def _lstm_backward_compiled(rec, ws, kept, need_x, x, w_hh, w_ih, w_x, hs, d_y, d_hT, d_cT):
    """:func:`_lstm_backward` after :func:`_lstm_forward_compiled`."""
    hidden, cell = kept.hidden, kept.cell
    act, cs, tcs = ws.buffers["act"], ws.buffers["cs"], ws.buffers["tcs"]
    steps, batch, gates = act.shape
    size = gates // 4
    d_pre = torch.empty_like(act) if rec.input is None else ws("d_pre", *act.shape)
    d_a = ws("d_a", *act.shape) if hidden is not None else None
    d_cn = ws("d_cn", steps, batch, size) if cell is not None else None
    d_h0, d_c0 = hs.new_empty(2, batch, size).unbind(0)
    native.loop(
        "lstm", True, (steps, batch, size), _scales(rec), hidden, cell,
        w=w_hh.contiguous(), hs=hs, cs=cs, act=act, tcs=tcs, work=_loop_work(ws, batch, size),
        d_y=d_y.contiguous(), d_hT=d_hT.contiguous(), d_cT=d_cT.contiguous(),
        d_pre=d_pre, d_a=d_a, d_cn=d_cn, d_h0=d_h0, d_c0=d_c0,
    )  # fmt: skip
    d_w = torch.mm((d_pre if d_a is None else d_a).flatten(0, 1).t(), hs[:-1].flatten(0, 1))
    spare = ws("p", steps, batch, gates)
    d_x, *d_input = _input_grads(
        rec, ws, x, need_x, w_ih, kept.saved_x, w_x, d_pre, kept.xhat_x, spare
    )
    grads = [d_x, d_w, d_h0, d_c0, *d_input]
    grads += _term_grads(rec.hidden, _xhat(hidden), d_pre, spare)
    return grads + _term_grads(rec.cell, _xhat(cell), d_cn, ws("k", steps, batch, size))
