"""A run's checkpoints (atomic writes, the previous one kept), their fingerprint of settings
and code, and loading a trained model."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import zipfile
from pathlib import Path

import torch

from .files import write_atomic
from .models import build_model


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


class Checkpointer:
    """``last.pt`` and ``prev.pt`` in a directory; writes are atomic."""

    def __init__(self, directory):
        self.dir = Path(directory)

    def save(self, payload: dict) -> None:
        write_atomic(self.dir / "last.pt", lambda f: torch.save(payload, f), self.dir / "prev.pt")

    def clear(self) -> None:
        """Remove the checkpoints once the run's outputs are written."""
        stale = [p for p in self.dir.glob(".*.tmp") if time.time() - _mtime(p) > 60]
        for path in (self.dir / "last.pt", self.dir / "prev.pt", self.dir / "last.pt.tmp", *stale):
            path.unlink(missing_ok=True)  # (a fresh temporary file is another writer's)
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


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return time.time()
