"""Training of one run, with checkpoints that survive kills.

A run checkpoints atomically (temp file, then rename; the previous checkpoint is kept) every
``checkpoint_every`` steps and after every epoch. Started again, it resumes from the newest
readable checkpoint: model, optimizer, scheduler, RNG states, data position, carried hidden
state and the best-validation model so far, so a killed and resumed run ends where an
uninterrupted one does. SIGTERM and SIGUSR1 (SLURM's warning before a time limit or
preemption) checkpoint and exit with 143.

After every epoch the run is validated (``valid_statistics``: with the batch norms'
population statistics, estimated over the training data first when ``population_stats`` is
``dataset``, or with batch statistics as in training, Cooijmans et al.'s model selection).
The model with the best validation ``select_on`` (loss or error rate) is kept beside the last
one; ``select`` says which one the test reports (evaluation.py tests both).

A diverged run (loss NaN/inf or above ``divergence_loss``) and one past ``time_budget_s``
stop early with status ``diverged``/``timeout``: they are results, and their outputs are
written like any other run's.
"""

from __future__ import annotations

import datetime
import json
import math
import resource
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..compute.paths import route_record
from ..methods.models import build_model, recurrent_layers
from ..methods.norms import activation_term
from . import tracking
from .checkpoint import Checkpointer, fingerprint, restore_rng_states, rng_states
from .config import JOB_SETTINGS
from .files import write_atomic
from .optim import make_optimizer, make_scheduler, parameter_groups, update_preconditioners
from .scoring import autocast, evaluate, population_statistics, resolve_device
from .tasks import make_task

PREEMPT_EXIT = 143


def norm_options(params) -> dict:
    """The run's norm options: ``norm_opts[norm]``, with a ``gamma_init`` hyperparameter (a grid
    axis) applied to the norms that have a gain γ (the activation norms)."""
    norm = params["norm"]
    opts = dict((params.get("norm_opts") or {}).get(norm, {}))
    if "gamma_init" in params and activation_term(norm) is not None:
        opts["gamma_init"] = params["gamma_init"]
    return opts


MODEL_KEYS = {  # hyperparameter: (build_model keyword, default)
    "cell": ("cell", "lstm"),
    "num_layers": ("num_layers", 1),
    "dropout": ("dropout", 0.0),
    "init": ("init", "orthogonal_gates"),
    "init_scale": ("init_scale", 1.0),
    "hh_init": ("hh_init", "orthogonal"),
    "forget_bias": ("forget_bias", 1.0),
    "learn_initial_state": ("learn_initial_state", False),
    "h0_noise": ("h0_noise", 0.0),
    "head_init": ("head_init", "default"),
    "head_norm": ("head_norm", False),
    "head_gain_init": ("head_gain_init", 1.0),
}


def model_spec(task, params) -> dict:
    """The keyword arguments of build_model for this run (saved with the model)."""
    spec = {
        "kind": params["model"],
        "hidden_size": params["hidden_size"],
        "norm": params["norm"],
        "quant": params["quant"],
        "max_steps": task.max_steps,
        "norm_opts": norm_options(params),
        **{kw: params.get(key, default) for key, (kw, default) in MODEL_KEYS.items()},
        **task.model_kwargs(),
    }
    if params.get("emb_size"):
        spec["emb_size"] = params["emb_size"]
    if params["model"] != "classifier":
        spec["input_encoding"] = params.get("input_encoding", "embedding")
    return spec


# ----------------------------------------------------------------------------- training
@dataclass
class Progress:
    """Where a run is: saved in every checkpoint (as a dict) and restored from it."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    history: list = field(default_factory=list)
    state: object = None  # the hidden state carried between chunks
    status: str = "running"
    step_times: list = field(default_factory=list)
    train_tokens: int = 0  # time steps × sequences of the training batches
    loss_sum: float = 0.0
    loss_count: int = 0
    train_time: float = 0.0
    epoch_train_time: float = 0.0
    stop_step: int | None = None
    best: float = math.inf  # the best validation value of ``select_on`` so far
    best_epoch: int | None = None
    best_state: dict | None = None
    route: dict = field(default_factory=dict)  # how the training steps ran (paths.choose)


SELECT_ON = ("loss", "error")


def train(
    params,
    data_dir,
    model_path,
    history_path,
    info_path,
    ckpt_dir,
    device="auto",
    log=None,
    code="",
    curves_dir=None,
):
    """Train one run; write the model (last and best-validation weights), the per-epoch
    history (CSV) and a JSON summary. ``code`` (the package's code hash) joins the params in
    the checkpoint's fingerprint; ``curves_dir``: where a TensorBoard writer puts the run's
    curves as it trains (``tracking``; none without)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    device = resolve_device(device)
    torch.manual_seed(params["seed"])
    task = make_task(data_dir, params)
    spec = model_spec(task, params)
    model = build_model(**spec).to(device)
    extra = {
        k: params[k] for k in ("weight_decay", "momentum", "alpha") if params.get(k) is not None
    }
    opt = make_optimizer(
        params.get("optimizer", "adam"), parameter_groups(model, params), params["lr"], **extra
    )
    sched = make_scheduler(opt, params)
    precision = params.get("precision", "fp32")
    select_on = params.get("select_on", "loss")
    if select_on not in SELECT_ON:
        raise ValueError(f"select_on must be one of {SELECT_ON}, got {select_on!r}")
    ckpt = Checkpointer(ckpt_dir)
    st = Progress()
    fp = fingerprint({k: v for k, v in params.items() if k not in JOB_SETTINGS}, code)
    saved = ckpt.load(log)
    if saved is not None and saved.get("fingerprint") != fp:
        log(f"checkpoint in {ckpt.dir} is from other settings or code; starting afresh")
        saved = None
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        restore_rng_states(saved.get("rng"), log)
        st = Progress(**saved["progress"])
        log(f"resumed at epoch {st.epoch}, batch {st.batch} (step {st.step})")

    def checkpoint():
        ckpt.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "fingerprint": fp,
                "scheduler": sched.state_dict(),
                "rng": rng_states(),  # every generator the run draws from
                "progress": asdict(st),
            }
        )

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    curves = tracking.curves(curves_dir, resumed_at=st.step)  # (before the handlers: may raise)
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
    bound = params.get("divergence_loss", 1e3)
    budget = params.get("time_budget_s", 0)
    every = params.get("checkpoint_every", 0)
    max_batches = params.get("max_batches", 0)
    valid_statistics = params.get("valid_statistics", "population")
    last_report = time.perf_counter()
    try:
        while st.status == "running" and st.epoch < params["epochs"]:
            model.train()
            t_epoch = time.perf_counter()
            batches = task.batches("train", st.epoch, params["seed"])[: max_batches or None]
            for b in range(st.batch, len(batches)):
                t0 = time.perf_counter()
                with autocast(device, precision):
                    loss, state, _, n = task.loss(model, batches[b], st.state, device)
                st.route = st.route or route_record(recurrent_layers(model))
                value = loss.item()
                if not math.isfinite(value) or value > bound:
                    st.status, st.stop_step = "diverged", st.step
                    log(f"diverged at step {st.step} (epoch {st.epoch}): loss {value}")
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                norm = gradient_norm(model, params.get("clip"))
                if not math.isfinite(norm):  # (before the step: the weights stay finite)
                    st.status, st.stop_step = "diverged", st.step
                    log(f"diverged at step {st.step} (epoch {st.epoch}): gradient norm {norm}")
                    break
                opt.step()
                update_preconditioners(model, opt)
                st.state = state
                st.step += 1
                curves.step(st.step, value)
                st.batch = b + 1
                st.loss_sum += value * n
                st.loss_count += n
                dt = time.perf_counter() - t0
                st.train_time += dt
                st.epoch_train_time += dt
                if len(st.step_times) < 10_000:
                    st.step_times.append(dt)
                st.train_tokens += batches[b][0].shape[0] * batches[b][0].shape[1]
                if time.perf_counter() - last_report > PROGRESS_EVERY_S:  # the job's live log
                    last_report = time.perf_counter()
                    log(progress_line(st, value, len(batches), params["epochs"]))
                if budget and st.train_time > budget:
                    st.status, st.stop_step = "timeout", st.step
                    log(f"time budget of {budget} s used up at step {st.step}")
                    break
                if stop["signal"] is not None:
                    checkpoint()
                    log(f"signal {stop['signal']}: checkpointed at step {st.step}, exiting")
                    sys.exit(PREEMPT_EXIT)
                if every and st.step % every == 0:
                    checkpoint()
            if st.status == "diverged":
                break
            if (
                valid_statistics == "population"
                and params.get("population_stats", "dataset") == "dataset"
            ):
                population_statistics(model, task, params, device, precision)
            score = evaluate(model, task, "valid", device, precision, statistics=valid_statistics)
            seen = st.loss_count
            row = {
                "epoch": st.epoch + 1,
                "step": st.step,
                "train_loss": st.loss_sum / seen if seen else float("nan"),
                "valid_loss": score.loss,
                f"valid_{task.metric}": score.metric,
                "valid_error": score.error,
                "lr": opt.param_groups[0]["lr"],
                "train_seconds": st.epoch_train_time,
                "seconds": time.perf_counter() - t_epoch,
            }
            st.history.append(row)
            curves.epoch(row)
            log(
                " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                )
                + " | "
                + progress_line(st, row["train_loss"], len(batches), params["epochs"])
            )
            last_report = time.perf_counter()
            value = getattr(score, select_on)
            if value < st.best:  # (NaN never is)
                st.best, st.best_epoch = value, st.epoch + 1
                st.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sched.step(score.loss)
            else:
                sched.step()
            st.epoch, st.batch, st.loss_sum, st.loss_count = st.epoch + 1, 0, 0.0, 0
            st.epoch_train_time = 0.0
            if task.metric == "accuracy":
                st.state = None
            if st.status == "running":
                checkpoint()
    finally:
        curves.close()
        for s, h in old.items():
            signal.signal(s, h)
    if st.status == "running":
        st.status = "ok"
    if st.status == "timeout" or (st.status == "ok" and valid_statistics == "batch"):
        _final_population(model, task, params, device, precision, st)
    info = _write_outputs(
        model, spec, task, params, st, device, model_path, history_path, info_path
    )
    ckpt.clear()
    return info


def gradient_norm(model, clip=None) -> float:
    """The total L2 norm of the gradients, clipped to ``clip`` (where set and > 0) after it
    is taken (torch's clip_grad_norm_)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if clip:
        return float(torch.nn.utils.clip_grad_norm_(params, clip))
    return float(torch.nn.utils.get_total_norm([p.grad for p in params]))


def _final_population(model, task, params, device, precision, st) -> None:
    """Population statistics for the test, where validation did not estimate them for the
    last model (a timeout mid-epoch, or validation with batch statistics); the best model's
    are estimated for it when it is tested (evaluation.py)."""
    if params.get("population_stats", "dataset") == "dataset":
        population_statistics(model, task, params, device, precision)


PROGRESS_EVERY_S = 60  # a progress line in the job's log at least this often


def progress_line(st: Progress, loss: float, per_epoch: int, epochs: int) -> str:
    """Where a run is and when it will end: epoch, step, loss, tokens/s of training and an
    ETA from the mean time per step so far (validation not counted)."""
    total = per_epoch * epochs
    left = max(0, total - st.step)
    rate = st.train_time / st.step if st.step else 0.0
    eta = datetime.timedelta(seconds=round(left * rate))
    tokens = st.train_tokens / st.train_time if st.train_time else 0.0
    return (
        f"epoch {st.epoch + 1}/{epochs} step {st.step}/{total} loss {loss:.4g} "
        f"{tokens:,.0f} tokens/s ETA {eta} (training steps only)"
    )


def peak_memory_mb(device) -> dict:
    """The job's peak memory: the process's resident set (torch itself included, about 350 MB
    on the CPU), and on a GPU the CUDA allocator's peak. The model's own memory (parameters,
    activations kept for backward) is measured apart, by the evaluation."""
    out = {"process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _write_outputs(model, spec, task, params, st, device, model_path, history_path, info_path):
    import pandas as pd

    model_path, history_path, info_path = Path(model_path), Path(history_path), Path(info_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"spec": spec, "state_dict": model.state_dict(), "params": params}
    payload.update(best_state_dict=st.best_state, best_epoch=st.best_epoch)
    write_atomic(model_path, lambda f: torch.save(payload, f))
    columns = ["epoch", "step", "train_loss", "valid_loss", f"valid_{task.metric}", "valid_error",
               "lr", "train_seconds", "seconds"]  # fmt: skip
    pd.DataFrame(st.history, columns=columns).to_csv(history_path, index=False)
    times = st.step_times[min(5, len(st.step_times) // 2) :]
    epoch_times = [row["train_seconds"] for row in st.history]
    curve = [row[f"valid_{task.metric}"] for row in st.history]
    info = {
        "status": st.status,
        "stop_step": st.stop_step,
        "epochs_done": st.epoch,
        "steps": st.step,
        "metric": task.metric,
        "train_seconds": st.train_time,
        # per training batch (forward, backward, update), median after the first steps
        "train_seconds_per_batch": statistics.median(times) if times else float("nan"),
        "train_tokens_per_s": st.train_tokens / st.train_time if st.train_time else float("nan"),
        "seconds_per_epoch": statistics.median(epoch_times) if epoch_times else float("nan"),
        "best_epoch": st.best_epoch,
        # the learning curve's mean height: how fast the run converged, not only where
        "valid_metric_mean": statistics.fmean(curve) if curve else float("nan"),
        **peak_memory_mb(device),
        "device": str(device),
        "threads": torch.get_num_threads(),
        **st.route,  # the compute path of the training steps: numbers drift between paths
    }
    info_path.write_text(json.dumps(info, indent=2))
    return info


__all__ = ["PREEMPT_EXIT", "Progress", "gradient_norm", "model_spec", "norm_options", "train"]
