"""The GPU path, where a GPU is present (skipped otherwise; CI has none): the same numbers as
the CPU's reference, cell by cell and for a short training run."""

import pandas as pd
import pytest
import torch
from path_helpers import FAST, MODES, close, default_path, run_path
from train_helpers import PARAMS, run_train

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
            # cuDNN sums in its own order; with ±1 weights the gates' sums reach ~10, and
            # fp32 promises 1e-5 of those, not of the outputs (seen: 1.7e-5 with bc)
            scale = 3.0 if path == "fused" and quant == "bc" else 1.0
            close(got[name].cpu(), expected, f"{path} {name}", scale)


@pytest.mark.parametrize("norm", ["bn", "ln", "none"])
def test_training_on_cuda_follows_the_cpu_run(tmp_path, digits_dir, norm, monkeypatch):
    """36 steps of SGD on the GPU, with and without CUDA graphs, and on the CPU from one seed.
    The graphs change no number (seen: equal to the last printed digit). The CPU run is
    followed to 1e-3: rounding differs between devices, and a run amplifies it (seen: at a
    learning rate of 0.5 batch norm's runs part by 3% from a 1e-6 change of the weights; at
    0.05, 5e-4 between CPU and GPU). A model saved on the GPU loads on a machine without one."""
    params = {**PARAMS, "norm": norm, "quant": "fp", "optimizer": "sgd", "lr": 0.05}
    runs = {}
    for device, graphs in (("cpu", "1"), ("cuda", "1"), ("cuda", "0")):
        monkeypatch.setenv("NORMRNN_CUDA_GRAPHS", graphs)
        out = tmp_path / f"{device}{graphs}"
        info = run_train(out, digits_dir, params, device=device)
        assert info["status"] == "ok" and info["steps"] == 36
        runs[device + graphs] = pd.read_csv(out / "history.csv")
    cols = ["train_loss", "valid_loss"]
    pd.testing.assert_frame_equal(runs["cuda0"][cols], runs["cuda1"][cols], rtol=1e-6)
    pd.testing.assert_frame_equal(runs["cuda1"][cols], runs["cpu1"][cols], rtol=1e-3)
    losses = runs["cuda1"]["train_loss"]
    assert losses.iloc[-1] < losses.iloc[0]  # it learns (slowly, without a norm, at this rate)
    state = torch.load(tmp_path / "cuda1" / "model.pt", map_location="cpu")["state_dict"]
    assert all(v.device.type == "cpu" for v in state.values())
