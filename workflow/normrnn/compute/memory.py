"""The process's memory allocator: which one it is (the bench records it), and with glibc,
freed memory kept for reuse rather than handed back to the kernel.

With glibc's defaults a freed block above the mmap threshold (which grows to at most 32 MiB)
is unmapped at once, and the top of the heap is trimmed past 128 KiB: the next allocation of
that size is mapped and page-faulted in again, zeroed by the kernel. oneDNN allocates the
fused LSTM's workspace afresh at each call, so on sequential MNIST (H=100, B=64, T=784, two
threads) ``nn.LSTM``'s training step took 410 ms under the defaults and 169 ms with freed
memory kept (H=256, T=100: 203 and 144 ms). The sequence path keeps its own buffers and
does not move. Training, evaluation and the bench keep freed memory
(:func:`keep_freed_memory`), so that the pipeline runs, and the bench measures, the fast
case; ``NORMRNN_MALLOPT=0`` leaves glibc's defaults. The cost: a process holds on to its
peak memory until it exits, which a training job does anyway.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEEP = 1 << 30  # bytes: blocks up to this size come from the heap, which is never trimmed
_kept: list[int] = []  # the thresholds set, once set


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The running process's C library where it is glibc, else None (musl, macOS, ...)."""
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_memory() -> bool:
    """Has glibc keep freed memory for reuse (mmap and trim thresholds at ``KEEP``, or the
    largest mmap threshold this glibc takes). False where it does not apply: another
    allocator preloaded, not glibc, or ``NORMRNN_MALLOPT=0``."""
    libc = glibc()
    if libc is None or _preloaded() or os.environ.get("NORMRNN_MALLOPT", "1") == "0":
        return False
    for size in (KEEP, 32 << 20):  # older glibc refuse an mmap threshold past 32 MiB
        if libc.mallopt(M_MMAP_THRESHOLD, size) and libc.mallopt(M_TRIM_THRESHOLD, KEEP):
            _kept[:] = [size]
            return True
    return False


def _preloaded() -> str | None:
    preload = os.environ.get("LD_PRELOAD", "")
    return next((n for n in ("jemalloc", "tcmalloc", "mimalloc") if n in preload), None)


def describe() -> str:
    """The allocator in use and its settings, for the bench's records: a preloaded one with
    its ``MALLOC_CONF``, or glibc's malloc with what :func:`keep_freed_memory` set and any
    ``MALLOC_*`` or ``GLIBC_TUNABLES`` variables."""
    name = _preloaded()
    if name:
        return f"{name} ({os.environ.get('MALLOC_CONF', 'default settings')})"
    if glibc() is None:
        return "system default"
    settings = [f"{k}={v}" for k, v in sorted(os.environ.items()) if _is_glibc_setting(k)]
    if _kept:
        settings.insert(0, f"freed memory kept (mmap threshold {_kept[0] >> 20} MiB)")
    return f"glibc malloc ({', '.join(settings) or 'defaults'})"


def _is_glibc_setting(key: str) -> bool:
    return key == "GLIBC_TUNABLES" or (key.startswith("MALLOC_") and key != "MALLOC_CONF")
