"""Seaborn figures of one study: learning curves, final metric, cost."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402


def _save(grid, path):
    grid.figure.savefig(path, dpi=110, bbox_inches="tight")
    matplotlib.pyplot.close(grid.figure)


def _placeholder(path, what: str) -> None:
    """A figure that says why there is nothing to plot (every run diverged, say)."""
    fig, ax = matplotlib.pyplot.subplots(figsize=(5, 1.5))
    ax.axis("off")
    ax.text(0.5, 0.5, f"no {what}: every run of this study diverged", ha="center", va="center")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    matplotlib.pyplot.close(fig)


def learning_curves(histories: pd.DataFrame, path) -> None:
    """Validation metric per epoch; one panel per task, colour = norm, dashes = quantizer."""
    metric_cols = [c for c in histories.columns if c.startswith("valid_") and c != "valid_loss"]
    long = histories.melt(
        id_vars=["task", "norm", "quant", "seed", "epoch"],
        value_vars=metric_cols,
        var_name="metric",
    ).dropna(subset=["value"])
    if long.empty:
        return _placeholder(path, "learning curves")
    g = sns.relplot(
        data=long,
        x="epoch",
        y="value",
        hue="norm",
        style="quant",
        col="task",
        row="metric",
        kind="line",
        errorbar="sd",
        facet_kws={"sharey": False},
        height=3.2,
        aspect=1.3,
    )
    _save(g, path)


def final_metric(runs: pd.DataFrame, path) -> None:
    """Test metric per norm × quantizer, mean with the standard deviation over seeds."""
    ok = runs[runs["status"] != "diverged"]
    if ok.empty:
        return _placeholder(path, "test metric")
    better = {
        "accuracy": "higher is better",
        "bpc": "lower is better",
        "perplexity": "lower is better",
    }
    ok = ok.assign(
        task=[f"{t}: {m} ({better.get(m, '')})" for t, m in zip(ok.task, ok.metric, strict=True)]
    )
    dodge = 0.4 if ok["quant"].nunique() > 1 else False
    g = sns.catplot(
        data=ok,
        x="norm",
        y="test_metric",
        hue="quant",
        col="task",
        kind="point",
        errorbar="sd",
        dodge=dodge,
        linestyle="none",
        sharey=False,
        height=3.2,
        aspect=1.5,
    )
    g.set_axis_labels("norm", "test metric")
    for ax in g.axes.flat:
        ax.tick_params(axis="x", rotation=45)
    _save(g, path)


def cost(runs: pd.DataFrame, path) -> None:
    """Median training time per step per norm × quantizer."""
    data = runs.assign(ms_per_step=1000 * runs["seconds_per_step"]).dropna(subset=["ms_per_step"])
    if data.empty:
        return _placeholder(path, "timings")
    g = sns.catplot(
        data=data,
        x="norm",
        y="ms_per_step",
        hue="quant",
        col="task",
        kind="bar",
        errorbar=None,
        sharey=False,
        height=3.2,
        aspect=1.5,
    )
    g.set_axis_labels("norm", "ms per training step")
    for ax in g.axes.flat:
        ax.tick_params(axis="x", rotation=45)
    _save(g, path)


def bench_ratios(df: pd.DataFrame, path, env: dict) -> None:
    """Training throughput of each variant as a fraction of the fused cell (1 = as fast)."""
    g = sns.catplot(
        data=df,
        x="norm",
        y="train_ratio",
        hue="quant",
        col="cell",
        kind="bar",
        errorbar=None,
        height=3.2,
        aspect=1.6,
    )
    for ax in g.axes.flat:
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.tick_params(axis="x", rotation=45)
    g.set_axis_labels("norm", "training throughput / fused")
    row = df.iloc[0]
    g.figure.suptitle(
        f"H={row['hidden']} B={row['batch']} T={row['steps']}, {env['device']}, {env['threads']} "
        f"threads, {env['allocator']}",
        y=1.04,
        fontsize=9,
    )
    _save(g, path)


def gradient_flow(flow: pd.DataFrame, path) -> None:
    """‖∂L/∂h_t‖ over t at initialisation and after training (log scale), colour = norm."""
    flow = flow[flow["grad_norm"] > 0]
    if flow.empty:
        return _placeholder(path, "gradient norms")
    g = sns.relplot(
        data=flow,
        x="t",
        y="grad_norm",
        hue="norm",
        style="quant",
        col="task",
        row="when",
        kind="line",
        errorbar=None,
        facet_kws={"sharey": False, "sharex": False},
        height=3.0,
        aspect=1.4,
    )
    g.set(yscale="log")
    g.set_axis_labels("time step t", "‖∂L/∂h_t‖")
    _save(g, path)
