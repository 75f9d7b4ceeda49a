"""The default (papers') config: its DAG, and a 'paper-small' run of it on stand-in files
served from 127.0.0.1, with tiny models and one epoch."""

import copy
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
    for task in cfg["tasks"].values():
        task.update(hidden_size=8, epochs=1, max_batches=2, batch_size=8)
        if "emb_size" in task:
            task["emb_size"] = 8
        if "seq_len" in task:
            task["seq_len"] = 20
    cfg["studies"] = [s for s in cfg["studies"] if s.get("paper")]  # the papers' studies
    cfg.pop("bench")  # timing the papers' sizes is hours of CPU, not a test
    for study in cfg["studies"]:
        study.update(norms=study["norms"][:2], quants=study["quants"][:2], seeds=[1])
        study.pop("task_overrides", None)
    cfg["defaults"]["checkpoint_every"] = 0
    return cfg


def test_default_config_lists_the_full_matrix(tmp_path):
    wf = workflow_copy(tmp_path)
    write_config(wf, DEFAULT)
    start = time.perf_counter()
    rules = [r for r, _ in planned_jobs(wf)]
    seconds = time.perf_counter() - start
    # cooijmans 4×2×1×3 + hou 4×5×8×3 + rmsnorm_hoffer 4×6×1×3 + bn_gamma 1×1×1×3×5
    # + laurent 1×4×1×3
    papers = 24 + 480 + 72 + 15 + 12
    # bn_statistics 3×3 + robustness 6×(4×3)×2 + optimizer 6×2×(2×2)×2
    # + architecture 5×3×(2×3)×2 + seq_length 3×3×2
    questions = 9 + 144 + 96 + 180 + 18
    n = papers + questions
    assert rules.count("train") == n and rules.count("evaluate") == n
    assert rules.count("figure") == 7  # bn_statistics 1, grid 4, lengths 1, spectral 1
    assert rules.count("tables") == len(DEFAULT["studies"]) == 10
    assert rules.count("bench") == 3  # h256, h1000, seqmnist
    assert rules.count("download") == 7 and rules.count("prepare") == 6
    assert seconds < 60, f"dry run took {seconds:.1f} s"


def test_paper_small_runs_end_to_end_with_reported_numbers(tmp_path, server):
    wf = workflow_copy(tmp_path)
    cfg = paper_small(server, server.sums)
    write_config(wf, cfg)
    snakemake(wf, "--cores", "2")
    for name, data in server.files.items():
        assert (wf / "data" / "downloads" / name).read_bytes() == data
    summary = pd.read_csv(wf / "results" / "summary.csv")
    assert len(summary) == 8 + 16 + 8 + 2
    hou = (wf / "results" / "studies" / "hou" / "reported.md").read_text()
    cmp = pd.read_csv(wf / "results" / "studies" / "hou" / "reported.csv")
    row = cmp[(cmp.task == "ptb_char") & (cmp.norm == "none") & (cmp.quant == "fp")].iloc[0]
    assert row["reported"] == 1.45 and row["reported H"] == 512 and row["run H"] == 8
    assert float(row["reproduced"]) > 0 and row["difference"] == pytest.approx(
        float(row["reproduced"]) - 1.45, abs=1e-3
    )
    assert row["flag"] == "outside tolerance"  # a one-epoch toy is far from the paper
    assert "hou2019" in hou
    cooij = pd.read_csv(wf / "results" / "studies" / "cooijmans" / "reported.csv")
    assert set(cooij.task) == {"seqmnist", "pmnist", "ptb_char", "text8"}
    assert cooij["reported"].notna().all()


def test_a_wrong_file_placed_by_hand_is_refused(tmp_path, server):
    wf = workflow_copy(tmp_path)
    cfg = paper_small(server, server.sums)
    cfg["studies"] = [dict(cfg["studies"][0], tasks=["text8"])]
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
