"""Run records: the commit (dirty trees told apart by their diff), versions and device."""

import subprocess

import torch

from normrnn.pipeline import provenance


def git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def test_the_commit_is_recorded_and_a_dirty_tree_is_told_apart(tmp_path):
    assert provenance.git_state(tmp_path) == "unknown"  # not a checkout
    git(tmp_path, "init", "-q")
    (tmp_path / "cell.py").write_text("x = 1\n")
    git(tmp_path, "add", "cell.py")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    clean = provenance.record(torch.device("cpu"), tmp_path)
    assert clean["code_commit"] == head == provenance.git_state(tmp_path)  # nothing changed
    assert clean == provenance.record(torch.device("cpu"), tmp_path)  # two runs, same record
    (tmp_path / "cell.py").write_text("x = 2\n")
    dirty = provenance.git_state(tmp_path)
    assert dirty.startswith(f"{head}-dirty-") and dirty == provenance.git_state(tmp_path)
    (tmp_path / "cell.py").write_text("x = 3\n")
    assert provenance.git_state(tmp_path) not in (head, dirty)  # another edit, another hash


def test_the_record_names_versions_device_and_settings():
    rec = provenance.record(torch.device("cpu"))
    assert rec["torch_version"] == torch.__version__ and rec["python_version"].count(".") == 2
    assert rec["threads"] == torch.get_num_threads() and rec["device_name"]
    assert rec["deterministic"] is torch.are_deterministic_algorithms_enabled()
    assert rec["cuda_version"] is None  # a CPU run
