"""What a run costs beside its training: the wall time of its jobs minus its training time.

Snakemake records each job's wall time (its ``benchmark:`` files, ``benchmarks/<rule>/...``);
``train.json`` records the run's training time (the optimizer steps). Their difference is what
starting processes, imports, data loading, validation and evaluation cost the run::

    python -m normrnn overhead --results results --benchmarks benchmarks

prints, per study, the number of runs, the median and total overhead per run, and the
training time, and with ``--json`` writes the rows. Run it after a workflow run of its own
(other load inflates every figure), and compare versions on the same machine, alternately.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RUN_RULES = ("train", "evaluate")  # the jobs of one run (evaluate: the pipeline before 0.2)


def job_seconds(path: Path) -> float:
    """The wall time in a Snakemake benchmark file (its ``s`` column, first repeat)."""
    header, first = path.read_text().splitlines()[:2]
    return float(first.split("\t")[header.split("\t").index("s")])


def runs(results: Path, benchmarks: Path) -> list[dict]:
    """One row per run: study, task, run, its jobs' wall time, training time, overhead."""
    rows = []
    for info in sorted((results / "runs").glob("*/*/*/train.json")):
        study, task, run = info.parts[-4:-1]
        jobs = [benchmarks / rule / study / task / f"{run}.tsv" for rule in RUN_RULES]
        wall = sum(job_seconds(p) for p in jobs if p.exists())
        train = json.loads(info.read_text())["train_seconds"]
        rows.append({"study": study, "task": task, "run": run, "jobs_s": wall, "train_s": train,
                     "overhead_s": wall - train})  # fmt: skip
    return rows


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for study in sorted({r["study"] for r in rows}):
        mine = [r for r in rows if r["study"] == study]
        out.append({
            "study": study,
            "runs": len(mine),
            "median_overhead_s": statistics.median(r["overhead_s"] for r in mine),
            "total_overhead_s": sum(r["overhead_s"] for r in mine),
            "total_train_s": sum(r["train_s"] for r in mine),
        })  # fmt: skip
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--benchmarks", type=Path, default=Path("benchmarks"))
    parser.add_argument("--json", type=Path, help="write the per-run rows here")
    args = parser.parse_args(argv)
    rows = runs(args.results, args.benchmarks)
    if not rows:
        raise SystemExit(f"no runs under {args.results}/runs")
    table = summary(rows)
    print(f"{'study':16s} {'runs':>5s} {'median s':>9s} {'total s':>9s} {'train s':>9s}")
    for r in table:
        print(f"{r['study']:16s} {r['runs']:5d} {r['median_overhead_s']:9.2f} "
              f"{r['total_overhead_s']:9.1f} {r['total_train_s']:9.1f}")  # fmt: skip
    every = [r["overhead_s"] for r in rows]
    print(
        f"all: {len(rows)} runs, median overhead {statistics.median(every):.2f} s per run, "
        f"total {sum(every):.1f} s for {sum(r['train_s'] for r in rows):.1f} s of training"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
