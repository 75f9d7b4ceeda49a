"""Datasets: raw sources, the uniform prepared format, and batching.

Prepared format (one directory per dataset): ``train.pt``, ``valid.pt``, ``test.pt`` (each a
dict of tensors: ``x`` and ``y`` for classification, ``ids`` for language modelling) and
``meta.json`` with the kind, sizes, vocabulary and the SHA-256 of every split file. Loading
checks the hashes, so a truncated or altered file is refused with its name.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from ..registry import Registry
from .files import write_atomic

SOURCES = Registry("data source")


class DataError(RuntimeError):
    """A data file is missing, corrupt or inconsistent; the message names the file."""


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- raw sources
@SOURCES.register("sklearn_digits")
def fetch_sklearn_digits(out: Path) -> None:  # format: digits_npz
    """scikit-learn's 1,797 real 8×8 handwritten digits (shipped with the package)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images, labels = d.data.astype(np.uint8), d.target.astype(np.int64)
    write_atomic(out, lambda f: np.savez_compressed(f, images=images, labels=labels))


@SOURCES.register("cpython_pydoc")
def fetch_cpython_pydoc(out: Path) -> None:
    """The help-topic texts that ship with CPython (``pydoc_data.topics``), about 0.5M chars."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    write_atomic(out, lambda f: f.write(text.encode("utf-8")))


def fetch(source: str, out: str | Path) -> None:
    SOURCES[source](Path(out))


# ----------------------------------------------------------------------------- preparation
FORMATS = Registry("data format")


def _split_sizes(n: int, fractions) -> tuple[int, int, int]:
    train = int(round(n * fractions[0]))
    valid = int(round(n * fractions[1]))
    return train, valid, n - train - valid


def default_format(spec: dict) -> str:
    return spec.get("format") or ("digits_npz" if spec["kind"] == "classification" else "text")


def prepare(raw, out_dir: str | Path, spec: dict) -> dict:
    """Turn raw file(s) into the prepared format described in the module docstring."""
    raws = [Path(raw)] if isinstance(raw, (str, Path)) else [Path(r) for r in raw]
    out_dir = Path(out_dir)
    splits, meta = FORMATS[default_format(spec)](raws, spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta["files"] = {}
    for name, tensors in splits.items():
        path = out_dir / f"{name}.pt"
        write_atomic(path, lambda f, tensors=tensors: torch.save(tensors, f))
        meta["files"][name] = {"name": path.name, "sha256": sha256(path)}
    meta["kind"] = spec["kind"]
    write_atomic(out_dir / "meta.json", lambda f: f.write(json.dumps(meta, indent=2).encode()))
    return meta


def _classification(images: np.ndarray, labels: np.ndarray, parts, spec: dict):
    """(N, steps) pixel rows in [0, 1] → sequences of one pixel per step."""
    steps = images.shape[1]
    if spec.get("permute", False):
        perm = np.random.default_rng(spec.get("permutation_seed", 0)).permutation(steps)
        images = images[:, perm]
    splits = {
        name: {
            "x": torch.from_numpy(np.ascontiguousarray(images[idx])).unsqueeze(-1),
            "y": torch.from_numpy(labels[idx].astype(np.int64)),
        }
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


@FORMATS.register("digits_npz")
def _prepare_digits(raws, spec):
    with np.load(raws[0]) as z:
        images, labels = z["images"].astype(np.float32), z["labels"]
    images /= max(float(images.max()), 1.0)
    order = np.random.default_rng(spec.get("split_seed", 0)).permutation(len(labels))
    n_train, n_valid, _ = _split_sizes(len(labels), spec.get("splits", [0.8, 0.1, 0.1]))
    return _classification(images, labels, np.split(order, [n_train, n_train + n_valid]), spec)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format), gzip-compressed or not."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: IDX header says {dims}, found {body.size} values")
    return body.reshape(dims)


@FORMATS.register("mnist")
def _prepare_mnist(raws, spec):
    """Four IDX files: train images, train labels, test images, test labels. The last
    ``valid_size`` (10,000) training examples are the validation set."""
    if len(raws) != 4:
        raise DataError(f"mnist needs 4 IDX files (train/test images and labels), got {len(raws)}")
    tr_x, tr_y, te_x, te_y = (read_idx(p) for p in raws)
    images = (
        np.concatenate([tr_x, te_x]).reshape(len(tr_x) + len(te_x), -1).astype(np.float32) / 255
    )
    labels = np.concatenate([tr_y, te_y])
    n_train = len(tr_x) - spec.get("valid_size", 10_000)
    if n_train < 1:
        raise DataError(
            f"{raws[0]}: {len(tr_x)} training images leave none after the validation split"
        )
    idx = np.arange(len(labels))
    parts = [idx[:n_train], idx[n_train : len(tr_x)], idx[len(tr_x) :]]
    return _classification(images, labels, parts, spec)


def read_text(path: Path, member: str | None = None) -> str:
    """A text file, or a member of a .zip/.tgz archive (matched by its file name)."""
    import tarfile
    import zipfile

    if member is None:
        return path.read_text(encoding="utf-8")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if Path(n).name == member]
            if names:
                return z.read(names[0]).decode("utf-8")
    elif tarfile.is_tarfile(path):
        with tarfile.open(path) as t:
            found = [m for m in t.getmembers() if Path(m.name).name == member and m.isfile()]
            if found:
                return t.extractfile(found[0]).read().decode("utf-8")
    else:
        raise DataError(f"{path}: not a zip or tar archive")
    raise DataError(f"{path}: archive has no member {member!r}")


def _symbols(text: str, kind: str, spec: dict) -> list[str]:
    if kind == "char" and spec.get("tokens") == "spaced":
        # PTB char level: characters separated by spaces, '_' between words
        return [s for line in text.splitlines() for s in line.split() + ["\n"]]
    if kind == "char":
        return list(text)
    return [w for line in text.splitlines() for w in line.split() + ["<eos>"]]


def _lm(split_symbols: dict[str, list[str]]):
    vocab = sorted(set().union(*split_symbols.values()))
    index = {s: i for i, s in enumerate(vocab)}
    splits = {
        k: {"ids": torch.tensor([index[s] for s in v], dtype=torch.int64)}
        for k, v in split_symbols.items()
    }
    meta = {
        "vocab": vocab,
        "vocab_size": len(vocab),
        "sizes": {k: len(v["ids"]) for k, v in splits.items()},
    }
    return splits, meta


@FORMATS.register("text")
def _prepare_text(raws, spec):
    """One text (a file or an archive member), split contiguously by ``splits``."""
    symbols = _symbols(read_text(raws[0], spec.get("member")), spec["kind"], spec)
    n_train, n_valid, _ = _split_sizes(len(symbols), spec.get("splits", [0.8, 0.1, 0.1]))
    return _lm(
        {
            "train": symbols[:n_train],
            "valid": symbols[n_train : n_train + n_valid],
            "test": symbols[n_train + n_valid :],
        }
    )


@FORMATS.register("presplit")
def _prepare_presplit(raws, spec):
    """Three members of one archive (PTB's simple-examples): ``members`` maps train, valid and
    test to a member name, or to {name, md5} to check the extracted file as well."""
    import hashlib

    texts = {}
    for split in ("train", "valid", "test"):
        m = spec["members"][split]
        name, md5 = (m, None) if isinstance(m, str) else (m["name"], m.get("md5"))
        text = read_text(raws[0], name)
        found = hashlib.md5(text.encode("utf-8")).hexdigest()
        if md5 and found != md5:
            raise DataError(f"{raws[0]}: member {name} has md5 {found}, expected {md5}")
        texts[split] = _symbols(text, spec["kind"], spec)
    return _lm(texts)


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


def crop_examples(ids: torch.Tensor, length: int, offset: int = 0, drop_last: bool = False):
    """Non-overlapping examples of ``length`` tokens from ``offset`` on, shape (N, length):
    ``len(ids) // length`` of them, one fewer with ``drop_last`` (which leaves room for any
    offset below ``length``, as Cooijmans et al.'s augmented crops do)."""
    count = len(ids) // length - (1 if drop_last else 0)
    if count < 2:
        raise DataError(f"a stream of {len(ids)} tokens gives fewer than 2 examples of {length}")
    return ids[offset : offset + count * length].view(count, length)


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


IGNORE = -100  # target of a padded position (F.cross_entropy's ignore_index)


def variable_length_batches(chunks, generator: torch.Generator, min_fraction=0.25, pad_id=0):
    """Language-model chunks cut to variable-length sequences: example b of a chunk keeps its
    first L_b ~ U{ceil(min_fraction T), T} steps. Returns (inputs, targets, mask) of the
    batch's longest length; padded inputs are ``pad_id``, padded targets :data:`IGNORE`, and
    ``mask`` is 1 at real positions."""
    out = []
    for x, y in chunks:
        steps, batch = x.shape
        low = max(1, math.ceil(min_fraction * steps))
        lengths = torch.randint(low, steps + 1, (batch,), generator=generator)
        longest = int(lengths.max())
        mask = torch.arange(longest).unsqueeze(1) < lengths.unsqueeze(0)
        out.append(
            (
                x[:longest].masked_fill(~mask, pad_id),
                y[:longest].masked_fill(~mask, IGNORE),
                mask,
            )
        )
    return out
