"""Optimizers by name, their parameter groups and learning-rate rules, and the optimizer state
the loss-aware quantizers read."""

from __future__ import annotations

import math

import torch

from ..methods.models import recurrent_layers
from ..registry import Registry

OPTIMIZERS = Registry("optimizer")
OPTIMIZERS.register(
    "adam",
    lambda groups, lr, momentum=None, alpha=None, **kw: torch.optim.Adam(groups, lr=lr, **kw),
)
OPTIMIZERS.register(
    "rmsprop",
    lambda groups, lr, momentum=None, alpha=None, **kw: torch.optim.RMSprop(
        groups, lr=lr, momentum=momentum or 0.0, alpha=0.99 if alpha is None else alpha, **kw
    ),
)
OPTIMIZERS.register(
    "sgd",
    lambda groups, lr, momentum=None, alpha=None, **kw: torch.optim.SGD(
        groups, lr=lr, momentum=0.9 if momentum is None else momentum, **kw
    ),
)


def recurrent_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The full-precision W_x and W_h of every recurrent layer (what the quantizers quantize)."""
    return [w for layer in recurrent_layers(model) for w in (layer.weight_ih, layer.weight_hh)]


def lr_scale(value, hidden_size: int) -> float:
    """``recurrent_lr_scale`` as a number: a number, or ``2sqrtH`` for 2·sqrt(hidden size)
    (Hou et al.'s BinaryConnect and TerConnect weights on word-level tasks)."""
    return 2 * math.sqrt(hidden_size) if value == "2sqrtH" else float(value)


def parameter_groups(model: torch.nn.Module, params: dict) -> list[dict]:
    """One group of all trained parameters, or, where ``recurrent_lr_scale`` is not 1 or
    ``lr_decay_params`` is ``recurrent``, two: the recurrent weights (named ``recurrent``, at
    lr × the scale) first, then the rest (Hou et al.'s main_lm.py)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    scale = lr_scale(params.get("recurrent_lr_scale", 1), params["hidden_size"])
    if scale == 1 and params.get("lr_decay_params", "all") == "all":
        return [{"params": trained, "name": "all"}]
    rec = {id(w) for w in recurrent_weights(model)}
    return [
        {"params": [p for p in trained if id(p) in rec], "lr": params["lr"] * scale,
         "name": "recurrent"},
        {"params": [p for p in trained if id(p) not in rec], "name": "other"},
    ]  # fmt: skip


def make_optimizer(name: str, groups, lr: float, **kw) -> torch.optim.Optimizer:
    """``kw``: ``momentum`` (sgd: default 0.9; rmsprop: default 0), ``alpha`` (rmsprop's
    decay of the squared-gradient average, default 0.99), ``weight_decay``."""
    return OPTIMIZERS[name](groups, lr, **kw)


def make_scheduler(opt, params):
    """Per-epoch learning-rate rule: ×``lr_plateau_factor`` for every group when the
    validation loss is not lower than its best so far, else ×``lr_decay`` after each epoch
    from ``lr_decay_start`` on (epochs counted from 1: after epoch e ≥ start the factor is
    decay^(e - start + 1)), to every group or (``lr_decay_params: recurrent``) to the
    recurrent weights' group only."""
    if params.get("lr_plateau_factor"):
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, factor=params["lr_plateau_factor"], patience=0, threshold=0.0
        )
    decay, start = params.get("lr_decay", 1.0), params.get("lr_decay_start", 0)
    only = params.get("lr_decay_params", "all") == "recurrent"
    rules = [
        (lambda e: decay ** max(0, e - start + 1))
        if not only or group.get("name") == "recurrent"
        else (lambda e: 1.0)
        for group in opt.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(opt, rules)


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
