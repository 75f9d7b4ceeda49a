"""Tables: mean ± std over seeds, diverged runs, reported vs reproduced."""

import math

import pandas as pd
import pytest

from normrnn.outputs.tables import compare_reported, study_table

REPORTED = pd.DataFrame(
    [
        ("p", "P et al.", "word", "test", 300, "none", "fp", "perplexity", 91.5),
        ("p", "P et al.", "word", "test", 650, "none", "fp", "perplexity", 87.6),
        ("p", "P et al.", "char", "test", 512, "bn", "bc", "bpc", 1.50),
        ("p", "P et al.", "char", "test", 512, "ln", "bc", "bpc", 1.49),
        ("q", "Q et al.", "char", "test", 512, "bn", "bc", "bpc", 9.99),
    ],
    columns=["paper", "source", "task", "split", "hidden_size", "norm", "quant", "metric", "value"],
)


def runs(rows):
    cols = ["task", "norm", "quant", "hidden_size", "seed", "status", "test_metric"]
    df = pd.DataFrame(rows, columns=cols)
    return df.assign(
        metric=df.task.map({"word": "perplexity", "char": "bpc"}),
        seconds_per_step=0.01,
        model_bits=1000,
    )


RUNS = runs(
    [
        ("word", "none", "fp", 600, 1, "ok", 90.0),
        ("word", "none", "fp", 600, 2, "ok", 94.0),
        ("char", "bn", "bc", 512, 1, "ok", 1.51),
        ("char", "bn", "bc", 512, 2, "diverged", math.nan),
    ]
)


def test_compare_reported():
    cmp = compare_reported(RUNS, REPORTED, "p", {"perplexity": 5.0, "bpc": 0.005}).set_index(
        ["task", "norm"]
    )
    word = cmp.loc[("word", "none")]
    assert word["reported H"] == 650 and word["run H"] == 600  # nearest reported size
    assert word["reported"] == 87.6 and word["reproduced"] == "92.000 ± 2.828" and word["n"] == 2
    assert word["difference"] == pytest.approx(92.0 - 87.6) and word["flag"] == "other size"
    char = cmp.loc[("char", "bn")]
    assert char["reproduced"] == "1.510" and char["n"] == 2  # one of two seeds diverged
    assert char["difference"] == pytest.approx(0.01) and char["flag"] == "outside tolerance"
    ln = cmp.loc[("char", "ln")]
    assert ln["reproduced"] == "not run" and ln["reported"] == 1.49
    assert len(cmp) == 3  # paper q is not mixed in
    assert compare_reported(RUNS, REPORTED, None, {}).empty


def test_study_table_mean_std_and_diverged():
    t = study_table(RUNS).set_index(["task", "norm"])
    assert t.loc[("word", "none"), "test"] == "92.000 ± 2.828"
    assert t.loc[("char", "bn"), "test"] == "1.510 (1 diverged)"
    all_bad = runs([("char", "ln", "bc", 8, 1, "diverged", math.nan)])
    assert study_table(all_bad)["test"].tolist() == ["diverged"]


def test_welch_on_identical_and_clearly_different_samples():
    from scipy import stats

    from normrnn.outputs.tables import welch_p

    same = [0.50, 0.52, 0.48, 0.51]
    assert welch_p(same, list(same)) == pytest.approx(1.0)
    far = [0.90, 0.91, 0.89, 0.92]
    assert welch_p(same, far) < 1e-4
    assert welch_p(same, far) == pytest.approx(stats.ttest_ind(same, far, equal_var=False).pvalue)
    assert math.isnan(welch_p([0.5], far))  # one seed: no test


def test_table_marks_significant_differences_to_the_baseline():
    """Welch's p of each variant against the baseline, Benjamini-Hochberg-adjusted over the
    table's tests (against scipy's own adjustment of the raw p-values); under three finished
    seeds a side, no test."""
    from scipy import stats

    from normrnn.outputs.tables import welch_p

    seeds = {"none": [1.50, 1.51, 1.49], "ln": [1.30, 1.31, 1.29], "wn": [1.52, 1.48, 1.50]}
    rows = [("char", n, "fp", 8, s, "ok", v) for n, vs in seeds.items() for s, v in enumerate(vs)]
    rows += [("char", "rms", "fp", 8, s, "ok", v) for s, v in enumerate([1.2, 1.21])]
    t = study_table(runs(rows)).set_index("norm")
    assert t.loc["none", "p vs baseline"] == "baseline"
    assert t.loc["rms", "p vs baseline"] == "untested" and t.loc["rms", "seeds"] == "2 of 2"
    raw = [welch_p(seeds[n], seeds["none"]) for n in ("ln", "wn")]
    ln, wn = stats.false_discovery_control(raw, method="bh")
    assert t.loc["ln", "p vs baseline"] == f"{ln:.3f} *" and ln > raw[0]
    assert t.loc["wn", "p vs baseline"] == f"{wn:.3f}" and wn > 0.5
    assert set(t["metric"]) == {"bpc (lower is better)"}


def test_the_baseline_is_named_with_its_grid_values(tmp_path):
    import json

    from normrnn.outputs.tables import caption, collect

    paths = []
    for i, gamma in enumerate([0.01, 0.1]):
        p = tmp_path / f"{i}.json"
        row = {"task": "pmnist", "norm": "bn", "quant": "fp", "seed": 1, "status": "ok",
               "metric": "accuracy", "model_bits": 10, "grid": {"gamma_init": gamma},
               "test_metric": 0.9}  # fmt: skip
        p.write_text(json.dumps(row))
        paths.append(p)
    text = caption(collect(paths))
    assert "Baselines: pmnist: bn+fp, gamma_init=0.01." in text
    assert "Benjamini-Hochberg" in text and "3 finished seeds" in text


def test_the_html_table_has_its_caption_borders_and_numbers_aligned():
    from normrnn.outputs.tables import html_table

    table = pd.DataFrame({"norm": ["none", "bn"], "test": ["0.803 ± 0.063", "diverged"]})
    page = html_table(table, "Study x", "Test metric & more")
    assert "<caption><b>Study x</b>. Test metric &amp; more</caption>" in page
    assert '<td class="num">0.803 ± 0.063</td>' in page and "<td>diverged</td>" in page
    assert "border: 1px solid" in page and "addEventListener" in page  # borders, sortable


def test_grid_axes_become_columns_and_other_columns_do_not(tmp_path):
    import json

    from normrnn.outputs.tables import collect

    base = {"task": "char", "norm": "ln", "quant": "fp", "hidden_size": 8, "status": "ok"}
    base.update(metric="bpc", seconds_per_step=0.01, model_bits=10)
    paths = []
    for i, cell in enumerate(["lstm", "gru"]):
        for seed in (1, 2):
            p = tmp_path / f"{i}{seed}.json"
            row = {**base, "seed": seed, "grid": {"cell": cell}, "test_metric": 1.0 + i}
            p.write_text(json.dumps({**row, "lambda1_hh_fp": 1.0 + seed}))
            paths.append(p)
    t = study_table(collect(paths))
    assert "cell" in t.columns and "lambda1_hh_fp" not in t.columns and len(t) == 2


def test_compare_reported_like_with_like():
    """A validation row compares with the selected model's validation metric, a size row with
    the model's size, a time row as a ratio to the baseline's (other hardware, no flag); the
    runs of two tasks that report as one are compared apart."""
    reported = pd.DataFrame(
        [
            ("p", "s", "ptb", "valid (length-100 subsequences)", 8, "ln", "fp", "bpc", 1.40),
            ("p", "s", "ptb", "", 8, "ln", "fp", "time_s_per_epoch", 530.0),
            ("p", "s", "ptb", "", 8, "none", "fp", "time_s_per_epoch", 386.0),
            ("p", "s", "ptb", "", 8, "ln", "fp", "size_kb", 10.0),
        ],
        columns=["paper", "source", "task", "split", "hidden_size", "norm", "quant", "metric",
                 "value"],
    )  # fmt: skip
    rows = [("ptb", "ptb", "ln", 1.5, 1.6, 12.0, 20.0), ("ptb", "ptb", "none", 1.6, 1.7, 9.0, 10.0),
            ("ptb_big", "ptb", "ln", 1.3, 1.35, 12.0, 30.0)]  # fmt: skip
    runs = pd.DataFrame(
        [
            {"task": t, "report_as": r, "norm": n, "quant": "fp", "hidden_size": 8, "seed": 1,
             "status": "ok", "valid_metric": v, "test_metric": tm, "size_kb": kb,
             "seconds_per_epoch": sec}
            for t, r, n, v, tm, kb, sec in rows
        ]
    )  # fmt: skip
    cmp = compare_reported(runs, reported, "p", {"bpc": 0.05, "size_kb": 1.0})
    ln = cmp[(cmp.norm == "ln") & (cmp.task == "ptb")].set_index("metric")
    assert ln.loc["bpc", "reproduced"] == "1.500" and "validation" in ln.loc["bpc", "note"]
    assert ln.loc["bpc", "flag"] == "outside tolerance"  # 1.5 - 1.4 > 0.05
    assert (
        ln.loc["size_kb", "reproduced"] == "12.000"
        and ln.loc["size_kb", "flag"] == "outside tolerance"
    )
    time = ln.loc["time_s_per_epoch"]
    assert time["flag"] == "" and pd.isna(time["difference"])
    assert "reported 1.37, reproduced 2.00" in time["note"]  # 530/386; 20/10
    assert set(cmp[cmp.norm == "ln"].task) == {"ptb", "ptb_big"}  # never pooled
