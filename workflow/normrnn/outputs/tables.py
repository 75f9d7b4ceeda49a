"""Tables: every run in one tidy frame, and per-study mean ± std over seeds."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd

LISTS = ("grad_norms_init", "grad_norms_trained", "bn_statistics", "length_metrics")


def collect(paths) -> pd.DataFrame:
    """One row per run from eval.json files (per-step lists such as gradient norms left out)."""
    rows = [
        {k: v for k, v in json.loads(Path(p).read_text()).items() if k not in LISTS} for p in paths
    ]
    df = pd.DataFrame(rows)
    grid_cols = sorted({k for r in rows for k in (r.get("grid") or {})})
    for col in grid_cols:
        df[col] = [(r.get("grid") or {}).get(col) for r in rows]
    df = df.drop(columns=["grid"], errors="ignore")
    df.attrs["grid"] = grid_cols
    return df


def _cell(values: pd.Series, statuses: pd.Series, digits: int) -> str:
    ok = values[statuses != "diverged"].dropna()
    bad = (statuses == "diverged").sum()
    if ok.empty:
        return "diverged" if bad else "n/a"
    text = f"{ok.mean():.{digits}f}"
    if len(ok) > 1:
        text += f" ± {ok.std(ddof=1):.{digits}f}"
    if bad:
        text += f" ({bad} diverged)"
    if (statuses == "timeout").any():
        text += " (timeout)"
    return text


MIN_SEEDS = 3  # finished seeds a side before a difference is tested
HIGHER_IS_BETTER = {"accuracy": True, "bpc": False, "perplexity": False}  # the test metrics
DIRECTION = {m: "higher is better" if h else "lower is better" for m, h in HIGHER_IS_BETTER.items()}
SIGNIFICANCE = (
    f"p: Welch's t-test of each variant against its task's baseline, where both sides have "
    f"{MIN_SEEDS} finished seeds or more, Benjamini-Hochberg-adjusted over the table's tests "
    "(scipy.stats.false_discovery_control); * adjusted p < 0.05"
)


def welch_p(a, b) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances); NaN under two values a side."""
    from scipy import stats

    a, b = pd.Series(a, dtype=float).dropna(), pd.Series(b, dtype=float).dropna()
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    if a.std(ddof=1) == 0 and b.std(ddof=1) == 0:
        return 1.0 if a.mean() == b.mean() else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def study_table(df: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """One row per variant: the test metric (its direction named) as mean ± std over seeds,
    diverged runs named, finished of total seeds, and the p-value of its difference to the
    task's baseline (its first variant, grid values included), adjusted for the table's
    multiple comparisons (:data:`SIGNIFICANCE`). Times are not here: the bench measures cost
    alone on the machine, the jobs' own times ran beside other jobs."""
    from scipy import stats

    optional = [
        c for c in ["cell", "num_layers", *grid_columns(df)] if c in df and df[c].nunique() > 1
    ]
    keys = ["task", "metric", *optional, "norm", "quant"]
    rows, baseline, tests = [], {}, []
    for key, g in df.groupby(keys, sort=False, dropna=False):
        row = dict(zip(keys, key, strict=True))
        row["metric"] = f"{row['metric']} ({DIRECTION.get(row['metric'], '')})"
        ok = g.loc[g["status"] != "diverged", "test_metric"]
        first = row["task"] not in baseline
        base = baseline.setdefault(row["task"], ok)
        row["test"] = _cell(g["test_metric"], g["status"], digits)
        row["seeds"] = f"{len(ok.dropna())} of {len(g)}"
        testable = not first and min(len(ok.dropna()), len(base.dropna())) >= MIN_SEEDS
        row["p vs baseline"] = "baseline" if first else ("" if testable else "untested")
        if testable:
            tests.append((len(rows), welch_p(ok, base)))
        row["kbit"] = f"{g['model_bits'].iloc[0] / 1000:.1f}"
        rows.append(row)
    if tests:
        adjusted = stats.false_discovery_control([p for _, p in tests], method="bh")
        for (i, _), p in zip(tests, adjusted, strict=True):
            rows[i]["p vs baseline"] = f"{p:.3f}{' *' if p < 0.05 else ''}"
    return pd.DataFrame(rows)


IDENT = ("task", "norm", "quant", "seed")


def _runs(paths, extra=()):
    """(identifying columns with the grid axes ``extra``, eval.json) of each run."""
    for p in paths:
        r = json.loads(Path(p).read_text())
        yield {k: r.get(k) for k in IDENT} | {k: (r.get("grid") or {}).get(k) for k in extra}, r


def gradient_flow(paths, extra=()) -> pd.DataFrame:
    """Long table of ‖∂L/∂h_t‖: task, norm, quant, seed, the grid axes ``extra``, when
    (init/trained), t, norm value."""
    rows = [
        {**ident, "when": when, "t": t + 1, "grad_norm": g}
        for ident, r in _runs(paths, extra)
        for when in ("init", "trained")
        for t, g in enumerate(r.get(f"grad_norms_{when}") or [])
    ]
    return pd.DataFrame(rows, columns=[*IDENT, *extra, "when", "t", "grad_norm"])


def _per_step(paths, key, extra=()) -> pd.DataFrame:
    """Long table of the list of records under ``key`` in each eval.json, with the run's
    identifying columns and its grid axes (``extra``) prepended."""
    return pd.DataFrame(
        [{**ident, **rec} for ident, r in _runs(paths, extra) for rec in r.get(key) or []]
    )


def batch_norm_statistics(paths) -> pd.DataFrame:
    """Per run, batch norm term and step t: the population and the batch scale (and means)."""
    return _per_step(paths, "bn_statistics")


def length_metrics(paths, extra=()) -> pd.DataFrame:
    """Per run and test sequence length: test loss and metric (``eval_seq_lens``)."""
    return _per_step(paths, "length_metrics", extra)


def grid_columns(df: pd.DataFrame) -> list[str]:
    """The study's grid axes: the keys of the runs' ``grid`` (kept by :func:`collect`)."""
    return [c for c in df.attrs.get("grid", []) if c in df]


def baselines(df: pd.DataFrame) -> str:
    """Each task's baseline (its first variant in the config's order) with its grid values."""
    grid = [c for c in grid_columns(df) if df[c].nunique() > 1]
    parts = []
    for task, r in df.groupby("task", sort=False).first().iterrows():
        setting = "".join(f", {c}={r[c]}" for c in grid)
        parts.append(f"{task}: {r['norm']}+{r['quant']}{setting}")
    return "Baselines: " + "; ".join(parts)


def caption(df: pd.DataFrame) -> str:
    return (
        "Test metric, mean ± std over the finished seeds (a single seed shows no ±); "
        f"{SIGNIFICANCE}. {baselines(df)}."
    )


def write_tables(df: pd.DataFrame, md_path, tex_path, html_path, title: str) -> pd.DataFrame:
    table = study_table(df)
    text = caption(df)
    Path(md_path).write_text(f"# {title}\n\n{text}\n\n" + table.to_markdown(index=False) + "\n")
    Path(tex_path).write_text(table.to_latex(index=False, escape=True, caption=text))
    Path(html_path).write_text(html_table(table, title, text))
    return table


HTML_STYLE = """
body { font-family: system-ui, sans-serif; font-size: 14px; margin: 1em; }
table { border-collapse: collapse; }
caption { caption-side: top; text-align: left; padding: 0 0 .6em; max-width: 60em; }
th, td { border: 1px solid #bbb; padding: .25em .6em; }
th { background: #eee; cursor: pointer; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
"""
# Click a column's header to sort by it (numbers as numbers; again to reverse).
SORT_SCRIPT = """
document.querySelectorAll("th").forEach((th, col) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], rows = [...body.rows];
  const key = r => { const t = r.cells[col].innerText, x = parseFloat(t);
                     return isNaN(x) ? t : x; };
  const dir = th.dataset.dir === "up" ? -1 : 1; th.dataset.dir = dir > 0 ? "up" : "down";
  rows.sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * dir);
  rows.forEach(r => body.appendChild(r));
}));
"""


def html_table(table: pd.DataFrame, title: str, text: str) -> str:
    """A page a reader browses: borders, numbers aligned right, the caption above, sortable
    columns (click a header); the report shows it as it is."""
    import html

    numeric = re.compile(r"^[-+]?\d[\d.,]*(e[-+]?\d+)?( ± [\d.]+)?( \*)?( \(.*\))?$")
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    body = []
    for row in table.astype(object).where(table.notna(), "").itertuples(index=False):
        cells = []
        for v in row:
            v = str(v)
            cls = ' class="num"' if numeric.match(v) else ""
            cells.append(f"<td{cls}>{html.escape(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{HTML_STYLE}</style></head><body>\n<table>"
        f"<caption><b>{html.escape(title)}</b>. {html.escape(text)}</caption>\n"
        f"<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody></table>\n"
        f"<script>{SORT_SCRIPT}</script></body></html>\n"
    )


# A reported row's split → the run's column it compares with (and a note where it is unsure).
SPLIT_COLUMNS = {"test": "test_metric", "not stated": "test_metric", "": "test_metric"}
METRIC_COLUMNS = {"size_kb": "size_kb", "time_s_per_epoch": "seconds_per_epoch"}


def reproduced_column(split: str, metric: str) -> tuple[str, str]:
    """The run column a reported (split, metric) compares with, and a note."""
    if metric in METRIC_COLUMNS:
        return METRIC_COLUMNS[metric], ""
    if split.startswith("valid"):
        return "valid_metric", "validation split, under the run's validation protocol"
    if split == "not stated":
        return "test_metric", "the paper does not say the split: compared with the test split"
    return SPLIT_COLUMNS.get(split, "test_metric"), ""


def compare_reported(
    runs: pd.DataFrame, reported: pd.DataFrame, paper: str | None, tolerance: dict
):
    """The paper's reported numbers beside the reproduced ones (mean ± std over seeds), like
    with like: the reported row's split (test, or validation: the selected model's
    validation metric) and metric (a model size in KiB, seconds per epoch). A reported row
    matches the study's runs of the same task (``report_as``), norm and quantizer; where the
    paper reports several hidden sizes, the runs are matched to the nearest one, and a size
    that differs is said, not flagged. ``flag`` marks a difference larger than the metric's
    tolerance; times per epoch are compared as ratios to the baseline's (other hardware)."""
    columns = ["task", "norm", "quant", "metric", "split", "reported H", "run H", "reported",
               "reproduced", "n", "difference", "flag", "note", "source"]  # fmt: skip
    if paper is None:
        return pd.DataFrame(columns=columns)
    runs = runs.assign(report_task=runs["report_as"] if "report_as" in runs else runs["task"])
    rep = reported[(reported["paper"] == paper) & reported["task"].isin(runs["report_task"])]
    rep = rep.fillna({"split": ""})
    rows = []
    for (task, norm, quant, metric, split), group in rep.groupby(
        ["task", "norm", "quant", "metric", "split"], sort=False
    ):
        sel = runs[(runs.report_task == task) & (runs.norm == norm) & (runs.quant == quant)]
        pairs = (
            _nearest_sizes(group, sel)
            if len(sel)
            else [(task, None, r) for _, r in group.iterrows()]
        )
        column, note = reproduced_column(split, metric)
        for run_task, h, r in pairs:
            mine = sel[(sel.task == run_task) & (sel.hidden_size == h)]
            ok = mine[mine.status != "diverged"]
            values = ok[column].dropna() if column in ok else pd.Series(dtype=float)
            row = {"task": run_task, "norm": norm, "quant": quant, "metric": metric, "split": split,
                   "reported H": int(r["hidden_size"]), "run H": h, "reported": r["value"],
                   "n": len(mine), "source": r["source"], "note": note}  # fmt: skip
            if values.empty:
                row.update(
                    reproduced="diverged" if len(mine) else "not run", difference=None, flag=""
                )
                rows.append(row)
                continue
            std = f" ± {values.std(ddof=1):.3f}" if len(values) > 1 else ""
            diff = values.mean() - r["value"]
            row.update(reproduced=f"{values.mean():.3f}{std}", difference=round(diff, 4), flag="")
            if metric == "time_s_per_epoch":  # other hardware: as ratios, never flagged
                row.update(difference=None, note=_time_ratio(runs, rep, task, h, values, r))
            if h != int(r["hidden_size"]):
                row["flag"] = "other size"
            elif row["difference"] is not None and abs(diff) > tolerance.get(metric, math.inf):
                row["flag"] = "outside tolerance"
            rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def _time_ratio(runs, rep, task, h, values, reported_row) -> str:
    """Seconds per epoch as a ratio to the baseline's (none, fp) of the same task and size,
    reported and reproduced: absolute times depend on the hardware."""
    base = rep[(rep.task == task) & (rep.norm == "none") & (rep.quant == "fp")]
    base = base[base.metric == "time_s_per_epoch"]
    mine = runs[(runs.report_task == task) & (runs.norm == "none") & (runs.quant == "fp")]
    mine = mine[mine.hidden_size == h]["seconds_per_epoch"].dropna()
    if base.empty or mine.empty:
        return "other hardware: no baseline to compare the ratio with"
    paper = reported_row["value"] / base["value"].iloc[0]
    ours = values.mean() / mine.mean()
    return f"other hardware; relative to the baseline: reported {paper:.2f}, reproduced {ours:.2f}"


def _nearest_sizes(reported_rows: pd.DataFrame, runs: pd.DataFrame) -> list:
    """(task, hidden size run, the reported row of the nearest size) for each task and size
    run (the runs of two tasks that report as one are never pooled)."""
    out = []
    for (task, h), _ in runs.groupby(["task", "hidden_size"], sort=True):
        i = (reported_rows["hidden_size"] - h).abs().argmin()
        out.append((task, int(h), reported_rows.iloc[i]))
    return out
