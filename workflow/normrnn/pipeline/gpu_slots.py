"""One GPU per job on a host with several: a training job claims a free device slot, an
exclusive lock on ``.snakemake/normrnn-gpu/slot-<i>.lock``, and runs on ``cuda:<i>``. The lock
goes with the process (an exit or a kill frees it), so N GPUs run N jobs at once and never two
on one; the workflow caps its ``gpu`` resource at N so that no job waits here for long.

``NORMRNN_GPU_SLOTS=<N>`` stands in for N devices on a machine without them (the jobs claim
slots and run on the CPU): how the tests check the assignment."""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

STAND_IN = "NORMRNN_GPU_SLOTS"
LOCAL = "NORMRNN_LOCAL_GPUS"  # set by the workflow where jobs run on this machine: their GPUs
DIRECTORY = Path(".snakemake") / "normrnn-gpu"


def visible_gpus() -> int:
    """The devices jobs share out: the stand-in count where it is set, else CUDA's."""
    if os.environ.get(STAND_IN):
        return int(os.environ[STAND_IN])
    import torch

    return torch.cuda.device_count()


@dataclass
class Slot:
    index: int
    fd: int
    claimed_at: float

    def release(self) -> None:
        os.close(self.fd)  # (closing the descriptor drops its lock)


def local_gpus() -> int:
    """The GPUs a job shares with its siblings: those the workflow found on this machine when
    it runs its jobs here; none on a cluster node (its scheduler gives each job its GPUs)."""
    return int(os.environ.get(LOCAL) or 0)


def claim(n: int, directory: Path = DIRECTORY, poll: float = 0.5, log=print) -> Slot | None:
    """The first free of ``n`` slots, waiting for one while all are held; None where the file
    system has no locks (the job then runs on its configured device)."""
    directory.mkdir(parents=True, exist_ok=True)
    waiting = False
    while True:
        for i in range(n):
            fd = os.open(directory / f"slot-{i}.lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            except OSError as e:  # no flock here (some network file systems)
                os.close(fd)
                log(f"GPU slots: no file locks in {directory} ({e}); using the configured device")
                return None
            return Slot(i, fd, time.time())
        if not waiting:
            log(f"all {n} GPU slots are in use; waiting for one")
            waiting = True
        time.sleep(poll)


def device_for(device: str, slot: Slot | None) -> str:
    """The job's device: ``cuda:<slot>`` for ``auto`` or ``cuda`` with a slot on a machine with
    CUDA; as configured otherwise (a stand-in slot runs on the CPU)."""
    if slot is None or device not in ("auto", "cuda"):
        return device
    import torch

    return f"cuda:{slot.index}" if torch.cuda.is_available() else device
