"""The sequence path's intermediate buffers, kept between calls (first touch of fresh
pages costs more than the arithmetic at small sizes)."""

from __future__ import annotations

import torch

from .. import graphs


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
