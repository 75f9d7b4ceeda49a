"""Claims: the papers' findings as statements checked against the runs (``summary.csv``).

A study lists its claims (``claims:`` in the config); each is one of

* a comparison: ``better`` (a selector of runs) beats ``than`` (another) on the study's test
  metric, in the metric's direction (accuracy up, BPC and perplexity down), by more than
  ``margin`` (default 0) and more than the seeds' spread; with ``within``, ``better`` is
  claimed at least as good as ``than``: worse by at most ``within``;
* a bound: every variant matching ``each`` reaches ``reaches`` (at least, for accuracy; at
  most, for BPC and perplexity) on its mean over seeds;
* a match: the two selectors of ``same`` come within ``within`` of each other (RMSNorm
  matches LN, L1 BN matches L2 BN).

A claim reads the test metric of the selected model, or the run column ``column`` names
(``valid_metric_mean``, the mean validation metric over the epochs, says how fast a run
converged). A selector is a dict of run columns (``norm``, ``quant``, ``task``, grid axes)
to a value or a list of values. A comparison's verdict: ``holds`` (the difference goes the
claimed way beyond margin and spread, and Welch's test gives p < 0.05 where both sides have
3 seeds or more), ``fails`` (it goes the other way beyond the spread, significantly where
testable), ``not significant`` (neither), ``not run``; with fewer than 3 seeds a side no test
is made and the verdict says so: ``holds (untested)``, ``fails (untested)``. A bound holds
when every variant's mean reaches it (a diverged seed counts as missing it), and fails
naming the variants that miss and by how much. A match holds where the means differ by at
most ``within``, fails where they differ by more, significantly where testable
(``(untested)`` as above); so does an at-least-as-good comparison, on the worse side only.
Each verdict comes with the numbers it rests on.
"""

from __future__ import annotations

import pandas as pd

from .tables import HIGHER_IS_BETTER, welch_p

# A claim on another column than the metric reads it in that column's direction (times and
# memory: lower is better; throughputs: higher). Times are the jobs' own, beside other jobs.
COLUMN_HIGHER_IS_BETTER = {
    "seconds_per_epoch": False,
    "train_seconds_per_batch": False,
    "infer_seconds_per_batch": False,
    "train_tokens_per_s": True,
    "infer_tokens_per_s": True,
    "activation_mb": False,
    "param_mb": False,
}
VARIANT = ("task", "norm", "quant")


def select(runs: pd.DataFrame, selector: dict) -> pd.DataFrame:
    """The runs matching every key of ``selector`` (a value or a list of values)."""
    mask = pd.Series(True, index=runs.index)
    for key, want in (selector or {}).items():
        if key not in runs:
            return runs.iloc[0:0]
        allowed = want if isinstance(want, list) else [want]
        mask &= runs[key].isin(allowed) | runs[key].astype(str).isin(map(str, allowed))
    return runs[mask]


def _values(runs: pd.DataFrame, on: str = "test_metric") -> pd.Series:
    return runs.loc[runs["status"] != "diverged", on].dropna()


def _on(claim: dict) -> tuple[str, str]:
    """The column a claim reads, and how the evidence names it."""
    on = claim.get("column", "test_metric")
    return on, ("" if on == "test_metric" else f"{on}: ")


def _describe(name: str, values: pd.Series, n: int) -> str:
    if values.empty:
        return f"{name}: no finished run"
    spread = f" ± {values.std(ddof=1):.3f}" if len(values) > 1 else ""
    return f"{name} {values.mean():.3f}{spread} ({len(values)} of {n} seeds)"


def _name(selector: dict) -> str:
    return "+".join(str(v) for v in selector.values()) or "all"


def _untested(verdict: str, testable: bool) -> str:
    return verdict if testable else verdict + " (untested)"


def compare(runs: pd.DataFrame, claim: dict) -> tuple[str, str]:
    """The verdict of a comparison claim and the numbers it rests on."""
    better, than = select(runs, claim["better"]), select(runs, claim["than"])
    if better.empty or than.empty:
        return "not run", "no runs of " + (
            _name(claim["better"]) if better.empty else _name(claim["than"])
        )
    on, label = _on(claim)
    a, b = _values(better, on), _values(than, on)
    evidence = label + " vs ".join(
        _describe(_name(claim[side]), values, len(group))
        for side, values, group in (("better", a, better), ("than", b, than))
    )
    if a.empty or b.empty:
        return "fails" if a.empty and not b.empty else "not significant", evidence
    higher = COLUMN_HIGHER_IS_BETTER.get(on, HIGHER_IS_BETTER.get(better["metric"].iloc[0], True))
    sign = 1 if higher else -1
    diff = sign * (a.mean() - b.mean())
    spread = max(a.std(ddof=1) if len(a) > 1 else 0.0, b.std(ddof=1) if len(b) > 1 else 0.0)
    margin = claim.get("margin", 0.0)
    testable = len(a) >= 3 and len(b) >= 3
    p = welch_p(a, b) if testable else float("nan")
    evidence += f": {diff:+.3f} in the claimed direction (spread {spread:.3f}"
    if "within" in claim:  # at least as good: no worse than ``within``
        evidence += f", {claim['within']} worse allowed"
    evidence += f", Welch p = {p:.2g})" if testable else ", untested: fewer than 3 seeds)"
    significant = p < 0.05 if testable else True
    if "within" in claim:
        if diff >= -claim["within"]:
            return _untested("holds", testable), evidence
        return (_untested("fails", testable) if significant else "not significant"), evidence
    if diff > margin and diff > spread and significant:
        return _untested("holds", testable), evidence
    if diff < -spread and significant:
        return _untested("fails", testable), evidence
    return "not significant", evidence


def match(runs: pd.DataFrame, claim: dict) -> tuple[str, str]:
    """The verdict of a match claim: the two selections' means within ``within``."""
    first, second = (select(runs, s) for s in claim["same"])
    if first.empty or second.empty:
        return "not run", "no runs of " + _name(claim["same"][0 if first.empty else 1])
    on, label = _on(claim)
    a, b = _values(first, on), _values(second, on)
    names = [_name(s) for s in claim["same"]]
    evidence = label + f"{_describe(names[0], a, len(first))} vs "
    evidence += _describe(names[1], b, len(second))
    if a.empty or b.empty:
        return "fails", evidence
    diff = abs(a.mean() - b.mean())
    testable = len(a) >= 3 and len(b) >= 3
    p = welch_p(a, b) if testable else float("nan")
    evidence += f": they differ by {diff:.3f} (within {claim['within']}"
    evidence += f", Welch p = {p:.2g})" if testable else ", untested: fewer than 3 seeds)"
    if diff <= claim["within"]:
        return _untested("holds", testable), evidence
    if not testable or p < 0.05:
        return _untested("fails", testable), evidence
    return "not significant", evidence


def bound(runs: pd.DataFrame, claim: dict) -> tuple[str, str]:
    """The verdict of a bound claim: every variant's mean reaches ``reaches``."""
    mine = select(runs, claim.get("each", {}))
    if mine.empty:
        return "not run", "no runs"
    keys = [k for k in VARIANT if k in mine] + [k for k in claim.get("per", []) if k in mine]
    on, label = _on(claim)
    higher = COLUMN_HIGHER_IS_BETTER.get(on, HIGHER_IS_BETTER.get(mine["metric"].iloc[0], True))
    target, missed, seen = claim["reaches"], [], []
    for key, group in mine.groupby(keys, sort=False, dropna=False):
        values = _values(group, on)
        name = "+".join(str(k) for k in (key if isinstance(key, tuple) else (key,))[1:])
        mean = values.mean() if len(values) == len(group) else float("nan")
        seen.append(f"{name} {mean:.3f}" if mean == mean else f"{name} diverged")
        if not (mean >= target if higher else mean <= target):
            missed.append(
                f"{name} by {abs(mean - target):.3f}" if mean == mean else f"{name} (diverged)"
            )
    verb = "at least" if higher else "at most"
    evidence = f"{label}every mean {verb} {target}: " + ", ".join(seen)
    if missed:
        return "fails", evidence + "; short: " + ", ".join(missed)
    return "holds", evidence


def check(claims_by_study: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per claim: study, claim, verdict, evidence, figure."""
    rows = []
    for study, claims in claims_by_study.items():
        mine = runs[runs["study"] == study]
        for claim in claims:
            kind = compare if "better" in claim else match if "same" in claim else bound
            verdict, evidence = kind(mine, claim)
            figure = claim.get("figure", "metric.png")
            rows.append({"study": study, "claim": claim["says"], "verdict": verdict,
                         "evidence": evidence, "figure": figure})  # fmt: skip
    return pd.DataFrame(rows, columns=["study", "claim", "verdict", "evidence", "figure"])


def groups(claims_by_study: dict, runs: pd.DataFrame) -> list[pd.DataFrame]:
    """For each claim (in :func:`check`'s order), the runs it rests on, each with the side
    it belongs to (``side``: the selector's values); a bound's frame carries its bound in
    ``attrs["bound"]``, every frame the column its claim reads in ``attrs["column"]``."""
    out = []
    for study, claims in claims_by_study.items():
        mine = runs[runs["study"] == study]
        for claim in claims:
            if "better" in claim or "same" in claim:
                sides = [claim["better"], claim["than"]] if "better" in claim else claim["same"]
                frame = pd.concat(
                    [select(mine, s).assign(side=_name(s)) for s in sides], ignore_index=True
                )
            else:
                frame = select(mine, claim.get("each", {}))
                frame = frame.assign(side=frame["norm"] + "+" + frame["quant"])
                frame.attrs["bound"] = claim["reaches"]
            frame.attrs["column"] = _on(claim)[0]
            out.append(frame)
    return out
