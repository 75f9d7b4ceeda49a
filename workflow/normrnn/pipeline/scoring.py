"""One split's loss, metric and error rate with a model (validation while training, and the
test), the precision it runs in, and Cooijmans et al.'s population statistics."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..methods.norms import estimate_population_statistics, frozen_statistics


def resolve_device(device: str = "auto") -> torch.device:
    """The config's ``device``: ``auto`` is a GPU where there is one; ``cuda`` without one is
    refused by name, not left to fail inside torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"config key device: {device!r}, but this machine has no CUDA device")
    return resolved


def autocast(device, precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@dataclass
class Score:
    loss: float
    metric: float
    error: float  # the fraction of examples (classification) or symbols predicted wrongly


@torch.no_grad()
def evaluate(model, task, split, device, precision="fp32", max_batches=0, statistics="population"):
    """The loss, metric and error rate of ``split``, in eval mode (the batch norms'
    population statistics), or with ``statistics="batch"`` with each batch's own statistics
    as in training, leaving the population statistics as they are."""
    if statistics == "batch":
        model.train()
        context = frozen_statistics(model)
    else:
        model.eval()
        context = contextlib.nullcontext()
    total, correct, count, state = 0.0, 0, 0, None
    with context:
        for batch in task.batches(split)[: max_batches or None]:
            with autocast(device, precision):
                loss, state, c, n = task.loss(model, batch, state, device)
            total += loss.item() * n
            correct += c
            count += n
    loss, metric = task.score(total, correct, count)
    return Score(loss, metric, 1 - correct / count)


def population_statistics(model, task, params, device, precision) -> int:
    """Replace the running averages by the mean batch statistics over the training data
    (Cooijmans et al.: population statistics estimated over the training set), at
    ``population_batch_size``, without augmentation. Training itself never reads these
    buffers."""
    batches = task.population_batches(params["seed"])[: params.get("max_batches", 0) or None]
    carried = {"state": None}

    def forward(batch):
        with autocast(device, precision):
            _, carried["state"], _, _ = task.loss(model, batch, carried["state"], device)

    return estimate_population_statistics(model, batches, forward)
