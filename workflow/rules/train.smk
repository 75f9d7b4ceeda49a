# One job per (study, task, norm, quant, grid point, seed): training, then the test, in one
# process (a process and its imports cost more than a toy run's training).


rule train:
    input:
        unpack(prepared_data),
    output:
        model=f"{RESULTS}/runs/{{study}}/{{task}}/{{run}}/model.pt",
        history=f"{RESULTS}/runs/{{study}}/{{task}}/{{run}}/history.csv",
        info=f"{RESULTS}/runs/{{study}}/{{task}}/{{run}}/train.json",
        evaluation=f"{RESULTS}/runs/{{study}}/{{task}}/{{run}}/eval.json",
    log:
        "logs/train/{study}/{task}/{run}.log",
    benchmark:
        "benchmarks/train/{study}/{task}/{run}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: config["threads_per_train_job"]
    resources:
        gpu=gpus_per_train_job(),
        mem_mb=train_resources("mem_mb", 2000),
        runtime=train_resources("runtime_min", 60),
        # a setting of the job, not of its result: a resource changes no params
        checkpoint_every=train_resources("checkpoint_every", 0),
        tensorboard=int(config["tensorboard"]),  # the run's curves as it trains (tracking.py)
    params:
        hp=lambda w: run_of(w).params(),
        code=CODE_VERSION,
        ckpt=lambda w: f"{RESULTS}/checkpoints/{w.study}/{w.task}/{w.run}",
        device=config["device"],
        deterministic=config["deterministic"],
        run=run_record,
    script:
        "../scripts/job.py"
