# Per-study tables and figures, the summary of every run, and the report's entries.


rule tables:
    input:
        evals=lambda w: study_runs(w.study, "eval.json"),
    output:
        runs=report(
            f"{RESULTS}/studies/{{study}}/runs.csv",
            caption="../report/runs.rst",
            category="{study}",
            labels={"kind": "data", "what": "every run (CSV)"},
        ),
        md=f"{RESULTS}/studies/{{study}}/table.md",
        tex=f"{RESULTS}/studies/{{study}}/table.tex",
        html=report(
            f"{RESULTS}/studies/{{study}}/table.html",
            caption="../report/table.rst",
            category="{study}",
            labels={"kind": "table", "what": "test metric per variant"},
        ),
    log:
        "logs/tables/{study}.log",
    conda:
        "../../envs/report.yaml"
    params:
        code=TABLES_CODE,
    script:
        "../scripts/job.py"


# Only for a study that names a paper (all_targets asks for it then).
rule reported:
    input:
        runs=rules.tables.output.runs,
        reported=config["reported"],
    output:
        md=f"{RESULTS}/studies/{{study}}/reported.md",
        csv=f"{RESULTS}/studies/{{study}}/reported.csv",
        html=report(
            f"{RESULTS}/studies/{{study}}/reported.html",
            caption="../report/reported.rst",
            category="{study}",
            labels={"kind": "table", "what": "reported vs reproduced"},
        ),
    log:
        "logs/reported/{study}.log",
    conda:
        "../../envs/report.yaml"
    params:
        code=TABLES_CODE,
        paper=lambda w: STUDY[w.study]["paper"],
        tolerance=config["tolerance"],
    script:
        "../scripts/job.py"


rule plots:
    input:
        runs=rules.tables.output.runs,
        histories=lambda w: study_runs(w.study, "history.csv"),
        evals=lambda w: study_runs(w.study, "eval.json"),
    output:
        curves=report(
            f"{RESULTS}/studies/{{study}}/curves.png",
            caption="../report/curves.rst",
            category="{study}",
            labels={"kind": "figure", "what": "learning curves"},
        ),
        metric=report(
            f"{RESULTS}/studies/{{study}}/metric.png",
            caption="../report/metric.rst",
            category="{study}",
            labels={"kind": "figure", "what": "test metric per variant"},
        ),
        gradflow=report(
            f"{RESULTS}/studies/{{study}}/gradflow.png",
            caption="../report/gradflow.rst",
            category="{study}",
            labels={"kind": "figure", "what": "gradient flow"},
        ),
    log:
        "logs/plots/{study}.log",
    conda:
        "../../envs/report.yaml"
    params:
        code=PLOTS_CODE,
        grid=lambda w: list(STUDY[w.study].get("grid") or {}),
    script:
        "../scripts/job.py"


rule figure:
    input:
        runs=rules.tables.output.runs,
        evals=lambda w: study_runs(w.study, "eval.json"),
    output:
        report(
            f"{RESULTS}/studies/{{study}}/{{figure}}.png",
            caption="../report/figure.rst",
            category="{study}",
            labels={"kind": "figure", "what": "{figure}"},
        ),
    log:
        "logs/figure/{study}/{figure}.log",
    conda:
        "../../envs/report.yaml"
    params:
        code=PLOTS_CODE,
        grid=lambda w: list(STUDY[w.study].get("grid") or {}),
        trained_len=lambda w: trained_lengths(w.study),
    script:
        "../scripts/job.py"


rule summary:
    input:
        expand(f"{RESULTS}/studies/{{study}}/runs.csv", study=STUDIES),
    output:
        csv=report(
            f"{RESULTS}/summary.csv",
            caption="../report/summary.rst",
            category="Summary",
            labels={"kind": "data", "what": "every run (CSV)"},
        ),
        html=report(
            f"{RESULTS}/summary.html",
            caption="../report/summary.rst",
            category="Summary",
            labels={"kind": "table", "what": "every run (sortable)"},
        ),
    log:
        "logs/summary.log",
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/job.py"


rule bench:
    output:
        csv=f"{RESULTS}/bench/{{name}}.csv",
        plot=report(
            f"{RESULTS}/bench/{{name}}.png",
            caption="../report/bench.rst",
            category="Cost",
            labels={"kind": "figure", "what": "bench {name}"},
        ),
    log:
        "logs/bench/{name}.log",
    conda:
        "../../envs/report.yaml"
    threads: bench_threads
    resources:
        mem_mb=lambda w: config["bench"][w.name].get("mem_mb", 4000),
        runtime=lambda w: config["bench"][w.name].get("runtime_min", 60),
    params:
        # (its time and memory limits are the job's, not the result's: out of the params)
        spec=lambda w: {
            k: v
            for k, v in config["bench"][w.name].items()
            if k not in ("mem_mb", "runtime_min")
        },
        code=BENCH_CODE,
    script:
        "../scripts/job.py"


rule claims:
    input:
        f"{RESULTS}/summary.csv",
    output:
        csv=f"{RESULTS}/claims.csv",
        md=f"{RESULTS}/claims.md",
        html=report(
            f"{RESULTS}/claims.html",
            caption="../report/claims.rst",
            category="Findings",
            labels={"kind": "table", "what": "the studies' claims, checked"},
        ),
        png=report(
            f"{RESULTS}/claims.png",
            caption="../report/claims.rst",
            category="Findings",
            labels={"kind": "figure", "what": "the studies' claims, checked"},
        ),
    log:
        "logs/claims.log",
    conda:
        "../../envs/report.yaml"
    params:
        claims=lambda w: {
            s: STUDY[s]["claims"] for s in STUDIES if STUDY[s].get("claims")
        },
    script:
        "../scripts/job.py"
