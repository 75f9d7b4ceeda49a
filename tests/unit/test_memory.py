"""glibc keeping freed memory (``normrnn.compute.memory``): what it changes, measured in a
process of its own (mallopt is process-wide), and what the bench records of the allocator."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from normrnn.compute import memory

needs_glibc = pytest.mark.skipif(memory.glibc() is None, reason="needs glibc")

PROBE = """
import json, sys
sys.path.insert(0, sys.argv[2])
import torch
from normrnn.compute import memory

def rss():  # resident pages, in MiB
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

kept = memory.keep_freed_memory() if sys.argv[1] == "keep" else False
x = torch.ones(1 << 24)  # 64 MiB, every page touched
held = rss()
del x
print(json.dumps({"kept": kept, "released": held - rss(), "allocator": memory.describe()}))
"""


def probe(mode: str, **env) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode, str(ROOT / "workflow")],
        capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin", **env},
    )  # fmt: skip
    return json.loads(out.stdout)


@needs_glibc
def test_freed_memory_is_kept_for_reuse_and_recorded():
    """By default glibc hands a freed 64 MiB block back to the kernel (the next one is
    page-faulted in again); kept, the process holds it for the next allocation."""
    default, kept = probe("default"), probe("keep")
    assert default["released"] > 48 and default["allocator"] == "glibc malloc (defaults)"
    assert kept["kept"] and kept["released"] < 8
    assert kept["allocator"].startswith("glibc malloc (freed memory kept (mmap threshold")


@needs_glibc
def test_switched_off_or_under_another_allocator_glibc_keeps_its_defaults():
    off = probe("keep", NORMRNN_MALLOPT="0", MALLOC_ARENA_MAX="2")
    assert not off["kept"] and off["released"] > 48
    assert off["allocator"] == "glibc malloc (MALLOC_ARENA_MAX=2)"


def test_a_preloaded_allocator_is_named_with_its_settings(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    monkeypatch.setenv("MALLOC_CONF", "dirty_decay_ms:-1")
    assert memory.describe() == "jemalloc (dirty_decay_ms:-1)"
    assert not memory.keep_freed_memory()  # jemalloc's, not glibc's, to tune
