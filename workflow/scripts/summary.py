"""Snakemake entry point: see normrnn.pipeline.summary_job."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/..")
from normrnn.pipeline import summary_job  # noqa: E402

summary_job(snakemake)
