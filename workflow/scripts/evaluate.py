"""Snakemake entry point: see normrnn.pipeline.evaluate_job."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/..")
from normrnn.pipeline import evaluate_job  # noqa: E402

evaluate_job(snakemake)
