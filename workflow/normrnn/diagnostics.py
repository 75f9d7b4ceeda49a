"""Diagnostics the reviewers asked for: gradient flow through time and spectral norms.

* :func:`gradient_norms` — ‖∂L/∂h_t‖ for every step t (Cooijmans et al.'s figure 1).
* :func:`spectral_norms` — λ1 (largest singular value) of W_h before and after quantization and
  normalization, per gate block, and the weight-norm gains (Hou et al.'s analysis, review R1).
"""

from __future__ import annotations

import contextlib

import torch

from .cells import RecurrentLayer


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
