"""Downloads against a loopback server: checksums, mirrors, truncation, unreachable hosts."""

import pytest
from standins import closed_port_url, md5

from normrnn.pipeline.data import DataError, load_meta, load_split, prepare
from normrnn.pipeline.download import download, verify


def no_leftovers(path):
    return not path.exists() and not path.with_name(path.name + ".part").exists()


def test_happy_path(tmp_path, server):
    data = server.files["text8.zip"]
    out = tmp_path / "text8.zip"
    found = download(
        out,
        {"urls": [f"{server.url}/text8.zip"], "md5": md5(data), "size": len(data)},
        log=lambda m: None,
    )
    assert out.read_bytes() == data and found["size"] == len(data)


def test_wrong_checksum_leaves_nothing(tmp_path, server):
    out = tmp_path / "text8.zip"
    with pytest.raises(
        DataError, match=r"(?s)text8\.zip: could not download.*md5 expected 0{32}, found"
    ):
        download(out, {"urls": [f"{server.url}/text8.zip"], "md5": "0" * 32}, log=lambda m: None)
    assert no_leftovers(out)


def test_truncated_transfer_leaves_nothing(tmp_path, server):
    out = tmp_path / "text8.zip"
    with pytest.raises(DataError, match="could not download"):
        download(out, {"urls": [f"{server.url}/cut/text8.zip"]}, log=lambda m: None)
    assert no_leftovers(out)


def test_404_then_a_working_mirror(tmp_path, server):
    data = server.files["warpeace_input.txt"]
    out = tmp_path / "warpeace_input.txt"
    messages = []
    urls = [f"{server.url}/missing/warpeace_input.txt", f"{server.url}/warpeace_input.txt"]
    download(out, {"urls": urls, "md5": md5(data)}, log=messages.append)
    assert out.read_bytes() == data
    assert "404" in messages[0]


def test_unreachable_host_gives_a_clear_error(tmp_path):
    out = tmp_path / "t10k-labels-idx1-ubyte.gz"
    url = closed_port_url(out.name)
    with pytest.raises(
        DataError, match=rf"could not download from any mirror:\n  {url}: .*refused"
    ):
        download(out, {"urls": [url], "md5": "0" * 32}, timeout=5, log=lambda m: None)
    assert no_leftovers(out)


def test_unpinned_download_logs_the_checksum_to_pin(tmp_path, server):
    messages = []
    download(tmp_path / "text8.zip", {"urls": [f"{server.url}/text8.zip"]}, log=messages.append)
    assert any("no checksum pinned" in m and "sha256:" in m for m in messages)


def test_verify_names_file_expected_and_found(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"not mnist")
    found = md5(b"not mnist")
    with pytest.raises(
        DataError, match=rf"{path.name}: checksum mismatch \(md5 expected f68b\w+, found {found}"
    ):
        verify(path, {"md5": "f68b3c2dcbeaaa9fbdd348bbdeb94873"})


def test_prepare_formats(tmp_path, server):
    files = {name: tmp_path / name for name in server.files}
    for name, path in files.items():
        path.write_bytes(server.files[name])
    members = {
        s: {"name": f"ptb.{s}.txt", "md5": server.sums[f"ptb.{s}.txt"]}
        for s in ("train", "valid", "test")
    }
    word = prepare(
        [files["simple-examples.tgz"]],
        tmp_path / "word",
        {"kind": "word", "format": "presplit", "members": members},
    )
    assert "<eos>" in word["vocab"] and word["vocab_size"] <= 21
    char_members = {s: f"ptb.char.{s}.txt" for s in ("train", "valid", "test")}
    char = prepare(
        [files["simple-examples.tgz"]],
        tmp_path / "char",
        {"kind": "char", "format": "presplit", "members": char_members, "tokens": "spaced"},
    )
    assert "_" in char["vocab"] and "\n" in char["vocab"] and " " not in char["vocab"]
    text8 = prepare(
        [files["text8.zip"]],
        tmp_path / "t8",
        {"kind": "char", "format": "text", "member": "text8", "splits": [0.9, 0.05, 0.05]},
    )
    n = sum(text8["sizes"].values())
    assert text8["sizes"]["train"] == round(0.9 * n) and text8["vocab_size"] <= 27
    mnist_names = [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    mnist = prepare(
        [files[n] for n in mnist_names],
        tmp_path / "mnist",
        {"kind": "classification", "format": "mnist", "valid_size": 20},
    )
    assert mnist["sizes"] == {"train": 60, "valid": 20, "test": 30} and mnist["seq_len"] == 784
    x = load_split(tmp_path / "mnist", "train")["x"]
    assert x.shape == (60, 784, 1) and float(x.max()) <= 1.0
    assert load_meta(tmp_path / "mnist")["num_classes"] <= 10
    bad = dict(members, train={"name": "ptb.train.txt", "md5": "1" * 32})
    with pytest.raises(DataError, match=r"member ptb\.train\.txt has md5 .*, expected 1{32}"):
        prepare(
            [files["simple-examples.tgz"]],
            tmp_path / "bad",
            {"kind": "word", "format": "presplit", "members": bad},
        )
