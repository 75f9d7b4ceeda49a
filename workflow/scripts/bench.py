"""Snakemake entry point: see normrnn.pipeline.bench_job."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/..")
from normrnn.pipeline import bench_job  # noqa: E402

bench_job(snakemake)
