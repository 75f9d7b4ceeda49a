import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))
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
    from normrnn.data import fetch, prepare

    tmp = tmp_path_factory.mktemp("digits")
    fetch("sklearn_digits", tmp / "raw")
    prepare(tmp / "raw", tmp / "prepared", {"kind": "classification"})
    return tmp / "prepared"


@pytest.fixture(scope="session")
def chars_dir(tmp_path_factory) -> Path:
    from normrnn.data import fetch, prepare

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
