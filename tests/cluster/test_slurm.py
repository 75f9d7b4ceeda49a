"""The pipeline submitted to a real one-node SLURM cluster (tests/cluster/up.sh).

Where no cluster runs, one is started when the tests may (root, and CI or NORMRNN_SLURM_UP=1
set: it installs Debian packages); otherwise these tests are skipped with the reason.
"""

import os
import re
import shutil
import subprocess

import pandas as pd
import pytest

from pipeline_helpers import ROOT, load_tiny, snakemake, workflow_copy, write_config

pytestmark = [pytest.mark.slurm, pytest.mark.pipeline]
CLUSTER = ROOT / "tests" / "cluster"


def idle_node() -> bool:
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "idle" in out.stdout.split()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if idle_node():
        yield "existing"
        return
    allowed = os.environ.get("CI") or os.environ.get("NORMRNN_SLURM_UP") == "1"
    if (
        os.geteuid() != 0
        or not allowed
        or shutil.which("apt-get") is None
        and shutil.which("slurmctld") is None
    ):
        pytest.skip(
            "no SLURM cluster is running, and one is started only as root with CI or "
            "NORMRNN_SLURM_UP=1 set (tests/cluster/up.sh installs Debian's slurm packages)"
        )
    state = tmp_path_factory.mktemp("slurm")
    up = subprocess.run([CLUSTER / "up.sh", state], capture_output=True, text=True, timeout=300)
    if up.returncode != 0:
        subprocess.run([CLUSTER / "down.sh", state], timeout=60)
        pytest.fail(f"tests/cluster/up.sh failed:\n{up.stdout}\n{up.stderr}")
    yield "started"
    subprocess.run([CLUSTER / "down.sh", state], timeout=60)


def small_config() -> dict:
    cfg = load_tiny()
    cfg["studies"] = [
        {"name": "s", "tasks": ["digits"], "norms": ["none", "bn"], "quants": ["fp"], "seeds": [1]}
    ]
    cfg["gpus_per_train_job"] = 1
    cfg["device"] = "auto"
    return cfg


def submit(wf, *extra):
    # the plugin can hang forever when it loses track of jobs: kill it from outside
    return snakemake(
        wf, "--profile", "profiles/slurm-noacct", "--slurm-init-seconds-before-status-checks", "1",
        "--verbose", *extra, check=False, timeout=290, prefix=("timeout", "-s", "KILL", "280"),
    )  # fmt: skip


@pytest.fixture(scope="module")
def submitted(cluster, tmp_path_factory):
    wf = workflow_copy(tmp_path_factory.mktemp("slurm-run"))
    write_config(wf, small_config())
    proc = submit(wf)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return wf, proc.stdout + proc.stderr


def test_every_job_ran_as_a_slurm_job(submitted):
    wf, log = submitted
    total = int(re.search(r"^total\s+(\d+)", log, re.M).group(1))
    ids = re.findall(r"has been submitted with SLURM jobid (\d+)", log)
    assert len(ids) == total - 1  # all jobs but the local target rule 'all'
    assert len(set(ids)) == len(ids)


def test_train_jobs_request_a_gpu(submitted):
    _, log = submitted
    calls = [line for line in log.splitlines() if line.startswith("sbatch call:")]
    train = [c for c in calls if "--comment rule_train_" in c]
    assert len(train) == 2 and all("--gpus=1" in c for c in train)
    assert not any("--gpus" in c for c in calls if "rule_fetch" in c or "rule_tables" in c)


def test_outputs_equal_a_local_run(submitted, tmp_path):
    wf, _ = submitted
    local = workflow_copy(tmp_path)
    write_config(local, small_config())
    snakemake(local, "--cores", "2")
    cols = ["study", "task", "run", "status", "test_loss", "test_metric", "steps", "n_params"]
    a = pd.read_csv(wf / "results" / "summary.csv")[cols].sort_values("run", ignore_index=True)
    b = pd.read_csv(local / "results" / "summary.csv")[cols].sort_values("run", ignore_index=True)
    pd.testing.assert_frame_equal(a, b, rtol=1e-6)


def test_failing_job_is_reported_with_its_log_kept(submitted, tmp_path):
    wf, _ = submitted
    broken = tmp_path / "broken"
    shutil.copytree(wf, broken, ignore=shutil.ignore_patterns("slurm_logs", "locks"))
    (broken / "data" / "prepared" / "digits" / "train.pt").write_bytes(b"truncated")
    proc = submit(broken)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Error in rule train" in log
    logs = list((broken / ".snakemake" / "slurm_logs" / "rule_train").rglob("*.log"))
    assert logs, "the failed job's SLURM log was not kept"
    assert any(
        "train.pt: prepared data file is corrupt or truncated" in p.read_text() for p in logs
    )
