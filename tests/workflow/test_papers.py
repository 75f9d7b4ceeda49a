"""The default (papers') config: its DAG, and a 'paper-small' run of it on stand-in files
served from 127.0.0.1, with tiny models and one epoch."""

import copy
import json
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest
import yaml
from standins import md5, write

from pipeline_helpers import ROOT, planned_jobs, snakemake, workflow_copy, write_config

pytestmark = pytest.mark.pipeline
DEFAULT = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def paper_small(server, sums) -> dict:
    """config.yaml with loopback URLs (a 404 first), stand-in checksums and tiny runs."""
    cfg = copy.deepcopy(DEFAULT)
    for name, spec in cfg["downloads"].items():
        data = server.files[name]
        spec.update(urls=[f"{server.url}/missing/{name}", f"{server.url}/{name}"], size=len(data))
        if spec.get("md5"):
            spec["md5"] = md5(data)
    for member in cfg["datasets"]["ptb_word"]["members"].values():
        member["md5"] = sums[member["name"]]
    for name in ("mnist", "mnist_perm"):
        cfg["datasets"][name]["valid_size"] = 20
    small = {"hidden_size": 8, "epochs": 1, "max_batches": 2, "batch_size": 8,
             "eval_batch_size": 8, "population_batch_size": 8}  # fmt: skip
    cfg["studies"] = [s for s in cfg["studies"] if s.get("paper")]  # the papers' studies
    cfg.pop("bench")  # timing the papers' sizes is hours of CPU, not a test
    for study in cfg["studies"]:
        study.update(norms=study["norms"][:2], quants=study["quants"][:2], seeds=[1])
        study["claims"] = [c for c in study.get("claims", []) if within(study, c)]
        study["overrides"] = {**small, **study.get("overrides", {})}  # over the recipe's
        study["task_overrides"] = {
            t: {"seq_len": 20, "emb_size": 8} if t.startswith("ptb_word") else {"seq_len": 20}
            for t in study["tasks"]
            if t not in ("seqmnist", "pmnist")
        }
    cfg["defaults"]["checkpoint_every"] = 0
    return cfg


def within(study, claim):
    """Whether a claim selects only runs the narrowed study still has."""
    axes = {"task": study["tasks"], "norm": study["norms"], "quant": study["quants"]}
    sides = [claim.get(k, {}) for k in ("better", "than", "each")] + claim.get("same", [])
    return all(
        v in axes.get(key, [v])
        for side in sides
        for key, want in side.items()
        for v in (want if isinstance(want, list) else [want])
    )


def test_default_config_lists_the_full_matrix(tmp_path):
    wf = workflow_copy(tmp_path)
    write_config(wf, DEFAULT)
    start = time.perf_counter()
    rules = [r for r, _ in planned_jobs(wf)]
    seconds = time.perf_counter() - start
    # cooijmans 4×2×1×3 + bn_gamma 2×1×1×5×3 + bn_gradflow 1×2×1×5×3 + laurent 1×5×1×3
    # + hou 5×5×8×3 + zhang 4×5×1×3 + hoffer 4×6×1×3
    papers = 24 + 30 + 30 + 15 + 600 + 60 + 72
    # bn_statistics 4×3 + robustness 6×(4×3)×2 + optimizer 6×2×(2×2)×2
    # + architecture 5×3×(2×3)×2 + seq_length 3×3×2
    questions = 12 + 144 + 96 + 180 + 18
    n = papers + questions
    assert rules.count("train") == n and "evaluate" not in rules
    assert rules.count("figure") == 8  # bn_statistics 1, grid 5, lengths 1, spectral 1
    assert rules.count("tables") == len(DEFAULT["studies"]) == 12
    assert rules.count("bench") == 3  # h256, h1000, seqmnist
    assert rules.count("download") == 7 and rules.count("prepare") == 6
    assert seconds < 60, f"dry run took {seconds:.1f} s"


@pytest.mark.parametrize("target", ["cooijmans2016", "hou"])
def test_a_paper_or_study_target_plans_exactly_its_jobs(tmp_path, target):
    """`snakemake -n <paper>`: the studies that name the paper (``paper``, ``experiment_of``), each
    of their runs and tables, nothing else (no other study, no summary, claims or bench)."""
    from normrnn.pipeline import config as nc

    wf = workflow_copy(tmp_path)
    write_config(wf, DEFAULT)
    jobs = planned_jobs(wf, "--cores", "1", target)
    names = {s["name"] for s in DEFAULT["studies"]
             if target in (s["name"], s.get("paper"), s.get("experiment_of"))}  # fmt: skip
    assert names == ({"cooijmans", "bn_gamma", "bn_gradflow"}
                     if target == "cooijmans2016" else {"hou"})  # fmt: skip
    assert {w["study"] for _, w in jobs if "study" in w} == names
    runs = [k for k in nc.expand(nc.validate(copy.deepcopy(DEFAULT))) if k[0] in names]
    assert sorted((w["study"], w["task"], w["run"]) for r, w in jobs if r == "train") == sorted(
        runs
    )
    assert [r for r, _ in jobs if r == "tables"] == ["tables"] * len(names)
    assert not {"summary", "claims", "bench"} & {r for r, _ in jobs}


# What the dry run's train jobs must carry (the authors' protocols; recipes/*.yaml cites them).
AUTHORS = {
    ("cooijmans", "seqmnist", "bn.fp.s1"): {
        "optimizer": "rmsprop", "lr": 0.001, "momentum": 0.9, "alpha": 0.5, "clip": 1.0,
        "hh_init": "identity", "init": "orthogonal", "h0_noise": 0.1, "batch_size": 100,
        "learn_initial_state": True, "select": "best", "select_on": "error",
        "valid_statistics": "batch", "population_stats": "dataset", "epochs": 200,
    },
    ("cooijmans", "pmnist", "bn.fp.s1"): {"h0_noise": None, "hh_init": "identity"},
    ("cooijmans", "ptb_char", "none.fp.s1"): {
        "optimizer": "adam", "lr": 0.002, "hidden_size": 1000, "seq_len": 99, "batch_size": 64,
        "epochs": 50, "input_encoding": "onehot", "train_batching": "crops",
        "valid_protocol": "crops", "test_protocol": "whole", "population_batch_size": 100,
    },
    ("cooijmans", "text8", "bn.fp.s1"): {"epochs": 50, "hidden_size": 2000, "batch_size": 128},
    ("laurent", "ptb_char", "normprop.fp.s1"): {
        "norm_opts": {"normprop": {"per_unit_gains": True, "gamma_init": 0.1, "sqrt2": True,
                                   "variance": "table"},
                      "ln": {"layout": "whole", "bias": True, "norm_cell": True,
                             "gamma_init": 1.0},
                      "bn": {"gamma_init": 0.1, "norm_cell": True, "eps": 1e-5}},
        "head_norm": True, "input_encoding": "onehot", "valid_protocol": "crops",
    },
    ("laurent", "ptb_char", "wn.fp.s1"): {"head_norm": None, "select": "best"},
}  # fmt: skip


def test_dry_run_runs_the_authors_settings(tmp_path):
    """Snakemake's own jobs for the default config (a dry run through its API): the train jobs
    of the ``cooijmans`` and ``laurent`` studies carry the authors' settings as params."""
    wf = workflow_copy(tmp_path)
    write_config(wf, DEFAULT)
    code = textwrap.dedent("""
        import json, sys
        from pathlib import Path
        from snakemake.api import SnakemakeApi
        from snakemake.settings.types import (ConfigSettings, DAGSettings, OutputSettings,
                                              ResourceSettings)
        with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
            wf = api.workflow(resource_settings=ResourceSettings(cores=1),
                              config_settings=ConfigSettings(configfiles=[Path(sys.argv[1])]),
                              snakefile=Path("Snakefile"), workdir=Path("."))
            dag = wf.dag(dag_settings=DAGSettings(targets={"all"}))
            dag.execute_workflow(executor="dryrun")
            jobs = [j for j in wf._workflow._dag.jobs if j.rule.name == "train"]  # (internal)
            print(json.dumps({"/".join(j.wildcards[k] for k in ("study", "task", "run")):
                              dict(j.params.hp) for j in jobs}))
    """)
    proc = subprocess.run([sys.executable, "-c", code, "config/test.yaml"], cwd=wf,
                          capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    params = json.loads(proc.stdout.strip().splitlines()[-1])
    for key, expected in AUTHORS.items():
        got = params["/".join(key)]
        for name, value in expected.items():
            assert got.get(name) == value, f"{key} {name}: {got.get(name)!r} != {value!r}"


def test_paper_small_runs_end_to_end_with_reported_numbers(tmp_path, server):
    wf = workflow_copy(tmp_path)
    cfg = paper_small(server, server.sums)
    write_config(wf, cfg)
    snakemake(wf, "--cores", "2")
    for name, data in server.files.items():
        assert (wf / "data" / "downloads" / name).read_bytes() == data
    summary = pd.read_csv(wf / "results" / "summary.csv")
    # cooijmans 4×2, laurent 1×2, hou 5×2×2, zhang 4×2, hoffer 4×2
    assert len(summary) == 8 + 2 + 20 + 8 + 8
    hou = (wf / "results" / "studies" / "hou" / "reported.md").read_text()
    cmp = pd.read_csv(wf / "results" / "studies" / "hou" / "reported.csv")
    mine = cmp[(cmp.task == "ptb_char") & (cmp.norm == "none") & (cmp.quant == "fp")]
    row = mine[mine.metric == "bpc"].iloc[0]
    assert row["reported"] == 1.45 and row["reported H"] == 512 and row["run H"] == 8
    assert float(row["reproduced"]) > 0 and row["difference"] == pytest.approx(
        float(row["reproduced"]) - 1.45, abs=1e-3
    )
    assert row["flag"] == "other size"  # a toy size: said, not flagged as a failure
    assert "does not say the split" in row["note"]  # the poster's split: compared with test
    size = mine[mine.metric == "size_kb"].iloc[0]
    vocab = json.loads((wf / "data" / "prepared" / "ptb_char" / "meta.json").read_text())
    weights = 4 * 8 * (vocab["vocab_size"] + 8 + 1)  # W_x (one-hot), W_h, b of H = 8, float32
    assert float(size["reproduced"]) == pytest.approx(weights * 4 / 1024, rel=1e-3)
    word = cmp[cmp.task.str.startswith("ptb_word") & (cmp.norm == "none") & (cmp.quant == "bc")]
    assert set(word.task) == {"ptb_word", "ptb_word_650"}  # 650 units: reported as ptb_word
    assert "hou2019" in hou
    laurent = pd.read_csv(wf / "results" / "studies" / "laurent" / "reported.csv")
    valid = laurent[(laurent.metric == "bpc") & (laurent.norm == "none")].iloc[0]
    assert valid["split"].startswith("valid") and "validation" in valid["note"]
    time_rows = laurent[laurent.metric == "time_s_per_epoch"]
    assert (time_rows["reproduced"] != "not run").sum() == 2  # none and wn ran
    assert time_rows["note"].str.contains("relative to the baseline").any()
    cooij = pd.read_csv(wf / "results" / "studies" / "cooijmans" / "reported.csv")
    assert set(cooij.task) == {"seqmnist", "pmnist", "ptb_char", "text8"}
    assert cooij["reported"].notna().all()


def test_a_wrong_file_placed_by_hand_is_refused(tmp_path, server):
    wf = workflow_copy(tmp_path)
    cfg = paper_small(server, server.sums)
    cfg["studies"] = [dict(cfg["studies"][0], tasks=["text8"], task_overrides={}, claims=[])]
    write_config(wf, cfg)
    write(wf / "data" / "downloads" / "text8.zip", b"PK not really text8")
    proc = snakemake(wf, "--cores", "1", check=False)
    assert proc.returncode != 0
    log = (wf / "logs" / "prepare" / "text8.log").read_text()
    expected = len(server.files["text8.zip"])
    assert f"text8.zip: checksum mismatch (size expected {expected}, found 19)" in log
    assert not (wf / "data" / "prepared" / "text8").exists() or not any(
        (wf / "data" / "prepared" / "text8").glob("*.pt")
    )
    assert (
        wf / "data" / "downloads" / "text8.zip"
    ).read_bytes() == b"PK not really text8"  # kept for inspection
