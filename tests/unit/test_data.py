"""Offline datasets and the prepared format."""

import numpy as np
import pytest
import torch

from normrnn.pipeline.data import DataError, fetch, lm_batches, load_meta, load_split, prepare


def test_digits_are_64_step_sequences_with_fixed_splits(digits_dir):
    meta = load_meta(digits_dir)
    assert meta["seq_len"] == 64 and meta["num_classes"] == 10 and meta["input_size"] == 1
    assert sum(meta["sizes"].values()) == 1797
    train = load_split(digits_dir, "train", meta)
    assert train["x"].shape == (meta["sizes"]["train"], 64, 1)
    assert 0.0 <= train["x"].min() and train["x"].max() == 1.0


def test_permutation_is_a_fixed_true_permutation(tmp_path, digits_dir):
    fetch("sklearn_digits", tmp_path / "raw")
    spec = {"kind": "classification", "permute": True, "permutation_seed": 7}
    prepare(tmp_path / "raw", tmp_path / "p1", spec)
    prepare(tmp_path / "raw", tmp_path / "p2", spec)
    a, b = load_split(tmp_path / "p1", "test"), load_split(tmp_path / "p2", "test")
    assert torch.equal(a["x"], b["x"])  # deterministic
    plain = load_split(digits_dir, "test")
    assert torch.equal(a["y"], plain["y"])  # same examples, same order
    # every pixel of each example appears exactly once: a permutation, not a resampling
    perm = np.random.default_rng(7).permutation(64)
    assert sorted(perm.tolist()) == list(range(64))
    assert torch.equal(a["x"][:, :, 0], plain["x"][:, perm, 0])


def test_text_is_split_contiguously(chars_dir):
    meta = load_meta(chars_dir)
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    ids = torch.cat([load_split(chars_dir, s, meta)["ids"] for s in ("train", "valid", "test")])
    assert len(ids) == len(text)
    assert "".join(meta["vocab"][i] for i in ids[:200].tolist()) == text[:200]
    assert meta["sizes"]["train"] == round(0.9 * len(text))


def test_lm_batches_shift_targets_by_one():
    ids = torch.arange(101)
    batches = lm_batches(ids, batch_size=4, seq_len=10)
    x, y = batches[0]
    assert x.shape == (10, 4) and torch.equal(y, x + 1)
    assert x[0].tolist() == [0, 25, 50, 75]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_prepared_file_is_refused_by_name(tmp_path, digits_dir, damage):
    import shutil

    d = tmp_path / "prepared"
    shutil.copytree(digits_dir, d)
    path = d / "train.pt"
    data = path.read_bytes()
    path.write_bytes(
        data[: len(data) // 2] if damage == "truncate" else data[:-1] + bytes([data[-1] ^ 0xFF])
    )
    with pytest.raises(DataError, match=r"train\.pt: prepared data file is corrupt or truncated"):
        load_split(d, "train")
    (d / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match=r"meta\.json: cannot read"):
        load_meta(d)
