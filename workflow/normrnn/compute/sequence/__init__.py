"""The LSTM and GRU recurrences over a whole sequence with a hand-written backward.

The step loop of :class:`~normrnn.methods.cells.RecurrentLayer` builds a dozen autograd nodes
per time step, and at small sizes their overhead, not arithmetic, sets the speed. Here one
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
while a stack stays in it (docs/performance.md has the figures). A term whose
statistics span all steps (shared batch statistics in training: ``TermNorm.stepwise``
false) normalizes the block as one step of T·B rows. Tests hold this path to the step loop
(outputs, gradients, population statistics) and its backward to finite differences
(``gradcheck``).
"""

from __future__ import annotations

import torch

from .. import graphs, native, triton_steps  # noqa: F401 (the GPU steps register on import)
from .gru import _GRUSequence, gru_sequence
from .loop import loop_form, loop_specs
from .lstm import _LSTMSequence, lstm_sequence
from .steps import STACK
from .workspace import POOL, Workspace, WorkspacePool

__all__ = ["POOL", "STACK", "Workspace", "WorkspacePool", "gru_sequence", "kept_tensors",
           "loop_form", "loop_specs", "lstm_sequence"]  # fmt: skip


def kept_tensors(node) -> list:
    """The tensors a sequence Function's backward ``node`` keeps beside autograd's saved ones
    (its workspace's buffers and the record its body kept); none for any other node."""
    if not isinstance(node, _LSTMSequence._backward_cls | _GRUSequence._backward_cls):
        return []
    return list(_tensors((list(node.ws.buffers.values()), node.kept)))


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, list | tuple):
        for item in obj:
            yield from _tensors(item)
