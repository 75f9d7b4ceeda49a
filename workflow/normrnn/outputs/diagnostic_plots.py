"""Figures of what trained models show (a study's ``figures:``): batch-norm statistics over
time, the test metric per sequence length, λ1 of the recurrent matrix."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .plots import _placeholder, _save  # noqa: E402


def batch_norm_statistics(stats: pd.DataFrame, path):
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
    return _save(g, path)


def length_metrics(lengths: pd.DataFrame, path, trained_len: dict, style="quant"):
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
            ax.annotate(
                f"T_max = {trained_len[task]}",
                (trained_len[task], 1),
                fontsize=8,
                xycoords=("data", "axes fraction"),
                xytext=(3, -10),
                textcoords="offset points",
                color="grey",
            )
    g.set_axis_labels("test sequence length", "test metric")
    return _save(g, path)


def spectral_norms(runs: pd.DataFrame, path):
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
        root = long.loc[long.task == task, "sqrt_hidden"].max()
        ax.axhline(root, color="grey", ls=":", lw=1)
        ax.annotate(
            f"√H = {root:.1f}",
            (0, root),
            xycoords=("axes fraction", "data"),
            xytext=(3, 3),
            textcoords="offset points",
            fontsize=8,
            color="grey",
        )
        ax.tick_params(axis="x", rotation=45)
    g.set_axis_labels("norm", "λ1 of W_h")
    return _save(g, path)
