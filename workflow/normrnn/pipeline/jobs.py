"""The bodies of the Snakemake jobs; ``workflow/scripts/*.py`` call these with the
``snakemake`` object. Each job's stdout and stderr go to its log file."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path


@contextlib.contextmanager
def logged(smk):
    """Send the job's output to its log; on failure, write the traceback there too."""
    path = Path(smk.log[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            yield
        except SystemExit:
            raise
        except BaseException:
            traceback.print_exc()
            raise


def fetch_job(smk):
    from .data import fetch

    with logged(smk):
        fetch(smk.params.source, smk.output[0])
        print(f"wrote {smk.output[0]} from {smk.params.source}")


def download_job(smk):
    from .download import download

    with logged(smk):
        download(smk.output[0], dict(smk.params.spec), log=lambda m: print(m, flush=True))


def prepare_job(smk):
    from .data import prepare
    from .download import verify

    with logged(smk):
        for path in smk.input.raw:  # a file placed by hand is checked like a downloaded one
            pins = smk.params.pins.get(Path(path).name)
            if pins is not None:
                verify(path, pins)
        meta = prepare(list(smk.input.raw), Path(smk.output.meta).parent, dict(smk.params.spec))
        print(json.dumps({k: v for k, v in meta.items() if k != "vocab"}, indent=2))


def _setup(smk):
    """A training or evaluation job's threads, and freed memory kept (``memory.py``)."""
    import torch

    from ..compute.memory import keep_freed_memory

    torch.set_num_threads(max(1, int(smk.threads)))
    keep_freed_memory()
    if getattr(smk.params, "deterministic", False):  # the config's switch: the same numbers
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # (before CUDA starts)
        torch.use_deterministic_algorithms(True, warn_only=True)  # (a warning where none is)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False


def train_job(smk):
    """A run: training, then its test, in one process (evaluation.evaluate_run), on a GPU slot
    of its own where the host has several (gpu_slots)."""
    from . import gpu_slots, provenance
    from .evaluation import evaluate_run
    from .scoring import resolve_device
    from .training import train

    with logged(smk):
        _setup(smk)
        data_dir = Path(smk.input.meta).parent
        hp = {**smk.params.hp, "checkpoint_every": smk.resources.checkpoint_every}
        curves = smk.resources.tensorboard  # a job setting, like the checkpoint cadence
        n = gpu_slots.local_gpus() if smk.params.device in ("auto", "cuda") else 0
        slot = gpu_slots.claim(n, log=lambda m: print(m, flush=True)) if n else None
        device = gpu_slots.device_for(smk.params.device, slot)
        started, t0 = provenance.now(), time.perf_counter()
        info = train(
            hp,
            data_dir,
            smk.output.model,
            smk.output.history,
            smk.output.info,
            smk.params.ckpt,
            device=device,
            log=lambda m: print(m, flush=True),
            code=smk.params.code,
            curves_dir=Path(smk.output.model).parent / "tensorboard" if curves else None,
        )
        # what produced it (provenance.py): train.json and, through it, eval.json and the summary
        info.update(provenance.record(resolve_device(device)), code_version=smk.params.code)
        info.update(started_at=started, train_wall_s=time.perf_counter() - t0)
        info.update(gpu_slot=slot.index if slot else None)
        Path(smk.output.info).write_text(json.dumps(info, indent=2))
        print(json.dumps(info))
        t1 = time.perf_counter()
        result = evaluate_run(
            smk.output.model,
            smk.output.info,
            data_dir,
            smk.output.evaluation,
            dict(smk.params.run),
            device=device,
        )
        result.update(eval_wall_s=time.perf_counter() - t1, finished_at=provenance.now())
        if slot:  # when the slot was held, to the writing of the result (the tests read it)
            result.update(slot_claimed_unix=slot.claimed_at, slot_released_unix=time.time())
        Path(smk.output.evaluation).write_text(json.dumps(result, indent=2, default=float))
        if slot:
            slot.release()
        print(json.dumps(result, default=str))


def tables_job(smk):
    from ..outputs.tables import collect, write_tables

    with logged(smk):
        runs = collect(smk.input.evals)
        runs.to_csv(smk.output.runs, index=False)
        out = smk.output
        table = write_tables(runs, out.md, out.tex, out.html, f"Study {smk.wildcards.study}")
        print(table.to_string())


def reported_job(smk):
    """A study's paper's reported numbers beside the reproduced ones (studies with a paper)."""
    import pandas as pd

    from ..outputs.tables import compare_reported, html_table

    with logged(smk):
        study, paper = smk.wildcards.study, smk.params.paper
        runs = pd.read_csv(smk.input.runs)
        cmp = compare_reported(
            runs, pd.read_csv(smk.input.reported), paper, dict(smk.params.tolerance)
        )
        title = f"Study {study}: reported ({paper}) vs reproduced"
        cmp.to_csv(smk.output.csv, index=False)
        blank = cmp.astype(object).where(cmp.notna(), "")
        Path(smk.output.md).write_text(f"# {title}\n\n" + blank.to_markdown(index=False) + "\n")
        text = "Reported numbers from config/reported.csv; reproduced as mean ± std over n seeds"
        Path(smk.output.html).write_text(html_table(cmp, title, text))
        print(cmp.to_string())


def plots_job(smk):
    import pandas as pd

    from ..outputs import plots, tables

    with logged(smk):
        runs, axes = pd.read_csv(smk.input.runs), list(smk.params.grid)
        ident = ["task", "norm", "quant", "seed", *axes]
        frames = []
        for path in smk.input.histories:
            parts = Path(path).parts
            run = runs[(runs["task"] == parts[-3]) & (runs["run"] == parts[-2])].iloc[0]
            frames.append(pd.read_csv(path).assign(**run[ident].to_dict()))
        histories = pd.concat(frames, ignore_index=True)
        flow = tables.gradient_flow(smk.input.evals, extra=axes)
        plots.gradient_flow(flow, smk.output.gradflow, axes)
        plots.learning_curves(histories, smk.output.curves, axes)
        plots.final_metric(runs, smk.output.metric, axes)


def summary_job(smk):
    import pandas as pd

    from ..outputs.tables import html_table

    with logged(smk):
        df = pd.concat([pd.read_csv(p) for p in smk.input], ignore_index=True)
        df.to_csv(smk.output.csv, index=False)
        text = f"{len(df)} runs, one row each (columns: the report's caption of summary.csv)"
        Path(smk.output.html).write_text(html_table(df, "Every run", text))
        print(f"{len(df)} runs, {int((df['status'] != 'ok').sum())} not ok", file=sys.stdout)


def claims_job(smk):
    """The studies' claims against summary.csv (normrnn.outputs.claims): a table with verdicts."""
    import pandas as pd

    from ..outputs import plots
    from ..outputs.claims import check, groups
    from ..outputs.tables import html_table

    with logged(smk):
        claims, runs = dict(smk.params.claims), pd.read_csv(smk.input[0])
        table = check(claims, runs)
        plots.claims(table, groups(claims, runs), smk.output.png)
        table.to_csv(smk.output.csv, index=False)
        Path(smk.output.md).write_text(
            "# Claims, checked against the runs\n\n" + table.to_markdown(index=False) + "\n"
        )
        text = "Each claim's verdict and the numbers it rests on (see the caption)"
        Path(smk.output.html).write_text(html_table(table, "Claims, checked", text))
        print(table.to_string())


def bench_job(smk):
    import pandas as pd

    from ..outputs import bench, plots

    with logged(smk):
        spec = {"threads": 1, **smk.params.spec}  # (the job holds every core: alone)
        env, rows = bench.run(bench.options(**spec))
        df = pd.DataFrame(rows).assign(sgemm_gflops=env["sgemm_gflops"])
        df.to_csv(smk.output.csv, index=False)
        plots.bench_ratios(df, smk.output.plot, env)


def figure_job(smk):
    """One of a study's optional figures (the study's ``figures`` key): ``grid``,
    ``bn_statistics``, ``lengths`` or ``spectral``."""
    import pandas as pd

    from ..outputs import diagnostic_plots, plots, tables

    with logged(smk):
        figure, out, grid = smk.wildcards.figure, smk.output[0], list(smk.params.grid)
        if figure == "grid":
            plots.grid_metric(pd.read_csv(smk.input.runs), grid, out)
        elif figure == "spectral":
            diagnostic_plots.spectral_norms(pd.read_csv(smk.input.runs), out)
        elif figure == "bn_statistics":
            diagnostic_plots.batch_norm_statistics(
                tables.batch_norm_statistics(smk.input.evals), out
            )
        else:
            style = "train_lengths" if "train_lengths" in grid else "quant"
            data = tables.length_metrics(smk.input.evals, extra=grid)
            diagnostic_plots.length_metrics(data, out, dict(smk.params.trained_len), style)
        print(f"wrote {out}")
