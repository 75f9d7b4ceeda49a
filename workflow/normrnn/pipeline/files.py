"""Writing a file whole or not at all: into a temporary file of its own beside it (unique per
writer, so two writers of one path never share one), flushed to disk, then renamed over the
target; on failure the temporary file is removed and the error names the file, and a full
disk as such."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import tempfile
from pathlib import Path


class WriteError(OSError):
    pass


_UMASK = os.umask(0)  # read once (a process-wide setting: put straight back)
os.umask(_UMASK)
FULL = {errno.ENOSPC, errno.EDQUOT}
_HOST = socket.gethostname().replace(".", "-") or "host"


def write_atomic(path, write, previous=None) -> Path:
    """``write(f)`` into a fresh temporary file beside ``path``, then rename it to ``path``
    (the file there before renamed to ``previous`` first, where given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's host and pid in the name: a temporary file of a dead writer is known as such
    prefix = f".{path.name}.{_HOST}.{os.getpid()}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # as open() would make it (mkstemp's is owner-only)
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
        # I/O errors name the file (torch reports a full disk as a RuntimeError); others,
        # such as an object that cannot be pickled, pass as they are
        if isinstance(e, OSError | RuntimeError):
            raise WriteError(_message(path, e)) from e
        raise
    return path


def _message(path: Path, e: Exception) -> str:
    full = getattr(e, "errno", None) in FULL or "iostream error" in str(e)
    reason = str(e)
    if full:
        try:
            reason = f"the disk is full ({shutil.disk_usage(path.parent).free} bytes free)"
        except OSError:
            reason = "the disk is full"
    return f"{path}: could not be written: {reason} [{type(e).__name__}: {e}]"


def abandoned(tmp: Path, age: float = 60.0) -> bool:
    """Whether a temporary file of :func:`write_atomic` has no live writer: its writer's
    process on this host is gone (a kill), or it is older than ``age`` seconds (a writer on
    another host, whose pid this host cannot check)."""
    import time

    parts = tmp.name.split(".")  # "", name..., host, pid, random, "tmp"
    here = len(parts) >= 5 and parts[-4] == _HOST  # a pid of another host tells nothing
    pid = int(parts[-3]) if here and parts[-3].isdigit() else None
    if pid is not None and pid != os.getpid():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, another user's
    try:
        return time.time() - tmp.stat().st_mtime > age
    except FileNotFoundError:
        return False
