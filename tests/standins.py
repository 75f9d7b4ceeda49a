"""Small files in the real formats of the papers' datasets, and a loopback HTTP server."""

import gzip
import hashlib
import http.server
import io
import socket
import struct
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np

WORDS = "the of and to in a is that for it as was with be by on not he this are".split()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _text(rng, n_words):
    return " ".join(rng.choice(WORDS, n_words))


def ptb_archive(rng) -> tuple[bytes, dict]:
    """simple-examples.tgz with PTB word and char members; returns the member md5s too."""
    members, sums = {}, {}
    for split, n in (("train", 60), ("valid", 20), ("test", 20)):
        lines = [_text(rng, 12) for _ in range(n)]
        word = "".join(f" {line} \n" for line in lines).encode()
        char = "".join(" ".join(line.replace(" ", "_")) + "\n" for line in lines).encode()
        members[f"ptb.{split}.txt"] = word
        members[f"ptb.char.{split}.txt"] = char
        sums[f"ptb.{split}.txt"] = md5(word)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"./simple-examples/data/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), sums


def text8_zip(rng) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("text8", _text(rng, 4000))
    return buf.getvalue()


def idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def mnist_files(rng, n_train=80, n_test=30) -> dict[str, bytes]:
    def images(n):
        return rng.integers(0, 256, size=(n, 28, 28))

    return {
        "train-images-idx3-ubyte.gz": idx(images(n_train)),
        "train-labels-idx1-ubyte.gz": idx(rng.integers(0, 10, n_train)),
        "t10k-images-idx3-ubyte.gz": idx(images(n_test)),
        "t10k-labels-idx1-ubyte.gz": idx(rng.integers(0, 10, n_test)),
    }


def all_files(seed=0) -> tuple[dict[str, bytes], dict]:
    rng = np.random.default_rng(seed)
    tgz, sums = ptb_archive(rng)
    files = {"simple-examples.tgz": tgz, "text8.zip": text8_zip(rng), **mnist_files(rng)}
    files["warpeace_input.txt"] = (
        "Well, Prince, so Genoa and Lucca are now just family estates. " * 60
    ).encode()
    return files, sums


class Server:
    """Serves ``files`` on 127.0.0.1: ``/NAME`` whole, ``/cut/NAME`` truncated (the header
    promises more bytes than are sent), anything else 404."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.lstrip("/")
                cut = path.startswith("cut/")
                data = outer.files.get(path[4:] if cut else path)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2] if cut else data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def closed_port_url(name: str) -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
