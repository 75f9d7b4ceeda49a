"""Training and evaluation of one run, with checkpoints that survive kills.

A run checkpoints atomically (temp file, then rename; the previous checkpoint is kept) every
``checkpoint_every`` steps and after every epoch. Started again, it resumes from the newest
readable checkpoint: model, optimizer, scheduler, RNG states, data position and carried
hidden state, so a killed and resumed run ends where an uninterrupted one does. SIGTERM and
SIGUSR1 (SLURM's warning before a time limit or preemption) checkpoint and exit with 143.

A diverged run (loss NaN/inf or above ``divergence_loss``) and one past ``time_budget_s``
stop early with status ``diverged``/``timeout``: they are results, and their outputs are
written like any other run's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import resource
import signal
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import (
    IGNORE,
    classification_batches,
    lm_batches,
    load_meta,
    load_split,
    variable_length_batches,
)
from .models import build_model
from .norms import estimate_population_statistics
from .optim import make_optimizer, update_preconditioners

LN2 = math.log(2)
PREEMPT_EXIT = 143


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class CheckpointError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- tasks
class ClassificationTask:
    metric, higher_is_better = "accuracy", True

    def __init__(self, meta, params, data_dir):
        self.meta, self.params = meta, params
        self.splits = {s: load_split(data_dir, s, meta) for s in ("train", "valid", "test")}

    def model_kwargs(self):
        return {"num_classes": self.meta["num_classes"], "input_size": self.meta["input_size"]}

    @property
    def max_steps(self):
        return self.meta["seq_len"]

    def batches(self, split, epoch=0, seed=0):
        d = self.splits[split]
        g = torch.Generator().manual_seed(seed * 100_003 + epoch) if split == "train" else None
        return classification_batches(d["x"], d["y"], self.params["batch_size"], g)

    def loss(self, model, batch, state, device):
        x, y = batch
        logits = model(x.to(device))[0]
        return (
            F.cross_entropy(logits, y.to(device)),
            None,
            (logits.argmax(1).cpu() == y).sum().item(),
            len(y),
        )

    def score(self, total_loss, correct, count):
        return total_loss / count, correct / count


class LanguageModelTask:
    def __init__(self, meta, params, data_dir):
        self.meta, self.params = meta, params
        self.splits = {s: load_split(data_dir, s, meta)["ids"] for s in ("train", "valid", "test")}
        self.metric = "bpc" if meta["kind"] == "char" else "perplexity"
        self.higher_is_better = False

    def model_kwargs(self):
        return {"vocab_size": self.meta["vocab_size"]}

    @property
    def max_steps(self):
        return self.params["seq_len"]

    @property
    def variable_length(self) -> bool:
        return self.params.get("train_lengths", "fixed") != "fixed"

    def batches(self, split, epoch=0, seed=0, seq_len=None):
        """(inputs, targets) chunks; with ``train_lengths: variable[_unmasked]`` the training
        chunks are variable-length sequences (inputs, targets, mask), see
        :func:`~normrnn.data.variable_length_batches`."""
        chunks = lm_batches(
            self.splits[split], self.params["batch_size"], seq_len or self.params["seq_len"]
        )
        if split != "train" or not self.variable_length:
            return chunks
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        return variable_length_batches(chunks, g)

    def loss(self, model, batch, state, device):
        """Mean cross-entropy over the real (unpadded) targets. Variable-length sequences
        start from a zero state; ``variable_unmasked`` hides the mask from the batch norms
        (their statistics then include the padding: the ablation of masked statistics)."""
        x, y, *mask = batch
        if mask:  # a variable-length batch: its sequences start from a zero state
            state = None
        use_mask = mask and self.params["train_lengths"] == "variable"
        logits, state = model(x.to(device), state, mask[0].to(device) if use_mask else None)
        carry = self.params.get("carry_state", True) and not self.variable_length
        state = _detach(state) if carry else None
        y = y.to(device).flatten()
        loss = F.cross_entropy(logits.flatten(0, 1), y, ignore_index=IGNORE)
        return loss, state, 0, int((y != IGNORE).sum())

    def score(self, total_loss, correct, count):
        nll = total_loss / count
        return nll, nll / LN2 if self.metric == "bpc" else math.exp(min(nll, 700))


def _detach(state):
    if isinstance(state, torch.Tensor):
        return state.detach()
    return type(state)(_detach(s) for s in state)


def make_task(data_dir, params):
    meta = load_meta(data_dir)
    cls = ClassificationTask if meta["kind"] == "classification" else LanguageModelTask
    return cls(meta, params, data_dir)


def norm_options(params) -> dict:
    """The run's norm options: ``norm_opts[norm]``, with a ``gamma_init`` hyperparameter (a grid
    axis) applied to the norms that have a gain γ (the activation norms)."""
    from .norms import activation_term

    norm = params["norm"]
    opts = dict((params.get("norm_opts") or {}).get(norm, {}))
    if "gamma_init" in params and activation_term(norm) is not None:
        opts["gamma_init"] = params["gamma_init"]
    return opts


def model_spec(task, params) -> dict:
    """The keyword arguments of build_model for this run (saved with the model)."""
    norm = params["norm"]
    return {
        "kind": params["model"],
        "hidden_size": params["hidden_size"],
        "norm": norm,
        "quant": params["quant"],
        "cell": params.get("cell", "lstm"),
        "num_layers": params.get("num_layers", 1),
        "dropout": params.get("dropout", 0.0),
        "max_steps": task.max_steps,
        "norm_opts": norm_options(params),
        "init_scale": params.get("init_scale", 1.0),
        "hh_init": params.get("hh_init", "orthogonal"),
        "forget_bias": params.get("forget_bias", 1.0),
        **({"emb_size": params["emb_size"]} if params.get("emb_size") else {}),
        **task.model_kwargs(),
    }


def autocast(device, precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def evaluate(model, task, split, device, precision="fp32", max_batches=0):
    model.eval()
    total, correct, count, state = 0.0, 0, 0, None
    batches = task.batches(split)
    for batch in batches[: max_batches or None]:
        with autocast(device, precision):
            loss, state, c, n = task.loss(model, batch, state, device)
        total += loss.item() * n
        correct += c
        count += n
    return task.score(total, correct, count)


# ----------------------------------------------------------------------------- checkpoints
class Checkpointer:
    """``last.pt`` and ``prev.pt`` in a directory; writes are atomic."""

    def __init__(self, directory):
        self.dir = Path(directory)

    def save(self, payload: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        last, prev, tmp = self.dir / "last.pt", self.dir / "prev.pt", self.dir / "last.pt.tmp"
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        if last.exists():
            os.replace(last, prev)
        os.replace(tmp, last)

    def clear(self) -> None:
        """Remove the checkpoints once the run's outputs are written."""
        for name in ("last.pt", "prev.pt", "last.pt.tmp"):
            (self.dir / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.dir.rmdir()

    def load(self, log=print) -> dict | None:
        for path in (self.dir / "last.pt", self.dir / "prev.pt"):
            if not path.exists():
                continue
            try:
                return torch.load(path, weights_only=False)
            except Exception as e:  # a truncated or garbled file: fall back to the previous
                log(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); trying prev.pt")
        return None


def load_model(path) -> tuple[torch.nn.Module, dict]:
    """Load a trained model written by :func:`train`."""
    try:
        saved = torch.load(path, weights_only=False, map_location="cpu")
        model = build_model(**saved["spec"])
        model.load_state_dict(saved["state_dict"])
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot load the trained model ({type(e).__name__}: {e})"
        ) from e
    return model, saved


# ----------------------------------------------------------------------------- training
def make_scheduler(opt, params):
    """Per-epoch learning-rate schedule: ×``lr_plateau_factor`` when the validation loss
    stops improving, else ×``lr_decay`` after each epoch from ``lr_decay_start`` on."""
    if params.get("lr_plateau_factor"):
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, factor=params["lr_plateau_factor"], patience=0
        )
    decay, start = params.get("lr_decay", 1.0), params.get("lr_decay_start", 0)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: decay ** max(0, e - start + 1))


def fingerprint(params: dict, code: str = "") -> str:
    """Identifies a run's settings: a checkpoint is only resumed by the same run."""
    blob = json.dumps(params, sort_keys=True, default=str) + code
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
):
    """Train one run; write the model, the per-epoch history (CSV) and a JSON summary.

    ``code`` (the package's code hash) joins the params in the checkpoint's fingerprint.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    device = resolve_device(device)
    torch.manual_seed(params["seed"])
    task = make_task(data_dir, params)
    spec = model_spec(task, params)
    model = build_model(**spec).to(device)
    extra = {k: params[k] for k in ("weight_decay", "momentum") if params.get(k) is not None}
    opt = make_optimizer(params.get("optimizer", "adam"), model.parameters(), params["lr"], **extra)
    sched = make_scheduler(opt, params)
    precision = params.get("precision", "fp32")
    ckpt = Checkpointer(ckpt_dir)
    st = {
        "epoch": 0,
        "batch": 0,
        "step": 0,
        "history": [],
        "state": None,
        "status": "running",
        "step_times": [],
        "loss_sum": 0.0,
        "loss_count": 0,
        "train_time": 0.0,
        "stop_step": None,
    }
    fp = fingerprint(params, code)
    saved = ckpt.load(log)
    if saved is not None and saved.get("fingerprint") != fp:
        log(f"checkpoint in {ckpt.dir} is from other settings or code; starting afresh")
        saved = None
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        st = saved["progress"]
        log(f"resumed at epoch {st['epoch']}, batch {st['batch']} (step {st['step']})")

    def checkpoint():
        ckpt.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "fingerprint": fp,
                "scheduler": sched.state_dict(),
                "rng": torch.get_rng_state(),
                "progress": st,
            }
        )

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
    bound = params.get("divergence_loss", 1e3)
    budget = params.get("time_budget_s", 0)
    every = params.get("checkpoint_every", 0)
    max_batches = params.get("max_batches", 0)
    try:
        while st["status"] == "running" and st["epoch"] < params["epochs"]:
            model.train()
            t_epoch = time.perf_counter()
            batches = task.batches("train", st["epoch"], params["seed"])[: max_batches or None]
            for b in range(st["batch"], len(batches)):
                t0 = time.perf_counter()
                with autocast(device, precision):
                    loss, state, _, n = task.loss(model, batches[b], st["state"], device)
                value = loss.item()
                if not math.isfinite(value) or value > bound:
                    st.update(status="diverged", stop_step=st["step"])
                    log(f"diverged at step {st['step']} (epoch {st['epoch']}): loss {value}")
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if params.get("clip"):
                    torch.nn.utils.clip_grad_norm_(model.parameters(), params["clip"])
                opt.step()
                update_preconditioners(model, opt)
                st["state"] = state
                st["step"] += 1
                st["batch"] = b + 1
                st["loss_sum"] += value * n
                st["loss_count"] += n
                dt = time.perf_counter() - t0
                st["train_time"] += dt
                if len(st["step_times"]) < 10_000:
                    st["step_times"].append(dt)
                if budget and st["train_time"] > budget:
                    st.update(status="timeout", stop_step=st["step"])
                    log(f"time budget of {budget} s used up at step {st['step']}")
                    break
                if stop["signal"] is not None:
                    checkpoint()
                    log(f"signal {stop['signal']}: checkpointed at step {st['step']}, exiting")
                    sys.exit(PREEMPT_EXIT)
                if every and st["step"] % every == 0:
                    checkpoint()
            if st["status"] == "diverged":
                break
            if params.get("population_stats", "dataset") == "dataset":
                population_statistics(model, task, params, device, precision)
            v_loss, v_metric = evaluate(model, task, "valid", device, precision)
            seen = st["loss_count"]
            row = {
                "epoch": st["epoch"] + 1,
                "step": st["step"],
                "train_loss": st["loss_sum"] / seen if seen else float("nan"),
                "valid_loss": v_loss,
                f"valid_{task.metric}": v_metric,
                "lr": opt.param_groups[0]["lr"],
                "seconds": time.perf_counter() - t_epoch,
            }
            st["history"].append(row)
            log(
                " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                )
            )
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sched.step(v_loss)
            else:
                sched.step()
            st.update(
                epoch=st["epoch"] + 1,
                batch=0,
                loss_sum=0.0,
                loss_count=0,
                state=None if task.metric == "accuracy" else st["state"],
            )
            if st["status"] == "running":
                checkpoint()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if st["status"] == "running":
        st["status"] = "ok"
    if st["status"] == "timeout" and params.get("population_stats", "dataset") == "dataset":
        population_statistics(model, task, params, device, precision)
    info = _write_outputs(
        model, spec, task, params, st, device, model_path, history_path, info_path
    )
    ckpt.clear()
    return info


def population_statistics(model, task, params, device, precision) -> int:
    """Replace the running averages by the mean batch statistics over one epoch of training
    batches (Cooijmans et al.: population statistics estimated over the training set). Done
    before every validation: training itself never reads these buffers."""
    batches = task.batches("train", 0, params["seed"])[: params.get("max_batches", 0) or None]
    carried = {"state": None}

    def forward(batch):
        with autocast(device, precision):
            _, carried["state"], _, _ = task.loss(model, batch, carried["state"], device)

    return estimate_population_statistics(model, batches, forward)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _write_outputs(model, spec, task, params, st, device, model_path, history_path, info_path):
    import pandas as pd

    model_path, history_path, info_path = Path(model_path), Path(history_path), Path(info_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = model_path.with_name(model_path.name + ".tmp")
    torch.save({"spec": spec, "state_dict": model.state_dict(), "params": params}, tmp)
    os.replace(tmp, model_path)
    columns = ["epoch", "step", "train_loss", "valid_loss", f"valid_{task.metric}", "lr", "seconds"]
    pd.DataFrame(st["history"], columns=columns).to_csv(history_path, index=False)
    times = st["step_times"][min(5, len(st["step_times"]) // 2) :]
    info = {
        "status": st["status"],
        "stop_step": st["stop_step"],
        "epochs_done": st["epoch"],
        "steps": st["step"],
        "metric": task.metric,
        "train_seconds": st["train_time"],
        "seconds_per_step": statistics.median(times) if times else float("nan"),
        "peak_memory_mb": peak_memory_mb(device),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    info_path.write_text(json.dumps(info, indent=2))
    return info


__all__ = [
    "train",
    "evaluate",
    "load_model",
    "make_task",
    "Checkpointer",
    "resolve_device",
]
