"""Writing a file whole or not at all: into a temporary file of its own beside it (unique per
writer, so two writers of one path never share one), flushed to disk, then renamed over the
target; on failure the temporary file is removed and the error names the file, and a full
disk as such."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path


class WriteError(OSError):
    pass


def write_atomic(path, write, previous=None) -> Path:
    """``write(f)`` into a fresh temporary file beside ``path``, then rename it to ``path``
    (the file there before renamed to ``previous`` first, where given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None:
            with contextlib.suppress(FileNotFoundError):  # (another writer moved it first)
                os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, Exception):
            raise WriteError(_message(path, e)) from e
        raise
    return path


def _message(path: Path, e: Exception) -> str:
    free = shutil.disk_usage(path.parent).free
    full = getattr(e, "errno", None) == errno.ENOSPC or "iostream" in str(e) or free < 1 << 20
    reason = f"the disk is full ({free} bytes free on {path.parent})" if full else str(e)
    return f"{path}: could not be written: {reason} [{type(e).__name__}: {e}]"
