"""Every rule names a conda env under envs/, and the envs pin what pyproject.toml pins."""

import re
import tomllib

import pytest
import yaml

from conftest import ROOT

RULE = re.compile(r"^rule (\w+):\n((?:[ \t]+.*\n|\n)*)", re.M)


def pins(requirements) -> dict[str, str]:
    out = {}
    for req in requirements:
        name, _, version = req.partition("==")
        assert version, f"{req!r} is not pinned with =="
        out[name.strip().lower()] = version.strip()
    return out


PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
PINS = pins(PROJECT["dependencies"] + PROJECT["optional-dependencies"]["test"])


def rules():
    for path in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        for name, body in RULE.findall(path.read_text()):
            yield path, name, body


def test_every_rule_names_an_existing_env():
    found = list(rules())
    assert {"fetch", "prepare", "train", "tables", "plots", "summary"} <= {n for _, n, _ in found}
    for path, name, body in found:
        m = re.search(r"conda:\s*\n\s*\"([^\"]+)\"", body)
        assert m, f"rule {name} in {path.name} names no conda env"
        env = (path.parent / m.group(1)).resolve()
        assert env.is_file() and env.parent == ROOT / "envs", f"rule {name}: {m.group(1)}"


@pytest.mark.parametrize("env", sorted((ROOT / "envs").glob("*.yaml")), ids=lambda p: p.name)
def test_env_pins_agree_with_pip(env):
    spec = yaml.safe_load(env.read_text())
    deps = spec["dependencies"]
    assert "python=3.11" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    env_pins = pins(pip)
    assert env_pins, env.name
    for name, version in env_pins.items():
        assert name in PINS, f"{env.name}: {name} is not a dependency in pyproject.toml"
        assert PINS[name] == version, f"{env.name}: {name}=={version}, pyproject pins {PINS[name]}"
    for dep in deps:
        if isinstance(dep, str) and not dep.startswith("python="):
            assert re.match(r"^[\w-]+=[\w.]+$", dep), f"{env.name}: {dep!r} is not pinned"
