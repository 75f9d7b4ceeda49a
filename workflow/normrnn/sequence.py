"""The LSTM and GRU recurrences over a whole sequence with a hand-written backward.

The step loop of :class:`~normrnn.cells.RecurrentLayer` builds a dozen autograd nodes per time
step, and at small sizes their overhead, not arithmetic, sets the speed. Here one
``torch.autograd.Function`` per cell runs the whole recurrence: everything after the input
term, or, for a norm with an input term, from the input projection on (one matmul over all
steps, into the workspace, and one each for its gradients):

* forward, step by step without autograd, keeping what the backward needs;
* backward, step by step in reverse, with only the work that depends on the next step's
  gradient in the loop. The activation derivatives are computed for all steps at once before
  it, and the parameter gradients after it: ``dW_h`` as one matmul over all steps;
* intermediate buffers from a :class:`WorkspacePool`, reused between calls.

The per-step normalizations come from a :class:`Recurrence`: the norm's input, hidden and
``c_t`` terms (modules with ``step``/``step_backward``, see ``norms.TermNorm``) or the
fixed scales of normalization propagation. The input term does not depend on the
recurrence: it is normalized inside the Function before the loop, in stacks of steps per
call of its step (each still with its own statistics), and its backward after the loop
likewise. Normalized as one block in autograd, it took three more passes over a
(T, B, gates·H) tensor each way, each into freshly allocated memory, which cost more than
per-step calls; in one call over all steps each op is a pass over that tensor out of cache,
while a stack stays in it (the README's benchmark section has the figures). A term whose
statistics span all steps (shared batch statistics in training: ``TermNorm.stepwise``
false) normalizes the block as one step of T·B rows. Tests hold this path to the step loop
(outputs, gradients, population statistics) and its backward to finite differences
(``gradcheck``).
"""

from __future__ import annotations

from functools import partial

import torch

from . import graphs, native, triton_steps  # noqa: F401 (the GPU steps register on import)
from .norms.base import Recurrence

# Elements of the input term per call of its step (see _parts): 16 steps at B=64, H=100.
STACK = 16 * 64 * 400


def lstm_sequence(rec: Recurrence, x, w_hh, h0, c0, bias=None, w_ih=None):
    """Runs the LSTM over ``x`` from ``(h0, c0)``: the input term with its bias (T, B, 4H),
    or with ``rec.input``, the layer's input (T, B, I), projected by ``w_ih`` and normalized
    inside, then ``bias`` added. Returns the outputs (T, B, H) and the final ``(h, c)``."""
    terms = (*_input_params(rec, bias, w_ih), *_params(rec.hidden), *_params(rec.cell))
    y, h, c = _LSTMSequence.apply(rec, torch.is_grad_enabled(), x, w_hh, h0, c0, *terms)
    return y, (h, c)


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


def kept_tensors(node) -> list:
    """The tensors a sequence Function's backward ``node`` keeps beside autograd's saved ones
    (its workspace's buffers and its terms' saved steps); none for any other node."""
    if not isinstance(node, _LSTMSequence._backward_cls | _GRUSequence._backward_cls):
        return []
    return list(_tensors((list(node.ws.buffers.values()), node.terms)))


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, list | tuple):
        for item in obj:
            yield from _tensors(item)


def _affine(xhat, weight, bias):
    return xhat * weight if bias is None else torch.addcmul(bias, xhat, weight)


class Workspace:
    """Named buffers of one call, created on first use; ``owner`` is the call using them;
    ``graphs`` the CUDA graphs of the loops that write them (``graphs.py``)."""

    def __init__(self, like: torch.Tensor):
        self.dtype, self.device, self.buffers, self.owner = like.dtype, like.device, {}, None
        self.graphs = graphs.Graphs()

    def __call__(self, name: str, *shape: int) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None:
            buf = self.buffers[name] = torch.empty(shape, dtype=self.dtype, device=self.device)
        return buf


class WorkspacePool:
    """Workspaces kept between calls: up to ``per_shape`` for each of the ``shapes`` most
    recent shapes (a stack of layers of one size uses one per layer).

    A sequence's intermediate buffers are tens of MB. Allocated afresh each call, they come
    from new pages of memory that the kernel must map and zero on first touch, a cost larger
    than the arithmetic at small hidden sizes on CPU. A forward pass takes a workspace and its
    backward gives it back (or the forward itself, when no gradient is needed), so two graphs
    alive at the same time never share one, and a graph dropped without a backward just lets
    its workspace be freed. A second backward of the same graph (``retain_graph``) takes its
    workspace back if no other forward has taken it since. Outputs and gradients are never
    workspace buffers.
    """

    def __init__(self, shapes: int = 2, per_shape: int = 4):
        self.shapes, self.per_shape, self.free = shapes, per_shape, {}

    def take(self, key, like: torch.Tensor, owner) -> Workspace:
        spares = self.free.get(key)
        ws = spares.pop() if spares else Workspace(like)
        ws.owner = owner
        return ws

    def give(self, key, ws: Workspace) -> None:
        ws.owner = None
        spares = self.free.pop(key, [])
        self.free[key] = (spares + [ws])[-self.per_shape :]  # the most recent key last
        while len(self.free) > self.shapes:
            self.free.pop(next(iter(self.free)))

    def reclaim(self, key, ws: Workspace, owner) -> bool:
        """Takes ``ws`` back for ``owner`` if it lies unused in the pool."""
        spares = self.free.get(key, [])
        if ws.owner is None and any(s is ws for s in spares):
            spares.remove(ws)
            ws.owner = owner
            return True
        return ws.owner is owner


POOL = WorkspacePool()


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


def _forward(ctx, kind, body, rec, grad, inputs, saved):
    """The forward of a sequence Function: runs ``body`` (``_lstm_forward``/``_gru_forward``)
    on a workspace, through a CUDA graph where one applies, and keeps for the backward the
    inputs at the indices ``saved``, the first input with an input term (x), and all h_t.
    Returns y and the final state (the last row of each state sequence the body returns
    before the terms' saved steps)."""
    x, w_hh = inputs[:2]
    key = (kind, *x.shape, *w_hh.shape, x.dtype, x.device)
    owner = object()
    ws = POOL.take(key, x, owner)
    (*states, terms), used, entry = graphs.run(
        ws.graphs, partial(body, rec, ws), inputs, _terms(rec), _rec_signature(rec)
    )
    hs = states[0]
    if grad and any(ctx.needs_input_grad):  # (under no_grad these stay set)
        ctx.rec, ctx.key, ctx.ws, ctx.owner, ctx.entry = rec, key, ws, owner, entry
        ctx.terms = terms
        x = used[0] if rec.input is not None else None  # on a graph: its static inputs
        ctx.save_for_backward(x, *(used[i] for i in saved), hs)
    else:
        POOL.give(key, ws)
    y = hs[1:] if entry is None else hs[1:].clone()  # never a buffer someone reuses
    return y, *(s[-1].clone() for s in states)


def _backward(ctx, body, grads_out) -> tuple:
    """The backward of a sequence Function: ``body`` (``_lstm_backward``/``_gru_backward``)
    on the forward's workspace, eagerly after an eager forward, else on the graph that
    belongs to the forward's (captured at its first use). The gradients are copied out of a
    graph's static outputs: autograd may keep one as a parameter's ``.grad``, and the next
    replay would overwrite it."""
    ws = ctx.ws
    if not POOL.reclaim(ctx.key, ws, ctx.owner):
        raise RuntimeError(
            f"a second backward through the {ctx.key[0].upper()} sequence path after another "
            "forward of the same shape: its buffers were reused; run it on layer.path = 'loop'"
        )
    need_x = ctx.needs_input_grad[2]  # (the backward's graph differs without dx)
    body = partial(body, ctx.rec, ws, ctx.terms, need_x, *ctx.saved_tensors)
    if ctx.entry is None:
        grads = body(*grads_out)
    else:
        grads = graphs.run(ctx.entry.children, body, grads_out, extra=(need_x,), warmup=False)[0]
        grads = [g if g is None else g.clone() for g in grads]
    POOL.give(ctx.key, ws)
    return (None, None, *grads)  # rec and grad first


class _LSTMSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rec, grad, *inputs):  # x, w_hh, h0, c0, bias, w_ih, then gains, shifts
        return _forward(ctx, "lstm", _lstm_forward, rec, grad, inputs, saved=(1, 5, 6, 8, 10))

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
    return hs, cs, (saved_x, saved_h, saved_c, xhat_x, xhat_h, xhat_c)


def _lstm_backward(rec, ws, terms, need_x, x, w_hh, w_ih, w_x, w_h, w_c, hs, d_y, d_hT, d_cT):
    """The backward of :func:`_lstm_forward`: the gradients of the Function's inputs."""
    if terms[0] == "compiled":
        args = (x, w_hh, w_ih, w_x, hs, d_y, d_hT, d_cT)
        return _lstm_backward_compiled(rec, ws, terms, need_x, *args)
    act, cs, tcs = ws.buffers["act"], ws.buffers["cs"], ws.buffers["tcs"]
    saved_x, saved_h, saved_c, xhat_x, xhat_h, xhat_c = terms
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
    d_x, *d_input = _input_grads(rec, ws, x, need_x, w_ih, saved_x, w_x, d_pre, xhat_x, p)
    grads = [d_x, d_w, torch.mm(da, w_hh), dc, *d_input]
    return grads + _term_grads(hidden, xhat_h, d_pre, p) + _term_grads(cell, xhat_c, d_cn, k)


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


def _loop_term(ws, name, term, spec, weight, bias, steps, batch, features, t0=0):
    """A term's :class:`~normrnn.native.LoopTerm`: its spec and its gains, shift and the
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
    ``act``, the h_t and the input term's saved steps."""
    xp = _project(ws, x, w_ih)
    steps, batch, width = xp.shape
    saved_x, xhat_x = [], []
    xin = _loop_input(rec, ws, xp, bias, w_x, b_x, saved_x, xhat_x)
    act = ws("act", steps, batch, width)
    hs = xp.new_empty(steps + 1, batch, width // gates)
    hs[0] = h0
    return (steps, batch, width // gates), xin, act, hs, (saved_x, xhat_x)


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
    return hs, cs, ("compiled", *saved, hidden, cell)


def _lstm_backward_compiled(rec, ws, terms, need_x, x, w_hh, w_ih, w_x, hs, d_y, d_hT, d_cT):
    """:func:`_lstm_backward` after :func:`_lstm_forward_compiled`."""
    _, saved_x, xhat_x, hidden, cell = terms
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
    d_x, *d_input = _input_grads(rec, ws, x, need_x, w_ih, saved_x, w_x, d_pre, xhat_x, spare)
    grads = [d_x, d_w, d_h0, d_c0, *d_input]
    grads += _term_grads(rec.hidden, _xhat(hidden), d_pre, spare)
    return grads + _term_grads(rec.cell, _xhat(cell), d_cn, ws("k", steps, batch, size))


def gru_sequence(rec: Recurrence, x, w_hh, b_hn, h0, bias=None, w_ih=None):
    """Runs the GRU (``cells.GRULayer``'s form) over ``x`` from ``h0``: the input term with
    its biases (T, B, 3H), or with ``rec.input``, the layer's input, ``w_ih`` and ``bias`` as
    for :func:`lstm_sequence`; ``b_hn`` is the recurrent bias inside the reset gate. The
    recurrence's ``cell`` and cell scales do not apply to the GRU. Returns the outputs and
    the final ``(h,)``."""
    terms = (*_input_params(rec, bias, w_ih), *_params(rec.hidden))
    y, h = _GRUSequence.apply(rec, torch.is_grad_enabled(), x, w_hh, b_hn, h0, *terms)
    return y, (h,)


class _GRUSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rec, grad, *inputs):  # x, w_hh, b_hn, h0, bias, w_ih, w_x, b_x, w_h, b_h
        return _forward(ctx, "gru", _gru_forward, rec, grad, inputs, saved=(1, 5, 6, 8))

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
    return hs, (saved_x, saved_h, xhat_x, xhat_h)


def _gru_backward(rec, ws, terms, need_x, x, w_hh, w_ih, w_x, w_h, hs, d_y, d_hT):
    """The backward of :func:`_gru_forward`: the gradients of the Function's inputs."""
    if terms[0] == "compiled":
        args = (x, w_hh, w_ih, w_x, hs, d_y, d_hT)
        return _gru_backward_compiled(rec, ws, terms, need_x, *args)
    hidden = rec.hidden
    act, hnb = ws.buffers["act"], ws.buffers["hnb"]
    saved_x, saved_h, xhat_x, xhat_h = terms
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
    d_x, *d_input = _input_grads(rec, ws, x, need_x, w_ih, saved_x, w_x, d_pre, xhat_x, spare)
    grads = [d_x, d_w, d_b_hn, dh, *d_input]
    return grads + _term_grads(hidden, xhat_h, d_hid, spare)


def _gru_forward_compiled(rec, ws, spec, x, w_hh, b_hn, h0, bias, w_ih, w_x, b_x, w_h, b_h):
    """:func:`_gru_forward` in the compiled loop (see :func:`_lstm_forward_compiled`)."""
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
    return hs, ("compiled", *saved, hidden)


def _gru_backward_compiled(rec, ws, terms, need_x, x, w_hh, w_ih, w_x, hs, d_y, d_hT):
    """:func:`_gru_backward` after :func:`_gru_forward_compiled`."""
    _, saved_x, xhat_x, hidden = terms
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
    d_x, *d_input = _input_grads(rec, ws, x, need_x, w_ih, saved_x, w_x, d_pre, xhat_x, spare)
    grads = [d_x, d_w, d_b_hn, d_h0, *d_input]
    return grads + _term_grads(rec.hidden, _xhat(hidden), d_hid, spare)
