"""Figures keep every grid axis apart: each kind is drawn from a small synthetic study with a
grid and one seed, and its data is read back (lines, points, heat-map cells, facets)."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from normrnn.outputs import plots

GAMMAS = [0.1, 0.5, 1.0]


def _num(v) -> float:
    return float(v) if not isinstance(v, str) else len(v)


def runs_of(grid: dict, norms=("bn",), seeds=(1,), metric="accuracy", diverged=()):
    """One row per norm × grid point × seed; test metric = a function of the point, so a figure
    that averages an axis away shows a different number."""
    rows = []
    for norm, point, seed in itertools.product(norms, itertools.product(*grid.values()), seeds):
        values = dict(zip(grid, point, strict=True))
        status = "diverged" if (norm, point) in diverged else "ok"
        value = round(0.5 + 0.1 * sum(i * _num(v) for i, v in enumerate(point, 1)), 6)
        rows.append({"task": "digits", "norm": norm, "quant": "fp", "seed": seed,
                     "metric": metric, "status": status,
                     "test_metric": math.nan if status == "diverged" else value + 0.01 * seed,
                     **values})  # fmt: skip
    return pd.DataFrame(rows)


def lines_with_data(ax) -> list:
    return [line for line in ax.get_lines() if len(line.get_xdata()) > 1]


def error_bars(ax) -> list:
    """The vertical two-point lines seaborn draws as error bars (NaN ones draw nothing)."""
    return [
        line
        for line in ax.get_lines()
        if len(line.get_xdata()) == 2
        and line.get_xdata()[0] == line.get_xdata()[1]
        and np.isfinite(line.get_ydata()).all()
    ]


def test_learning_curves_draw_one_line_per_grid_value_with_one_seed(tmp_path):
    runs = runs_of({"gamma_init": GAMMAS})
    hist = pd.concat(
        [
            pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [1.0, 0.8, 0.7],
                          "valid_accuracy": [0.3 + r.gamma_init, 0.4, 0.5]}).assign(
                **r[["task", "norm", "quant", "seed", "gamma_init"]].to_dict()
            )
            for _, r in runs.iterrows()
        ]
    )  # fmt: skip
    fig = plots.learning_curves(hist, tmp_path / "c.png", ["gamma_init"])
    axes = [ax for ax in fig.axes if ax.get_lines()]
    assert len(axes) == 2  # train loss and validation accuracy, one panel each
    for ax in axes:
        assert len(lines_with_data(ax)) == 3  # one per γ, not their mean
        assert all(isinstance(t, int | np.integer) or float(t).is_integer()
                   for t in ax.get_xticks())  # fmt: skip
    starts = sorted(round(line.get_ydata()[0], 6) for line in lines_with_data(axes[1]))
    assert starts == [0.4, 0.8, 1.3]
    assert not any(np.isfinite(p.vertices).any() for ax in axes for c in ax.collections
                   for p in c.get_paths())  # one seed: no band  # fmt: skip
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert [f"gamma_init={g}" for g in GAMMAS] == [t for t in legend if t.startswith("gamma")]
    assert {ax.get_ylabel() for ax in axes} == {"train loss", "valid accuracy"}


def test_learning_curves_with_many_variants_get_a_panel_each(tmp_path):
    norms = [f"n{i}" for i in range(8)]
    hist = pd.DataFrame(
        [{"task": "digits", "norm": n, "quant": "fp", "seed": s, "epoch": e, "train_loss": 1.0,
          "valid_accuracy": 0.5} for n in norms for s in (1, 2) for e in (1, 2)]
    )  # fmt: skip
    fig = plots.learning_curves(hist, tmp_path / "c.png")
    panels = [ax for ax in fig.axes if lines_with_data(ax)]
    assert len(panels) == 2 * len(norms)
    assert all(len(lines_with_data(ax)) == 1 for ax in panels)


def test_final_metric_keeps_the_grid_as_colours_without_error_bars_for_one_seed(tmp_path):
    fig = plots.final_metric(runs_of({"gamma_init": GAMMAS}), tmp_path / "m.png", ["gamma_init"])
    (ax,) = fig.axes
    points = sorted(round(y, 6) for line in ax.get_lines() for y in line.get_ydata() if y == y)
    assert points == [0.52, 0.56, 0.61]  # each γ's own value (+0.01 seed), never averaged
    assert not error_bars(ax)
    assert "one seed" in fig.texts[0].get_text()


def test_final_metric_draws_the_seeds_spread_where_there_are_seeds(tmp_path):
    fig = plots.final_metric(runs_of({}, norms=("none", "bn"), seeds=(1, 2, 3)), tmp_path / "m.png")
    (ax,) = fig.axes
    bars = error_bars(ax)
    assert len(bars) == 2
    assert np.ptp(bars[0].get_ydata()) == pytest.approx(2 * 0.01, rel=1e-6)  # ± 1 sd of 3 seeds
    assert "over 3 seeds" in fig.texts[0].get_text()


def test_gradient_flow_draws_each_gamma_and_norm(tmp_path):
    runs = runs_of({"gamma_init": GAMMAS}, norms=("none", "bn"))
    flow = pd.DataFrame(
        [{**r[["task", "norm", "quant", "seed", "gamma_init"]].to_dict(), "when": when, "t": t,
          "grad_norm": r.gamma_init * t * (2 if r.norm == "bn" else 1)}
         for _, r in runs.iterrows() for when in ("init", "trained") for t in (1, 2, 3)]
    )  # fmt: skip
    fig = plots.gradient_flow(flow, tmp_path / "g.png", ["gamma_init"])
    axes = [ax for ax in fig.axes if ax.get_lines()]
    assert len(axes) == 2  # init, trained
    for ax in axes:
        finals = sorted(round(line.get_ydata()[-1], 6) for line in lines_with_data(ax))
        assert finals == sorted(round(3 * g * k, 6) for g in GAMMAS for k in (1, 2))


def test_two_grid_axes_become_a_heat_map_with_diverged_cells_marked(tmp_path):
    grid = {"lr": [0.001, 0.03], "init_scale": [0.3, 3.0]}
    runs = runs_of(grid, norms=("none", "bn"), diverged={("none", (0.03, 3.0))})
    fig = plots.grid_metric(runs, list(grid), tmp_path / "h.png")
    maps = [ax for ax in fig.axes if ax.collections and ax.get_title()]
    assert [ax.get_title() for ax in maps] == ["digits: none", "digits: bn"]
    for ax in maps:
        assert ax.get_ylabel() == "lr" and ax.get_xlabel() == "init_scale"
        assert [t.get_text() for t in ax.get_yticklabels()] == ["0.001", "0.03"]
    cells = np.ma.filled(maps[0].collections[0].get_array(), np.nan).reshape(2, 2)
    expected = runs[runs.norm == "none"].pivot_table(index="lr", columns="init_scale",
                                                     values="test_metric")  # fmt: skip
    np.testing.assert_allclose(cells[0], expected.values[0])
    assert math.isnan(cells[1, 1]) and cells[1, 0] == pytest.approx(expected.values[1, 0])
    assert "diverged" in [t.get_text() for t in maps[0].texts]
    assert "diverged" not in [t.get_text() for t in maps[1].texts]
    # one colour scale for the task's panels: equal colours mean equal numbers
    assert maps[0].collections[0].get_clim() == maps[1].collections[0].get_clim()


def test_one_grid_axis_is_the_x_axis_with_a_point_per_value(tmp_path):
    runs = runs_of({"gamma_init": GAMMAS})
    fig = plots.grid_metric(runs, ["gamma_init"], tmp_path / "p.png")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.1", "0.5", "1.0"]
    ys = [round(y, 6) for line in ax.get_lines() for y in line.get_ydata() if y == y]
    assert ys == [0.52, 0.56, 0.61]


def test_a_third_grid_axis_gets_panels_of_its_own(tmp_path):
    grid = {"lr": [0.001, 0.03], "init_scale": [0.3, 3.0], "optimizer": ["adam", "sgd"]}
    fig = plots.grid_metric(runs_of(grid), list(grid), tmp_path / "h.png")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["digits: bn, optimizer=adam", "digits: bn, optimizer=sgd"]


def test_lengths_figure_draws_each_training_mode_and_labels_t_max(tmp_path):
    from normrnn.outputs import diagnostic_plots

    lengths = pd.DataFrame(
        [{"task": "chars", "norm": n, "quant": "fp", "seed": 1, "train_lengths": mode,
          "length": L, "test_metric": 1.0 + 0.1 * i + L / 1000}
         for n in ("bn", "ln") for i, mode in enumerate(["fixed", "variable"])
         for L in (25, 50, 100)]
    )  # fmt: skip
    fig = diagnostic_plots.length_metrics(
        lengths, tmp_path / "l.png", {"chars": 50}, "train_lengths"
    )
    (ax,) = fig.axes
    curves = [line for line in ax.get_lines() if len(line.get_xdata()) == 3]
    assert len(curves) == 4  # 2 norms × 2 training modes, none averaged
    assert "T_max = 50" in [t.get_text() for t in ax.texts]


def test_spectral_figure_labels_its_sqrt_h_line(tmp_path):
    from normrnn.outputs import diagnostic_plots

    runs = pd.DataFrame(
        [{"task": "digits", "norm": n, "quant": q, "seed": 1, "sqrt_hidden": 8.0,
          "lambda1_hh_quantized": 10.0 + i, "lambda1_hh_effective": 5.0 + i}
         for i, (n, q) in enumerate([("none", "bc"), ("ln", "bc")])]
    )  # fmt: skip
    fig = diagnostic_plots.spectral_norms(runs, tmp_path / "s.png")
    assert all("√H = 8.0" in [t.get_text() for t in ax.texts] for ax in fig.axes)
