"""Snakemake entry point: see normrnn.pipeline.download_job."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/..")
from normrnn.pipeline import download_job  # noqa: E402

download_job(snakemake)
