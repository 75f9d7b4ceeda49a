"""Optimizers by name, and the optimizer state the loss-aware quantizers read."""

from __future__ import annotations

import torch

from .models import recurrent_layers
from .registry import Registry

OPTIMIZERS = Registry("optimizer")
OPTIMIZERS.register(
    "adam", lambda params, lr, momentum=None, **kw: torch.optim.Adam(params, lr=lr, **kw)
)
OPTIMIZERS.register(
    "rmsprop", lambda params, lr, momentum=None, **kw: torch.optim.RMSprop(params, lr=lr, **kw)
)
OPTIMIZERS.register(
    "sgd",
    lambda params, lr, momentum=0.9, **kw: torch.optim.SGD(params, lr=lr, momentum=momentum, **kw),
)


def make_optimizer(name: str, params, lr: float, **kw) -> torch.optim.Optimizer:
    return OPTIMIZERS[name](params, lr, **kw)


@torch.no_grad()
def update_preconditioners(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Set the LAB/LAT preconditioner D = sqrt(v) + 1e-8 from Adam's (or RMSprop's) second
    moment v of each quantized weight. Optimizers without a second moment leave D = 1."""
    for layer in recurrent_layers(model):
        if not layer.quant.uses_preconditioner:
            continue
        for w, d in ((layer.weight_ih, layer.d_ih), (layer.weight_hh, layer.d_hh)):
            state = optimizer.state.get(w, {})
            v = state.get("exp_avg_sq", state.get("square_avg"))
            if v is not None:
                d.copy_(v.sqrt().add_(1e-8))
