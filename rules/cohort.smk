# The cohort: the embedded synthetic subjects, or the manifest's (checked in common.smk).


rule synthesize_subject:
    output:
        **{item: synthetic_path("{subject}", item) for item in SYNTHETIC_IMAGES},
        truth_exhale="results/cohort/synthetic/{subject}/gt_displacement_fixed-exhale.nii.gz",
        truth_inhale="results/cohort/synthetic/{subject}/gt_displacement_fixed-inhale.nii.gz",
        parameters="results/cohort/synthetic/{subject}/parameters.json",
    params:
        settings=config["synthetic"],
    log:
        "results/logs/synthesize_subject/{subject}.log",
    benchmark:
        "results/benchmarks/synthesize_subject/{subject}.tsv"
    conda:
        "../envs/imaging.yaml"
    script:
        "../scripts/synthesize_subject.py"


rule cohort_table:
    localrule: True  # seconds of work: on a cluster, not worth a job
    output:
        "results/cohort/subjects.tsv",
    params:
        cohort=COHORT[["subject", "label", "split"]],
    log:
        "results/logs/cohort_table.log",
    benchmark:
        "results/benchmarks/cohort_table.tsv"
    conda:
        "../envs/imaging.yaml"
    script:
        "../scripts/cohort_table.py"
