# normrnn-repro: normalized and quantized recurrent networks, reproduced in one harness.
# `--configfile config/quick.yaml` runs the quick offline study instead.
import os

from snakemake.utils import min_version

min_version("9.0")


# The default config, found beside this Snakefile from any working directory;
# a `--configfile FILE` on the command line replaces it (Snakemake would merge the two).
if not workflow.overwrite_configfiles:

    configfile: os.path.join(workflow.basedir, "config", "config.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/aggregate.smk"


rule all:
    default_target: True
    input:
        all_targets(),


# One target per study and per paper: `snakemake --cores all cooijmans2016` (--list-target-rules).
for target, files in named_targets().items():

    rule:
        name:
            target
        input:
            files,
        localrule: True
