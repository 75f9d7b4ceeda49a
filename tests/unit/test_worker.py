"""The job worker (normrnn.pipeline.worker): a job run in a forked child gives what it gives
in its own process, a signal to the job's script reaches the child, a script that dies takes
its child with it, and the worker leaves when asked, when its parent is gone, or when idle."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT
from normrnn.pipeline import worker

PARAMS = {
    "model": "classifier", "hidden_size": 8, "batch_size": 32, "epochs": 2, "lr": 0.01,
    "norm": "bn", "quant": "fp", "seed": 3, "max_batches": 6, "checkpoint_every": 2,
    "clip": 1.0, "optimizer": "adam",
}  # fmt: skip


def train_job(out: Path, data_dir: Path, **params) -> SimpleNamespace:
    """A train job's snakemake object, as the train rule fills it."""
    return SimpleNamespace(
        rule="train",
        threads=1,
        log=[str(out / "train.log")],
        input=SimpleNamespace(meta=str(data_dir / "meta.json")),
        output=SimpleNamespace(
            model=str(out / "model.pt"), history=str(out / "history.csv"),
            info=str(out / "train.json"), evaluation=str(out / "eval.json"),
        ),
        params=SimpleNamespace(
            hp={**PARAMS, **params}, code="test", ckpt=str(out / "ckpt"), device="cpu",
            run={"study": "s", "task": "t", "run": "r"},
        ),
        resources=SimpleNamespace(
            checkpoint_every={**PARAMS, **params}["checkpoint_every"], tensorboard=0
        ),
    )  # fmt: skip


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A worker serving ``tmp_path``, and this test working there."""
    monkeypatch.chdir(tmp_path)
    proc = worker.start(tmp_path, ROOT / "workflow" / "normrnn")
    assert proc is not None and proc.poll() is None, "the worker did not start"
    yield tmp_path, proc
    worker.stop(tmp_path)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def test_a_job_through_the_worker_equals_one_in_its_own_process(served, digits_dir):
    tmp_path, proc = served
    for where, env in (("worker", {}), ("own", {"NORMRNN_WORKER": "0"})):
        out = tmp_path / where
        out.mkdir()
        smk = train_job(out, digits_dir)
        run = subprocess.run(
            [sys.executable, "-c", _script(smk)], cwd=tmp_path, env={**os.environ, **env},
            capture_output=True, text=True,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
    got = json.loads((tmp_path / "worker" / "eval.json").read_text())
    expected = json.loads((tmp_path / "own" / "eval.json").read_text())
    assert got["test_loss"] == expected["test_loss"] and got["steps"] == expected["steps"] == 12
    a = torch.load(tmp_path / "worker" / "model.pt")["state_dict"]
    b = torch.load(tmp_path / "own" / "model.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "resumed" not in (tmp_path / "worker" / "train.log").read_text()
    assert proc.poll() is None  # the worker serves on


def _script(smk) -> str:
    import pickle

    return textwrap.dedent(f"""
        import pickle, sys
        sys.path.insert(0, {str(ROOT / "workflow")!r})
        from normrnn.pipeline.worker import run_job
        run_job("train", pickle.loads({pickle.dumps(smk)!r}))
    """)


def _wait_for(path: Path, proc, timeout=120):
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, "the job ended before it could be signalled"
        assert time.time() - start < timeout, f"{path} did not appear"
        time.sleep(0.05)


def _long_job(tmp_path, digits_dir):
    """A job's script training for long, started once its first checkpoint is written."""
    out = tmp_path / "job"
    out.mkdir()
    smk = train_job(out, digits_dir, epochs=500, max_batches=0, checkpoint_every=1)
    proc = subprocess.Popen([sys.executable, "-c", _script(smk)], cwd=tmp_path)
    _wait_for(out / "ckpt" / "last.pt", proc)
    return out, proc


def test_a_signal_to_the_script_reaches_the_child(served, digits_dir):
    """SIGTERM to the job's script (SLURM's time limit, Snakemake stopping): the child
    checkpoints and exits 143, and so does the script."""
    out, proc = _long_job(served[0], digits_dir)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert "checkpointed at step" in (out / "train.log").read_text()
    assert not (out / "model.pt").exists()


def test_a_script_that_dies_takes_its_child_with_it(served, digits_dir):
    """SIGKILL of the job's script (a node's OOM killer, a killed Snakemake): the worker sends
    its child SIGTERM, which checkpoints and exits instead of training on unwatched."""
    tmp_path, proc_worker = served
    out, proc = _long_job(tmp_path, digits_dir)
    proc.kill()
    proc.wait()
    log = out / "train.log"
    start = time.time()
    while "checkpointed at step" not in log.read_text():
        assert time.time() - start < 60, "the orphaned child trains on"
        time.sleep(0.1)
    assert proc_worker.poll() is None


def test_the_worker_leaves_when_its_parent_is_gone_or_idle(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    path = tmp_path / "w.sock"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow")}
    args = [sys.executable, "-m", "normrnn.pipeline.worker", "--socket", str(path)]
    orphan = subprocess.Popen([*args, "--parent", str(parent.pid)], env=env)
    idle = subprocess.Popen([*args[:-1], str(tmp_path / "i.sock"), "--idle", "1"], env=env)
    deadline = time.time() + 90
    while not path.exists():
        assert time.time() < deadline and orphan.poll() is None
        time.sleep(0.1)
    parent.kill()
    parent.wait()
    assert orphan.wait(timeout=30) == 0 and not path.exists()
    assert idle.wait(timeout=90) == 0


def test_without_a_worker_a_job_runs_in_its_own_process(tmp_path, monkeypatch):
    """No socket (a cluster node, conda environments, NORMRNN_WORKER=0): the script runs the
    job itself; a socket nobody listens on (a worker that died) is the same."""
    monkeypatch.chdir(tmp_path)
    calls = []
    from normrnn.pipeline import jobs

    monkeypatch.setattr(jobs, "summary_job", lambda smk: calls.append(smk), raising=True)
    worker.run_job("summary", "no worker")
    (tmp_path / worker.SOCKET).parent.mkdir()
    (tmp_path / worker.SOCKET).touch()
    worker.run_job("summary", "a dead socket")
    assert calls == ["no worker", "a dead socket"]
