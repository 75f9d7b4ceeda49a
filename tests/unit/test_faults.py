"""Faults: kills, signals, divergence and damaged files (CPU, small)."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest
import torch
from train_helpers import PARAMS, run_train

from conftest import ROOT
from normrnn.pipeline.checkpoint import (
    Checkpointer,
    CheckpointError,
    load_model,
    restore_rng_states,
    rng_states,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DROPOUT = {**PARAMS, "num_layers": 2, "dropout": 0.5}  # dropout between the two layers


def child(out, data_dir, params, device="cpu"):
    """Train in a child process (single thread, like the uninterrupted run)."""
    code = textwrap.dedent(f"""
        import sys, json, torch
        sys.path.insert(0, {str(ROOT / "workflow")!r})
        torch.set_num_threads(1)
        from pathlib import Path
        from normrnn.pipeline.training import train
        out = Path({str(out)!r})
        train(json.loads({json.dumps(json.dumps(params))}), {str(data_dir)!r}, out / "model.pt",
              out / "history.csv", out / "train.json", out / "ckpt", device={device!r})
    """)
    return subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(out, proc, min_step=6, timeout=120):
    path = out / "ckpt" / "last.pt"
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise AssertionError(
                f"training ended before it could be interrupted: {proc.stderr.read()}"
            )
        if path.exists():
            try:
                step = torch.load(path, weights_only=False)["progress"]["step"]
            except Exception:  # caught mid-rename: try again
                step = -1
            if step >= min_step:
                return step
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def same_result(a, b, exact=False):
    """The same history and weights, to rounding or (``exact``) to the bit."""
    rtol, atol = (0.0, 0.0) if exact else (1e-6, 1e-7)
    ha, hb = pd.read_csv(a / "history.csv"), pd.read_csv(b / "history.csv")
    cols = ["epoch", "step", "train_loss", "valid_loss", "valid_accuracy"]
    pd.testing.assert_frame_equal(ha[cols], hb[cols], check_exact=exact, rtol=1e-6)
    ma, mb = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    assert ma["state_dict"].keys() == mb["state_dict"].keys()
    for k, v in ma["state_dict"].items():
        torch.testing.assert_close(v, mb["state_dict"][k], rtol=rtol, atol=atol, msg=k)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits_dir):
    out = tmp_path_factory.mktemp("clean")
    info = run_train(out, digits_dir)
    assert info["status"] == "ok" and info["steps"] == 36
    return out


def kill_and_resume(out, data_dir, params, device="cpu"):
    """Train in a child, SIGKILL it after a checkpoint, then rerun to the end: its info."""
    proc = child(out, data_dir, params, device)
    wait_for_checkpoint(out, proc)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
    assert not (out / "model.pt").exists()
    info = run_train(out, data_dir, params, device=device)
    assert info["status"] == "ok" and info["steps"] == params["epochs"] * params["max_batches"]
    return info


@pytest.fixture(scope="module")
def uninterrupted_dropout(tmp_path_factory, digits_dir):
    out = tmp_path_factory.mktemp("clean_dropout")
    info = run_train(out, digits_dir, DROPOUT)
    assert info["status"] == "ok" and info["steps"] == 36
    return out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_run_resumes_to_the_same_result(tmp_path, digits_dir, uninterrupted, sig):
    proc = child(tmp_path, digits_dir, PARAMS)
    step = wait_for_checkpoint(tmp_path, proc)
    os.kill(proc.pid, sig)
    code = proc.wait(60)
    if sig == signal.SIGTERM:
        assert code == 143  # checkpointed, then exited for a requeue
        resumed_at = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=False)["progress"]
        assert resumed_at["step"] >= step
    else:
        assert code == -signal.SIGKILL
    assert not (tmp_path / "model.pt").exists()
    # the rerun resumes, under raised limits and another checkpoint cadence (job settings)
    limits = {"runtime_min": 240, "mem_mb": 8000, "checkpoint_every": 7}
    info = run_train(tmp_path, digits_dir, {**PARAMS, **limits})
    assert info["status"] == "ok" and info["steps"] == 36 and info["path"] == "sequence"
    same_result(tmp_path, uninterrupted)
    assert not (tmp_path / "ckpt").exists()  # removed once the outputs are written


def test_killed_run_with_dropout_resumes_to_the_same_result(
    tmp_path, digits_dir, uninterrupted_dropout
):
    """Dropout draws from torch's generator at every training step: the checkpoint keeps its
    state, so the resumed run draws the masks the uninterrupted one drew, to the bit."""
    kill_and_resume(tmp_path, digits_dir, DROPOUT)
    same_result(tmp_path, uninterrupted_dropout, exact=True)


@needs_cuda
def test_killed_run_with_dropout_resumes_to_the_same_result_on_cuda(tmp_path, digits_dir):
    """On a GPU dropout draws from the device's generator (issue #25: the checkpoint kept the
    CPU's alone, and a resumed run drew other masks). Six epochs: time to kill it in."""
    params = {**DROPOUT, "epochs": 6}
    clean = tmp_path / "clean"
    info = run_train(clean, digits_dir, params, device="cuda")
    assert info["status"] == "ok" and info["device"].startswith("cuda")
    resumed = tmp_path / "resumed"
    kill_and_resume(resumed, digits_dir, params, device="cuda")
    same_result(resumed, clean)


def draws() -> list:
    """A draw from each generator a checkpoint keeps (CUDA's where it is in use)."""
    out = [torch.rand(4).tolist(), random.random(), np.random.random(4).tolist()]
    if torch.cuda.is_initialized():
        out.append(torch.rand(4, device="cuda").tolist())
    return out


def test_a_checkpoint_restores_every_random_generator(tmp_path):
    ck = Checkpointer(tmp_path)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ck.save({"rng": rng_states()})
    expected = draws()
    assert draws() != expected  # the generators moved on
    messages = []
    restore_rng_states(ck.load()["rng"], messages.append)
    assert draws() == expected and messages == []


def test_a_checkpoint_without_some_generators_restores_the_others(tmp_path):
    """A checkpoint from before held torch's CPU state alone (a tensor), or none: it loads,
    restores what it holds and names what it lacks."""
    torch.manual_seed(3)
    old, expected = torch.get_rng_state(), torch.rand(4)
    messages = []
    restore_rng_states(old, messages.append)
    assert torch.equal(torch.rand(4), expected)
    assert "no state of python, numpy" in messages[0]
    restore_rng_states(None, messages.append)
    assert "no state of torch, python, numpy" in messages[1]


def test_the_cuda_generators_are_kept_where_cuda_is_in_use(monkeypatch):
    """CUDA's generators, one per device, are saved once CUDA is in use and restored to the
    devices there are (stood in for here: the test runs without a GPU too)."""
    kept = [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: kept)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    states = rng_states()
    assert states["cuda"] is kept
    messages = []
    restore_rng_states(states, messages.append)
    assert restored == kept[:1]  # one device here
    assert messages == [
        "the checkpoint keeps no state of cuda on 1 device(s) not on this machine: "
        "from the seed instead"
    ]
    restore_rng_states({k: v for k, v in states.items() if k != "cuda"}, messages.append)
    assert "no state of cuda:" in messages[1]


def test_corrupt_checkpoint_falls_back_to_the_previous(tmp_path):
    ck = Checkpointer(tmp_path)
    ck.save({"n": 1})
    ck.save({"n": 2})
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[: len(data) // 3])
    messages = []
    assert ck.load(messages.append) == {"n": 1}
    assert "last.pt is unreadable" in messages[0]
    (tmp_path / "prev.pt").write_bytes(b"garbage")
    assert ck.load(messages.append) is None


def test_checkpoint_of_other_settings_is_not_resumed(tmp_path, digits_dir):
    short = {**PARAMS, "epochs": 1, "checkpoint_every": 0}
    proc = child(tmp_path, digits_dir, {**PARAMS, "lr": 0.02})
    wait_for_checkpoint(tmp_path, proc)
    proc.kill()
    proc.wait()
    info = run_train(tmp_path, digits_dir, short)
    assert info["steps"] == 12  # started afresh, not at the lr=0.02 run's step


def test_nan_loss_is_a_diverged_result(tmp_path, digits_dir):
    import shutil

    from normrnn.pipeline.data import sha256

    d = tmp_path / "data"
    shutil.copytree(digits_dir, d)
    train_split = torch.load(d / "train.pt")
    train_split["x"][:] = float("nan")
    torch.save(train_split, d / "train.pt")
    meta = json.loads((d / "meta.json").read_text())
    meta["files"]["train"]["sha256"] = sha256(d / "train.pt")
    (d / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "run"
    info = run_train(out, d, {**PARAMS, "quant": "fp"})
    assert info["status"] == "diverged" and info["stop_step"] == 0
    assert json.loads((out / "train.json").read_text())["status"] == "diverged"
    assert (out / "model.pt").exists() and (out / "history.csv").exists()


def test_loss_above_the_bound_and_time_budget(tmp_path, digits_dir):
    info = run_train(tmp_path / "a", digits_dir, {**PARAMS, "divergence_loss": 0.5})
    assert info["status"] == "diverged"  # the initial loss is ln 10 ≈ 2.3
    info = run_train(tmp_path / "b", digits_dir, {**PARAMS, "time_budget_s": 1e-9})
    assert info["status"] == "timeout" and info["steps"] == 1


def test_damaged_model_file_is_named(tmp_path, uninterrupted):
    path = tmp_path / "model.pt"
    path.write_bytes((uninterrupted / "model.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model\.pt: cannot load the trained model"):
        load_model(path)


def test_gradient_norm_is_the_total_l2_norm_clipped_after():
    from normrnn.pipeline.training import gradient_norm

    model = torch.nn.Linear(3, 2)
    model.weight.grad = torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]])  # bias: no grad
    assert gradient_norm(model) == pytest.approx(5.0)
    assert gradient_norm(model, clip=1.0) == pytest.approx(5.0)  # the norm before clipping
    assert model.weight.grad.norm().item() == pytest.approx(1.0)


def test_infinite_gradient_is_a_diverged_result_with_finite_weights(
    tmp_path, digits_dir, monkeypatch
):
    """A finite loss with a non-finite gradient (an overflow in the backward) stops the run
    before the optimizer step, so the kept weights stay finite."""
    import normrnn.pipeline.training as training

    real, calls = training.gradient_norm, []

    def overflowing(model, clip=None):
        calls.append(1)
        if len(calls) == 4:  # the fourth step's backward overflows
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        return real(model, clip)

    monkeypatch.setattr(training, "gradient_norm", overflowing)
    info = run_train(tmp_path, digits_dir, {**PARAMS, "quant": "fp"})
    assert info["status"] == "diverged" and info["stop_step"] == 3
    state = torch.load(tmp_path / "model.pt")["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_run_records_the_compute_path_it_took(tmp_path, digits_dir, monkeypatch):
    """Runs on different paths agree per step to rounding and then drift: each records the
    path its training steps took (train.json, then eval.json and summary.csv)."""
    from normrnn.compute import native

    params = {**PARAMS, "quant": "fp", "epochs": 1, "max_batches": 2}
    first = run_train(tmp_path / "a", digits_dir, params)
    compiled = native.loop_applies(torch.zeros(1, 2, 3))
    assert (first["path"], first["step_kernels"]) == (
        "sequence",
        "compiled" if native.library() else "torch",
    )
    assert first["recurrence"] == ("compiled" if compiled else "python")
    monkeypatch.setattr(native, "loop_applies", lambda x: False)
    second = run_train(tmp_path / "b", digits_dir, params)
    assert second["path"] == "sequence" and second["recurrence"] == "python"
    third = run_train(tmp_path / "c", digits_dir, {**params, "norm": "wn"})
    assert (third["path"], third["recurrence"]) == ("fused", "-")


def flip_bytes(path, count=1000, seed=0):
    """Flip ``count`` bytes in the middle third of ``path`` (inside its tensors' data)."""
    data = bytearray(path.read_bytes())
    third = len(data) // 3
    rng = np.random.default_rng(seed)
    for i in rng.choice(np.arange(third, 2 * third), size=min(count, third), replace=False):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_bit_flips_in_a_checkpoint_or_a_model_are_caught(tmp_path, uninterrupted):
    """torch.load would load flipped bytes as numbers: the archive's CRCs catch them, the
    checkpoint falls back to the previous one and a damaged model is refused by name."""
    ck = Checkpointer(tmp_path / "ckpt")
    weights = {"w": torch.arange(20_000, dtype=torch.float32)}
    ck.save({"n": 1, **weights})
    ck.save({"n": 2, **weights})
    flip_bytes(ck.dir / "last.pt")
    messages = []
    assert ck.load(messages.append)["n"] == 1
    assert "last.pt" in messages[0] and "CRC" in messages[0]
    model = tmp_path / "model.pt"
    model.write_bytes((uninterrupted / "model.pt").read_bytes())
    load_model(model)  # intact: loads
    flip_bytes(model, count=200)
    with pytest.raises(CheckpointError, match=r"model\.pt: .*CRC does not match"):
        load_model(model)


def test_two_writers_of_one_checkpoint_do_not_collide(tmp_path):
    """After ``--unlock`` two jobs of one run may write its checkpoint at once: each writes a
    temporary file of its own, so neither finds its file gone."""
    import threading

    errors = []

    def writer(n):
        ck = Checkpointer(tmp_path)
        try:
            for i in range(20):
                ck.save({"writer": n, "i": i, "w": torch.randn(2000)})
        except Exception as e:  # noqa: BLE001 (any failure is the finding)
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert Checkpointer(tmp_path).load()["i"] == 19
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_killed_writers_temporary_file_is_cleared_a_live_ones_kept(tmp_path):
    """Clearing a run's checkpoints removes a temporary file whose writer is dead (killed while
    writing, however recent), keeps a fresh one of a live writer (another job of the run)."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    ck = Checkpointer(tmp_path)
    ck.save({"i": 1})
    from normrnn.pipeline.files import _HOST

    orphan = tmp_path / f".last.pt.{_HOST}.{dead}.abc123.tmp"
    live = tmp_path / f".last.pt.{_HOST}.{os.getppid()}.def456.tmp"  # (pytest's parent: alive)
    elsewhere = tmp_path / f".last.pt.other-node.{dead}.ghi789.tmp"  # a pid this host can't see
    for path in (orphan, live, elsewhere):
        path.write_bytes(b"half")
    ck.clear()
    assert not orphan.exists() and live.exists() and elsewhere.exists()
    assert not (tmp_path / "last.pt").exists()


@pytest.mark.parametrize(
    "failure",
    [OSError(28, "No space left on device"), RuntimeError("basic_ios::clear: iostream error")],
    ids=["ENOSPC", "torch"],
)
def test_a_full_disk_is_named_and_leaves_no_temporary_file(tmp_path, monkeypatch, failure):
    from normrnn.pipeline.files import WriteError

    ck = Checkpointer(tmp_path)
    ck.save({"n": 1})

    def full(obj, f):
        f.write(b"partial")
        raise failure

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(WriteError, match=r"last\.pt: could not be written: the disk is full"):
        ck.save({"n": 2})
    assert not list(tmp_path.glob(".*.tmp"))
    monkeypatch.undo()
    assert ck.load() == {"n": 1}  # the last good checkpoint is intact


def test_written_files_keep_the_umasks_mode_and_other_errors_pass_as_they_are(tmp_path):
    """Written through a temporary file, a file gets the mode open() would give it (not
    mkstemp's owner-only 0600); an error that is not I/O passes unwrapped."""
    from normrnn.pipeline import files
    from normrnn.pipeline.files import WriteError, write_atomic

    umask = os.umask(files._UMASK)  # (the process's, as the module read it)
    try:
        path = write_atomic(tmp_path / "a.bin", lambda f: f.write(b"x"))
        plain = tmp_path / "b.bin"
        plain.write_bytes(b"x")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777

    def unpicklable(f):
        raise TypeError("cannot pickle")

    with pytest.raises(TypeError, match="cannot pickle"):
        write_atomic(tmp_path / "c.bin", unpicklable)
    with pytest.raises(WriteError, match=r"c\.bin: could not be written: \[Errno 5\] boom"):
        write_atomic(tmp_path / "c.bin", lambda f: (_ for _ in ()).throw(OSError(5, "boom")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]


def test_the_log_shows_progress_with_throughput_and_an_eta(tmp_path, digits_dir, monkeypatch):
    """Each epoch's line, and a line at least every PROGRESS_EVERY_S within an epoch, say the
    epoch, the step of all steps, the loss, tokens/s and the time left."""
    import re

    from normrnn.pipeline import training

    monkeypatch.setattr(training, "PROGRESS_EVERY_S", 0.0)  # a line after every step
    lines = []
    params = {**PARAMS, "epochs": 2, "max_batches": 3}
    training.train(params, digits_dir, tmp_path / "m.pt", tmp_path / "h.csv", tmp_path / "t.json",
                   tmp_path / "ckpt", device="cpu", log=lines.append)  # fmt: skip
    pattern = r"epoch (\d)/2 step (\d+)/6 loss [\d.]+ [\d,]+ tokens/s ETA (\d+):(\d\d):(\d\d)"
    progress = [re.search(pattern, line) for line in lines]
    progress = [m for m in progress if m]
    assert len(progress) == 2 * 3 + 2  # every step, and each epoch's end
    steps = [int(m.group(2)) for m in progress]
    assert steps == sorted(steps) and steps[-1] == 6
    assert progress[-1].group(3, 4, 5) == ("0", "00", "00")  # nothing left at the end
    assert [int(m.group(1)) for m in progress][:4] == [1, 1, 1, 1]
