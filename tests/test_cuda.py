"""The GPU path, where a GPU is present (skipped otherwise; CI has none): the same numbers as
the CPU's reference, cell by cell and for a short training run."""

import pandas as pd
import pytest
import torch
from test_cells import FAST, MODES, default_path, run_path
from test_faults import PARAMS, run_train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _no_tf32(monkeypatch):
    """fp32 means fp32: cuDNN would otherwise multiply in TF32 (10-bit mantissa)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.mark.parametrize(
    "quant,train", MODES, ids=[f"{q}-{'train' if t else 'eval'}" for q, t in MODES]
)
@pytest.mark.parametrize("cell,norm", FAST)
def test_cuda_paths_equal_the_cpu_reference(cell, norm, quant, train):
    """The loop and the fast path (cuDNN or the hand-written recurrence) on the GPU against
    the CPU's step loop: outputs, gradients and population statistics to 1e-5, as on the CPU."""
    ref = run_path(cell, norm, quant, "loop", train)
    for path in ("loop", default_path(cell, norm)):
        got = run_path(cell, norm, quant, path, train, device="cuda")
        assert got.keys() == ref.keys()
        for name, expected in ref.items():
            atol = 1e-5 * max(1.0, expected.abs().max().item())
            torch.testing.assert_close(
                got[name].cpu(), expected, atol=atol, rtol=1e-5, msg=f"{path}: {name}"
            )


@pytest.mark.parametrize("norm", ["bn", "ln", "none"])
def test_training_on_cuda_follows_the_cpu_run(tmp_path, digits_dir, norm):
    """36 steps of Adam on the GPU and on the CPU from one seed: the same losses to float
    rounding, and a model saved on the GPU that loads on a machine without one."""
    params = {**PARAMS, "norm": norm}
    runs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        info = run_train(out, digits_dir, params, device=device)
        assert info["status"] == "ok" and info["steps"] == 36
        runs[device] = pd.read_csv(out / "history.csv")
    cols = ["train_loss", "valid_loss", "valid_accuracy"]
    pd.testing.assert_frame_equal(runs["cuda"][cols], runs["cpu"][cols], rtol=1e-3)
    state = torch.load(tmp_path / "cuda" / "model.pt", map_location="cpu")["state_dict"]
    assert all(v.device.type == "cpu" for v in state.values())
