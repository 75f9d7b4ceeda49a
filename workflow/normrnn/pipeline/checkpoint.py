"""A run's checkpoints (atomic writes, the previous one kept), their fingerprint of settings
and code, the states of the random number generators they keep, and loading a trained
model."""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..methods.models import build_model
from .files import abandoned, write_atomic


class CheckpointError(RuntimeError):
    pass


def verified(path) -> Path:
    """``path``, once every member of its archive (``torch.save`` writes a zip) matches its
    CRC; ``torch.load`` checks none, and loads flipped bits as numbers. Raises
    :class:`CheckpointError` naming the file and the damaged member."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable archive ({e})") from e
    if bad is not None:
        raise CheckpointError(f"{path}: {bad} is damaged (its CRC does not match)")
    return Path(path)


def fingerprint(params: dict, code: str = "") -> str:
    """Identifies a run's settings: a checkpoint is only resumed by the same run."""
    blob = json.dumps(params, sort_keys=True, default=str) + code
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def rng_states() -> dict:
    """The states of the random number generators a run draws from, for its checkpoint:
    torch's on the CPU (``"torch"``: the initialisation, and dropout and ``h0_noise`` on the
    CPU), CUDA's, one per device, where this process uses CUDA (``"cuda"``: dropout and
    ``h0_noise`` on a GPU), Python's ``random`` and NumPy's global generator (``"python"``,
    ``"numpy"``: the package draws from neither, code it calls may). The order of the data
    needs none: each epoch's comes from a generator of its own, seeded by the run's seed and
    the epoch (tasks.py), so a resumed run draws it again."""
    states = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_initialized():  # (asking for its states would initialise CUDA)
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states, log=print) -> None:
    """Set the generators to ``states`` (from :func:`rng_states`). A checkpoint from before
    these held torch's CPU state alone, as a tensor: that one is restored. A generator the
    checkpoint does not hold (or CUDA states for devices this machine lacks) goes on from
    the run's seed, and the log says so: the run may then part from an uninterrupted one."""
    if isinstance(states, torch.Tensor):
        states = {"torch": states}
    states = states if isinstance(states, dict) else {}
    restore = {
        "torch": torch.set_rng_state,
        "python": random.setstate,
        "numpy": np.random.set_state,
    }
    missing = [name for name in restore if name not in states]
    for name, set_state in restore.items():
        if name in states:
            set_state(states[name])
    cuda = states.get("cuda")
    if cuda is None:
        if torch.cuda.is_initialized():
            missing.append("cuda")
    else:
        count = min(len(cuda), torch.cuda.device_count() if torch.cuda.is_available() else 0)
        if count:
            torch.cuda.set_rng_state_all(cuda[:count])
        if count < len(cuda):
            missing.append(f"cuda on {len(cuda) - count} device(s) not on this machine")
    if missing:
        log(f"the checkpoint keeps no state of {', '.join(missing)}: from the seed instead")


class Checkpointer:
    """``last.pt`` and ``prev.pt`` in a directory; writes are atomic."""

    def __init__(self, directory):
        self.dir = Path(directory)

    def save(self, payload: dict) -> None:
        write_atomic(self.dir / "last.pt", lambda f: torch.save(payload, f), self.dir / "prev.pt")

    def clear(self) -> None:
        """Remove the checkpoints once the run's outputs are written."""
        stale = [p for p in self.dir.glob(".*.tmp") if abandoned(p)]
        for path in (self.dir / "last.pt", self.dir / "prev.pt", self.dir / "last.pt.tmp", *stale):
            path.unlink(missing_ok=True)  # (a live writer's temporary file stays)
        with contextlib.suppress(OSError):
            self.dir.rmdir()

    def load(self, log=print) -> dict | None:
        for path in (self.dir / "last.pt", self.dir / "prev.pt"):
            if not path.exists():
                continue
            try:
                return torch.load(verified(path), weights_only=False)
            except Exception as e:  # a truncated or garbled file: fall back to the previous
                log(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); trying prev.pt")
        return None


def load_model(path, which: str = "last") -> tuple[torch.nn.Module, dict]:
    """Load a trained model written by :func:`train`: the last one, or ``which="best"`` the
    best-validation one (the last one where the run kept none)."""
    try:
        saved = torch.load(verified(path), weights_only=False, map_location="cpu")
        model = build_model(**saved["spec"])
        state = saved.get("best_state_dict") if which == "best" else None
        model.load_state_dict(state or saved["state_dict"])
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot load the trained model ({type(e).__name__}: {e})"
        ) from e
    return model, saved
