"""Run snakemake on a temporary copy of the workflow."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def workflow_copy(tmp: Path) -> Path:
    dest = tmp / "wf"
    dest.mkdir()
    shutil.copy(ROOT / "Snakefile", dest)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "workflow", dest / "workflow", ignore=ignore)
    shutil.copytree(ROOT / "envs", dest / "envs")
    shutil.copytree(ROOT / "profiles", dest / "profiles")
    (dest / "config").mkdir()
    shutil.copy(ROOT / "config" / "reported.csv", dest / "config")
    return dest


def write_config(wf: Path, config: dict, name="test.yaml") -> Path:
    path = wf / "config" / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def load_tiny() -> dict:
    return yaml.safe_load((ROOT / "tests" / "data" / "tiny.yaml").read_text())


def snakemake(wf: Path, *args, config="config/test.yaml", check=True, timeout=600, prefix=()):
    cmd = [*prefix, sys.executable, "-m", "snakemake", "--configfile", config, *args]
    proc = subprocess.run(cmd, cwd=wf, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def planned_jobs(wf: Path, *targets, config="config/test.yaml") -> list[tuple[str, dict]]:
    """(rule, wildcards) of every job a dry run (of ``targets``, default all) would execute."""
    out = snakemake(wf, "-n", *targets, config=config).stdout
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        m = re.match(r"(?:local)?rule (\w+):", block.strip())
        if not m:
            continue
        wc = re.search(r"wildcards: (.*)", block)
        wildcards = dict(kv.split("=", 1) for kv in wc.group(1).split(", ")) if wc else {}
        jobs.append((m.group(1), wildcards))
    return jobs


# Config edits that validation refuses: (what, edit of the tiny config, the key its message names)
BAD_CONFIGS = [
    ("negative learning rate", lambda c: c["tasks"]["digits"].update(lr=-0.1), "tasks.digits.lr"),
    ("unknown norm", lambda c: c["studies"][0]["norms"].append("groupnorm"), "studies[0].norms[2]"),
    (
        "unknown quantizer",
        lambda c: c["studies"][1]["quants"].append("int8"),
        "studies[1].quants[1]",
    ),
    ("missing key", lambda c: c["tasks"]["chars"].pop("hidden_size"), "tasks.chars"),
    ("zero seeds", lambda c: c["studies"][0].update(seeds=[]), "studies[0].seeds"),
    ("unknown task", lambda c: c["studies"][1].update(tasks=["mnist"]), "studies[1].tasks[0]"),
    ("wrong type", lambda c: c["tasks"]["digits"].update(epochs="ten"), "tasks.digits.epochs"),
    (
        "negative size",
        lambda c: c["tasks"]["digits"].update(hidden_size=-8),
        "tasks.digits.hidden_size",
    ),
    (
        "unknown source",
        lambda c: c["datasets"]["pydoc"].update(source="http"),
        "datasets.pydoc.source",
    ),
    ("duplicate study", lambda c: c["studies"][1].update(name="alpha"), "studies[1].name"),
    ("study named as a rule", lambda c: c["studies"][1].update(name="summary"), "studies[1].name"),
    (
        "paper named as a study",
        lambda c: c["studies"][1].update(experiment_of="alpha"),
        "studies[1].experiment_of",
    ),
    ("unknown key", lambda c: c["defaults"].update(learning_rate=1), "learning_rate"),
    (
        "unknown figure",
        lambda c: c["studies"][0].update(figures=["heatmap"]),
        "studies[0].figures[0]",
    ),
    (
        "grid figure without a grid",
        lambda c: c["studies"][1].update(figures=["grid"]),
        "studies[1].figures",
    ),
    (
        "lengths figure without eval_seq_lens",
        lambda c: c["studies"][0].update(figures=["lengths"]),
        "studies[0].figures",
    ),
    (
        "variable lengths on a classifier",
        lambda c: c["tasks"]["digits"].update(train_lengths="variable"),
        "train_lengths",
    ),
    ("not a number", lambda c: c["tasks"]["digits"].update(lr=float("nan")), "tasks.digits.lr"),
    (
        "an infinity",
        lambda c: c["defaults"].update(divergence_loss=float("inf")),
        "defaults.divergence_loss",
    ),
    (
        "splits past 1",
        lambda c: c["datasets"]["pydoc"].update(splits=[0.9, 0.2, 0.1]),
        "datasets.pydoc.splits",
    ),
    (
        "grid value as a string",  # YAML reads 1e-3 (no dot) as a string
        lambda c: c["studies"][0].update(grid={"lr": ["1e-3"]}),
        "studies[0].grid.lr: '1e-3' is not of type 'number'",
    ),
    (
        "negative grid value",
        lambda c: c["studies"][0].update(grid={"lr": [-1]}),
        "studies[0].grid.lr: -1 is less than",
    ),
    (
        "grid value of the wrong type",
        lambda c: c["studies"][0].update(grid={"hidden_size": ["big"]}),
        "studies[0].grid.hidden_size: 'big'",
    ),
    (
        "misspelt norm option",
        lambda c: c["defaults"].update(norm_opts={"bn": {"gama_init": 0.1}}),
        "defaults.norm_opts.bn: 'gama_init' is not an option of bn",
    ),
    ("cuda without a GPU for the jobs", lambda c: c.update(device="cuda"), "gpus_per_train_job"),
    ("results in a file", lambda c: c.update(results_dir=str(ROOT / "README.md")), "results_dir"),
]
