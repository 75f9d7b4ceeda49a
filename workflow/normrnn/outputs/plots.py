"""Seaborn figures of a study: learning curves, final metric, gradient flow, its grid; every
grid axis kept apart (:func:`settings`), seeds the only thing averaged."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .tables import DIRECTION  # noqa: E402


def _save(grid, path):
    """Write a seaborn grid's (or a matplotlib) figure and close it; return the figure, whose
    artists the tests read back."""
    fig = getattr(grid, "figure", grid)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    matplotlib.pyplot.close(fig)
    return fig


def _placeholder(path, what: str, why: str = "every run of this study diverged") -> None:
    """A figure that says why there is nothing to plot (every run diverged, say)."""
    fig, ax = matplotlib.pyplot.subplots(figsize=(5, 1.5))
    ax.axis("off")
    ax.text(0.5, 0.5, f"no {what}: {why}", ha="center", va="center")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    matplotlib.pyplot.close(fig)


def settings(df: pd.DataFrame, axes=()) -> pd.DataFrame:
    """``df`` with ``variant`` (the norm, + quantizer where the study has several) and
    ``setting`` (the values of the grid axes that vary, "gamma_init=0.1, lr=0.03"; "" without
    a grid), so that a figure averages over seeds only. ``df.attrs["settings"]`` lists the
    settings in the axes' numeric order."""
    axes = [a for a in axes if a in df and df[a].nunique(dropna=False) > 1]
    several = df["quant"].nunique() > 1
    out = df.assign(variant=df["norm"] + "+" + df["quant"] if several else df["norm"])
    if not axes:
        out = out.assign(setting="")
        out.attrs["settings"] = []
        return out
    out = out.assign(
        setting=[
            ", ".join(f"{a}={v}" for a, v in zip(axes, row, strict=True))
            for row in out[axes].itertuples(index=False)
        ]
    )
    ranks = [out[a].map({v: i for i, v in enumerate(_ordered(out[a]))}) for a in axes]
    order = out.assign(_rank=list(zip(*ranks, strict=True))).sort_values("_rank", kind="stable")
    out.attrs["settings"] = list(dict.fromkeys(order["setting"]))
    return out


def _seeds_note(df: pd.DataFrame) -> str:
    n = df.groupby(["task", "variant", "setting"])["seed"].nunique()
    if n.max() <= 1:
        return "one seed per point: no error bars"
    spread = f"{n.min()}" if n.min() == n.max() else f"{n.min()}-{n.max()}"
    return f"mean ± sd over {spread} seeds"


def learning_curves(histories: pd.DataFrame, path, axes=()):
    """Training loss and validation metric per epoch, mean ± sd over seeds. One row of
    panels per task and quantity; grid settings as lines (one variant) or as columns (several);
    more than six variants get a panel each instead of sharing one."""
    from matplotlib.ticker import MaxNLocator

    skip = ("valid_loss", "valid_error")
    quantities = [
        c
        for c in histories.columns
        if c == "train_loss" or (c.startswith("valid_") and c not in skip)
    ]
    h = settings(histories, axes)
    long = h.melt(
        id_vars=["task", "variant", "setting", "seed", "epoch"],
        value_vars=quantities,
        var_name="quantity",
    ).dropna(subset=["value"])
    if long.empty:
        return _placeholder(path, "learning curves")
    long["panel"] = long["task"] + ": " + long["quantity"].str.replace("_", " ")
    variants = list(dict.fromkeys(h["variant"]))
    hue, col = "variant", None
    if h.attrs["settings"] and len(variants) == 1:
        hue = "setting"
    elif h.attrs["settings"]:
        col = "setting"
    elif len(variants) > 6:
        hue, col = None, "variant"
    order = {"setting": h.attrs["settings"], "variant": variants}
    row, wide = "panel", col and long[col].nunique() > 6
    if wide:  # many panels: one row each, so the figure grows down, not sideways
        row, col = col, row
    g = sns.relplot(
        data=long,
        x="epoch",
        y="value",
        hue=hue,
        hue_order=order.get(hue),
        row=row,
        col=col,
        row_order=order.get(row),
        col_order=order.get(col),
        kind="line",
        errorbar="sd",
        marker="o",
        markersize=3,
        facet_kws={"sharey": "col" if wide else "row"},
        height=2.4,
        aspect=1.5,
    )
    g.set_titles(row_template="{row_name}", col_template="{col_name}")
    for key, ax in g.axes_dict.items():
        panel = key if isinstance(key, str) else key[1 if wide else 0]
        ax.set_ylabel(panel.split(": ", 1)[-1] if panel in set(long["panel"]) else "")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    g.figure.suptitle(_seeds_note(h), y=1.01, fontsize=9)
    return _save(g, path)


def final_metric(runs: pd.DataFrame, path, axes=()):
    """Test metric per variant (x), colour = quantizer, or the grid setting where the study
    has a grid; mean ± sd over seeds (one seed: no bar)."""
    ok = settings(runs[runs["status"] != "diverged"], axes)
    if ok.empty:
        return _placeholder(path, "test metric")
    ok = ok.assign(
        task=[f"{t}: {m} ({DIRECTION.get(m, '')})" for t, m in zip(ok.task, ok.metric, strict=True)]
    )
    x, hue, order = "norm", "quant", None
    if ok.attrs["settings"]:
        x, hue, order = "variant", "setting", ok.attrs["settings"]
    dodge = 0.4 if ok[hue].nunique() > 1 else False
    g = sns.catplot(
        data=ok,
        x=x,
        y="test_metric",
        hue=hue,
        hue_order=order,
        col="task",
        kind="point",
        errorbar="sd",
        dodge=dodge,
        linestyle="none",
        sharey=False,
        height=3.2,
        aspect=1.5,
    )
    g.set_axis_labels("norm" if x == "norm" else "variant", "test metric")
    for ax in g.axes.flat:
        ax.tick_params(axis="x", rotation=45)
    g.figure.suptitle(_seeds_note(ok), y=1.02, fontsize=9)
    return _save(g, path)


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


def gradient_flow(flow: pd.DataFrame, path, axes=()):
    """‖∂L/∂h_t‖ over t at initialisation and after training (log scale), mean over seeds:
    colour = norm, or the grid setting where the study has one (dashes then tell the norms)."""
    flow = flow[flow["grad_norm"] > 0]
    if flow.empty:
        return _placeholder(path, "gradient norms")
    flow = settings(flow, axes)
    hue, style, hue_order = "variant", None, None
    if flow.attrs["settings"]:
        hue, hue_order = "setting", flow.attrs["settings"]
        style = "variant" if flow["variant"].nunique() > 1 else None
    g = sns.relplot(
        data=flow,
        x="t",
        y="grad_norm",
        hue=hue,
        hue_order=hue_order,
        style=style,
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
    g.figure.suptitle(_seeds_note(flow).replace("± sd ", ""), y=1.02, fontsize=9)
    return _save(g, path)


def _ordered(values) -> list:
    """Distinct values in numeric order when they are numbers, else in order of appearance."""
    distinct = list(dict.fromkeys(values))
    try:
        return sorted(distinct, key=float)
    except (TypeError, ValueError):
        return distinct


def grid_metric(runs: pd.DataFrame, axes: list[str], path):
    """Test metric against the study's grid axes, mean over seeds. One axis: the axis along
    x, colour = variant, a row of panels per task. Two or more: a heat map per task ×
    variant (× the further axes' values) with the first axis down and the second across,
    each cell annotated with its mean and its diverged runs; a cell where every run
    diverged is grey and says so. Colours run towards the better end of the metric."""
    runs = runs.assign(**{a: runs[a].astype(str) for a in axes})
    labelled = settings(runs, axes[2:])
    ok = labelled[labelled["status"] != "diverged"]
    if ok.empty:
        return _placeholder(path, "test metric")
    if len(axes) == 1:
        return _grid_points(labelled, ok, axes[0], path)
    import numpy as np

    a, b = axes[0], axes[1]
    rows_, cols_ = _ordered(runs[a]), _ordered(runs[b])
    panels = list(labelled.groupby(["task", "variant", "setting"], sort=False).groups)
    n = len(panels)
    ncols = min(4, n)
    nrows = -(-n // ncols)
    size = (ncols * (0.9 * len(cols_) + 2.4), nrows * (0.6 * len(rows_) + 1.4))
    fig, grid = matplotlib.pyplot.subplots(nrows, ncols, squeeze=False, figsize=size)
    for ax, (task, variant, setting) in zip(grid.flat, panels, strict=False):
        sel = labelled[
            (labelled.task == task) & (labelled.variant == variant) & (labelled.setting == setting)
        ]
        metric = sel["metric"].iloc[0]
        mean = ok[ok.index.isin(sel.index)].pivot_table(
            index=a, columns=b, values="test_metric", aggfunc="mean"
        )
        mean = mean.reindex(index=rows_, columns=cols_)
        bad = (
            sel.assign(d=sel.status == "diverged")
            .pivot_table(index=a, columns=b, values="d", aggfunc="sum")
            .reindex(index=rows_, columns=cols_)
            .fillna(0)
            .astype(int)
        )
        notes = np.empty(mean.shape, dtype=object)
        for i, j in np.ndindex(mean.shape):
            m, d = mean.iat[i, j], bad.iat[i, j]
            notes[i, j] = "diverged" if m != m and d else ("" if m != m else f"{m:.3f}")
            if d and m == m:
                notes[i, j] += f"\n({d} diverged)"
        cmap = "viridis" if DIRECTION.get(metric, "").startswith("higher") else "viridis_r"
        scale = ok.loc[ok["task"] == task, "test_metric"]  # one colour scale per task
        sns.heatmap(
            mean,
            annot=notes,
            fmt="",
            cmap=cmap,
            vmin=scale.min(),
            vmax=scale.max(),
            cbar=True,
            ax=ax,
            linewidths=0.5,
            linecolor="white",
            annot_kws={"fontsize": 8},
            cbar_kws={"label": f"test {metric} ({DIRECTION.get(metric, '')})"},
        )
        ax.set_facecolor("0.85")  # NaN cells (every run diverged), which heatmap leaves bare
        for i, j in zip(*np.nonzero(mean.isna().to_numpy() & (bad.to_numpy() > 0)), strict=True):
            ax.text(j + 0.5, i + 0.5, "diverged", ha="center", va="center", fontsize=8)
        title = f"{task}: {variant}" + (f", {setting}" if setting else "")
        ax.set_title(title, fontsize=9)
    for ax in list(grid.flat)[n:]:
        ax.axis("off")
    fig.suptitle(_seeds_note(labelled).replace("± sd ", ""), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _grid_points(runs: pd.DataFrame, ok: pd.DataFrame, x: str, path):
    """One grid axis along x: the test metric per variant, mean ± sd over seeds; a panel's
    title counts its diverged runs."""
    g = sns.catplot(data=ok, x=x, y="test_metric", hue="variant", row="task",
                    order=_ordered(runs[x]), kind="point", errorbar="sd",
                    dodge=0.3 if ok["variant"].nunique() > 1 else False, sharey="row",
                    height=3.0, aspect=1.4)  # fmt: skip
    for task, ax in g.axes_dict.items():
        sel = runs[runs["task"] == task]
        bad = int((sel["status"] == "diverged").sum())
        metric = sel["metric"].iloc[0]
        ax.set_title(f"{task}: test {metric} ({DIRECTION.get(metric, '')})"
                     + (f"\n{bad} of {len(sel)} runs diverged" if bad else ""))  # fmt: skip
    g.set_axis_labels(x, "test metric")
    g.figure.suptitle(_seeds_note(runs), y=1.02, fontsize=9)
    return _save(g, path)


VERDICT_COLOURS = {"holds": "tab:green", "fails": "tab:red", "not significant": "tab:orange",
                   "holds (untested)": "olivedrab", "fails (untested)": "indianred"}  # fmt: skip


def claims(table: pd.DataFrame, groups: list[pd.DataFrame], path):
    """The studies' claims at a glance: a panel per claim with every seed's value (dots) of what
    the claim reads (the test metric, or its ``column``) and the mean ± standard deviation of
    each side (bars), the bound as a line; the title
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
        column = runs.attrs.get("column", "test_metric")  # what the claim reads
        ok = runs[runs["status"] != "diverged"] if not runs.empty else runs
        if not ok.empty:
            order = list(dict.fromkeys(ok["side"]))
            sns.stripplot(data=ok, x="side", y=column, order=order, ax=ax, color="0.3",
                          size=4, jitter=0.15)  # fmt: skip
            sns.pointplot(data=ok, x="side", y=column, order=order, ax=ax, errorbar="sd",
                          color="tab:blue", linestyle="none", capsize=0.2, marker="_")  # fmt: skip
            ax.tick_params(axis="x", labelrotation=45 if len(order) > 3 else 0, labelsize=8)
            ax.set_ylabel(f"test {ok['metric'].iloc[0]}" if column == "test_metric" else column)
        if "bound" in runs.attrs:
            ax.axhline(runs.attrs["bound"], color="tab:red", linestyle="--", linewidth=1)
        ax.set_xlabel("")
        title = textwrap.fill(f"{claim['study']}: {claim['claim']}", 48)
        ax.set_title(f"{title}\n{claim['verdict']}", fontsize=8,
                     color=VERDICT_COLOURS.get(claim["verdict"], "0.4"))  # fmt: skip
    for ax in list(axes.flat)[len(table) :]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)
