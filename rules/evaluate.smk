# Gather every method's per-pair rows into the paper's tables.


rule tables:
    localrule: True  # seconds of work: on a cluster, not worth a job
    input:
        cohort="results/cohort/subjects.tsv",
        metrics=registration_results("metrics"),
        landmarks=registration_results("landmarks"),
    output:
        **{
            table: report(f"results/tables/{table}.tsv", caption=f"../report/tables/{table}.rst", category="Tables")
            for table in TABLES
        },
    log:
        "results/logs/tables.log",
    benchmark:
        "results/benchmarks/tables.tsv"
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/tables.py"
