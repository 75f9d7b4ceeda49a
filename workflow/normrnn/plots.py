"""Seaborn figures of one study: learning curves, final metric, cost."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402


def _save(grid, path):
    grid.figure.savefig(path, dpi=110, bbox_inches="tight")
    matplotlib.pyplot.close(grid.figure)


def _placeholder(path, what: str, why: str = "every run of this study diverged") -> None:
    """A figure that says why there is nothing to plot (every run diverged, say)."""
    fig, ax = matplotlib.pyplot.subplots(figsize=(5, 1.5))
    ax.axis("off")
    ax.text(0.5, 0.5, f"no {what}: {why}", ha="center", va="center")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    matplotlib.pyplot.close(fig)


def learning_curves(histories: pd.DataFrame, path) -> None:
    """Validation metric per epoch; one panel per task, colour = norm, dashes = quantizer."""
    skip = ("valid_loss", "valid_error")
    metric_cols = [c for c in histories.columns if c.startswith("valid_") and c not in skip]
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


def bench_ratios(df: pd.DataFrame, path, env: dict) -> matplotlib.figure.Figure:
    """Training throughput of each variant as a fraction of the fused cell (1 = as fast): the
    median of the repeats' ratios, with a bar from their 25th to their 75th percentile. One
    panel per cell, x = norm, colour = quantizer; grey (norm ``fused``, first): the fused
    kernel against a second instance of itself, whose bar is the noise around 1. Returns the
    figure (saved to ``path`` and closed: its artists can still be read)."""
    from matplotlib.patches import Patch

    grey = (0.6, 0.6, 0.6)
    cells = list(dict.fromkeys(df["cell"]))
    quants = list(dict.fromkeys(df.loc[df["norm"] != "fused", "quant"]))
    colours = dict(zip(quants, sns.color_palette(n_colors=max(len(quants), 1)), strict=False))
    width = 0.8 / max(len(quants), 1)
    fig, axes = matplotlib.pyplot.subplots(
        1, len(cells), figsize=(5.1 * len(cells), 3.2), sharey=True, squeeze=False
    )
    for ax, cell in zip(axes.flat, cells, strict=True):
        sub = df[df["cell"] == cell]
        norms = list(dict.fromkeys(sub["norm"]))
        xs, colour = [], []
        for norm, quant in zip(sub["norm"], sub["quant"], strict=True):
            fused = norm == "fused"
            shift = 0 if fused else (quants.index(quant) - (len(quants) - 1) / 2) * width
            xs.append(norms.index(norm) + shift)
            colour.append(grey if fused else colours[quant])
        y = sub["train_ratio"].to_numpy(float)
        lo, hi = sub["train_ratio_lo"].to_numpy(float), sub["train_ratio_hi"].to_numpy(float)
        bars = ax.bar(xs, y, width=width, color=colour)
        for bar, norm, quant in zip(bars, sub["norm"], sub["quant"], strict=True):
            bar.set_gid(f"{cell}/{norm}/{quant}")
        ax.errorbar(xs, y, yerr=[y - lo, hi - y], fmt="none", ecolor="black", lw=1, capsize=2.5)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xticks(range(len(norms)), norms, rotation=45, ha="right")
        ax.set_title(f"cell = {cell}", fontsize=9)
        ax.set_xlabel("norm")
    repeats = ", ".join(str(n) for n in sorted(set(df["repeats"])))
    axes.flat[0].set_ylabel(
        f"training throughput / fused\n(median, 25–75 % of {repeats} repeats)", fontsize=9
    )
    handles = [Patch(color=colours[q], label=q) for q in quants]
    handles.append(Patch(color=grey, label="fused vs. itself"))
    axes.flat[-1].legend(
        handles=handles, title="quant", loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8
    )
    row = df.iloc[0]
    fig.suptitle(
        f"H={row['hidden']} B={row['batch']} T={row['steps']}, {env['device']}, {env['threads']} "
        f"threads, {env['allocator']}\n"
        f"the bench ran alone on the machine (no other job beside it), on its "
        f"{env['threads']} threads; grey: the fused kernel against itself (1 but for the noise)",
        y=1.06,
        fontsize=9,
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    matplotlib.pyplot.close(fig)
    return fig


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


def _ordered(values) -> list:
    """Distinct values in numeric order when they are numbers, else in order of appearance."""
    distinct = list(dict.fromkeys(values))
    try:
        return sorted(distinct, key=float)
    except (TypeError, ValueError):
        return distinct


def grid_metric(runs: pd.DataFrame, axes: list[str], path) -> None:
    """Test metric against the study's grid axes: x = the first axis, panels = the second (if
    any) × task, colour = norm (+ quantizer). Each panel's title counts its diverged runs."""
    runs = runs.assign(
        variant=runs["norm"]
        if runs["quant"].nunique() == 1
        else runs["norm"] + "+" + runs["quant"],
        **{a: runs[a].astype(str) for a in axes},
    )
    ok = runs[runs["status"] != "diverged"]
    if ok.empty:
        return _placeholder(path, "test metric")
    x, col = axes[0], (axes[1] if len(axes) > 1 else None)
    g = sns.catplot(
        data=ok,
        x=x,
        y="test_metric",
        hue="variant",
        col=col,
        row="task",
        order=_ordered(runs[x]),
        col_order=_ordered(runs[col]) if col else None,
        kind="point",
        errorbar="sd",
        dodge=0.3 if ok["variant"].nunique() > 1 else False,
        sharey="row",
        height=3.0,
        aspect=1.2,
    )
    for key, ax in g.axes_dict.items():
        task, value = key if col else (key, None)
        sel = runs[runs["task"] == task]
        if col:
            sel = sel[sel[col] == value]
        bad = int((sel["status"] == "diverged").sum())
        ax.set_title(ax.get_title() + (f"\n{bad} of {len(sel)} runs diverged" if bad else ""))
    g.set_axis_labels(x, "test metric")
    _save(g, path)


def batch_norm_statistics(stats: pd.DataFrame, path) -> None:
    """The scale each batch norm divides by at step t (population) beside the scale of the
    test batch at t (batch), mean over features; rows = term (x: W_x x, h: W_h h, c: c_t).
    Statistics shared over time draw a flat population line through a batch curve that is
    not flat: the mismatch is what they normalize with."""
    if stats.empty:
        return _placeholder(path, "batch-norm statistics", "no run of this study uses batch norm")
    long = stats.melt(
        id_vars=["task", "norm", "term", "t"],
        value_vars=["batch", "population"],
        var_name="statistic",
        value_name="scale",
    )
    g = sns.relplot(
        data=long[long["scale"] > 0],
        x="t",
        y="scale",
        hue="norm",
        style="statistic",
        row="term",
        col="task",
        kind="line",
        errorbar=None,
        facet_kws={"sharey": False, "sharex": False},
        height=2.6,
        aspect=1.6,
    )
    g.set(yscale="log")
    g.set_axis_labels("time step t", "scale (mean over units)")
    _save(g, path)


def length_metrics(lengths: pd.DataFrame, path, trained_len: dict, style="quant") -> None:
    """Test metric against the test sequence length; a dotted line at each task's training
    length T_max. Colour = norm, dashes = ``style`` (a grid axis such as train_lengths, or
    the quantizer)."""
    if lengths.empty:
        return _placeholder(path, "length metrics", "no run evaluated other lengths")
    g = sns.relplot(
        data=lengths,
        x="length",
        y="test_metric",
        hue="norm",
        style=style,
        col="task",
        kind="line",
        marker="o",
        errorbar="sd",
        facet_kws={"sharey": False},
        height=3.0,
        aspect=1.4,
    )
    g.set(xscale="log")
    ticks = sorted(lengths["length"].unique())
    for task, ax in g.axes_dict.items():
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        if task in trained_len:
            ax.axvline(trained_len[task], color="grey", ls=":", lw=1)
    g.set_axis_labels("test sequence length", "test metric")
    _save(g, path)


def spectral_norms(runs: pd.DataFrame, path) -> None:
    """λ1 of the trained recurrent matrix W_h per norm × quantizer: as quantized (left) and as
    the cell uses it, after the weight transforms of wn/normprop (right); log scale. The dotted
    line is sqrt(H), the smallest λ1 a ±1 matrix can have (BinaryConnect's bound); a
    normalization that rescales the activations makes the cell indifferent to λ1."""
    cols = {"lambda1_hh_quantized": "quantized", "lambda1_hh_effective": "effective"}
    if not set(cols) <= set(runs.columns):
        return _placeholder(path, "spectral norms", "no run was evaluated")
    long = runs.melt(
        id_vars=["task", "norm", "quant", "sqrt_hidden"],
        value_vars=list(cols),
        var_name="matrix",
        value_name="lambda1",
    ).replace({"matrix": cols})
    g = sns.catplot(
        data=long,
        x="norm",
        y="lambda1",
        hue="quant",
        col="matrix",
        row="task",
        kind="point",
        errorbar="sd",
        dodge=0.4 if long["quant"].nunique() > 1 else False,
        linestyle="none",
        sharey="row",
        height=3.0,
        aspect=1.5,
    )
    g.set(yscale="log")
    for (task, _), ax in g.axes_dict.items():
        ax.axhline(long.loc[long.task == task, "sqrt_hidden"].max(), color="grey", ls=":", lw=1)
        ax.tick_params(axis="x", rotation=45)
    g.set_axis_labels("norm", "λ1 of W_h")
    _save(g, path)


VERDICT_COLOURS = {"holds": "tab:green", "fails": "tab:red", "not significant": "tab:orange",
                   "holds (untested)": "olivedrab", "fails (untested)": "indianred"}  # fmt: skip


def claims(table: pd.DataFrame, groups: list[pd.DataFrame], path) -> None:
    """The studies' claims at a glance: a panel per claim with every seed's test metric (dots)
    and the mean ± standard deviation of each side (bars), the bound as a line; the title
    gives the study, the claim and its verdict (green holds, red fails, orange neither; paler
    where untested).
    ``groups[i]`` holds claim i's runs with a ``side`` column (the group each belongs to)."""
    import textwrap

    if table.empty:
        return _placeholder(path, "claims", "no study states a claim")
    cols = min(3, len(table))
    rows = -(-len(table) // cols)
    fig, axes = matplotlib.pyplot.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows),
                                           squeeze=False)  # fmt: skip
    for ax, (_, claim), runs in zip(axes.flat, table.iterrows(), groups, strict=False):
        ok = runs[runs["status"] != "diverged"] if not runs.empty else runs
        if not ok.empty:
            order = list(dict.fromkeys(ok["side"]))
            sns.stripplot(data=ok, x="side", y="test_metric", order=order, ax=ax, color="0.3",
                          size=4, jitter=0.15)  # fmt: skip
            sns.pointplot(data=ok, x="side", y="test_metric", order=order, ax=ax, errorbar="sd",
                          color="tab:blue", linestyle="none", capsize=0.2, marker="_")  # fmt: skip
            ax.tick_params(axis="x", labelrotation=45 if len(order) > 3 else 0, labelsize=8)
            ax.set_ylabel(f"test {ok['metric'].iloc[0]}")
        if "bound" in runs.attrs:
            ax.axhline(runs.attrs["bound"], color="tab:red", linestyle="--", linewidth=1)
        ax.set_xlabel("")
        title = textwrap.fill(f"{claim['study']}: {claim['claim']}", 48)
        ax.set_title(f"{title}\n{claim['verdict']}", fontsize=8,
                     color=VERDICT_COLOURS.get(claim["verdict"], "0.4"))  # fmt: skip
    for ax in list(axes.flat)[len(table) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    matplotlib.pyplot.close(fig)
