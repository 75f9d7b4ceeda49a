"""Recipes: each paper's protocol in one file, ``<paper>.yaml`` beside this module.

A study names a recipe (``recipe: cooijmans2016``) and its runs take their hyperparameters
from it, over the config's ``defaults`` and task settings and under the study's own
``overrides``, ``task_overrides`` and grid. A recipe holds:

* ``defaults``: for every run;
* ``kinds``: by the dataset's kind (``classification``, ``char``, ``word``), the protocol
  the paper runs on that kind of task (so a toy task of the same kind runs it too);
* ``tasks``: by task name, the paper's own tasks (sizes, epochs, learning rates);
* ``cases``: a list of ``{when: {task|kind|norm|quant: value or list}, set: {...}}``, applied
  in order to the runs that match every key of ``when``;
* ``extends``: a recipe whose settings come first (Zhang's and Hoffer's norms run on Hou's
  protocol).

``norm_opts`` merge per norm (a later layer's options for one norm update, not replace, an
earlier layer's). The YAML comments cite the paper and the authors' code, file and line.
"""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

HERE = Path(__file__).parent
NONE = "none"  # a study's recipe when it runs on the config's settings alone
MATCH = ("task", "kind", "norm", "quant")


def names() -> list[str]:
    """The recipes that ship with the package, and ``none``."""
    return sorted([p.stem for p in HERE.glob("*.yaml")] + [NONE])


@functools.cache
def load(name: str) -> dict:
    """The recipe ``name`` with what it ``extends`` merged under it (``none``: empty)."""
    if name == NONE:
        return {}
    path = HERE / f"{name}.yaml"
    if not path.exists():
        raise KeyError(f"unknown recipe {name!r}; valid names: {', '.join(names())}")
    recipe = yaml.safe_load(path.read_text()) or {}
    base = recipe.get("extends")
    if not base:
        return recipe
    parent = load(base)
    merged = {k: v for k, v in parent.items() if k not in ("paper", "title", "code")}
    merged.update(
        {k: v for k, v in recipe.items() if k not in ("defaults", "kinds", "tasks", "cases")}
    )
    merged["defaults"] = merge(parent.get("defaults", {}), recipe.get("defaults", {}))
    for key in ("kinds", "tasks"):
        names_ = {*parent.get(key, {}), *recipe.get(key, {})}
        merged[key] = {
            n: merge(parent.get(key, {}).get(n, {}), recipe.get(key, {}).get(n, {})) for n in names_
        }
    merged["cases"] = list(parent.get("cases", [])) + list(recipe.get("cases", []))
    return merged


def merge(*layers: dict) -> dict:
    """Hyperparameter layers, later ones winning; ``norm_opts`` merged per norm."""
    out: dict = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if key == "norm_opts" and value is not None:
                opts = {n: dict(o) for n, o in (out.get("norm_opts") or {}).items()}
                for norm, options in value.items():
                    opts[norm] = {**opts.get(norm, {}), **(options or {})}
                out[key] = opts
            else:
                out[key] = value
    return out


def matches(when: dict, run: dict) -> bool:
    """Whether a case's ``when`` (values or lists of values) holds for ``run`` (its task,
    kind, norm and quant)."""
    for key, want in when.items():
        allowed = want if isinstance(want, list) else [want]
        if run[key] not in allowed:
            return False
    return True


def settings(name: str, task: str, kind: str, norm: str, quant: str) -> dict:
    """The hyperparameters recipe ``name`` gives a run of ``task`` (of dataset kind
    ``kind``) with ``norm`` and ``quant``."""
    recipe = load(name)
    run = {"task": task, "kind": kind, "norm": norm, "quant": quant}
    layers = [
        recipe.get("defaults", {}),
        recipe.get("kinds", {}).get(kind, {}),
        recipe.get("tasks", {}).get(task, {}),
    ]
    layers += [case["set"] for case in recipe.get("cases", []) if matches(case["when"], run)]
    return merge(*layers)
