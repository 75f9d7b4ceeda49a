# normrnn-repro: normalized and quantized recurrent networks, reproduced in one harness.
# The default config comes from profiles/default (config/config.yaml);
# `--configfile config/quick.yaml` runs the quick offline study instead.
from snakemake.utils import min_version

min_version("9.0")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/aggregate.smk"


rule all:
    default_target: True
    input:
        all_targets(),
