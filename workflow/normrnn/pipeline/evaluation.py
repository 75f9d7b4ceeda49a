"""Evaluate a trained run on the test split and record its cost and size in one JSON.

Both kept models are tested, the last one and the best-validation one (``test_metric_last``,
``test_metric_best``, ``best_epoch``); ``test_metric`` is the one the run's ``select`` names
(``last``, the default, or ``best``), and ``valid_metric`` that model's validation metric
under the task's validation protocol, with population statistics (the split some papers
report). A noisy initial state (``h0_noise``) draws its noise from the run's seed."""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import torch

from ..methods.models import build_model, model_bits, recurrent_layers, recurrent_size_kb
from .checkpoint import load_model
from .diagnostics import (
    batch_norm_statistics,
    hidden_gradient_norms,
    saved_bytes,
    spectral_norms,
)
from .scoring import autocast, evaluate, population_statistics, resolve_device
from .tasks import make_task


@torch.no_grad()
def inference_seconds_per_batch(model, task, device, repeats: int = 5) -> tuple[float, int]:
    """Median wall time of a forward pass over the first test batch (after one warm-up), and
    the batch's tokens (time steps × sequences)."""
    model.eval()
    batch = task.batches("test")[0]
    tokens = batch[0].shape[0] * batch[0].shape[1]
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        task.loss(model, batch, None, device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]), tokens


def model_memory(model, task, device) -> dict:
    """The model's own memory, not the process's: its parameters and buffers, and the
    activations one training batch keeps for backward (autograd's saved tensors and the
    sequence path's buffers, :func:`~normrnn.pipeline.diagnostics.saved_bytes`), in MiB."""
    params = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    model.train()
    batch = task.batches("train")[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}  # (population statistics)
    activations = saved_bytes(lambda: task.loss(model, batch, None, device)[0])
    model.load_state_dict(state)
    model.eval()
    return {"param_mb": params / 2**20, "activation_mb": activations / 2**20}


def test_both(model_path, saved, task, params, device) -> dict:
    """Test and validation scores of the last and the best-validation model: {"last": ...,
    "best": ...}, each with test_loss, test_metric, valid_loss and valid_metric."""
    out = {}
    precision = params.get("precision", "fp32")
    for which in ("last", "best"):
        model = load_model(model_path, which)[0].to(device)
        if which == "best" and _needs_population(params, saved):
            population_statistics(model, task, params, device, precision)
        scores = {}
        for split in ("test", "valid"):
            torch.manual_seed(params["seed"])  # (the noise of a noisy initial state)
            score = evaluate(model, task, split, device, precision)
            scores.update({f"{split}_loss": score.loss, f"{split}_metric": score.metric})
        out[which] = scores
    return out


def _needs_population(params, saved) -> bool:
    """Whether the best model's population statistics were not estimated in training (its
    validation used batch statistics) and must be, over the training data, before its test."""
    return (
        saved.get("best_state_dict") is not None
        and params.get("valid_statistics", "population") == "batch"
        and params.get("population_stats", "dataset") == "dataset"
    )


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
        size_kb=recurrent_size_kb(model),
        cell=params.get("cell", "lstm"),
        num_layers=params.get("num_layers", 1),
    )
    # every hyperparameter of the run, grid or not, as a column of summary.csv
    for key, value in params.items():
        if key not in result:
            result[key] = (
                value if isinstance(value, str | int | float | bool) else json.dumps(value)
            )
    if info["status"] == "diverged":
        result.update(test_loss=math.nan, test_metric=math.nan)
        result.update(infer_seconds_per_batch=math.nan, infer_tokens_per_s=math.nan)
    else:
        scores = test_both(model_path, saved, task, params, device)
        chosen = scores[params.get("select", "last")]
        if not math.isfinite(chosen["test_loss"]):
            result["status"] = "diverged"
        result.update(chosen)
        for which, score in scores.items():
            result.update({f"{k}_{which}": v for k, v in score.items()})
        result["selected"] = params.get("select", "last")
        seconds, tokens = inference_seconds_per_batch(model, task, device)
        result.update(infer_seconds_per_batch=seconds, infer_tokens_per_s=tokens / seconds)
        if params.get("eval_seq_lens"):
            result["length_metrics"] = length_metrics(model, task, device, params)
        model.eval()
        test_batch = task.batches("test")[0]
        result["bn_statistics"] = batch_norm_statistics(
            layer, lambda: task.loss(model, test_batch, None, device)
        )
        result["grad_norms_trained"] = gradient_flow(model, task, device)
        torch.manual_seed(params["seed"])  # the initialisation this run started from
        result["grad_norms_init"] = gradient_flow(
            build_model(**saved["spec"]).to(device), task, device
        )
        result.update(model_memory(model, task, device))  # last: it draws dropout masks
    Path(out_path).write_text(json.dumps(result, indent=2, default=float))
    return result


@torch.no_grad()
def length_metrics(model, task, device, params) -> list[dict]:
    """The test metric on sequences of each length in ``eval_seq_lens``, each sequence started
    from a zero state: per-step batch norm reuses the statistics of its last trained step
    beyond T_max (Cooijmans et al.), the layer-wise norms need none."""
    model.eval()
    out = []
    for length in params["eval_seq_lens"]:
        total, count = 0.0, 0
        for batch in task.batches("test", seq_len=length):
            with autocast(device, params.get("precision", "fp32")):
                loss, _, _, n = task.loss(model, batch, None, device)
            total += loss.item() * n
            count += n
        nll, metric = task.score(total, 0, count)
        out.append({"length": length, "test_loss": nll, "test_metric": metric})
    return out


def gradient_flow(model, task, device) -> list[float]:
    """‖∂L/∂h_t‖ of the first recurrent layer over t, on the first validation batch, with
    batch statistics as in training (run last: it moves batch-norm population statistics)."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    batch = task.batches("valid")[0]
    layer = recurrent_layers(model)[0]
    with torch.enable_grad():
        return hidden_gradient_norms(model, layer, lambda: task.loss(model, batch, None, device)[0])
