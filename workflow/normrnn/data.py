"""Datasets: raw sources, the uniform prepared format, and batching.

Prepared format (one directory per dataset): ``train.pt``, ``valid.pt``, ``test.pt`` (each a
dict of tensors: ``x`` and ``y`` for classification, ``ids`` for language modelling) and
``meta.json`` with the kind, sizes, vocabulary and the SHA-256 of every split file. Loading
checks the hashes, so a truncated or altered file is refused with its name.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from .registry import Registry

SOURCES = Registry("data source")


class DataError(RuntimeError):
    """A data file is missing, corrupt or inconsistent; the message names the file."""


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- raw sources
@SOURCES.register("sklearn_digits")
def fetch_sklearn_digits(out: Path) -> None:
    """scikit-learn's 1,797 real 8×8 handwritten digits (shipped with the package)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(tmp, images=d.data.astype(np.uint8), labels=d.target.astype(np.int64))
    os.replace(tmp, out)


@SOURCES.register("cpython_pydoc")
def fetch_cpython_pydoc(out: Path) -> None:
    """The help-topic texts that ship with CPython (``pydoc_data.topics``), about 0.5M chars."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    atomic_write_bytes(out, text.encode("utf-8"))


def fetch(source: str, out: str | Path) -> None:
    SOURCES[source](Path(out))


# ----------------------------------------------------------------------------- preparation
def _split_sizes(n: int, fractions) -> tuple[int, int, int]:
    train = int(round(n * fractions[0]))
    valid = int(round(n * fractions[1]))
    return train, valid, n - train - valid


def prepare(raw: str | Path, out_dir: str | Path, spec: dict) -> dict:
    """Turn a raw file into the prepared format described in the module docstring."""
    raw, out_dir = Path(raw), Path(out_dir)
    kind = spec["kind"]
    fractions = spec.get("splits", [0.8, 0.1, 0.1])
    if kind == "classification":
        splits, meta = _prepare_classification(raw, spec, fractions)
    elif kind in ("char", "word"):
        splits, meta = _prepare_text(raw, kind, fractions)
    else:
        raise DataError(f"{raw}: unknown dataset kind {kind!r} (classification, char, word)")
    out_dir.mkdir(parents=True, exist_ok=True)
    meta["files"] = {}
    for name, tensors in splits.items():
        path = out_dir / f"{name}.pt"
        tmp = path.with_name(path.name + ".tmp")
        torch.save(tensors, tmp)
        os.replace(tmp, path)
        meta["files"][name] = {"name": path.name, "sha256": sha256(path)}
    meta["kind"] = kind
    atomic_write_bytes(out_dir / "meta.json", json.dumps(meta, indent=2).encode())
    return meta


def _prepare_classification(raw: Path, spec: dict, fractions):
    with np.load(raw) as z:
        images, labels = z["images"].astype(np.float32), z["labels"]
    images /= max(float(images.max()), 1.0)  # pixels in [0, 1]
    steps = images.shape[1]
    if spec.get("permute", False):
        perm = np.random.default_rng(spec.get("permutation_seed", 0)).permutation(steps)
        images = images[:, perm]
    order = np.random.default_rng(spec.get("split_seed", 0)).permutation(len(labels))
    n_train, n_valid, _ = _split_sizes(len(labels), fractions)
    parts = np.split(order, [n_train, n_train + n_valid])
    splits = {
        name: {"x": torch.from_numpy(images[idx]).unsqueeze(-1), "y": torch.from_numpy(labels[idx])}
        for name, idx in zip(("train", "valid", "test"), parts, strict=True)
    }
    meta = {
        "num_classes": int(labels.max()) + 1,
        "input_size": 1,
        "seq_len": int(steps),
        "sizes": {k: len(v["y"]) for k, v in splits.items()},
        "permuted": bool(spec.get("permute", False)),
    }
    return splits, meta


def _prepare_text(raw: Path, kind: str, fractions):
    text = raw.read_text(encoding="utf-8")
    if kind == "char":
        symbols = list(text)
    else:
        symbols = [w for line in text.splitlines() for w in line.split() + ["<eos>"]]
    vocab = sorted(set(symbols))
    index = {s: i for i, s in enumerate(vocab)}
    ids = torch.tensor([index[s] for s in symbols], dtype=torch.int64)
    n_train, n_valid, _ = _split_sizes(len(ids), fractions)
    splits = {
        "train": {"ids": ids[:n_train].clone()},
        "valid": {"ids": ids[n_train : n_train + n_valid].clone()},
        "test": {"ids": ids[n_train + n_valid :].clone()},
    }
    meta = {
        "vocab": vocab,
        "vocab_size": len(vocab),
        "sizes": {k: len(v["ids"]) for k, v in splits.items()},
    }
    return splits, meta


# ----------------------------------------------------------------------------- loading
def load_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read prepared-data metadata ({e})") from e


def load_split(data_dir: str | Path, split: str, meta: dict | None = None) -> dict:
    """Load one split, refusing a file whose SHA-256 differs from ``meta.json``."""
    meta = meta or load_meta(data_dir)
    entry = meta["files"][split]
    path = Path(data_dir) / entry["name"]
    if not path.exists():
        raise DataError(f"{path}: prepared data file is missing; rerun the prepare rule")
    found = sha256(path)
    if found != entry["sha256"]:
        raise DataError(
            f"{path}: prepared data file is corrupt or truncated (sha256 {found[:12]}…, "
            f"expected {entry['sha256'][:12]}… from meta.json); delete it and rerun prepare"
        )
    return torch.load(path, weights_only=True)


def lm_batches(ids: torch.Tensor, batch_size: int, seq_len: int):
    """Split a token stream into ``batch_size`` parallel streams and cut them into
    (inputs, targets) chunks of at most ``seq_len`` steps, shape (T, B)."""
    n = (len(ids) - 1) // batch_size
    if n < 1:
        raise DataError(f"a stream of {len(ids)} tokens is too short for batch size {batch_size}")
    x = ids[: n * batch_size].view(batch_size, n).t()
    y = ids[1 : n * batch_size + 1].view(batch_size, n).t()
    return [(x[i : i + seq_len], y[i : i + seq_len]) for i in range(0, n, seq_len)]


def classification_batches(x, y, batch_size: int, generator: torch.Generator | None = None):
    """Minibatches of (T, B, input) sequences and (B,) labels, shuffled by ``generator``."""
    order = (
        torch.randperm(len(y), generator=generator)
        if generator is not None
        else torch.arange(len(y))
    )
    return [
        (x[idx].transpose(0, 1), y[idx])
        for idx in order.split(batch_size)
        if len(idx) > 1  # batch statistics need at least two examples
    ]
