"""Snakemake entry point: see normrnn.pipeline.prepare_job."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/..")
from normrnn.pipeline import prepare_job  # noqa: E402

prepare_job(snakemake)
