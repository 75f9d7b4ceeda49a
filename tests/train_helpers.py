"""A short training run on sequential digits, as the fault and GPU tests start it."""

from normrnn.pipeline.training import train

PARAMS = {
    "model": "classifier", "hidden_size": 16, "batch_size": 32, "epochs": 3, "lr": 0.01,
    "norm": "bn", "quant": "lab", "seed": 3, "max_batches": 12, "checkpoint_every": 5,
    "clip": 1.0, "optimizer": "adam",
}  # fmt: skip


def curves_of(logdir) -> dict[str, list[tuple[int, float]]]:
    """A run's TensorBoard curves, read with TensorBoard's own reader: tag → (step, value)s."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def run_train(out, data_dir, params=PARAMS, device="cpu", log=lambda m: None, **kw):
    return train(
        params, data_dir, out / "model.pt", out / "history.csv", out / "train.json", out / "ckpt",
        device=device, log=log, **kw,
    )  # fmt: skip
