"""A short training run on sequential digits, as the fault and GPU tests start it."""

from normrnn.pipeline.training import train

PARAMS = {
    "model": "classifier", "hidden_size": 16, "batch_size": 32, "epochs": 3, "lr": 0.01,
    "norm": "bn", "quant": "lab", "seed": 3, "max_batches": 12, "checkpoint_every": 5,
    "clip": 1.0, "optimizer": "adam",
}  # fmt: skip


def run_train(out, data_dir, params=PARAMS, device="cpu", log=lambda m: None, **kw):
    return train(
        params, data_dir, out / "model.pt", out / "history.csv", out / "train.json", out / "ckpt",
        device=device, log=log, **kw,
    )  # fmt: skip
