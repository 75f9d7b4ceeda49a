# Raw data, then the uniform prepared format (normrnn.pipeline.data).


rule fetch:
    output:
        f"{DATA}/raw/{{source}}",
    log:
        "logs/fetch/{source}.log",
    conda:
        "../../envs/data.yaml"
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        source="{source}",
    script:
        "../scripts/job.py"


rule download:
    output:
        f"{DATA}/downloads/{{file}}",
    log:
        "logs/download/{file}.log",
    localrule: True
    conda:
        "../../envs/data.yaml"
    resources:
        mem_mb=500,
        runtime=60,
    params:
        spec=lambda w: config["downloads"][w.file],
    script:
        "../scripts/job.py"


rule prepare:
    input:
        raw=raw_of_dataset,
    output:
        train=f"{DATA}/prepared/{{dataset}}/train.pt",
        valid=f"{DATA}/prepared/{{dataset}}/valid.pt",
        test=f"{DATA}/prepared/{{dataset}}/test.pt",
        meta=f"{DATA}/prepared/{{dataset}}/meta.json",
    log:
        "logs/prepare/{dataset}.log",
    conda:
        "../../envs/data.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        spec=lambda w: config["datasets"][w.dataset],
        pins=download_pins,
    script:
        "../scripts/job.py"
