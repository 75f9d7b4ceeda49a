"""Curves while jobs run: the config's ``tensorboard: true`` gives each train job a TensorBoard
writer (torch's ``SummaryWriter``; the ``tensorboard`` package of the ``[track]`` extra), off by
default. Watch them with ``tensorboard --logdir results/runs``.

A run writes into ``tensorboard/`` in its own directory: ``train/loss`` at every training
step, and after each epoch its history row (``epoch/<column>``: validation loss and metric,
learning rate, times), all against the training step. A resumed run purges what its killed
attempt wrote after the checkpoint it resumes from, so the curves hold each step once.
Writing curves decides no number: the switch is a job setting, not a param, so turning it on
reruns nothing.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

KEY = "tensorboard"  # the config's switch
EXTRA = "pip install -e '.[track]'"


def missing() -> str | None:
    """Why ``tensorboard: true`` cannot run here, naming the key and the extra that installs
    the writer's package; None where torch's writer imports."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return (
            f"{KEY}: true needs the tensorboard package, which is not installed in this "
            f"environment: {EXTRA} (or set {KEY}: false)"
        )
    return None


def require() -> None:
    if (why := missing()) is not None:
        raise RuntimeError(f"config key {why}")


class Curves:
    """A run's TensorBoard writer. ``resumed_at``: the last step of the checkpoint a resumed
    run starts from; what an earlier attempt wrote after it is dropped (TensorBoard's
    ``purge_step``, the first step to drop). A run from step 0 (first start, a refused
    checkpoint, a rerun after a change) starts an empty directory."""

    def __init__(self, logdir: str | Path, resumed_at: int = 0):
        require()
        from torch.utils.tensorboard import SummaryWriter

        if not resumed_at:
            shutil.rmtree(logdir, ignore_errors=True)
        self.writer = SummaryWriter(str(logdir), purge_step=resumed_at + 1 if resumed_at else None)

    def step(self, step: int, loss: float) -> None:
        self.writer.add_scalar("train/loss", loss, step)

    def epoch(self, row: dict) -> None:
        """An epoch's history row, each number against the row's training step."""
        for name, value in row.items():
            if name not in ("epoch", "step") and isinstance(value, float) and math.isfinite(value):
                self.writer.add_scalar(f"epoch/{name}", value, row["step"])
        self.writer.flush()  # an epoch is the unit a watcher waits for

    def close(self) -> None:
        self.writer.close()


class NoCurves:
    """What a run writes with the switch off: nothing."""

    def step(self, step: int, loss: float) -> None:
        pass

    def epoch(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def curves(logdir: str | Path | None, resumed_at: int = 0) -> Curves | NoCurves:
    """The run's writer: TensorBoard's into ``logdir``, or none without one."""
    return Curves(logdir, resumed_at) if logdir else NoCurves()
