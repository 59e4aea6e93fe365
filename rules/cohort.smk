# The cohort: the embedded synthetic subjects, or the manifest's (checked in common.smk).


rule synthesize_subject:
    output:
        **{item: synthetic_path("{subject}", item) for item in SYNTHETIC_FILES},
        truth_exhale=truth_path("{subject}", "exhale"),
        truth_inhale=truth_path("{subject}", "inhale"),
        parameters=f"{SYNTHETIC}/parameters.json",
    log:
        log_path("synthesize_subject/{subject}"),
    benchmark:
        benchmark_path("synthesize_subject/{subject}")
    conda:
        "../envs/imaging.yaml"
    params:
        settings=config["synthetic"],
    script:
        "../scripts/synthesize_subject.py"


rule cohort_table:
    output:
        COHORT_TABLE,
    log:
        log_path("cohort_table"),
    benchmark:
        benchmark_path("cohort_table")
    localrule: True  # seconds of work: on a cluster, not worth a job
    conda:
        "../envs/imaging.yaml"
    params:
        cohort=COHORT[["subject", "label", "split"]],
    script:
        "../scripts/cohort_table.py"
