"""The tests by kind: unit/ (methods, paths, pipeline pieces), conformance/ (against the
authors' code), workflow/ (snakemake end to end), cluster/ (a real SLURM), gpu/ (CUDA only).
Helpers beside this file."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))
sys.path.insert(0, str(ROOT / "tests"))  # the helpers, for the tests in its folders
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """Sequential digits in the prepared format (from scikit-learn's copy, no network)."""
    from normrnn.pipeline.data import fetch, prepare

    tmp = tmp_path_factory.mktemp("digits")
    fetch("sklearn_digits", tmp / "raw")
    prepare(tmp / "raw", tmp / "prepared", {"kind": "classification"})
    return tmp / "prepared"


@pytest.fixture(scope="session")
def chars_dir(tmp_path_factory) -> Path:
    from normrnn.pipeline.data import fetch, prepare

    tmp = tmp_path_factory.mktemp("chars")
    fetch("cpython_pydoc", tmp / "raw")
    prepare(tmp / "raw", tmp / "prepared", {"kind": "char", "splits": [0.9, 0.05, 0.05]})
    return tmp / "prepared"


@pytest.fixture(scope="session")
def server():
    """A loopback HTTP server with stand-ins of the papers' data files (tests/standins.py)."""
    from standins import Server, all_files

    files, sums = all_files()
    s = Server(files)
    s.sums = sums
    yield s
    s.close()


@pytest.fixture(params=["compiled", "torch"])
def bn_steps(request, monkeypatch) -> str:
    """The batch norms' steps compiled (``normrnn.compute.native``) or in torch's ops: a test that
    takes this fixture runs both ways. Where a C++ compiler is, the compiled steps must
    build."""
    from normrnn.compute import native

    if request.param == "torch":
        monkeypatch.setattr(native, "library", lambda: None)
    elif native.compiler() is None:
        pytest.skip("no C++ compiler: the batch norms run torch's ops only")
    else:
        assert native.library() is not None, "a compiler is there, the steps did not build"
    return request.param
