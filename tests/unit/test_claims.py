"""Claims: each kind's verdicts on synthetic runs, against scipy's Welch test."""

import math
import re

import pandas as pd
import pytest
from scipy import stats

from normrnn.outputs.claims import check


def runs(rows, metric="accuracy"):
    cols = ["study", "task", "norm", "quant", "seed", "status", "test_metric"]
    return pd.DataFrame(rows, columns=cols).assign(metric=metric)


def variant(norm, quant, values, study="s", status=None):
    return [
        ("s" if study == "s" else study, "t", norm, quant, i + 1, (status or ["ok"] * 9)[i], v)
        for i, v in enumerate(values)
    ]


def verdicts(claims, df):
    table = check({"s": claims}, df)
    return dict(
        zip(table["claim"], zip(table["verdict"], table["evidence"], strict=True), strict=True)
    )


def test_a_comparison_holds_fails_or_is_not_significant():
    df = runs(
        variant("ln", "bc", [0.80, 0.82, 0.81])
        + variant("none", "bc", [0.30, 0.35, 0.25])
        + variant("bn", "bc", [0.40, 0.20, 0.33])
        + variant("wn", "bc", [0.10, 0.12, 0.11])
    )
    got = verdicts(
        [
            {"says": "ln beats none", "better": {"norm": "ln"}, "than": {"norm": "none"}},
            {"says": "bn beats none", "better": {"norm": "bn"}, "than": {"norm": "none"}},
            {"says": "wn beats none", "better": {"norm": "wn"}, "than": {"norm": "none"}},
            {"says": "by 0.6", "better": {"norm": "ln"}, "than": {"norm": "none"}, "margin": 0.6},
            {"says": "gru", "better": {"norm": "gru"}, "than": {"norm": "none"}},
        ],
        df,
    )
    assert got["ln beats none"][0] == "holds"
    p = stats.ttest_ind([0.80, 0.82, 0.81], [0.30, 0.35, 0.25], equal_var=False).pvalue
    assert f"p = {p:.2g}" in got["ln beats none"][1] and "+0.510" in got["ln beats none"][1]
    assert got["bn beats none"][0] == "not significant"  # +0.01, within the spread
    assert got["wn beats none"][0] == "fails"  # the other way, significantly
    assert got["by 0.6"][0] == "not significant"  # the difference is below the margin
    assert got["gru"][0] == "not run"


def test_lower_is_better_for_bits_per_character():
    df = runs(
        variant("ln", "bc", [1.9, 1.95, 1.92]) + variant("none", "bc", [2.6, 2.5, 2.7]), "bpc"
    )
    got = verdicts([{"says": "c", "better": {"norm": "ln"}, "than": {"norm": "none"}}], df)
    assert got["c"][0] == "holds" and "+0.677" in got["c"][1]


def test_a_bound_names_the_variants_that_miss_it():
    df = runs(
        variant("ln", "fp", [0.80, 0.82, 0.81])
        + variant("bn", "fp", [0.70, 0.72, 0.74])
        + variant("rms", "fp", [0.9, 0.9, math.nan], status=["ok", "ok", "diverged"])
        + variant("none", "bc", [0.1, 0.1, 0.1])
    )
    got = verdicts([{"says": "b", "each": {"quant": "fp"}, "reaches": 0.75}], df)
    verdict, evidence = got["b"]
    assert verdict == "fails"
    assert "bn+fp by 0.030" in evidence and "rms+fp (diverged)" in evidence
    assert "ln+fp 0.810" in evidence and "none" not in evidence
    ok = verdicts([{"says": "b", "each": {"norm": "ln"}, "reaches": 0.75}], df)
    assert ok["b"][0] == "holds"


def test_a_match_holds_within_its_tolerance():
    df = runs(
        variant("ln", "fp", [1.90, 1.92, 1.91])
        + variant("rms", "fp", [1.93, 1.94, 1.92])
        + variant("bn", "fp", [2.10, 2.12, 2.11]),
        "bpc",
    )
    same = [{"norm": "ln"}, {"norm": "rms"}]
    got = verdicts(
        [
            {"says": "rms matches ln", "same": same, "within": 0.05},
            {"says": "bn matches ln", "same": [{"norm": "ln"}, {"norm": "bn"}], "within": 0.05},
        ],
        df,
    )
    assert got["rms matches ln"][0] == "holds" and "differ by 0.020" in got["rms matches ln"][1]
    assert got["bn matches ln"][0] == "fails"


@pytest.mark.parametrize("n", [1, 2])
def test_fewer_than_three_seeds_are_not_tested(n):
    df = runs(variant("ln", "bc", [0.8, 0.81][:n]) + variant("none", "bc", [0.3, 0.31][:n]))
    got = verdicts([{"says": "c", "better": {"norm": "ln"}, "than": {"norm": "none"}}], df)
    assert got["c"][0] == "holds (untested)" and "untested: fewer than 3 seeds" in got["c"][1]
    flipped = verdicts([{"says": "c", "better": {"norm": "none"}, "than": {"norm": "ln"}}], df)
    assert flipped["c"][0] == "fails (untested)"
    same = [{"norm": "ln"}, {"norm": "none"}]
    assert verdicts([{"says": "m", "same": same, "within": 0.6}], df)["m"][0] == "holds (untested)"
    assert verdicts([{"says": "m", "same": same, "within": 0.1}], df)["m"][0] == "fails (untested)"


@pytest.mark.parametrize(
    "claim,key",
    [
        ({"says": "x", "better": {"nrom": "ln"}, "than": {"norm": "ln"}}, "claims[0].better.nrom"),
        (
            {"says": "x", "same": [{"norm": "ln"}, {"norm": "bn"}], "within": 1},
            "claims[0].same[1].norm",
        ),
        ({"says": "x", "reaches": 0.5, "per": ["lr"]}, "claims[0].per"),
    ],
)
def test_a_claim_selecting_outside_its_study_is_a_config_error(claim, key):
    import copy

    from normrnn.pipeline.config import ConfigError, validate
    from pipeline_helpers import load_tiny

    cfg = copy.deepcopy(load_tiny())
    cfg["studies"][1]["claims"] = [claim]  # beta: ln × fp × seeds 1, 2
    with pytest.raises(ConfigError, match=re.escape(f"studies[1].{key}")):
        validate(cfg)
    cfg["studies"][1]["claims"] = [
        {"says": "ok", "same": [{"seed": 1}, {"seed": [2]}], "within": 1}
    ]
    validate(cfg)


def test_at_least_as_good_allows_a_worse_mean_within_its_tolerance():
    df = runs(
        variant("bn", "fp", [0.79, 0.785, 0.78])
        + variant("none", "fp", [0.80, 0.805, 0.81])
        + variant("ln", "fp", [0.60, 0.61, 0.62])
    )
    claim = {"better": {"norm": "bn"}, "than": {"norm": "none"}}
    got = verdicts(
        [
            {"says": "bn ≥ none", **claim, "within": 0.03},
            {"says": "bn > none", **claim},
            {
                "says": "ln ≥ none",
                "better": {"norm": "ln"},
                "than": {"norm": "none"},
                "within": 0.03,
            },
        ],
        df,
    )
    assert got["bn ≥ none"][0] == "holds" and "-0.020" in got["bn ≥ none"][1]
    assert "0.03 worse allowed" in got["bn ≥ none"][1]
    assert got["bn > none"][0] == "fails"  # -0.020 beyond the spread of 0.005, p < 0.05
    assert got["ln ≥ none"][0] == "fails"


def test_a_claim_reads_the_column_it_names():
    df = runs(variant("bn", "fp", [0.5, 0.5, 0.5]) + variant("none", "fp", [0.5, 0.5, 0.5]))
    df["valid_metric_mean"] = [0.60, 0.62, 0.61, 0.40, 0.42, 0.41]
    claim = {"better": {"norm": "bn"}, "than": {"norm": "none"}}
    got = verdicts(
        [{"says": "test", **claim}, {"says": "curve", **claim, "column": "valid_metric_mean"}], df
    )
    assert got["test"][0] == "not significant"
    assert got["curve"][0] == "holds" and got["curve"][1].startswith("valid_metric_mean: bn 0.610")


def test_a_claim_on_a_time_reads_lower_as_better():
    """ "Normprop is faster per epoch than BN": a time column's direction, not the metric's."""
    df = runs(variant("normprop", "fp", [0.5] * 3) + variant("bn", "fp", [0.5] * 3))
    df["seconds_per_epoch"] = [10.0, 10.5, 9.5, 20.0, 21.0, 19.0]
    df["train_tokens_per_s"] = [200.0, 210.0, 190.0, 100.0, 105.0, 95.0]
    faster = {"better": {"norm": "normprop"}, "than": {"norm": "bn"}}
    slower = {"better": {"norm": "bn"}, "than": {"norm": "normprop"}}
    got = verdicts(
        [{"says": "faster", **faster, "column": "seconds_per_epoch"},
         {"says": "slower", **slower, "column": "seconds_per_epoch"},
         {"says": "throughput", **faster, "column": "train_tokens_per_s"}], df
    )  # fmt: skip
    assert got["faster"][0] == "holds" and "+10.000 in the claimed direction" in got["faster"][1]
    assert got["slower"][0] == "fails"
    assert got["throughput"][0] == "holds"


def test_a_bound_on_a_time_is_a_ceiling_and_the_figure_plots_the_column(tmp_path):
    from normrnn.outputs import plots
    from normrnn.outputs.claims import groups

    df = runs(variant("normprop", "fp", [0.5] * 3) + variant("bn", "fp", [0.5] * 3))
    df["seconds_per_epoch"] = [10.0, 10.5, 9.5, 20.0, 21.0, 19.0]
    claim = {"says": "fast", "each": {}, "reaches": 15.0, "column": "seconds_per_epoch"}
    verdict, evidence = verdicts([claim], df)["fast"]
    assert (
        verdict == "fails"
        and "every mean at most 15.0" in evidence
        and "bn+fp by 5.000" in evidence
    )
    fig = plots.claims(check({"s": [claim]}, df), groups({"s": [claim]}, df), tmp_path / "c.png")
    ax = fig.axes[0]
    assert ax.get_ylabel() == "seconds_per_epoch"
    dots = sorted(y for c in ax.collections for _, y in c.get_offsets())
    assert dots == sorted(df["seconds_per_epoch"])
