"""The plan: a config's runs, steps and hours before it starts, from measured step times."""

import json
import math

import pytest
import torch

from normrnn.outputs import plan
from normrnn.pipeline import config as nc
from pipeline_helpers import load_tiny


@pytest.fixture()
def prepared(tmp_path):
    """meta.json files for the tiny config's datasets (sizes only; no data is read)."""
    cfg = nc.validate(load_tiny())
    for name in cfg["datasets"]:
        d = tmp_path / "prepared" / name
        d.mkdir(parents=True)
        meta = {"sizes": {"train": 400, "valid": 50, "test": 60}}
        meta |= {"num_classes": 10, "input_size": 1, "seq_len": 16, "vocab": list("abcdefgh")}
        (d / "meta.json").write_text(json.dumps(meta))
    return cfg, tmp_path


def test_the_plan_counts_each_runs_steps_and_prices_them(prepared, monkeypatch):
    cfg, data = prepared

    def fake(shape, params, device, repeats, batch=None, forward=False):
        return 0.001 if forward else 0.01  # a forward pass, a training step

    monkeypatch.setattr(plan, "step_seconds", fake)
    rows = plan.plan(cfg, data, torch.device("cpu"))
    runs = nc.expand(cfg)
    assert len(rows) == len(runs)
    for row, run in zip(rows, runs.values(), strict=True):
        hp = run.hparams
        per_batch = hp["batch_size"] * (1 if hp["model"] == "classifier" else hp["seq_len"])
        per_epoch = math.ceil(400 / per_batch)
        if hp.get("max_batches"):
            per_epoch = min(per_epoch, hp["max_batches"])
        assert row["steps"] == per_epoch * hp["epochs"]
        # + validation each epoch and the test of both models on test and validation
        per_eval = (hp.get("eval_batch_size") or hp["batch_size"]) * per_batch // hp["batch_size"]
        valid = math.ceil(50 / per_eval)
        assert row["seconds"] >= row["steps"] * 0.01 + (hp["epochs"] + 2) * valid * 0.001
    text = plan.report(rows, 2, torch.device("cpu"))
    total = next(line for line in text.splitlines() if line.startswith("total"))
    assert total.split()[:3] == ["total", str(len(rows)), f"{sum(r['steps'] for r in rows):,d}"]
    assert "assumptions:" in text and "meta.json" in text


def test_a_step_is_timed_at_the_runs_size(prepared):
    cfg, data = prepared
    run = next(iter(nc.expand(cfg).values()))
    meta, _ = plan.dataset_meta(run.dataset, data)
    small = plan.Shape(meta, {**run.hparams, "norm": run.norm, "quant": run.quant})
    big = plan.Shape(meta, {**small.params, "hidden_size": 32 * run.hparams["hidden_size"]})
    cpu = torch.device("cpu")
    assert plan.step_seconds(big, big.params, cpu, 3) > plan.step_seconds(
        small, small.params, cpu, 3
    )


def test_an_unknown_unprepared_dataset_is_named(tmp_path):
    with pytest.raises(SystemExit, match="dataset 'nowhere'"):
        plan.dataset_meta("nowhere", tmp_path)
