"""The pipeline's models as the default config's studies build them, for the conformance tests:
a run's hyperparameters come from ``config/config.yaml`` expanded with its recipe, only the
sizes made small, and the model from ``training.model_spec`` as a train job builds it."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import yaml

from normrnn.methods.models import build_model
from normrnn.pipeline import config as nc
from normrnn.pipeline.training import model_spec

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
RUNS = nc.expand(nc.validate(copy.deepcopy(DEFAULT)))


def study_params(study: str, task: str, norm: str, quant: str = "fp", **small) -> dict:
    """The train job's params of seed 1 of that run, with ``small`` replacing sizes."""
    params = RUNS[(study, task, f"{norm}.{quant}.s1")].params()
    return {**params, **small}


class _Task:
    """What model_spec reads of a task: its model keywords and T_max."""

    def __init__(self, max_steps: int, **model_kwargs):
        self.max_steps, self._kw = max_steps, model_kwargs

    def model_kwargs(self):
        return dict(self._kw)


def study_model(params: dict, max_steps: int, seed: int = 0, **task_kw) -> torch.nn.Module:
    """The float64 model a train job builds from ``params`` (``task_kw``: vocab_size, or
    num_classes and input_size)."""
    torch.manual_seed(seed)
    return build_model(**model_spec(_Task(max_steps, **task_kw), params)).double()


def blocks(w: torch.Tensor, order, dim: int = 0) -> torch.Tensor:
    """``w``'s four gate blocks along ``dim`` (ours: i, f, g, o) in another ``order`` of
    their indices, e.g. (2, 1, 0, 3) for (g, f, i, o)."""
    parts = w.chunk(4, dim)
    return torch.cat([parts[i] for i in order], dim)


def leaves(p: dict) -> dict:
    """Float64 leaf copies that record their gradients."""
    return {k: v.detach().clone().double().requires_grad_() for k, v in p.items()}


def assert_close(got: torch.Tensor, expected: torch.Tensor, name: str, tol: float = 1e-10):
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * scale, msg=name)
