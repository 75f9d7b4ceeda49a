"""The benchmark's measurements (not timings: those are figures, never asserted)."""

import json

import matplotlib.colors
import pandas as pd
import pytest
import torch
from matplotlib.container import BarContainer, ErrorbarContainer

from normrnn.compute import memory, native
from normrnn.outputs import bench, plots
from normrnn.pipeline.diagnostics import saved_bytes


def test_saved_bytes_counts_what_autograd_keeps():
    x = torch.randn(100, 10, requires_grad=True)
    assert saved_bytes(lambda: x.pow(2)) == 100 * 10 * 4  # pow saves its input
    w = torch.randn(10, 10, requires_grad=True)
    # mm saves both operands; tanh saves its output (two distinct tensors)
    expected = 4 * (100 * 10 + 10 * 10) + 4 * 100 * 10
    assert saved_bytes(lambda: torch.tanh(x @ w)) == expected


def test_saved_bytes_counts_the_sequence_paths_own_buffers():
    """The sequence path keeps its activations in a workspace beside autograd: a memory
    figure without them would favour it. At least the gates (T, B, 4H), c_t, tanh(c_t) and
    h_t must count (here ~3x what the layer's autograd tensors come to)."""
    from normrnn.methods.cells import LSTMLayer

    layer = LSTMLayer(2, 16, norm="normprop", max_steps=10)
    assert layer.path == "sequence"
    t, b, h = 10, 8, 16
    floats = t * b * 4 * h + (t + 1) * b * h + t * b * h + (t + 1) * b * h
    assert saved_bytes(lambda: layer(torch.randn(t, b, 2))[0].sum()) >= 4 * floats


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
    assert len(rows) == 2 * (1 + 4)  # per cell: the fused sanity row, then 2 norms × 2 quants
    keys = {
        "norm",
        "quant",
        "cell",
        "train_ratio",
        "train_ratio_lo",
        "train_ratio_hi",
        "infer_ratio",
        "infer_ratio_lo",
        "infer_ratio_hi",
        "repeats",
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
    assert {r["repeats"] for r in rows} == {2}
    text = capsys.readouterr().out
    assert "sgemm roof" in text and "allocator" in text and "compiled steps" in text


def test_glibc_defaults_leave_the_allocator_alone(monkeypatch):
    kept = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: kept.append(True))
    argv = ["--hidden=4", "--batch=2", "--steps=2", "--norms=none", "--quants=fp",
            "--cells=lstm", "--repeats=1", "--warmup=1", "--glibc-defaults"]  # fmt: skip
    env, rows = bench.run(bench.parse(argv))
    assert kept == [] and len(rows) == 2  # the fused sanity row and the variant


def test_options_as_values_are_the_command_lines():
    """A config's bench spec (values, lists) gives the options its command line would."""
    spec = {"hidden": 8, "batch": 4, "norms": ["none", "bn"], "cells": ["gru"], "threads": 2}
    argv = ["--hidden=8", "--batch=4", "--norms=none,bn", "--cells=gru", "--threads=2"]
    assert bench.options(**spec) == bench.parse(argv)
    assert bench.options(hidden=8, input=3).input == 3 and bench.options(hidden=8).input == 8
    with pytest.raises(ValueError, match="'hiden'"):
        bench.options(hiden=8)


def test_ratio_spread_is_the_median_and_quartiles_of_each_repeats_ratio():
    """Ratios base_i / var_i of 0.5, 1, 2, 4, 8 (in any order): median 2, quartiles 1 and 4.
    The repeats are paired: base 1, 2, 3 against 1, 1, 4 are ratios 1, 2, 0.75 (median 1,
    quartiles 0.875 and 1.5), where the ratio of the medians, 2 / 1, lies outside them."""
    var = [0.25, 2, 0.125, 1, 0.5]
    assert bench.ratio_spread([1.0] * 5, var) == (2.0, 1.0, 4.0)
    med, lo, hi = bench.ratio_spread([1.0, 2.0, 3.0], [1.0, 1.0, 4.0])
    assert (med, lo, hi) == pytest.approx((1.0, 0.875, 1.5))
    assert bench.ratio_spread([2.0], [4.0]) == (0.5, 0.5, 0.5)  # one repeat: no spread


def test_time_pair_keeps_every_repeat_alternately():
    calls = []
    base, var = bench.time_pair(
        lambda: calls.append("b"), lambda: calls.append("v"), torch.device("cpu"), 2, 5
    )
    assert len(base) == len(var) == 5 and all(t >= 0 for t in base + var)
    assert calls == ["b", "v"] * 7  # warm-up, then each repeat's pair side by side


@pytest.fixture(scope="module")
def bench_rows():
    """A tiny bench (two cells, two norms, fp and bc), allocator left alone."""
    spec = {"hidden": 8, "batch": 4, "steps": 5, "norms": ["none", "bn"], "quants": ["fp", "bc"],
            "cells": ["lstm", "gru"], "repeats": 5, "warmup": 1,
            "glibc_defaults": True}  # fmt: skip
    env, rows = bench.run(bench.options(**spec))
    return env, pd.DataFrame(rows)


def test_fused_row_first_per_cell_with_its_spread(bench_rows):
    """The sanity row: nn.LSTM (nn.GRU) against a second one, first in each cell, not through
    the cells' registry (path fused, quant fp); every row's median between its quartiles."""
    _, df = bench_rows
    for _, sub in df.groupby("cell", sort=False):
        first = sub.iloc[0]
        assert (first["norm"], first["quant"], first["path"]) == ("fused", "fp", "fused")
        assert (sub["norm"] == "fused").sum() == 1 and first["peak_mem_mb"] > 0
        assert first["train_ratio_lo"] <= first["train_ratio"] <= first["train_ratio_hi"]
    for kind in ("train", "infer"):
        lo, ratio, hi = (df[f"{kind}_ratio{s}"] for s in ("_lo", "", "_hi"))
        assert ((lo <= ratio) & (ratio <= hi) & (lo > 0)).all()
    assert (df["repeats"] == 5).all() and list(df["cell"].unique()) == ["lstm", "gru"]


def _drawn(fig) -> dict:
    """Per panel title: the bars' (gid, x, height, colour) and the error bars' (x, y0, y1)."""
    out = {}
    for ax in fig.axes:
        if not ax.get_title():
            continue
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        errs = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        drawn = [(b.get_gid(), b.get_x() + b.get_width() / 2, b.get_height(), b.get_facecolor())
                 for c in bars for b in c]  # fmt: skip
        segments = [seg for c in errs for coll in c.lines[2] for seg in coll.get_segments()]
        spans = [(s[0][0], min(s[0][1], s[1][1]), max(s[0][1], s[1][1])) for s in segments]
        dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        out[ax.get_title()] = drawn, spans, dashed
    return out


def test_figure_draws_each_rows_median_and_spread(bench_rows, tmp_path):
    """One bar per CSV row at its median train ratio, one error bar per row from its lo to
    its hi at the bar's x, the fused row grey and the others not, a dashed line at 1."""
    env, df = bench_rows
    fig = plots.bench_ratios(df, tmp_path / "b.png", env)
    assert (tmp_path / "b.png").stat().st_size > 0
    drawn = _drawn(fig)
    assert set(drawn) == {"cell = lstm", "cell = gru"}
    for cell, sub in df.groupby("cell"):
        bars, spans, dashed = drawn[f"cell = {cell}"]
        assert len(bars) == len(spans) == len(sub) == 5
        gids = [f"{cell}/{n}/{q}" for n, q in zip(sub.norm, sub.quant, strict=True)]
        assert [b[0] for b in bars] == gids
        assert [b[2] for b in bars] == pytest.approx(list(sub.train_ratio))
        assert [s[0] for s in spans] == pytest.approx([b[1] for b in bars])
        assert [s[1] for s in spans] == pytest.approx(list(sub.train_ratio_lo))
        assert [s[2] for s in spans] == pytest.approx(list(sub.train_ratio_hi))
        grey = [matplotlib.colors.to_hex(b[3]) == "#999999" for b in bars]
        assert grey == [True] + [False] * 4
        assert any(list(ln.get_ydata()) == [1.0, 1.0] for ln in dashed)
    label = fig.axes[0].get_ylabel().replace("\n", " ")
    assert label == "training throughput / fused (median, 25–75 % of 5 repeats)"
    title = fig.texts[0].get_text()
    assert "ran alone on the machine" in title and f"{env['threads']} threads" in title


def test_fused_bar_spans_parity_when_its_quartiles_do(tmp_path):
    """A hand-made table: the fused row's quartiles 0.9 and 1.1 straddle 1, its bar spans
    1.0; a variant's (1.2 to 1.4) does not."""
    common = {"cell": "lstm", "hidden": 8, "batch": 4, "steps": 5, "repeats": 21}
    df = pd.DataFrame([
        {**common, "norm": "fused", "quant": "fp", "train_ratio": 1.02, "train_ratio_lo": 0.9,
         "train_ratio_hi": 1.1},
        {**common, "norm": "bn", "quant": "fp", "train_ratio": 1.3, "train_ratio_lo": 1.2,
         "train_ratio_hi": 1.4},
    ])  # fmt: skip
    env = {"device": "cpu", "threads": 2, "allocator": "glibc"}
    fig = plots.bench_ratios(df, tmp_path / "b.png", env)
    ((bars, spans, _),) = _drawn(fig).values()
    (x_fused, lo_fused, hi_fused), (_, lo_bn, hi_bn) = spans
    assert lo_fused < 1.0 < hi_fused and (lo_fused, hi_fused) == pytest.approx((0.9, 1.1))
    assert not lo_bn <= 1.0 <= hi_bn
    assert bars[0][0] == "lstm/fused/fp" and x_fused == pytest.approx(bars[0][1])
    assert "of 21 repeats" in fig.axes[0].get_ylabel()
