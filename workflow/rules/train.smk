# One training job and one evaluation job per (study, task, norm, quant, grid point, seed).


rule train:
    input:
        unpack(prepared_data),
    output:
        model=f"{RESULTS}/runs/{{study}}/{{task}}/{{run}}/model.pt",
        history=f"{RESULTS}/runs/{{study}}/{{task}}/{{run}}/history.csv",
        info=f"{RESULTS}/runs/{{study}}/{{task}}/{{run}}/train.json",
    log:
        "logs/train/{study}/{task}/{run}.log",
    benchmark:
        "benchmarks/train/{study}/{task}/{run}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: config["threads_per_train_job"]
    resources:
        gpu=config["gpus_per_train_job"],
        mem_mb=train_resources("mem_mb", 2000),
        runtime=train_resources("runtime_min", 60),
    params:
        hp=lambda w: run_of(w).params(),
        code=CODE_VERSION,
        ckpt=lambda w: f"{RESULTS}/checkpoints/{w.study}/{w.task}/{w.run}",
        device=config["device"],
    script:
        "../scripts/train.py"


rule evaluate:
    input:
        unpack(prepared_data),
        model=rules.train.output.model,
        info=rules.train.output.info,
    output:
        f"{RESULTS}/runs/{{study}}/{{task}}/{{run}}/eval.json",
    log:
        "logs/evaluate/{study}/{task}/{run}.log",
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        gpu=config["gpus_per_train_job"],
        mem_mb=train_resources("mem_mb", 2000),
        runtime=30,
    params:
        run=run_record,
        device=config["device"],
    script:
        "../scripts/evaluate.py"
