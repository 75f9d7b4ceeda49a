"""CUDA graphs for the hand-written recurrence's step loops (``sequence/``).

On a GPU a step of the recurrence is a dozen small kernels, and launching them from Python
costs more than running them: at H=1000 the sequence path spent about four fifths of its time
in launches. A CUDA graph records the launches of a whole loop once and replays them as one.

:func:`run` calls ``body(*tensors)`` through a graph kept in a :class:`Graphs` (one per
workspace, whose buffers the graph writes): the first call with a new signature runs eagerly
(it warms up the libraries), the second captures, and later calls copy their inputs into the
graph's static inputs and replay. What a replay returns are the graph's static outputs, valid
until the next replay of the same graph: the callers copy out what they hand to autograd or
to the user, and keep the workspace (so its graphs) to themselves until their backward.

A term's per-step records of batch statistics (``_pending``, flushed at the end of the
sequence) are Python side effects that a replay would not repeat: :func:`run` keeps the
records appended during capture and appends them again at each replay. A step must
not read values on the host, which a graph cannot. On the CPU, under an outer capture, or
with the environment variable ``NORMRNN_CUDA_GRAPHS=0``, the body runs eagerly.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch


def enabled(tensors: Sequence) -> bool:
    return (
        tensors[0].is_cuda
        and os.environ.get("NORMRNN_CUDA_GRAPHS", "1") != "0"
        and not torch.cuda.is_current_stream_capturing()
    )


class Captured:
    """One captured call: its graph, static inputs and outputs, the terms' records, and the
    graphs of the calls that depend on its outputs (the backward of a forward)."""

    def __init__(self, graph, inputs, outputs, records, terms):
        self.graph, self.inputs, self.outputs, self.records = graph, inputs, outputs, records
        self.terms = tuple(terms)  # alive as long as the graph that reads and feeds them
        self.children = Graphs()

    def replay(self, tensors):
        for static, t in zip(self.inputs, tensors, strict=True):
            if static is not None:
                static.copy_(t)
        self.graph.replay()
        for term, records in self.records:
            term._pending.extend(records)  # the term's list of the moment: a flush renews it
        return self.outputs


class Graphs:
    """The captured calls of one workspace by signature, the ``keep`` most recent."""

    def __init__(self, keep: int = 2):
        self.keep, self.captured, self.seen = keep, OrderedDict(), set()

    def __len__(self) -> int:
        return len(self.captured)


def signature(tensors: Sequence, extra=()) -> tuple:
    shapes = tuple(None if t is None else (t.shape, t.dtype, t.device) for t in tensors)
    return shapes + tuple(extra)


def run(
    graphs: Graphs,
    body: Callable,
    tensors: Sequence,
    terms: Sequence = (),
    extra=(),
    warmup: bool = True,
):
    """``body(*tensors)``, through a graph where :func:`enabled`. Returns the outputs, the
    tensors the body saw (the static inputs when graphed) and the :class:`Captured` (None
    when it ran eagerly). ``extra``: what else the body depends on (part of the signature);
    ``warmup=False`` captures at the first call (the libraries are warm already)."""
    if not enabled(tensors):
        return body(*tensors), tensors, None
    sig = signature(tensors, extra)
    entry = graphs.captured.get(sig)
    if entry is not None:
        graphs.captured.move_to_end(sig)
        return entry.replay(tensors), entry.inputs, entry
    if warmup and sig not in graphs.seen:
        graphs.seen.add(sig)
        return body(*tensors), tensors, None
    entry = graphs.captured[sig] = capture(body, tensors, terms)
    while len(graphs.captured) > graphs.keep:
        graphs.captured.popitem(last=False)
    return entry.outputs, entry.inputs, entry


def capture(body: Callable, tensors: Sequence, terms: Sequence) -> Captured:
    """Captures ``body`` on static copies of ``tensors`` and runs it once."""
    inputs = tuple(None if t is None else t.detach().clone() for t in tensors)
    recording = [term for term in terms if term.keeps_statistics]
    before = [len(term._pending) for term in recording]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = body(*inputs)
    # this call's records are in place already: the capture appended them
    records = [(t, t._pending[n:]) for t, n in zip(recording, before, strict=True)]
    entry = Captured(graph, inputs, outputs, records, terms)
    graph.replay()  # the capture itself ran nothing
    return entry
