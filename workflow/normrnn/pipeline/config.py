"""The pipeline's config: validation beyond the JSON schema, and expansion into runs.

A config is a list of studies; a study is tasks × norms × quants × grid × seeds. A run's
hyperparameters are ``defaults`` ⊕ the task's ⊕ the study's recipe's (``recipes/``, for the
run's task, dataset kind, norm and quantizer) ⊕ the study's ``overrides`` ⊕ the study's
``task_overrides`` of that task ⊕ one grid point; ``norm_opts`` merge per norm.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..methods.cells import CELLS
from ..methods.models import MODELS
from ..methods.norms import NORMS, norm_options, uses_batch_norm
from ..methods.quantizers import QUANTIZERS
from . import recipes
from .data import FORMATS, SOURCES, default_format
from .optim import OPTIMIZERS

SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "config.schema.yaml"
DATASET_KEYS = {"dataset", "report_as"}  # task keys that are not hyperparameters
REQUIRED_HPARAMS = ("model", "hidden_size", "batch_size", "epochs", "lr")
# The workflow's rules: a study (and a paper) is a target rule of its own name too.
RULES = ("all", "fetch", "download", "prepare", "train", "tables", "reported", "plots",
         "figure", "summary", "bench", "claims")  # fmt: skip
# A study's optional figures (its ``figures`` key), each made by the rule ``figure``.
FIGURES = ("grid", "bn_statistics", "lengths", "spectral")


class ConfigError(ValueError):
    """An invalid config; the message names the key."""

    def __init__(self, message: str):
        super().__init__(f"invalid config: {message}")


# How a job runs, not what it computes: kept out of a train job's params (a change reruns
# nothing) and out of its checkpoint's fingerprint (raising a time limit resumes the run).
JOB_SETTINGS = ("checkpoint_every", "mem_mb", "runtime_min")


@dataclass(frozen=True)
class Run:
    study: str
    task: str
    run: str
    norm: str
    quant: str
    seed: int
    dataset: str
    grid: dict = field(default_factory=dict, hash=False, compare=False)
    hparams: dict = field(default_factory=dict, hash=False, compare=False)
    recipe: str = recipes.NONE
    report_as: str = ""  # the task name the papers' reported numbers use ("" = ``task``)

    @property
    def key(self) -> tuple[str, str, str]:
        return self.study, self.task, self.run

    def params(self) -> dict:
        """What decides the run's numbers; a change here reruns that job (Snakemake params).
        The job's settings (:data:`JOB_SETTINGS`) reach it as resources instead."""
        hp = {k: v for k, v in self.hparams.items() if k not in JOB_SETTINGS}
        return {"norm": self.norm, "quant": self.quant, "seed": self.seed, **hp}


def validate(config: dict, schema: str | Path = SCHEMA) -> dict:
    """Validate against the JSON schema (filling defaults), then the checks a schema cannot
    express. Raises :class:`ConfigError` naming the offending key."""
    from snakemake.utils import validate as schema_validate

    try:
        schema_validate(config, str(schema), set_default=True)
    except Exception as e:  # snakemake wraps jsonschema's error in a WorkflowError
        raise ConfigError(_schema_message(e)) from None
    _check_finite(config)
    _check_values(config)
    _check_names(config)
    _check_recipes(config, schema)
    runs = expand(config)
    if not runs:
        raise ConfigError("'studies' expands to zero runs")
    _check_figures(config, runs)
    _check_claims(config)
    for run in runs.values():
        missing = [k for k in REQUIRED_HPARAMS if k not in run.hparams]
        if missing:
            raise ConfigError(
                f"tasks.{run.task}: {missing[0]!r} is a required property (study {run.study!r}; "
                "set it in defaults, the task or the study's overrides)"
            )
        if run.hparams["model"] != "classifier" and "seq_len" not in run.hparams:
            raise ConfigError(
                f"tasks.{run.task}: 'seq_len' is a required property of a language model"
            )
        hp = run.hparams
        if hp["model"] == "classifier":
            for key, varies in (
                ("train_lengths", hp.get("train_lengths", "fixed") != "fixed"),
                ("eval_seq_lens", bool(hp.get("eval_seq_lens"))),
            ):
                if varies:
                    raise ConfigError(
                        f"{key} (task {run.task!r}, study {run.study!r}): only language models "
                        "have variable sequence lengths; classification sequences are fixed"
                    )
    return config


def _schema_message(e: Exception) -> str:
    """One line from Snakemake's validation error: the key path and jsonschema's reason."""
    text = str(e)
    reason = re.search(r"ValidationError: (.*)", text)
    where = re.search(r"On instance((?:\[[^\]]*\])*)", text)
    if not reason:
        return text.strip()
    path = (
        ".".join(p.strip("'\"") for p in re.findall(r"\[([^\]]*)\]", where.group(1)))
        if where
        else ""
    )
    path = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", path)
    return f"{path or '<top level>'}: {reason.group(1)}"


def _one_of(where: str, value, registry) -> None:
    if value not in registry:
        raise ConfigError(f"{where}: {value!r} is not one of {sorted(registry)}")


def _check_hparams(where: str, hp: dict) -> None:
    if "model" in hp:
        _one_of(f"{where}.model", hp["model"], MODELS)
    if "cell" in hp:
        _one_of(f"{where}.cell", hp["cell"], CELLS)
    if "optimizer" in hp:
        _one_of(f"{where}.optimizer", hp["optimizer"], OPTIMIZERS)
    for name, opts in (hp.get("norm_opts", {}) or {}).items():
        _one_of(f"{where}.norm_opts", name, NORMS)
        known = norm_options(name)
        for key in opts or {}:
            if key not in known:
                raise ConfigError(
                    f"{where}.norm_opts.{name}: {key!r} is not an option of {name} "
                    f"({', '.join(sorted(known))})"
                )


def _check_finite(value, where: str = "") -> None:
    """No NaN or infinity anywhere (YAML reads ``.nan`` and ``.inf`` as numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where or 'config'}: {value} is not a finite number")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")


def _check_values(config: dict) -> None:
    """What the schema cannot say: splits that add up to 1, a GPU for ``device: cuda``,
    directories that are not files."""
    for key in ("data_dir", "results_dir"):
        where = Path(str(config.get(key, "")))
        if where.exists() and not where.is_dir():
            raise ConfigError(f"{key}: {str(where)!r} is a file, not a directory")
    for name, spec in config.get("datasets", {}).items():
        splits = spec.get("splits")
        if splits is not None and abs(sum(splits) - 1) > 1e-6:
            raise ConfigError(
                f"datasets.{name}.splits: {splits} add up to {sum(splits):g}, not 1 "
                "(the train, validation and test fractions)"
            )
    if str(config.get("device", "auto")).startswith("cuda") and not config.get(
        "gpus_per_train_job"
    ):
        raise ConfigError(
            f"device: {config['device']!r} with gpus_per_train_job 0: the train jobs would get "
            "no GPU; set gpus_per_train_job to 1, or device to auto or cpu"
        )


def _check_names(config: dict) -> None:
    datasets, tasks = config["datasets"], config["tasks"]
    downloads = config.get("downloads", {})
    for name, ds in datasets.items():
        if "source" in ds:
            _one_of(f"datasets.{name}.source", ds["source"], SOURCES)
        for j, f in enumerate(ds.get("downloads", [])):
            _one_of(f"datasets.{name}.downloads[{j}]", f, downloads)
        _one_of(f"datasets.{name}.format", default_format(ds), FORMATS)
    _check_hparams("defaults", config.get("defaults", {}))
    for name, spec in (config.get("bench") or {}).items():
        for key, registry in (("norms", NORMS), ("quants", QUANTIZERS), ("cells", CELLS)):
            for j, value in enumerate(spec.get(key, [])):
                _one_of(f"bench.{name}.{key}[{j}]", value, registry)
    for name, task in tasks.items():
        if task["dataset"] not in datasets:
            raise ConfigError(
                f"tasks.{name}.dataset: {task['dataset']!r} is not one of {sorted(datasets)}"
            )
        _check_hparams(f"tasks.{name}", task)
    seen = set()
    for i, study in enumerate(config["studies"]):
        where = f"studies[{i}]"
        if study["name"] in seen:
            raise ConfigError(f"{where}.name: {study['name']!r} is used twice")
        if study["name"] in RULES:  # a study's name is its target rule's
            raise ConfigError(f"{where}.name: {study['name']!r} is the name of a rule")
        for key in ("paper", "experiment_of"):  # and a paper's, the target of its studies
            paper = study.get(key)
            if paper in RULES or paper in {s["name"] for s in config["studies"]}:
                raise ConfigError(f"{where}.{key}: {paper!r} is the name of a rule or a study")
        seen.add(study["name"])
        for j, t in enumerate(study["tasks"]):
            if t not in tasks:
                raise ConfigError(f"{where}.tasks[{j}]: {t!r} is not one of {sorted(tasks)}")
        for j, n in enumerate(study["norms"]):
            _one_of(f"{where}.norms[{j}]", n, NORMS)
        for j, q in enumerate(study["quants"]):
            _one_of(f"{where}.quants[{j}]", q, QUANTIZERS)
        _check_hparams(f"{where}.overrides", study.get("overrides", {}))
        for t, hp in (study.get("task_overrides") or {}).items():
            if t not in study["tasks"]:
                raise ConfigError(
                    f"{where}.task_overrides.{t}: not one of the study's tasks {study['tasks']}"
                )
            _check_hparams(f"{where}.task_overrides.{t}", hp)


def _hparam_validator(schema: str | Path):
    """A jsonschema validator of one hyperparameter layer (the schema's ``hparams``)."""
    import jsonschema
    import yaml

    doc = yaml.safe_load(Path(schema).read_text())
    return jsonschema.Draft202012Validator({"$defs": doc["$defs"], "$ref": "#/$defs/hparams"})


def _check_layer(validator, where: str, layer: dict) -> None:
    errors = sorted(validator.iter_errors(layer), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        path = ".".join(str(p) for p in e.absolute_path)
        raise ConfigError(f"{where}{'.' + path if path else ''}: {e.message}")
    _check_hparams(where, layer)


def _check_recipes(config: dict, schema) -> None:
    """The studies' recipes exist, and every layer of each is a valid hyperparameter set;
    grid values are valid values of their key."""
    validator = _hparam_validator(schema)
    for i, study in enumerate(config["studies"]):
        name = study.get("recipe", recipes.NONE)
        _one_of(f"studies[{i}].recipe", name, recipes.names())
        recipe = recipes.load(name)
        where = f"recipe {name}"
        _check_layer(validator, f"{where}.defaults", recipe.get("defaults") or {})
        for key in ("kinds", "tasks"):
            for sub, layer in (recipe.get(key) or {}).items():
                _check_layer(validator, f"{where}.{key}.{sub}", layer or {})
        for j, case in enumerate(recipe.get("cases") or []):
            bad = set(case.get("when", {})) - set(recipes.MATCH)
            if bad or "set" not in case:
                raise ConfigError(
                    f"{where}.cases[{j}]: needs 'when' with keys among {recipes.MATCH} and 'set'"
                )
            _check_layer(validator, f"{where}.cases[{j}].set", case["set"])
        for key, values in (study.get("grid") or {}).items():
            for value in values:  # the error's path ends in the key: studies[i].grid.lr
                _check_layer(validator, f"studies[{i}].grid", {key: value})


def _check_figures(config: dict, runs: dict) -> None:
    for i, study in enumerate(config["studies"]):
        where = f"studies[{i}].figures"
        for j, figure in enumerate(study.get("figures", [])):
            _one_of(f"{where}[{j}]", figure, FIGURES)
            if figure == "grid" and not study.get("grid"):
                raise ConfigError(f"{where}: 'grid' needs the study to have a 'grid'")
            if figure == "bn_statistics" and not any(map(uses_batch_norm, study["norms"])):
                raise ConfigError(
                    f"{where}: 'bn_statistics' needs a batch norm among the study's norms "
                    f"({', '.join(n for n in NORMS if uses_batch_norm(n))})"
                )
            if figure == "lengths":
                mine = [r for r in runs.values() if r.study == study["name"]]
                if not all(r.hparams.get("eval_seq_lens") for r in mine):
                    raise ConfigError(
                        f"{where}: 'lengths' needs 'eval_seq_lens' in every run of the study "
                        "(set it in the study's overrides)"
                    )


def _check_claims(config: dict) -> None:
    """A claim selects runs by the study's own axes and values; a typo would select none."""
    for i, study in enumerate(config["studies"]):
        axes = {"task": study["tasks"], "norm": study["norms"], "quant": study["quants"]}
        axes |= {"seed": study["seeds"]} | (study.get("grid") or {})
        for j, claim in enumerate(study.get("claims", [])):
            where = f"studies[{i}].claims[{j}]"
            selectors = [(k, claim[k]) for k in ("better", "than", "each") if k in claim]
            selectors += [(f"same[{n}]", s) for n, s in enumerate(claim.get("same", []))]
            for name, selector in selectors:
                for key, want in selector.items():
                    if key not in axes:
                        raise ConfigError(
                            f"{where}.{name}.{key}: not an axis of the study "
                            f"(one of {', '.join(axes)})"
                        )
                    for value in want if isinstance(want, list) else [want]:
                        if value not in axes[key]:
                            raise ConfigError(
                                f"{where}.{name}.{key}: {value!r} is not among the study's "
                                f"{key} values {axes[key]}"
                            )
            for key in claim.get("per", []):
                if key not in (study.get("grid") or {}):
                    raise ConfigError(f"{where}.per: {key!r} is not a grid axis of the study")


def run_id(norm: str, quant: str, seed: int, grid: dict) -> str:
    extra = "".join(f".{k}-{v}" for k, v in grid.items())
    return f"{norm}.{quant}{extra}.s{seed}"


def expand(config: dict) -> dict[tuple[str, str, str], Run]:
    """All runs of the config, keyed by (study, task, run id)."""
    runs = {}
    defaults = config.get("defaults", {})
    for study in config["studies"]:
        grid = study.get("grid") or {}
        points = [dict(zip(grid, vals, strict=True)) for vals in itertools.product(*grid.values())]
        recipe = study.get("recipe", recipes.NONE)
        for task in study["tasks"]:
            task_cfg = config["tasks"][task]
            kind = config["datasets"][task_cfg["dataset"]]["kind"]
            base = {k: v for k, v in task_cfg.items() if k not in DATASET_KEYS}
            for norm, quant, point, seed in itertools.product(
                study["norms"], study["quants"], points, study["seeds"]
            ):
                hp = recipes.merge(
                    defaults,
                    base,
                    recipes.settings(recipe, task, kind, norm, quant),
                    study.get("overrides") or {},
                    (study.get("task_overrides") or {}).get(task, {}),
                    point,
                )
                run = Run(
                    study=study["name"],
                    task=task,
                    run=run_id(norm, quant, seed, point),
                    norm=norm,
                    quant=quant,
                    seed=seed,
                    dataset=task_cfg["dataset"],
                    grid=point,
                    hparams=hp,
                    recipe=recipe,
                    report_as=task_cfg.get("report_as", task),
                )
                runs[run.key] = run
    return runs
