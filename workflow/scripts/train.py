"""Snakemake entry point: see normrnn.pipeline.train_job."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/..")
from normrnn.pipeline import train_job  # noqa: E402

train_job(snakemake)
