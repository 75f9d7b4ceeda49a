"""Snakemake entry point: see normrnn.pipeline.plots_job."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/..")
from normrnn.pipeline import plots_job  # noqa: E402

plots_job(snakemake)
