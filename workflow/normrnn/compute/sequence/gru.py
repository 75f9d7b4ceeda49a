"""The GRU recurrence over a whole sequence (``cells.GRULayer``'s form): its autograd
Function, the step loop forward and backward in torch, and the compiled loop's wrappers."""

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
    _term_grads,
    _term_step,
    _weight_grad,
)

# The Function's inputs after rec and grad, and those its backward keeps (besides x and the h_t):
# SAVED are the names of _gru_backward's parameters between need_x and hs.
INPUTS = ("x", "w_hh", "b_hn", "h0", "bias", "w_ih", "w_x", "b_x", "w_h", "b_h")
SAVED = ("w_hh", "w_ih", "w_x", "w_h")


class GRUSteps(NamedTuple):
    """What the torch step loop keeps for its backward: the input and hidden terms' per-step
    saved values and their x̂ (empty lists for an absent term)."""

    saved_x: list
    saved_h: list
    xhat_x: list
    xhat_h: list


def gru_sequence(rec: Recurrence, x, w_hh, b_hn, h0, bias=None, w_ih=None):
    """Runs the GRU (``cells.GRULayer``'s form) over ``x`` from ``h0``: the input term with
    its biases (T, B, 3H), or with ``rec.input``, the layer's input, ``w_ih`` and ``bias`` as
    for ``lstm_sequence``; ``b_hn`` is the recurrent bias inside the reset gate. The
    recurrence's ``cell`` and cell scales do not apply to the GRU. Returns the outputs and
    the final ``(h,)``."""
    terms = (*_input_params(rec, bias, w_ih), *_params(rec.hidden))
    y, h = _GRUSequence.apply(rec, torch.is_grad_enabled(), x, w_hh, b_hn, h0, *terms)
    return y, (h,)


class _GRUSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rec, grad, *inputs):  # named by INPUTS
        return _forward(ctx, "gru", _gru_forward, rec, grad, inputs, INPUTS, SAVED)

    @staticmethod
    def backward(ctx, d_y, d_hT):
        return _backward(ctx, _gru_backward, (d_y, d_hT))


def _gru_forward(rec, ws, x, w_hh, b_hn, h0, bias, w_ih, w_x, b_x, w_h, b_h):
    """The forward loop: returns all h_t (from h0) and the terms' saved steps. Where the
    compiled loop takes the recurrence (:func:`loop_specs`), it runs that."""
    specs = loop_specs(rec, x, cell=False)
    if specs is not None:
        args = (x, w_hh, b_hn, h0, bias, w_ih, w_x, b_x, w_h, b_h)
        return _gru_forward_compiled(rec, ws, specs[0], *args)
    xp = _project(ws, x, w_ih)
    steps, batch, gates = xp.shape
    size = gates // 3
    act = ws("act", steps, batch, gates)  # σ(r), σ(z), tanh(u) (unscaled)
    hnb = ws("hnb", steps, batch, size)  # the recurrent n term with its bias
    pre = ws("pre", batch, 2 * size)
    xin = ws("xin", batch, gates)  # this step's normalized input term
    hs = xp.new_empty(steps + 1, batch, size)  # saved for backward: never a workspace buffer
    hs[0] = h0
    hidden = rec.hidden
    saved_x, saved_h, xhat_x, xhat_h = [], [], [], []
    r, z, n = (v.unbind(0) for v in act.chunk(3, 2))
    xs = _input_steps(rec, xp, saved_x, xhat_x)
    acts, hnbs, h_out = (v.unbind(0) for v in (act, hnb, hs[1:]))
    wt = w_hh.t()
    h = hs[0]
    for t in range(steps):
        a = torch.mm(h, wt)
        if hidden is not None:
            a = _affine(_term_step(hidden, a, rec.t0 + t, saved_h, xhat_h), w_h, b_h)
        x_t = _input_step(rec, xs, t, bias, w_x, b_x, xin)
        x_rz, x_n = x_t.split([2 * size, size], 1)
        a_rz, a_n = a.split([2 * size, size], 1)
        torch.add(x_rz, a_rz, out=pre)
        torch.sigmoid(pre, out=acts[t][:, : 2 * size])
        u = torch.addcmul(x_n, r[t], torch.add(a_n, b_hn, out=hnbs[t]), out=n[t])
        nt = torch.tanh(u, out=n[t])
        if rec.candidate_scale != 1.0:
            nt = nt * rec.candidate_scale
        # h' = n + z (h - n)
        h = torch.addcmul(nt, z[t], h - nt, out=h_out[t])
    return hs, GRUSteps(saved_x, saved_h, xhat_x, xhat_h)


def _gru_backward(rec, ws, kept, need_x, x, w_hh, w_ih, w_x, w_h, hs, d_y, d_hT):
    """The backward of :func:`_gru_forward`: the gradients of the Function's inputs."""
    if isinstance(kept, CompiledSteps):
        args = (x, w_hh, w_ih, w_x, hs, d_y, d_hT)
        return _gru_backward_compiled(rec, ws, kept, need_x, *args)
    hidden = rec.hidden
    act, hnb = ws.buffers["act"], ws.buffers["hnb"]
    saved_h = kept.saved_h
    steps, batch, gates = act.shape
    size = gates // 3
    r, z, n = act.chunk(3, 2)
    s_g = rec.candidate_scale
    # For all steps at once: k_u = d h'/d u = (1 - z) s_g (1 - tanh²); q_r = d u / d pre_r
    # = (W_hn h + b_hn) σ'(r); q_z = d h' / d pre_z = (h - s_g tanh u) σ'(z).
    k_u = ws("k_u", steps, batch, size)
    torch.mul(n, n, out=k_u).sub_(1).mul_(s_g).mul_(z.sub(1))
    q_r = torch.addcmul(r, r, r, value=-1, out=ws("q_r", steps, batch, size)).mul_(hnb)
    q_z = ws("q_z", steps, batch, size)
    torch.add(hs[:-1], n, alpha=-s_g, out=q_z)
    q_z.mul_(torch.addcmul(z, z, z, value=-1))

    # the input term's gradient; x's without an input term: never a workspace buffer then
    d_pre = torch.empty_like(act) if rec.input is None else ws("d_pre", *act.shape)
    d_hid = ws("d_hid", steps, batch, gates)  # the gradient for the (normalized) W_h h
    d_ys, k_us, q_rs, q_zs, rs, zs = (v.unbind(0) for v in (d_y, k_u, q_r, q_z, r, z))
    d_r, d_z, d_u = (v.unbind(0) for v in d_pre.chunk(3, 2))
    d_hr, d_hz, d_hn = (v.unbind(0) for v in d_hid.chunk(3, 2))
    d_a = []
    dh = d_ys[steps - 1] + d_hT
    for t in range(steps - 1, -1, -1):
        du = torch.mul(dh, k_us[t], out=d_u[t])
        torch.mul(dh, q_zs[t], out=d_z[t])
        torch.mul(du, q_rs[t], out=d_r[t])
        torch.mul(du, rs[t], out=d_hn[t])
        d_hr[t].copy_(d_r[t])
        d_hz[t].copy_(d_z[t])
        if hidden is None:
            da = d_hid[t]
        else:
            da = hidden.step_backward(d_hid[t] * w_h, saved_h[t])
            d_a.append(da)
        carry = dh * zs[t]  # h' = n + z h: the direct path to h
        dh = torch.addmm(carry.add_(d_ys[t - 1]) if t else carry, da, w_hh)
    d_w = _weight_grad(d_a, d_hid, hs, ws)
    d_b_hn = d_pre[..., 2 * size :].mul(r).sum((0, 1))
    spare = ws("xhat", steps, batch, gates)
    d_x, *d_input = _input_grads(
        rec, ws, x, need_x, w_ih, kept.saved_x, w_x, d_pre, kept.xhat_x, spare
    )
    grads = [d_x, d_w, d_b_hn, dh, *d_input]
    return grads + _term_grads(hidden, kept.xhat_h, d_hid, spare)


def _gru_forward_compiled(rec, ws, spec, x, w_hh, b_hn, h0, bias, w_ih, w_x, b_x, w_h, b_h):
    """:func:`_gru_forward` in the compiled loop (see ``lstm._lstm_forward_compiled``)."""
    dims, xin, act, hs, saved = _loop_begin(rec, ws, x, h0, bias, w_ih, w_x, b_x, gates=3)
    steps, batch, size = dims
    hnb = ws("hnb", steps, batch, size)
    hidden = _loop_term(ws, "h", rec.hidden, spec, w_h, b_h, steps, batch, 3 * size, rec.t0)
    native.loop(
        "gru", False, dims, _scales(rec), hidden, None,
        x=xin, w=w_hh.contiguous(), hs=hs, act=act, tcs=hnb, b_hn=b_hn.contiguous(),
        work=_loop_work(ws, batch, size),
    )  # fmt: skip
    _keep_statistics(rec.t0, (rec.hidden, hidden))
    return hs, CompiledSteps(*saved, hidden)


def _gru_backward_compiled(rec, ws, kept, need_x, x, w_hh, w_ih, w_x, hs, d_y, d_hT):
    """:func:`_gru_backward` after :func:`_gru_forward_compiled`."""
    hidden = kept.hidden
    act, hnb = ws.buffers["act"], ws.buffers["hnb"]
    steps, batch, gates = act.shape
    size = gates // 3
    d_pre = torch.empty_like(act) if rec.input is None else ws("d_pre", *act.shape)
    d_hid = ws("d_hid", *act.shape)
    d_a = ws("d_a", *act.shape) if hidden is not None else None
    d_h0 = hs.new_empty(batch, size)
    native.loop(
        "gru", True, (steps, batch, size), _scales(rec), hidden, None,
        w=w_hh.contiguous(), hs=hs, act=act, tcs=hnb, work=_loop_work(ws, batch, size),
        d_y=d_y.contiguous(), d_hT=d_hT.contiguous(), d_pre=d_pre, d_a=d_a, d_hid=d_hid,
        d_h0=d_h0,
    )  # fmt: skip
    d_w = torch.mm((d_hid if d_a is None else d_a).flatten(0, 1).t(), hs[:-1].flatten(0, 1))
    d_b_hn = d_pre[..., 2 * size :].mul(act[..., :size]).sum((0, 1))
    spare = ws("xhat", steps, batch, gates)
    d_x, *d_input = _input_grads(
        rec, ws, x, need_x, w_ih, kept.saved_x, w_x, d_pre, kept.xhat_x, spare
    )
    grads = [d_x, d_w, d_b_hn, d_h0, *d_input]
    return grads + _term_grads(rec.hidden, _xhat(hidden), d_hid, spare)
