"""Config validation called directly (every refusal names its key), and the code versions that
decide what reruns."""

import copy
import shutil

import pytest
import yaml

from normrnn.pipeline import check, versions
from normrnn.pipeline import config as nc
from pipeline_helpers import BAD_CONFIGS, load_tiny


def test_the_tiny_config_is_valid_and_gets_the_schema_defaults():
    cfg = load_tiny()
    assert "threads_per_train_job" not in cfg
    nc.validate(cfg)
    assert cfg["threads_per_train_job"] == 1  # filled from the schema
    assert len(nc.expand(cfg)) > 0


@pytest.mark.parametrize("what,edit,key", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_invalid_config_names_the_key(what, edit, key):
    cfg = copy.deepcopy(load_tiny())
    edit(cfg)
    with pytest.raises(nc.ConfigError) as err:
        nc.validate(cfg)
    assert key in str(err.value), str(err.value)


def test_code_versions_follow_the_files_that_decide_their_outputs(tmp_path):
    """A byte of the compiled loop changes the runs' and the bench's code version, not the
    tables'; a byte of the tables' module changes only theirs."""
    package = tmp_path / "normrnn"
    shutil.copytree(versions.PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))

    def three():
        return (
            versions.code_version(package),
            versions.code_version(package, modules=("outputs.bench", "outputs.plots")),
            versions.code_version(
                package, modules=("outputs.tables", "pipeline.jobs"), run_code=False
            ),
        )

    before = three()
    with open(package / "compute" / "csrc" / "recurrence.cpp", "a") as f:
        f.write("\n")
    after_cpp = three()
    assert after_cpp[0] != before[0] and after_cpp[1] != before[1] and after_cpp[2] == before[2]
    with open(package / "outputs" / "tables.py", "a") as f:
        f.write("\n")
    after_tables = three()
    assert after_tables[:2] == after_cpp[:2] and after_tables[2] != after_cpp[2]
    with open(package / "outputs" / "bench.py", "a") as f:
        f.write("\n")
    assert three()[0] == after_tables[0] and three()[1] != after_tables[1]
    after_bench = three()
    for command in ("pipeline/check.py", "__main__.py", "pipeline/tracking.py"):  # no numbers
        with open(package / command, "a") as f:
            f.write("\n")
    assert three() == after_bench
    with open(package / "pipeline" / "config.py", "a") as f:
        f.write("\n")
    assert three()[0] != after_bench[0]


def test_cuda_without_a_device_is_refused_by_name(monkeypatch):
    import torch

    from normrnn.pipeline.scoring import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu" and resolve_device("cpu").type == "cpu"
    with pytest.raises(RuntimeError, match="config key device: 'cuda:1'.*no CUDA device"):
        resolve_device("cuda:1")


def test_a_yaml_error_names_the_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults:\n  lr: 0.1\nstudies:\n  - name: [a\n    tasks: x\n")
    with pytest.raises(nc.ConfigError, match=rf"{bad}:5:10: "):
        check.load(bad)
    good = tmp_path / "tiny.yaml"
    good.write_text(yaml.safe_dump(load_tiny()))
    assert check.main([str(good), str(bad)]) == 1  # the command fails if any file does
    out = capsys.readouterr().out.splitlines()
    n = len(nc.expand(nc.validate(load_tiny())))
    assert out[0].startswith(f"{good}: valid, {n} runs (") and out[1].startswith(
        f"invalid config: {bad}:5:10: "
    )


def test_a_config_that_is_not_a_mapping_is_refused_by_file(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(nc.ConfigError, match=f"{path}: a config is a mapping"):
        check.load(path)


@pytest.mark.parametrize(
    "path", sorted((versions.PACKAGE.parents[1] / "config").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_config_is_valid(path, capsys):
    """What `python -m normrnn check` says of each config the project ships: valid, with runs."""
    assert check.main([str(path)]) == 0, capsys.readouterr().out
    assert f"{path}: valid, " in capsys.readouterr().out
