"""Which computation one call of a recurrent layer takes, decided in one place (:func:`choose`)
and recorded on the layer (``layer.route``), where the bench and the tests read it.

* ``path``: ``fused`` (norms that only transform the weights: torch's LSTM/GRU kernels),
  ``sequence`` (the hand-written recurrence, ``sequence/``) or ``loop`` (the reference:
  Python steps over the norm's hooks). A layer's own path (``layer.path``, fixed when it is
  built) unless the call needs the loop: ``why`` then says what (recorded hidden states,
  autocast, a mask on the sequence path).
* ``recurrence``: on the sequence path, ``compiled`` where one C++ loop each way runs the
  recurrence (``native.loop``: CPU float32/float64, and each term has a form there), else
  ``python`` (steps in Python, each a few torch calls).
* ``steps``: the compiled steps the terms' steps may use on this device: ``compiled`` (C++,
  ``native``), ``triton`` (``triton_steps``) or ``torch`` (neither is there).
* ``graphs``: whether the sequence path replays CUDA graphs (``graphs.py``).

Whether the compiled loop runs is the sequence path's own test (``sequence.loop_specs``),
asked here once more; a test holds this record to what ran.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..methods.norms.base import Recurrence
from . import graphs, native, triton_steps
from .sequence import loop_specs


class Route(NamedTuple):
    path: str
    recurrence: str = ""
    steps: str = ""
    graphs: bool = False
    why: str = ""


def step_kernels(device: torch.device) -> str:
    """The terms' compiled steps on ``device``: C++ loops on the CPU (``native``), Triton
    kernels on a GPU (``triton_steps``), or torch's ops where neither is there."""
    if device.type == "cuda":
        return "triton" if triton_steps.available() and triton_steps.works(device) else "torch"
    return "compiled" if device.type == "cpu" and native.library() is not None else "torch"


def choose(layer, x: torch.Tensor, mask=None) -> tuple[Route, Recurrence | None]:
    """The route of ``layer`` on input ``x`` (T, B, I) with ``mask``, and on the sequence path
    the recurrence it runs."""
    if layer.recorded is not None:
        return Route("loop", why="recording"), None
    if torch.is_autocast_enabled(x.device.type):
        return Route("loop", why="autocast"), None
    if layer.path == "fused":
        return Route("fused"), None
    if layer.path != "sequence":
        return Route("loop"), None
    if mask is not None:
        return Route("loop", why="mask"), None
    rec = layer.norm.recurrence()
    if rec is None:
        return Route("loop", why="no recurrence"), None
    lstm = layer.state_count == 2  # the LSTM's loop has a cell term; the GRU's has none
    compiled = loop_specs(rec, x, lstm) is not None  # (the sequence path's own test)
    route = Route(
        "sequence",
        recurrence="compiled" if compiled else "python",
        steps=step_kernels(x.device),
        graphs=graphs.enabled([x]),
    )
    return route, rec


def route_record(layers) -> dict:
    """What ``layers`` (a model's recurrent layers) computed at their last call, for a run's
    record: ``path``, ``recurrence`` and ``step_kernels``, each one value, or the layers'
    values joined by ``+`` where they differ; empty where no layer ran."""
    routes = [layer.route for layer in layers if layer.route is not None]
    if not routes:
        return {}
    fields = {"path": "path", "recurrence": "recurrence", "step_kernels": "steps"}
    record = {}
    for key, field in fields.items():
        values = list(dict.fromkeys(getattr(r, field) for r in routes))
        record[key] = "+".join(v or "-" for v in values)
    return record
