"""Snakemake entry point: see normrnn.pipeline.tables_job."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/..")
from normrnn.pipeline import tables_job  # noqa: E402

tables_job(snakemake)
