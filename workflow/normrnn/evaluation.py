"""Evaluate a trained run on the test split and record its cost and size in one JSON."""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import torch

from .diagnostics import spectral_norms
from .models import model_bits, recurrent_layers
from .training import evaluate, load_model, make_task, resolve_device


@torch.no_grad()
def inference_seconds_per_step(model, task, device, repeats: int = 5) -> float:
    """Median wall time of a forward pass over one test batch, per time step."""
    model.eval()
    batch = task.batches("test")[0]
    steps = batch[0].shape[0]
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        task.loss(model, batch, None, device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) / steps


def evaluate_run(model_path, info_path, data_dir, out_path, run: dict, device="auto") -> dict:
    device = resolve_device(device)
    info = json.loads(Path(info_path).read_text())
    model, saved = load_model(model_path)
    model.to(device)
    params = saved["params"]
    task = make_task(data_dir, params)
    result = {**run, **info}
    layer = recurrent_layers(model)[0]
    spectral = spectral_norms(layer)
    result.update({k: v for k, v in spectral.items() if not isinstance(v, list)})
    result["lambda1_gates_effective"] = json.dumps(
        [round(v, 4) for v in spectral["lambda1_gates_effective"]]
    )
    result.update(
        n_params=sum(p.numel() for p in model.parameters()),
        model_bits=model_bits(model),
        hidden_size=params["hidden_size"],
        cell=params.get("cell", "lstm"),
        num_layers=params.get("num_layers", 1),
    )
    if info["status"] == "diverged":
        result.update(test_loss=math.nan, test_metric=math.nan, infer_seconds_per_step=math.nan)
    else:
        loss, metric = evaluate(model, task, "test", device, params.get("precision", "fp32"))
        if not math.isfinite(loss):
            result["status"] = "diverged"
        result.update(
            test_loss=loss,
            test_metric=metric,
            infer_seconds_per_step=inference_seconds_per_step(model, task, device),
        )
    Path(out_path).write_text(json.dumps(result, indent=2, default=float))
    return result
