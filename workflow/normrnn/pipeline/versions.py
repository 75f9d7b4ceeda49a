"""Code versions: hashes of the package's files that decide a job's numbers. A train job
carries its version as a param (editing those files reruns it; Snakemake's params trigger) and
in its checkpoint's fingerprint (an old checkpoint is refused); tables, plots and the bench
carry their own."""

from __future__ import annotations

import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # workflow/normrnn
# What decides no run's numbers: it tables, plots, judges, times or records finished runs,
# writes curves for a watcher, or checks a config file and dispatches the commands.
OUTPUT_PARTS = (
    "outputs",
    "pipeline/provenance.py",
    "pipeline/tracking.py",
    "pipeline/check.py",
    "__main__.py",
)
SOURCE_SUFFIXES = (".py", ".cpp", ".h", ".yaml")


def run_code_files(package_dir: str | Path | None = None) -> list[Path]:
    """Every file of the package that decides a run's numbers (training and evaluation): all
    but :data:`OUTPUT_PARTS`, the compiled loops' C++ sources and the recipes included; a new
    module counts by itself."""
    package_dir = Path(package_dir or PACKAGE)
    skip = [package_dir / part for part in OUTPUT_PARTS]
    return sorted(
        p
        for p in package_dir.rglob("*")
        if p.suffix in SOURCE_SUFFIXES
        and p.is_file()
        and "__pycache__" not in p.parts
        and not any(p == s or s in p.parents for s in skip)
    )


def code_version(package_dir: str | Path | None = None, modules=(), run_code=True) -> str:
    """A hash of the files that decide a run's numbers (:func:`run_code_files`, unless
    ``run_code`` is false) and of the named ``modules`` (dotted, under the package:
    ``outputs.tables``): train jobs carry it as a param, so editing the model, training or
    evaluation code (C++ included) reruns the runs and refuses their old checkpoints
    (Snakemake's params rerun trigger; the checkpoint's fingerprint), while editing tables,
    plots or docs does not. The bench's adds its own module to the run code (it times the same
    cells); tables' and plots' hash their modules only."""
    package_dir = Path(package_dir or PACKAGE)
    paths = run_code_files(package_dir) if run_code else []
    paths = sorted({*paths, *(package_dir / f"{m.replace('.', '/')}.py" for m in modules)})
    h = hashlib.sha256()
    for path in paths:
        h.update(str(path.relative_to(package_dir)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
