"""The optional TensorBoard curves (``tracking.py``): what a run writes, read back with
TensorBoard's own reader, against the run's history and an uninterrupted run."""

import sys

import pandas as pd
import pytest
from train_helpers import PARAMS, curves_of, run_train

from normrnn.pipeline import tracking

PLAIN = {**PARAMS, "quant": "fp", "checkpoint_every": 0}  # 3 epochs of 12 steps


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits_dir):
    out = tmp_path_factory.mktemp("curves")
    info = run_train(out, digits_dir, PLAIN, curves_dir=out / "tb")
    assert info["status"] == "ok" and info["steps"] == 36
    return out


def test_a_run_writes_a_loss_per_step_and_its_history_per_epoch(uninterrupted):
    curves = curves_of(uninterrupted / "tb")
    assert [s for s, _ in curves["train/loss"]] == list(range(1, 37))
    history = pd.read_csv(uninterrupted / "history.csv")
    for column in ("train_loss", "valid_loss", "valid_accuracy", "lr"):
        steps, values = zip(*curves[f"epoch/{column}"], strict=True)
        assert list(steps) == history["step"].tolist()
        assert values == pytest.approx(history[column].tolist(), rel=1e-6)  # (stored as fp32)
    # the epoch's train loss is the mean of its steps' losses, weighted by examples (equal here)
    first = [v for s, v in curves["train/loss"] if s <= 12]
    assert sum(first) / 12 == pytest.approx(history["train_loss"][0], rel=1e-5)


def test_a_resumed_run_holds_each_step_once(tmp_path, digits_dir, uninterrupted):
    """Killed in epoch 2 after its curves reached step 24, resumed from the checkpoint at
    step 12: each step once, with the uninterrupted run's loss."""

    def stop_after_epoch_2(message):
        if message.startswith("epoch=2 "):
            raise Interrupted

    with pytest.raises(Interrupted):
        run_train(tmp_path, digits_dir, PLAIN, curves_dir=tmp_path / "tb", log=stop_after_epoch_2)
    assert [s for s, _ in curves_of(tmp_path / "tb")["train/loss"]] == list(range(1, 25))
    info = run_train(tmp_path, digits_dir, PLAIN, curves_dir=tmp_path / "tb")
    assert info["status"] == "ok" and info["steps"] == 36
    resumed, clean = curves_of(tmp_path / "tb"), curves_of(uninterrupted / "tb")
    assert [s for s, _ in resumed["train/loss"]] == list(range(1, 37))
    assert [v for _, v in resumed["train/loss"]] == pytest.approx(
        [v for _, v in clean["train/loss"]], rel=1e-5
    )
    assert [s for s, _ in resumed["epoch/valid_loss"]] == [12, 24, 36]


def test_a_run_from_step_0_starts_its_curves_afresh(tmp_path, digits_dir):
    """Killed in its first epoch with no checkpoint (or rerun after a change): the next
    attempt starts at step 0 and its curves hold each step once, not both attempts'."""

    def stop_in_epoch_1(message):
        if message.startswith("epoch=1 "):
            raise Interrupted

    with pytest.raises(Interrupted):
        run_train(tmp_path, digits_dir, PLAIN, curves_dir=tmp_path / "tb", log=stop_in_epoch_1)
    assert not (tmp_path / "ckpt" / "last.pt").exists()  # (no checkpoint before the epoch's)
    run_train(tmp_path, digits_dir, PLAIN, curves_dir=tmp_path / "tb")
    assert [s for s, _ in curves_of(tmp_path / "tb")["train/loss"]] == list(range(1, 37))


def test_without_a_directory_nothing_is_written(tmp_path, digits_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # (a writer without a directory would write ./runs)
    (tmp_path / "out").mkdir()
    run_train(tmp_path / "out", digits_dir, {**PLAIN, "epochs": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "history.csv", "model.pt", "train.json"
    ]  # fmt: skip


def test_without_the_package_the_switch_is_refused_by_name(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    assert "tensorboard: true needs the tensorboard package" in tracking.missing()
    assert "pip install -e '.[track]'" in tracking.missing()
    with pytest.raises(RuntimeError, match=r"config key tensorboard: true needs"):
        tracking.curves(tmp_path / "tb")
    assert isinstance(tracking.curves(None), tracking.NoCurves)  # off: never imported
