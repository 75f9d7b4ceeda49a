"""Diagnostics the reviewers asked for: gradient flow through time and spectral norms.

* :func:`gradient_norms` — ‖∂L/∂h_t‖ for every step t (Cooijmans et al.'s figure 1).
* :func:`spectral_norms` — λ1 (largest singular value) of W_h before and after quantization and
  normalization, per gate block, and the weight-norm gains (Hou et al.'s analysis, review R1).
* :func:`batch_norm_statistics` — per time step, the scale a batch norm divides by (its
  population statistic) beside the scale of the batch actually arriving at that step: the
  mismatch that statistics shared over time cannot follow.
* :func:`saved_bytes` — the memory a training step keeps for backward (the activations).
"""

from __future__ import annotations

import contextlib

import torch

from ..compute.sequence import kept_tensors
from ..methods.cells import RecurrentLayer
from ..methods.norms import BatchNormTerm, batch_mean


def largest_singular_value(w: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(w.detach().double(), ord=2))


def gradient_norms(hiddens: list[torch.Tensor], loss: torch.Tensor) -> list[float]:
    """‖∂loss/∂h_t‖ (Frobenius over the batch) for each hidden state in ``hiddens``."""
    grads = torch.autograd.grad(loss, hiddens, allow_unused=True)
    return [0.0 if g is None else float(g.norm()) for g in grads]


@contextlib.contextmanager
def recording(layer: RecurrentLayer):
    """Keep every h_t that ``layer`` computes (as graph nodes) in ``layer.recorded``."""
    layer.recorded = []
    try:
        yield layer.recorded
    finally:
        layer.recorded = None


def hidden_gradient_norms(model, layer: RecurrentLayer, forward_loss) -> list[float]:
    """‖∂L/∂h_t‖ of ``layer``'s states for the loss that ``forward_loss()`` returns."""
    with recording(layer) as hs:
        loss = forward_loss()
        return gradient_norms(list(hs), loss)


@torch.no_grad()
def spectral_norms(layer: RecurrentLayer) -> dict:
    """λ1 of the recurrent matrix as stored (full precision), as quantized, and as the cell
    uses it (quantized, then weight-normalized), whole and per gate block; mean weight-norm
    gain; and the bound λ1 ≥ sqrt(H) that binary matrices must satisfy."""
    fp = layer.weight_hh
    quantized = layer.quantized_weights()[1]
    effective = layer.effective_weights()[1]
    out = {
        "lambda1_hh_fp": largest_singular_value(fp),
        "lambda1_hh_quantized": largest_singular_value(quantized),
        "lambda1_hh_effective": largest_singular_value(effective),
        "lambda1_gates_effective": [
            largest_singular_value(b) for b in effective.chunk(layer.gates, 0)
        ],
        "sqrt_hidden": layer.hidden_size**0.5,
    }
    gain = getattr(layer.norm, "g_hh", None)
    if gain is not None:
        out["gain_hh_mean"] = float(gain.mean())
    h = getattr(layer.norm, "h", None)
    if h is not None and hasattr(h, "weight"):
        out["gamma_h_mean"] = float(h.weight.abs().mean())
    return out


@torch.no_grad()
def batch_norm_statistics(layer: RecurrentLayer, forward) -> list[dict]:
    """For each batch norm of ``layer`` (input term ``x``, hidden term ``h``, cell ``c``) and
    each step t of the eval-mode pass ``forward()``: the mean over features of the scale the
    norm divides by at t (``population``, from its population statistic) and of the scale of
    the batch at t measured with the same estimator (``batch``); likewise the means
    (``population_mean``, ``batch_mean``). An empty list if the layer has no batch norm."""
    terms = {
        name: m
        for name in ("x", "h", "c")
        if isinstance(m := getattr(layer.norm, name, None), BatchNormTerm)
    }
    rows, hooks = [], []

    def hook(name, term):
        def record(module, args, output):
            a, t0 = args[0], (args[1] if len(args) > 1 else 0)
            mean = batch_mean(a)
            batch = term.denominator(term.statistic(a - mean))
            slots = term._slots(t0, a.shape[0], a.device).expand(a.shape[0])
            pop = term.denominator(term.running_stat[slots, None])
            pmean = term.running_mean[slots, None]
            for i in range(a.shape[0]):
                rows.append(
                    {
                        "term": name,
                        "t": t0 + i + 1,
                        "batch": float(batch[i].mean()),
                        "population": float(pop[i].mean()),
                        "batch_mean": float(mean[i].mean()),
                        "population_mean": float(pmean[i].mean()),
                    }
                )

        return record

    try:
        for name, term in terms.items():
            hooks.append(term.register_forward_hook(hook(name, term)))
        if terms:
            with recording(layer):  # the loop path, which calls the terms as modules
                forward()
    finally:
        for h in hooks:
            h.remove()
    return sorted(rows, key=lambda r: (r["term"], r["t"]))


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors kept for backward by ``fn()``'s graph: those autograd
    saves, and those the sequence path keeps beside it (its workspace and the terms' steps)."""
    seen = {}

    def pack(t):
        if t.device.type != "meta":
            seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    for node in _graph_nodes(out.grad_fn):
        for t in kept_tensors(node):
            pack(t)
    del out
    return sum(seen.values())


def _graph_nodes(root) -> list:
    nodes, todo, seen = [], [root], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        todo.extend(n for n, _ in node.next_functions)
    return nodes
