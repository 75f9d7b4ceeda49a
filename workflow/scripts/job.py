"""Snakemake's entry point of every rule: ``normrnn.pipeline.jobs.<rule>_job(snakemake)``, in a
child of the job worker where one serves this run (``normrnn.pipeline.worker``), else in this
process."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/..")
from normrnn.pipeline.worker import run_job  # noqa: E402

run_job(snakemake.rule, snakemake)
