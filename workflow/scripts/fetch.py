"""Snakemake entry point: see normrnn.pipeline.fetch_job."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/..")
from normrnn.pipeline import fetch_job  # noqa: E402

fetch_job(snakemake)
