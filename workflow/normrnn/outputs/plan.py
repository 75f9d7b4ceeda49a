"""What a config will cost before it starts.

    python -m normrnn plan CONFIG [--cores N] [--device cpu|cuda] [--data-dir DIR]

Per study and in total: runs, training steps, and the hours they take here, from the time of
one training step (forward, backward, update) that this command measures on ``--device`` at
each run's own size (model, batch, sequence length; one thread per job on the CPU, as the
jobs run), times the run's steps, plus the forward passes of validation (each epoch), of the
population statistics where batch norm estimates them over the training set before each
validation, and of the test. A dataset's size comes from its prepared ``meta.json`` where it
is prepared, else from :data:`SIZE_HINTS`. On a GPU host ``--device cuda`` measures there;
this machine's CPU is measured by default. The assumptions are printed with the estimate, and
each study's time per run beside the ``runtime_min`` its SLURM jobs ask for.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..methods.models import build_model
from ..methods.norms import uses_batch_norm
from ..pipeline import config as nc
from ..pipeline.check import load
from ..pipeline.training import model_spec

# A dataset's sizes where it is not prepared yet: training examples or tokens, validation and
# test likewise, and what the model sees (approximate; the prepared meta.json replaces them).
SIZE_HINTS = {
    "mnist": {"sizes": [50_000, 10_000, 10_000], "num_classes": 10, "input_size": 1,
              "seq_len": 784},
    "ptb_char": {"sizes": [5_017_000, 393_000, 442_000], "vocab_size": 50},
    "ptb_word": {"sizes": [929_000, 73_000, 82_000], "vocab_size": 10_000},
    "text8": {"sizes": [90_000_000, 5_000_000, 5_000_000], "vocab_size": 27},
    "warpeace": {"sizes": [2_600_000, 325_000, 325_000], "vocab_size": 83},
}  # fmt: skip
SIZE_HINTS["mnist_perm"] = SIZE_HINTS["mnist"]
# A forward pass at a larger batch (population statistics at 5000 sequences of 784 steps) is
# timed at this many and scaled: the plan must not need the memory the run will.
FORWARD_BATCH_CAP = 512
JOB_OVERHEAD_S = 2.0  # per job: process, imports, evaluation's diagnostics (quick study, 2 cores)


class Shape:
    """What a run's model sees: the task's kind, sizes and the dataset's."""

    def __init__(self, meta: dict, params: dict):
        self.meta, self.params = meta, params
        self.classifier = params["model"] == "classifier"
        self.max_steps = meta["seq_len"] if self.classifier else params["seq_len"]

    def model_kwargs(self) -> dict:
        if self.classifier:
            return {"num_classes": self.meta["num_classes"], "input_size": self.meta["input_size"]}
        return {"vocab_size": self.meta["vocab_size"]}

    def batches(self, split: int, batch_size: int) -> int:
        per_batch = batch_size * (1 if self.classifier else self.max_steps)
        return max(1, math.ceil(self.meta["sizes"][split] / per_batch))

    def eval_batch(self, split: str) -> int:
        """The batch size a split is evaluated at: 1 for a language model's ``whole``
        protocol (the whole sequence, Cooijmans et al.), else the evaluation batch size."""
        if not self.classifier and self.params.get(f"{split}_protocol") == "whole":
            return 1
        return self.params.get("eval_batch_size") or self.params["batch_size"]


def dataset_meta(name: str, data_dir: Path) -> tuple[dict, str]:
    """The dataset's sizes and shapes, and where they came from."""
    path = data_dir / "prepared" / name / "meta.json"
    if path.exists():
        meta = json.loads(path.read_text())
        meta["sizes"] = [meta["sizes"][s] for s in ("train", "valid", "test")]
        if "vocab" in meta:
            meta["vocab_size"] = len(meta["vocab"])
        return meta, str(path)
    if name in SIZE_HINTS:
        return dict(SIZE_HINTS[name]), "SIZE_HINTS (approximate)"
    raise SystemExit(f"plan: dataset {name!r} is neither prepared ({path}) nor in SIZE_HINTS")


def step_seconds(
    shape: Shape, params: dict, device: torch.device, repeats: int, batch=None, forward=False
) -> float:
    """Median time of one training step at the run's size (after one warm-up step); with
    ``forward``, of a forward pass without gradients at ``batch`` sequences (evaluation)."""
    torch.manual_seed(0)
    model = build_model(**model_spec(shape, params)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    b, t = batch or params["batch_size"], shape.max_steps
    if shape.classifier:
        x = torch.randn(t, b, shape.meta["input_size"], device=device)
        y = torch.randint(shape.meta["num_classes"], (b,), device=device)

        def loss():
            return F.cross_entropy(model(x)[0], y)
    else:
        x = torch.randint(shape.meta["vocab_size"], (t, b), device=device)

        def loss():
            return F.cross_entropy(model(x)[0].flatten(0, 1), x.flatten())

    times = []
    model.train(not forward)
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        if forward:
            with torch.no_grad():
                loss()
        else:
            opt.zero_grad(set_to_none=True)
            loss().backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def run_seconds(run: nc.Run, shape: Shape, time_of) -> tuple[int, float]:
    """A run's training steps and its estimated seconds: training; validation after every
    epoch; population statistics over the training set before it where batch norm estimates
    them so; the test of both kept models on the test and validation splits (and the best
    model's population statistics where validation used batch statistics); the job's
    overhead. ``time_of(batch, forward)`` is the measured time of a step or a forward pass."""
    hp = run.hparams
    batch, epochs, cap = hp["batch_size"], hp["epochs"], hp.get("max_batches") or math.inf
    steps = min(shape.batches(0, batch), cap) * epochs
    seconds = steps * time_of(batch, False)
    valid_b, test_b = shape.eval_batch("valid"), shape.eval_batch("test")
    valid = shape.batches(1, valid_b) * time_of(valid_b, True)
    test = shape.batches(2, test_b) * time_of(test_b, True)
    seconds += epochs * valid + 2 * (valid + test)
    if uses_batch_norm(run.norm) and hp.get("population_stats", "dataset") == "dataset":
        pop_b = hp.get("population_batch_size") or batch
        population = min(shape.batches(0, pop_b), cap) * time_of(pop_b, True)
        if hp.get("valid_statistics", "population") == "population":
            seconds += epochs * population
        elif hp.get("select") == "best":
            seconds += population  # the best model's, before its test
    return steps, seconds + JOB_OVERHEAD_S


def plan(config: dict, data_dir: Path, device: torch.device, repeats: int = 3) -> list[dict]:
    """One row per run: study, task, steps, step seconds, estimated seconds."""
    torch.set_num_threads(config.get("threads_per_train_job", 1))
    measured, rows = {}, []
    for (study, task, _), run in nc.expand(config).items():
        meta, source = dataset_meta(run.dataset, data_dir)
        shape = Shape(meta, {**run.hparams, "norm": run.norm, "quant": run.quant})
        spec = json.dumps(model_spec(shape, shape.params), sort_keys=True, default=str)

        def time_of(batch, forward, shape=shape, spec=spec):
            timed = min(batch, FORWARD_BATCH_CAP) if forward else batch
            if (spec, timed, forward) not in measured:
                measured[spec, timed, forward] = step_seconds(
                    shape, shape.params, device, repeats, timed, forward
                )
            return measured[spec, timed, forward] * batch / timed

        steps, seconds = run_seconds(run, shape, time_of)
        step_ms = 1000 * time_of(run.hparams["batch_size"], False)
        rows.append({"study": study, "task": task, "run": run.run, "steps": steps,
                     "step_ms": step_ms, "seconds": seconds, "sizes": source,
                     "runtime_min": run.hparams.get("runtime_min", 60)})  # fmt: skip
    return rows


def report(rows: list[dict], cores: int, device: torch.device) -> str:
    per = collections.defaultdict(list)
    for r in rows:
        per[r["study"]].append(r)
    lines = [f"{'study':22s} {'runs':>5s} {'steps':>12s} {'hours (1 job)':>14s} "
             f"{'longest run, min':>17s} {'asked, min':>11s}"]  # fmt: skip
    for study, rs in per.items():
        longest = max(r["seconds"] for r in rs) / 60
        asked = min(r["runtime_min"] for r in rs)
        flag = "  <- runtime_min too short" if longest > asked else ""
        lines.append(f"{study:22s} {len(rs):5d} {sum(r['steps'] for r in rs):12,d} "
                     f"{sum(r['seconds'] for r in rs) / 3600:14.2f} {longest:17.1f} "
                     f"{asked:11d}{flag}")  # fmt: skip
    total = sum(r["seconds"] for r in rows)
    wall = max(total / cores, max(r["seconds"] for r in rows))
    lines.append(f"{'total':22s} {len(rows):5d} {sum(r['steps'] for r in rows):12,d} "
                 f"{total / 3600:14.2f}")  # fmt: skip
    lines.append(f"\nestimate on {device} with {cores} jobs at once: {wall / 3600:.2f} h "
                 f"({wall / 60:.0f} min) of training jobs")  # fmt: skip
    sources = sorted({r["sizes"] for r in rows})
    lines.append(
        "assumptions: one training step and one forward pass at each evaluation batch size "
        "timed at each run's size on this device (median of the repeats, one thread per job on "
        f"a CPU; a forward pass above {FORWARD_BATCH_CAP} sequences scaled from that many); "
        "validation every epoch, population statistics over the training set before it "
        "where batch norm estimates them, the test and validation splits of both kept models; "
        f"{JOB_OVERHEAD_S:.0f} s per "
        "job for the process and the evaluation's diagnostics; data preparation, tables and "
        f"the bench not counted; dataset sizes from {', '.join(sources)}. A GPU estimate: run "
        "this on the GPU host with --device cuda."
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m normrnn plan", description=__doc__.split("\n\n")[0])
    p.add_argument("configfile", type=Path)
    p.add_argument("--cores", type=int, default=torch.get_num_threads(), help="jobs at once")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", type=Path, default=None, help="default: the config's data_dir")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--csv", type=Path, default=None, help="write the per-run estimates here")
    args = p.parse_args(argv)
    try:
        config = nc.validate(load(args.configfile))
    except nc.ConfigError as e:
        raise SystemExit(str(e)) from None
    device = torch.device(args.device)
    rows = plan(config, args.data_dir or Path(config["data_dir"]), device, args.repeats)
    print(report(rows, args.cores, device))
    if args.csv:
        import pandas as pd

        pd.DataFrame(rows).to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
