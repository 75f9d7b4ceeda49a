# Config validation, run expansion and input functions shared by the rules.
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))

from normrnn.pipeline import config as nc  # noqa: E402
from normrnn.pipeline import gpu_slots, tracking, versions, worker  # noqa: E402

nc.validate(config)


def in_workflow(path):
    """A config's file path: from the working directory where it is there, else from the
    workflow's (run from elsewhere with -s, the shipped files are still found)."""
    p = Path(path)
    return str(p if p.is_absolute() or p.exists() else Path(workflow.basedir) / p)


config["reported"] = in_workflow(config["reported"])
RUNS = nc.expand(config)
STUDIES = [s["name"] for s in config["studies"]]
STUDY = {s["name"]: s for s in config["studies"]}
CODE_VERSION = versions.code_version()
TABLES_CODE = versions.code_version(
    modules=("outputs.tables", "pipeline.jobs"), run_code=False
)
PLOTS_CODE = versions.code_version(
    modules=(
        "outputs.plots",
        "outputs.diagnostic_plots",
        "outputs.tables",
        "pipeline.jobs",
    ),
    run_code=False,
)
# the bench times the run code's cells: its version covers them, with its own module
BENCH_CODE = versions.code_version(modules=("outputs.bench", "outputs.plots"))
DATA = config["data_dir"]
RESULTS = config["results_dir"]
PREPARED = ["train.pt", "valid.pt", "test.pt", "meta.json"]


wildcard_constraints:
    study="[A-Za-z0-9_-]+",
    task="[^/]+",
    run="[^/]+",
    dataset="[^/]+",
    source="[^/]+",
    figure="|".join(nc.FIGURES),


def run_of(wildcards):
    return RUNS[(wildcards.study, wildcards.task, wildcards.run)]


def prepared_data(wildcards):
    """The prepared files of the dataset the run's task uses."""
    dataset = run_of(wildcards).dataset
    return {
        Path(f).stem if f != "meta.json" else "meta": f"{DATA}/prepared/{dataset}/{f}"
        for f in PREPARED
    }


def raw_of_dataset(wildcards):
    """An offline source's file, or the dataset's downloads (in the config's order)."""
    ds = config["datasets"][wildcards.dataset]
    if "source" in ds:
        return [f"{DATA}/raw/{ds['source']}"]
    return [f"{DATA}/downloads/{f}" for f in ds["downloads"]]


def download_pins(wildcards):
    """The pinned checksums of the dataset's downloads, checked before preparing."""
    ds = config["datasets"][wildcards.dataset]
    return {f: config["downloads"][f] for f in ds.get("downloads", [])}


def run_record(wildcards):
    """Identifying columns of a run, stored in its eval.json."""
    r = run_of(wildcards)
    return {
        "study": r.study,
        "task": r.task,
        "run": r.run,
        "norm": r.norm,
        "quant": r.quant,
        "seed": r.seed,
        "dataset": r.dataset,
        "report_as": r.report_as,
        "recipe": r.recipe,
        "grid": r.grid,
    }


def train_resources(key, default):
    def get(wildcards):
        return run_of(wildcards).hparams.get(key, default)

    return get


# On this machine: one GPU per train job, and as many at once as there are GPUs
# (gpu_slots.py gives each job its own). `--resources gpu=N` on the command line wins.
# Only where jobs run here and on GPUs (device auto or cuda): a cluster gives jobs their GPUs.
ON_LOCAL_GPUS = workflow.local_exec and config["device"] in ("auto", "cuda")
VISIBLE_GPUS = gpu_slots.visible_gpus() if ON_LOCAL_GPUS else 0
if VISIBLE_GPUS:  # the jobs (and the worker, which forks them) share them out
    os.environ[gpu_slots.LOCAL] = str(VISIBLE_GPUS)
    if "gpu" not in workflow.global_resources:
        workflow.global_resources["gpu"] = VISIBLE_GPUS


def gpus_per_train_job():
    """The config's ``gpus_per_train_job``; 1 where it is 0 but the jobs run on this
    machine's GPUs (``device`` auto or cuda), so that the gpu resource caps them."""
    return config["gpus_per_train_job"] or (1 if VISIBLE_GPUS else 0)


def bench_threads(wildcards):
    """Every core where the jobs run on this machine: the bench runs alone, so no job beside
    it moves its timings. Elsewhere (a cluster, or no cores given, as for --report) its
    spec's ``threads`` (default 1)."""
    cores = workflow.resource_settings.cores
    if workflow.local_exec and cores:
        return cores
    return config["bench"][wildcards.name].get("threads", 1)


def study_runs(study, name):
    return [f"{RESULTS}/runs/{s}/{t}/{r}/{name}" for (s, t, r) in RUNS if s == study]


def trained_lengths(study):
    """The training sequence length of each language-model task of the study."""
    return {
        t: r.hparams["seq_len"]
        for (s, t, _), r in RUNS.items()
        if s == study and "seq_len" in r.hparams
    }


def study_targets(s):
    # every run's result too: Snakemake does not rerun a table whose inputs went missing (it
    # reads them as temporary files), so a run whose outputs a failure removed is asked for
    # by name, rebuilt, and its table and the summary follow by their inputs' times
    out = [f"{RESULTS}/runs/{s}/{t}/{r}/eval.json" for (s_, t, r) in RUNS if s_ == s]
    out += [f"{RESULTS}/studies/{s}/table.md", f"{RESULTS}/studies/{s}/curves.png"]
    out += [f"{RESULTS}/studies/{s}/{f}.png" for f in STUDY[s].get("figures", [])]
    if STUDY[s].get("paper"):
        out.append(f"{RESULTS}/studies/{s}/reported.md")
    return out


def named_targets():
    """A target rule per study (its name) and per paper (the studies that name it as their
    ``paper`` or ``experiment_of``): `snakemake --cores all cooijmans2016`, `... hou`.
    """
    out = {s: study_targets(s) for s in STUDIES}
    for s in STUDIES:
        for paper in {STUDY[s].get("paper"), STUDY[s].get("experiment_of")} - {None}:
            out.setdefault(paper, []).extend(study_targets(s))
    return out


def all_targets():
    out = [f"{RESULTS}/summary.csv"]
    for s in STUDIES:
        out += study_targets(s)
    out += [f"{RESULTS}/bench/{name}.csv" for name in config.get("bench", {})]
    if any(STUDY[s].get("claims") for s in STUDIES):
        out.append(f"{RESULTS}/claims.md")
    return out


def use_worker() -> bool:
    """Whether a job worker serves this run (normrnn.pipeline.worker): jobs on this machine, in this
    environment (not a cluster executor, not conda environments), unless switched off.
    """
    return config.get("job_worker", True) and workflow.local_exec and not uses_conda()


def uses_conda() -> bool:
    from snakemake.settings.types import DeploymentMethod

    return DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method


# The curves' writer needs the [track] extra: refused before any job where the jobs run in this
# environment (a conda env has it: envs/train.yaml).
if config["tensorboard"] and not uses_conda() and (why := tracking.missing()):
    raise nc.ConfigError(why)


onstart:
    if use_worker():
        worker.start(Path.cwd(), Path(workflow.basedir) / "workflow" / "normrnn")


onsuccess:
    worker.stop(Path.cwd())


onerror:
    worker.stop(Path.cwd())
