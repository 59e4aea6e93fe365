# lungreg: linear and deformable lung registration with a 3D CNN (Christodoulidis et al. 2018)
# at cohort scale, against classical baselines, with an ILD classifier of the residual motion.
#   snakemake --cores all --resources gpu=1                              embedded synthetic cohort
#   snakemake ... --configfile config/paper.yaml --config subjects=my_cohort.tsv
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: f"{workflow.basedir}/config/config.yaml"


validate(config, "config/schemas/config.schema.yaml")


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/cohort.smk"
include: "rules/preprocess.smk"
include: "rules/train.smk"
include: "rules/register.smk"
include: "rules/baselines.smk"
include: "rules/evaluate.smk"
include: "rules/classify.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        final_outputs,


onsuccess:
    summarise_problems(succeeded=True)


onerror:
    summarise_problems(succeeded=False)
