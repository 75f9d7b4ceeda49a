"""The Snakemake pipeline end to end on a tiny config, in a temporary copy."""

import copy
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from train_helpers import curves_of

from pipeline_helpers import (
    BAD_CONFIGS,
    ROOT,
    load_tiny,
    planned_jobs,
    snakemake,
    workflow_copy,
    write_config,
)

pytestmark = pytest.mark.pipeline
N_ALPHA, N_BETA, N_GAMMA, N_DELTA = 2 * 2 * 2, 2, 1, 2 * 2  # tasks × norms × quants × seeds
N_RUNS = N_ALPHA + N_BETA + N_GAMMA + N_DELTA


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A tiny workflow run once, with TensorBoard curves on; tests below read and rerun it
    (with the curves off: a job setting, it reruns nothing)."""
    wf = workflow_copy(tmp_path_factory.mktemp("pipeline"))
    write_config(wf, {**load_tiny(), "tensorboard": True})
    snakemake(wf, "--cores", "2")
    return wf


def test_dag_has_one_job_per_run(tmp_path):
    """A run's training and its test are one job (one process, one import of torch)."""
    wf = workflow_copy(tmp_path)
    write_config(wf, load_tiny())
    rules = [r for r, _ in planned_jobs(wf)]
    assert rules.count("train") == N_RUNS and "evaluate" not in rules
    assert rules.count("fetch") == 2 and rules.count("prepare") == 2
    assert rules.count("tables") == 4 and rules.count("plots") == 4 and rules.count("summary") == 1
    assert rules.count("figure") == 4  # study delta's grid, lengths, bn_statistics, spectral
    assert rules.count("claims") == 1


def test_claims_are_checked_against_the_summary(done):
    claims = pd.read_csv(done / "results" / "claims.csv")
    assert list(claims["study"]) == ["beta"] * 3
    assert list(claims["verdict"]) == ["holds", "fails", "holds (untested)"]
    beta = pd.read_csv(done / "results" / "summary.csv").query("study == 'beta'")
    mean = beta["test_metric"].mean()
    assert (
        f"ln+fp {mean:.3f}" in claims["evidence"][0]
        and f"by {1.01 - mean:.3f}" in claims["evidence"][1]
    )
    assert (done / "results" / "claims.png").stat().st_size > 10_000


def test_summary_has_one_row_per_run_with_finite_metrics(done):
    df = pd.read_csv(done / "results" / "summary.csv")
    assert len(df) == N_RUNS
    assert set(df["study"]) == {"alpha", "beta", "gamma", "delta"}
    assert set(zip(df.norm, df.quant, strict=True)) >= {("none", "fp"), ("bn", "bc"), ("ln", "fp")}
    df = df[df.study != "gamma"]
    assert set(df.loc[df.norm == "none", "path"]) == {"fused"}  # each run's compute path
    bn = df[(df.norm == "bn") & (df.study == "alpha")]
    assert set(bn["path"]) == {"sequence"} and set(bn["recurrence"]) <= {"compiled", "python"}
    assert "loop" in set(df[df.study == "delta"]["path"])  # masked variable lengths
    assert df["test_metric"].map(math.isfinite).all()
    assert (df["status"] == "ok").all()
    chars = df[df.task == "chars"]
    assert (chars["metric"] == "bpc").all() and (chars["test_metric"] > 0).all()
    digits = df[df.task == "digits"]
    assert ((digits["test_metric"] >= 0) & (digits["test_metric"] <= 1)).all()
    # binary weights are stored in 1 bit: the bc model is smaller than the fp one
    alpha = df[(df.study == "alpha") & (df.task == "digits") & (df.norm == "none")]
    bits = dict(zip(alpha.quant, alpha.model_bits, strict=True))
    assert bits["bc"] < bits["fp"]
    # every hyperparameter is a column of every row, grid or not; names carry their units
    for key in ("lr", "batch_size", "hidden_size", "optimizer", "epochs"):
        assert df[key].notna().all(), key
    timed = ["train_seconds_per_batch", "train_tokens_per_s", "infer_seconds_per_batch"]
    for key in [*timed, "infer_tokens_per_s", "param_mb", "activation_mb", "process_peak_rss_mb"]:
        assert (df[key] > 0).all(), key
    # the model's memory, not the process's: far below torch's own ~350 MB
    assert (df["param_mb"] < 1).all() and (df["activation_mb"] < df["process_peak_rss_mb"]).all()
    assert "seconds_per_step" not in df and "peak_memory_mb" not in df
    # what produced each result (the test's copy of the workflow is no git checkout)
    assert set(df["code_commit"]) == {"unknown"} and df["code_version"].nunique() == 1
    assert set(df["torch_version"]) == {torch.__version__} and df["device_name"].notna().all()
    assert (df["train_wall_s"] > 0).all() and (df["eval_wall_s"] > 0).all()


def test_each_run_wrote_its_curves_for_tensorboard(done):
    import json

    runs = sorted((done / "results" / "runs").glob("*/*/*/eval.json"))
    assert len(runs) == N_RUNS
    for run in runs:
        curves = curves_of(run.parent / "tensorboard")
        steps = json.loads((run.parent / "train.json").read_text())["steps"]
        if steps == 0:  # study gamma diverges at its first step: nothing to draw
            assert curves == {}, run
            continue
        assert [s for s, _ in curves["train/loss"]] == list(range(1, steps + 1)), run
        history = pd.read_csv(run.parent / "history.csv")
        expected = zip(history["step"], history["valid_loss"].astype("float32"), strict=True)
        assert curves["epoch/valid_loss"] == list(expected), run


def test_curves_without_their_package_are_refused_before_any_job(tmp_path):
    """tensorboard: true where the package is missing (hidden from the import system here)."""
    wf = workflow_copy(tmp_path)
    write_config(wf, {**load_tiny(), "tensorboard": True})
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['tensorboard'] = None\n")
    proc = snakemake(wf, "-n", check=False, prefix=("env", f"PYTHONPATH={hide}"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "rule fetch" not in out
    assert "invalid config: tensorboard: true needs the tensorboard package" in out
    assert "pip install -e '.[track]'" in out


def test_gradient_flow_is_recorded_at_init_and_after_training(done):
    import json

    r = json.loads((done / "results/runs/alpha/digits/bn.fp.s1/eval.json").read_text())
    assert len(r["grad_norms_init"]) == len(r["grad_norms_trained"]) == 64  # one per pixel step
    assert all(g >= 0 for g in r["grad_norms_init"]) and r["grad_norms_init"][-1] > 0
    assert r["lambda1_hh_fp"] > 0 and "grad_norms_init" not in pd.read_csv(
        done / "results/summary.csv"
    )


def test_sequence_length_and_batch_norm_statistics_are_recorded(done):
    import json

    runs = done / "results/runs/delta/chars"
    for norm in ("bn", "ln"):
        for lengths in ("fixed", "variable"):
            r = json.loads((runs / f"{norm}.fp.train_lengths-{lengths}.s1/eval.json").read_text())
            assert [m["length"] for m in r["length_metrics"]] == [10, 40]
            assert all(0 < m["test_metric"] < 10 for m in r["length_metrics"])
    stats = json.loads((runs / "bn.fp.train_lengths-variable.s1/eval.json").read_text())
    stats = pd.DataFrame(stats["bn_statistics"])
    assert set(stats["term"]) == {"x", "h", "c"}
    assert sorted(stats[stats.term == "h"]["t"]) == list(range(1, 21))  # seq_len 20
    assert (stats[["batch", "population"]] > 0).all().all()
    ln = json.loads((runs / "ln.fp.train_lengths-fixed.s1/eval.json").read_text())
    assert ln["bn_statistics"] == []
    runs_csv = pd.read_csv(done / "results/studies/delta/runs.csv")
    assert sorted(runs_csv["train_lengths"]) == ["fixed", "fixed", "variable", "variable"]


def test_diverged_run_is_a_result_not_a_crash(done):
    df = pd.read_csv(done / "results" / "summary.csv")
    row = df[df.study == "gamma"].iloc[0]
    assert row["status"] == "diverged" and row["stop_step"] == 0
    assert math.isnan(row["test_metric"])
    table = (done / "results" / "studies" / "gamma" / "table.md").read_text()
    assert "| diverged " in table
    assert (df[df.study != "gamma"]["status"] == "ok").all()  # the others went on


def test_tables_and_report_show_every_variant(done):
    table = (done / "results" / "studies" / "alpha" / "table.md").read_text()
    for norm, quant in [("none", "fp"), ("none", "bc"), ("bn", "fp"), ("bn", "bc")]:
        assert f"| {norm} " in table and f"| {quant} " in table
    beta = pd.read_csv(done / "results" / "studies" / "beta" / "runs.csv")
    assert sorted(beta["seed"]) == [1, 2]
    assert "±" in (done / "results" / "studies" / "beta" / "table.md").read_text()
    snakemake(done, "--report", "results/report.html")
    html = (done / "results" / "report.html").read_text()
    for name in (
        "curves.png",
        "metric.png",
        "gradflow.png",
        "grid.png",
        "lengths.png",
        "bn_statistics.png",
        "spectral.png",
        "table.html",
        "summary.csv",
        "summary.html",
        "claims.png",
    ):
        assert name in html
    # entries are labelled by kind; a study naming no paper has no reported-vs-reproduced entry
    assert all(f'"kind": "{kind}"' in html or f'"kind":"{kind}"' in html
               for kind in ("table", "figure", "data"))  # fmt: skip
    assert "reported.html" not in html
    assert not list((done / "results" / "studies").glob("*/reported.*"))


def test_nothing_to_do_when_nothing_changed(done):
    out = snakemake(done, "-n").stdout
    assert "Nothing to be done" in out


def test_a_damaged_prepared_file_is_refused_and_its_results_rebuilt(done, tmp_path):
    """A truncated prepared file: the runs that read it fail naming it and leave no result
    behind; doing what the message says (delete it, rerun) rebuilds the data and every result
    that depends on it, to the same numbers."""
    wf = tmp_path / "wf"
    shutil.copytree(done, wf, symlinks=True)
    key = ["study", "task", "run"]
    before = pd.read_csv(wf / "results" / "summary.csv").sort_values(key).reset_index(drop=True)
    damaged = wf / "data" / "prepared" / "digits" / "train.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    assert snakemake(wf, "--cores", "2", check=False).returncode != 0
    logs = "".join(p.read_text() for p in (wf / "logs" / "train").rglob("*.log"))
    assert f"{damaged.relative_to(wf)}: prepared data file is corrupt or truncated" in logs
    failed = [p for p in (wf / "results" / "runs").rglob("train.json")]
    assert len(failed) < N_RUNS  # the failed runs' outputs are gone, not stale
    damaged.unlink()
    snakemake(wf, "--cores", "2")
    after = pd.read_csv(wf / "results" / "summary.csv").sort_values(key).reset_index(drop=True)
    pd.testing.assert_series_equal(after["test_metric"], before["test_metric"])
    assert len(list((wf / "results" / "runs").rglob("eval.json"))) == N_RUNS


def test_run_from_another_directory_with_s(tmp_path):
    """`snakemake -s path/to/Snakefile` from another directory: results go there, and the
    files the workflow ships (the papers' reported numbers) are found beside the Snakefile."""
    import subprocess
    import sys

    wf = workflow_copy(tmp_path)
    config = write_config(wf, load_tiny())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cmd = [sys.executable, "-m", "snakemake", "-s", str(wf / "Snakefile"), "-n"]
    proc = subprocess.run(
        [*cmd, "--configfile", str(config)], cwd=elsewhere, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "rule train:" in proc.stdout and "results/summary.csv" in proc.stdout
    # without --configfile the default config beside the Snakefile is read, not the cwd's
    shutil.copy(ROOT / "config" / "config.yaml", wf / "config")
    proc = subprocess.run(cmd, cwd=elsewhere, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "rule download:" in proc.stdout and "rule fetch:" not in proc.stdout  # its datasets


def test_raising_a_jobs_limits_or_checkpoint_cadence_reruns_nothing(done):
    """Time and memory limits, the checkpoint cadence and the curves' writer are settings of a
    job, not of its result (the natural fix after a SLURM time limit is to raise runtime_min);
    ``done`` ran with the curves on, this plan has them off."""
    cfg = {**load_tiny(), "tensorboard": False}
    cfg["defaults"].update(runtime_min=240, mem_mb=8000, checkpoint_every=7)
    write_config(done, cfg, "limits.yaml")
    assert [r for r, _ in planned_jobs(done, config="config/limits.yaml")] == []


def test_editing_one_study_reruns_only_its_jobs(done):
    cfg = load_tiny()
    cfg["studies"][1]["overrides"] = {"lr": 0.02}  # study beta only
    write_config(done, cfg, "edited.yaml")
    jobs = planned_jobs(done, config="config/edited.yaml")
    per_run = [(r, w) for r, w in jobs if r == "train"]
    assert len(per_run) == 2
    assert {w["study"] for _, w in per_run} == {"beta"}
    assert {w.get("study") for r, w in jobs if r in ("tables", "plots")} == {"beta"}
    assert "fetch" not in [r for r, _ in jobs]


def test_a_changed_byte_of_the_compiled_loop_reruns_every_training(done, tmp_path):
    """The C++ recurrence decides numbers: one changed byte of it (in a copy) schedules every
    train job again, and a rerun job refuses the checkpoint its run left under the old code
    (as a run killed before the change leaves one)."""
    import torch
    import yaml

    from normrnn.pipeline import config as nc
    from normrnn.pipeline import versions
    from normrnn.pipeline.checkpoint import Checkpointer, fingerprint

    wf = tmp_path / "wf"
    shutil.copytree(done, wf, symlinks=True)
    package = wf / "workflow" / "normrnn"
    old_code = versions.code_version(package)
    with open(package / "compute" / "csrc" / "recurrence.cpp", "a") as f:
        f.write("\n")
    assert versions.code_version(package) != old_code
    trains = [w for r, w in planned_jobs(wf) if r == "train"]
    assert len(trains) == N_RUNS
    run = trains[0]
    key = (run["study"], run["task"], run["run"])
    cfg = yaml.safe_load((wf / "config" / "test.yaml").read_text())
    nc.validate(cfg)
    params = nc.expand(cfg)[key].params()
    ckpt = wf / "results" / "checkpoints" / Path(*key)
    Checkpointer(ckpt).save({"fingerprint": fingerprint(params, old_code)})
    target = f"results/runs/{'/'.join(key)}/train.json"
    # (the Python steps: the changed source would otherwise compile a new library first)
    snakemake(wf, "--cores", "1", target, prefix=("env", "NORMRNN_NATIVE=0"))
    log = (wf / "logs" / "train" / Path(*key[:2]) / f"{key[2]}.log").read_text()
    assert "from other settings or code; starting afresh" in log
    assert not (ckpt / "last.pt").exists()  # the finished run cleared it
    assert torch.load(wf / target.replace("train.json", "model.pt"), weights_only=False)


# every case is checked on validate() itself (test_config.py); three kinds through snakemake
THROUGH_SNAKEMAKE = [
    b for b in BAD_CONFIGS if b[0] in ("unknown norm", "wrong type", "duplicate study")
]


@pytest.mark.parametrize("what,edit,key", THROUGH_SNAKEMAKE, ids=[b[0] for b in THROUGH_SNAKEMAKE])
def test_invalid_config_is_refused_before_any_job(tmp_path, what, edit, key):
    wf = workflow_copy(tmp_path)
    cfg = copy.deepcopy(load_tiny())
    edit(cfg)
    write_config(wf, cfg)
    proc = snakemake(wf, "--cores", "1", check=False)
    assert proc.returncode != 0
    assert "invalid config" in proc.stderr and key in proc.stderr, proc.stderr[-2000:]
    assert not (wf / "data").exists() and not (wf / "results").exists()


def test_a_second_snakemake_is_refused_by_the_lock(tmp_path):
    import subprocess
    import sys
    import time

    wf = workflow_copy(tmp_path)
    cfg = load_tiny()
    cfg["studies"] = [cfg["studies"][1]]  # beta: two runs
    write_config(wf, cfg)
    cmd = [sys.executable, "-m", "snakemake", "--configfile", "config/test.yaml", "--cores", "1"]
    first = subprocess.Popen(
        cmd, cwd=wf, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    locks = wf / ".snakemake" / "locks"
    start = time.time()
    while not (locks.exists() and any(locks.iterdir())) and time.time() - start < 60:
        time.sleep(0.1)
    # Snakemake refuses at its incomplete-files check when a job of the first run is in
    # flight, else at the lock; with --rerun-incomplete it always gets to the lock
    second = snakemake(wf, "--cores", "1", check=False)
    text = second.stdout + second.stderr
    assert second.returncode != 0
    assert "cannot be locked" in text or "Incomplete files" in text, text[-1500:]
    third = snakemake(wf, "--cores", "1", "--rerun-incomplete", check=False)
    assert third.returncode != 0 and "cannot be locked" in third.stdout + third.stderr
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out[-2000:]
    assert len(pd.read_csv(wf / "results" / "summary.csv")) == 2  # the first run's work is intact


def test_a_killed_snakemake_leaves_a_lock_that_unlock_clears(tmp_path):
    """A node failure kills Snakemake and its jobs: the lock stays and refuses the next run
    until `--unlock`; then `--rerun-incomplete` finishes every run (docs/faults.md)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    wf = workflow_copy(tmp_path)
    cfg = load_tiny()
    cfg["studies"] = [cfg["studies"][1]]  # beta: two runs
    write_config(wf, cfg)
    cmd = [sys.executable, "-m", "snakemake", "--configfile", "config/test.yaml", "--cores", "1"]
    first = subprocess.Popen(cmd, cwd=wf, stdout=subprocess.DEVNULL, start_new_session=True)
    runs = wf / "results" / "runs"
    start = time.time()
    while not (runs.exists() and any(runs.rglob("*"))) and time.time() - start < 120:
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)  # Snakemake and its job, as a node failure does
    first.wait(30)
    refused = snakemake(wf, "--cores", "1", "--rerun-incomplete", check=False)
    assert refused.returncode != 0 and "cannot be locked" in refused.stdout + refused.stderr
    snakemake(wf, "--unlock")
    snakemake(wf, "--cores", "1", "--rerun-incomplete")
    summary = pd.read_csv(wf / "results" / "summary.csv")
    assert len(summary) == 2 and summary["status"].eq("ok").all()


def test_four_stand_in_gpus_run_eight_jobs_never_two_on_one(tmp_path):
    """`--cores 8` on a host with four (stand-in) GPUs: each train job claims a device slot of
    its own (gpu_slots.py), the gpu resource caps them at four at once, none shares a slot."""
    import itertools
    import json

    wf = workflow_copy(tmp_path)
    cfg = load_tiny()
    cfg.update(device="auto", studies=[cfg["studies"][0]], deterministic=True)  # alpha: 8 runs
    write_config(wf, cfg)
    snakemake(wf, "--cores", "8", prefix=("env", "NORMRNN_GPU_SLOTS=4"))
    runs = [json.loads(p.read_text()) for p in (wf / "results" / "runs").rglob("eval.json")]
    assert len(runs) == 8 and {r["gpu_slot"] for r in runs} <= {0, 1, 2, 3}
    held = [(r["gpu_slot"], r["slot_claimed_unix"], r["slot_released_unix"]) for r in runs]
    for (slot_a, a0, a1), (slot_b, b0, b1) in itertools.combinations(held, 2):
        assert slot_a != slot_b or a1 <= b0 or b1 <= a0, "two jobs held one slot at once"
    starts = sorted(t for _, t, _ in held)
    at_once = max(sum(a0 <= t < a1 for _, a0, a1 in held) for t in starts)
    assert 2 <= at_once <= 4  # jobs did run side by side, never more than the GPUs
    assert all(r["deterministic"] is True for r in runs)  # the config's switch, recorded


def test_the_rule_names_validation_reserves_are_the_workflows(tmp_path):
    """config.RULES (names a study may not take) lists exactly the workflow's own rules: the
    rest of `--list-rules` is one target per study and per paper."""
    from normrnn.pipeline import config as nc

    wf = workflow_copy(tmp_path)
    cfg = load_tiny()
    write_config(wf, cfg)
    listed = set(snakemake(wf, "--list-rules").stdout.split())
    targets = {s["name"] for s in cfg["studies"]}
    targets |= {s[k] for s in cfg["studies"] for k in ("paper", "experiment_of") if k in s}
    assert listed - targets == set(nc.RULES)
