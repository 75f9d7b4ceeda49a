"""Downloads with pinned checksums and mirrors.

A file is downloaded to ``NAME.part`` while its checksums are computed, checked against the
pinned ``md5``/``sha256``/``size`` and only then renamed to ``NAME``; on any failure (HTTP
error, unreachable host, truncated transfer, wrong checksum) the partial file is removed and
the next mirror is tried. A file that is already present (placed by hand in the data
directory) is never downloaded again, and never trusted either: :func:`verify` checks it
before anything reads it.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from .data import DataError

CHUNK = 1 << 20


def digests(path: str | Path) -> dict:
    md5, sha = hashlib.md5(), hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            md5.update(chunk)
            sha.update(chunk)
            size += len(chunk)
    return {"md5": md5.hexdigest(), "sha256": sha.hexdigest(), "size": size}


def mismatches(found: dict, spec: dict) -> list[str]:
    """The pinned checksums (md5, sha256, size) that ``found`` does not match."""
    return [
        f"{key} expected {spec[key]}, found {found[key]}"
        for key in ("md5", "sha256", "size")
        if spec.get(key) is not None and str(spec[key]).lower() != str(found[key]).lower()
    ]


def verify(path: str | Path, spec: dict) -> dict:
    """Check a file against its pinned checksums; raise DataError naming the file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file is missing")
    found = digests(path)
    bad = mismatches(found, spec)
    if bad:
        raise DataError(
            f"{path}: checksum mismatch ({'; '.join(bad)}). The file is corrupt, truncated or a "
            "different version: delete it to download it again, or fix the pin in the config."
        )
    return found


def download(path: str | Path, spec: dict, timeout: float = 60.0, log=print) -> dict:
    """Download ``path`` from ``spec['urls']`` in order; return the verified digests."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    errors = []
    for url in spec["urls"]:
        try:
            _fetch(url, part, timeout)
            found = digests(part)
            bad = mismatches(found, spec)
            if bad:
                raise DataError("checksum mismatch: " + "; ".join(bad))
        except (OSError, urllib.error.URLError, http.client.HTTPException, DataError) as e:
            part.unlink(missing_ok=True)
            errors.append(f"{url}: {e}")
            log(f"download failed, {url}: {e}")
            continue
        os.replace(part, path)
        if not any(spec.get(k) for k in ("md5", "sha256")):
            log(f"{path.name}: no checksum pinned; pin it in the config: sha256: {found['sha256']}")
        log(f"downloaded {path} from {url} ({found['size']} bytes, sha256 {found['sha256']})")
        return found
    tried = "\n  ".join(errors) or "(no urls configured)"
    raise DataError(f"{path}: could not download from any mirror:\n  {tried}")


def _fetch(url: str, part: Path, timeout: float) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as f:
        expected = response.headers.get("Content-Length")
        received = 0
        while chunk := response.read(CHUNK):
            f.write(chunk)
            received += len(chunk)
    if expected is not None and received != int(expected):
        raise DataError(f"truncated transfer: {received} of {expected} bytes")
