"""Tables: every run in one tidy frame, and per-study mean ± std over seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def collect(paths) -> pd.DataFrame:
    rows = [json.loads(Path(p).read_text()) for p in paths]
    df = pd.DataFrame(rows)
    grid_cols = sorted({k for r in rows for k in (r.get("grid") or {})})
    for col in grid_cols:
        df[col] = [(r.get("grid") or {}).get(col) for r in rows]
    return df.drop(columns=["grid"], errors="ignore")


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


def study_table(df: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """One row per variant: the test metric as mean ± std over seeds, diverged runs named."""
    optional = [
        c for c in ["cell", "num_layers", *grid_columns(df)] if c in df and df[c].nunique() > 1
    ]
    keys = ["task", "metric", *optional, "norm", "quant"]
    rows = []
    for key, g in df.groupby(keys, sort=False, dropna=False):
        row = dict(zip(keys, key, strict=True))
        row["test"] = _cell(g["test_metric"], g["status"], digits)
        row["seeds"] = len(g)
        row["ms/step"] = f"{1000 * g['seconds_per_step'].median():.1f}"
        row["kbit"] = f"{g['model_bits'].iloc[0] / 1000:.1f}"
        rows.append(row)
    return pd.DataFrame(rows)


def grid_columns(df: pd.DataFrame) -> list[str]:
    fixed = {
        "study",
        "task",
        "run",
        "norm",
        "quant",
        "seed",
        "dataset",
        "status",
        "stop_step",
        "epochs_done",
        "steps",
        "metric",
        "train_seconds",
        "seconds_per_step",
        "peak_memory_mb",
        "device",
        "threads",
        "n_params",
        "model_bits",
        "hidden_size",
        "cell",
        "num_layers",
        "test_loss",
        "test_metric",
        "infer_seconds_per_step",
    }
    return [c for c in df.columns if c not in fixed]


def write_tables(df: pd.DataFrame, md_path, tex_path, title: str) -> pd.DataFrame:
    table = study_table(df)
    Path(md_path).write_text(f"# {title}\n\n" + table.to_markdown(index=False) + "\n")
    Path(tex_path).write_text(table.to_latex(index=False, escape=True))
    return table
