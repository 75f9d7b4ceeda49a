"""CUDA graphs of the recurrence's loops (``normrnn/compute/graphs.py``): replays against the step
loop. On a GPU with real graphs; everywhere with :class:`ReplayByRerun`, a stand-in that
replays by running the captured body again into the static outputs, so that the bookkeeping
(static inputs, static outputs copied out, the batch norms' records, the backward's graphs,
the signature) is tested without a GPU."""

import copy
import os

import pytest
import torch
from path_helpers import FAST, close, default_path

from normrnn import CELLS
from normrnn.compute import graphs
from normrnn.compute.sequence import POOL


def _copy_into(static, new):
    if isinstance(static, torch.Tensor):
        static.copy_(new)
    elif isinstance(static, list | tuple):
        assert len(static) == len(new)
        for a, b in zip(static, new, strict=True):
            _copy_into(a, b)


class ReplayByRerun:
    """A graph whose replay runs ``body`` on the static inputs and copies the results into
    the static outputs and records, leaving the terms' lists as a real replay does."""

    def __init__(self, body, entry):
        self.body, self.entry = body, entry

    def replay(self):
        terms = [term for term, _ in self.entry.records]
        before = [len(term._pending) for term in terms]
        outputs = self.body(*self.entry.inputs)
        fresh = [term._pending[n:] for term, n in zip(terms, before, strict=True)]
        for term, n in zip(terms, before, strict=True):
            del term._pending[n:]
        _copy_into(self.entry.outputs, outputs)
        _copy_into([r for _, r in self.entry.records], fresh)


def capture_by_running(body, tensors, terms):
    inputs = tuple(None if t is None else t.detach().clone() for t in tensors)
    recording = [term for term in terms if term.keeps_statistics]
    before = [len(term._pending) for term in recording]
    outputs = body(*inputs)
    records = [(t, t._pending[n:]) for t, n in zip(recording, before, strict=True)]
    entry = graphs.Captured(None, inputs, outputs, records, terms)
    entry.graph = ReplayByRerun(body, entry)
    return entry


@pytest.fixture(params=["cpu", "cuda"])
def device(request, monkeypatch):
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    else:
        monkeypatch.setattr(graphs, "capture", capture_by_running)
        monkeypatch.setattr(
            graphs,
            "enabled",
            lambda tensors: os.environ.get("NORMRNN_CUDA_GRAPHS") != "0",
        )
    return request.param


SEQUENCE = [(c, n) for c, n in FAST if default_path(c, n) == "sequence"]


def workspaces(cell):
    return [ws for key, spares in POOL.free.items() if key[0] == cell for ws in spares]


@pytest.mark.parametrize("cell,norm", SEQUENCE)
def test_graphs_replay_the_loop_on_new_inputs_and_weights(cell, norm, device, monkeypatch):
    """Training steps with new inputs, states and weights each time (the first runs eagerly,
    the second captures the loops as CUDA graphs, the rest replay them), then inference in
    eval mode: each against the step loop on the same device, to 1e-5. Without the graphs
    (``NORMRNN_CUDA_GRAPHS=0``) nothing is captured."""
    POOL.free.clear()
    torch.manual_seed(0)
    opts = {"p": 0.25} if norm == "prms" else None
    fast = CELLS[cell](5, 16, norm=norm, max_steps=6, norm_opts=opts).to(device)
    ref = copy.deepcopy(fast)
    ref.path = "loop"
    for i in range(4):
        x = torch.randn(6, 4, 5, device=device)
        state = [torch.randn(4, 16, device=device) for _ in fast.initial_state(x)]
        outs = []
        for layer in (fast, ref):
            xi = x.clone().requires_grad_()
            si = [s.clone().requires_grad_() for s in state]
            y, last = layer(xi, si)
            (y.pow(2).mean() + sum(s.mean() for s in last)).backward()
            grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
            bufs = {n: b.clone() for n, b in layer.named_buffers() if b.is_floating_point()}
            outs.append({"y": y, "x": xi.grad, **{f"s{j}": s.grad for j, s in enumerate(si)},
                         **grads, **bufs})  # fmt: skip
        assert outs[0].keys() == outs[1].keys()
        for name, expected in outs[1].items():
            close(outs[0][name], expected, f"step {i}: {name}")
        with torch.no_grad():
            for a, b in zip(fast.parameters(), ref.parameters(), strict=True):
                noise = 0.1 * torch.randn_like(a)
                a.add_(noise).grad = None
                b.add_(noise).grad = None
    (ws,) = workspaces(cell)
    assert len(ws.graphs) == 1 and len(next(iter(ws.graphs.captured.values())).children) == 1
    fast.eval()
    ref.eval()
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(6, 4, 5, device=device)
            torch.testing.assert_close(fast(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5)
    # eval mode: another graph where the terms' training flag changes the step (shared batch
    # statistics: in another workspace, as the input term moves into the loop)
    assert sum(len(w.graphs) for w in workspaces(cell)) == (1 if norm == "normprop" else 2)
    POOL.free.clear()
    monkeypatch.setenv("NORMRNN_CUDA_GRAPHS", "0")
    with torch.no_grad():
        for _ in range(3):
            fast(torch.randn(6, 4, 5, device=device))
    assert [len(ws.graphs) for ws in workspaces(cell)] == [0]
