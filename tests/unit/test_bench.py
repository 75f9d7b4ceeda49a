"""The benchmark's measurements (not timings: those are figures, never asserted)."""

import json

import pytest
import torch

from normrnn import bench, memory, native


def test_saved_bytes_counts_what_autograd_keeps():
    x = torch.randn(100, 10, requires_grad=True)
    assert bench.saved_bytes(lambda: x.pow(2)) == 100 * 10 * 4  # pow saves its input
    w = torch.randn(10, 10, requires_grad=True)
    # mm saves both operands; tanh saves its output (two distinct tensors)
    expected = 4 * (100 * 10 + 10 * 10) + 4 * 100 * 10
    assert bench.saved_bytes(lambda: torch.tanh(x @ w)) == expected


def test_saved_bytes_counts_the_sequence_paths_own_buffers():
    """The sequence path keeps its activations in a workspace beside autograd: a memory
    figure without them would favour it. At least the gates (T, B, 4H), c_t, tanh(c_t) and
    h_t must count (here ~3x what the layer's autograd tensors come to)."""
    from normrnn.cells import LSTMLayer

    layer = LSTMLayer(2, 16, norm="normprop", max_steps=10)
    assert layer.path == "sequence"
    t, b, h = 10, 8, 16
    floats = t * b * 4 * h + (t + 1) * b * h + t * b * h + (t + 1) * b * h
    assert bench.saved_bytes(lambda: layer(torch.randn(t, b, 2))[0].sum()) >= 4 * floats


def test_step_flops_by_hand():
    # LSTM: 4 gates × H outputs × (I + H) inputs × 2 flops × T × B, and ×3 for backward
    assert bench.step_flops("lstm", 3, 5, 7, 11) == 3 * 2 * 11 * 7 * 8 * 4 * 5
    assert bench.step_flops("gru", 3, 5, 7, 11) == 3 * 2 * 11 * 7 * 8 * 3 * 5


def test_cli_writes_every_variant(tmp_path, capsys, monkeypatch):
    """Every variant's row, with the run's settings; the bench has freed memory kept as the
    pipeline's jobs do (here recorded, not done: mallopt would outlast the test)."""
    kept = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: kept.append(True))
    out = tmp_path / "b.json"
    argv = ["--hidden=8", "--batch=4", "--steps=5", "--norms=none,bn", "--quants=fp,bc",
            "--cells=lstm,gru", "--repeats=2", "--warmup=1", f"--json={out}"]  # fmt: skip
    assert bench.main(argv) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 8
    keys = {
        "norm",
        "quant",
        "cell",
        "train_ratio",
        "infer_ratio",
        "peak_mem_mb",
        "threads",
        "allocator",
        "path",
        "recurrence",
        "step_kernels",
    }
    assert keys <= set(rows[0]) and kept == [True]
    assert {r["allocator"] for r in rows} == {memory.describe()}
    compiled = native.library() is not None
    looped = compiled and native.gemm(torch.float32) is not None
    bn = [r for r in rows if r["norm"] == "bn"]  # the rows come from each layer's route
    assert {r["path"] for r in bn} == {"sequence"} and {r["path"] for r in rows} >= {"fused"}
    assert {r["step_kernels"] for r in bn} == {"compiled" if compiled else "torch"}
    assert {r["recurrence"] for r in bn} == {"compiled" if looped else "python"}
    assert {r["recurrence"] for r in rows if r["norm"] == "none"} == {""}
    assert all(r["train_ratio"] > 0 and r["peak_mem_mb"] > 0 for r in rows)
    text = capsys.readouterr().out
    assert "sgemm roof" in text and "allocator" in text and "compiled steps" in text


def test_glibc_defaults_leave_the_allocator_alone(monkeypatch):
    kept = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: kept.append(True))
    argv = ["--hidden=4", "--batch=2", "--steps=2", "--norms=none", "--quants=fp",
            "--cells=lstm", "--repeats=1", "--warmup=1", "--glibc-defaults"]  # fmt: skip
    env, rows = bench.run(bench.parse(argv))
    assert kept == [] and len(rows) == 1


def test_options_as_values_are_the_command_lines():
    """A config's bench spec (values, lists) gives the options its command line would."""
    spec = {"hidden": 8, "batch": 4, "norms": ["none", "bn"], "cells": ["gru"], "threads": 2}
    argv = ["--hidden=8", "--batch=4", "--norms=none,bn", "--cells=gru", "--threads=2"]
    assert bench.options(**spec) == bench.parse(argv)
    assert bench.options(hidden=8, input=3).input == 3 and bench.options(hidden=8).input == 8
    with pytest.raises(ValueError, match="'hiden'"):
        bench.options(hiden=8)
