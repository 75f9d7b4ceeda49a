"""From a config to a run's results: validation and expansion (``config``), the code versions
that decide reruns, the papers' recipes, data and downloads, tasks, optimizers, training,
checkpoints, scoring, evaluation with its diagnostics, and the Snakemake jobs' bodies (``jobs``)
with their worker, GPU slots and provenance records."""
