# Gather every method's per-pair rows into the paper's tables, and every check into qc.tsv.


rule tables:
    input:
        cohort=rules.cohort_table.output[0],
        metrics=registration_results("metrics"),
        landmarks=registration_results("landmarks"),
        qc=subject_qc_files(),
        budget_curve=budget_curve_table(),
    output:
        **{
            table: report(table_path(table), caption=f"../report/tables/{table}.rst", category="Tables")
            for table in TABLES
        },
    log:
        log_path("tables"),
    benchmark:
        benchmark_path("tables")
    localrule: True  # seconds of work: on a cluster, not worth a job
    conda:
        "../envs/torch.yaml"
    params:
        variant=BUDGET_VARIANT,
        refine=refine_settings(),
    script:
        "../scripts/tables.py"
