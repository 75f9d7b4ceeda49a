"""Snakemake entry point: see normrnn.pipeline.figure_job."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/..")
from normrnn.pipeline import figure_job  # noqa: E402

figure_job(snakemake)
