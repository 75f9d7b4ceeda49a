"""What produced a result: the code's commit, the versions, the device and the settings that can
change numbers, recorded in every run's ``train.json`` and ``eval.json`` (and so in
``summary.csv``) so that two results can be told apart by what made them."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path

import torch

from ..compute import memory

ROOT = Path(__file__).resolve().parents[3]  # the repository holding workflow/normrnn


def git_state(root: str | Path = ROOT) -> str:
    """The commit of the checkout holding the code; ``<commit>-dirty-<hash>`` when tracked files
    differ from it (the hash of ``git diff HEAD``, so two trees dirty alike read alike);
    ``unknown`` outside a git checkout."""

    def git(*args) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown"
        commit = head.stdout.decode().strip()
        diff = git("diff", "HEAD", "--binary").stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"{commit}-dirty-{hashlib.sha256(diff).hexdigest()[:12]}" if diff else commit


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def record(device: torch.device, root: str | Path = ROOT) -> dict:
    """The run's provenance: commit, Python, torch, CUDA, cuDNN and Triton versions, the device's
    name, threads, memory allocator and the determinism settings."""
    cuda = device.type == "cuda"
    return {
        "code_commit": git_state(root),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda if cuda else None,
        "cudnn_version": torch.backends.cudnn.version() if cuda else None,
        "triton_version": _version("triton") if cuda else None,
        "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_name(),
        "host": platform.node(),
        "threads": torch.get_num_threads(),
        "allocator": memory.describe(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark if cuda else None,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
