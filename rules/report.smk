# Figures for `snakemake --report report.html` (one caption per figure in report/*.rst): overlays
# and a Jacobian map of a few inhale-exhale pairs (config: report), Dice and landmark-error
# boxplots, and every table on one page. Training and ROC curves come from rules train and
# classify_summary; the tables themselves are report() outputs of rules tables and classify_summary.


rule report_overlay:
    localrule: True  # seconds of work: on a cluster, not worth a job
    input:
        unpack(report_pair_inputs),
    output:
        report(
            "results/report/overlays/{method}/{pair}.png",
            caption="../report/overlay.rst",
            category="Registration overlays",
            labels={"method": "{method}", "pair": "{pair}"},
        ),
    params:
        pair_folder=report_pair_folder,
    log:
        "results/logs/report/overlay_{method}_{pair}.log",
    benchmark:
        "results/benchmarks/report/overlay_{method}_{pair}.tsv"
    wildcard_constraints:
        pair=alternatives(REPORT_PAIRS) if REPORT_PAIRS else "^$",
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/report_overlay.py"


rule report_jacobian:
    localrule: True  # seconds of work: on a cluster, not worth a job
    input:
        unpack(report_pair_inputs),
    output:
        report(
            "results/report/jacobian/{method}/{pair}.png",
            caption="../report/jacobian.rst",
            category="Jacobian determinant",
            labels={"method": "{method}", "pair": "{pair}"},
        ),
    params:
        pair_folder=report_pair_folder,
    log:
        "results/logs/report/jacobian_{method}_{pair}.log",
    benchmark:
        "results/benchmarks/report/jacobian_{method}_{pair}.tsv"
    wildcard_constraints:
        pair=alternatives(REPORT_PAIRS) if REPORT_PAIRS else "^$",
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/report_jacobian.py"


rule report_boxplots:
    localrule: True  # seconds of work: on a cluster, not worth a job
    input:
        pairs="results/tables/pairs.tsv",
        landmarks="results/tables/landmarks.tsv",
        cohort="results/cohort/subjects.tsv",
    output:
        dice=report("results/report/dice.png", caption="../report/dice.rst", category="Dice"),
        landmarks=report(
            "results/report/landmark_errors.png",
            caption="../report/landmark_errors.rst",
            category="Landmark errors",
        ),
    log:
        "results/logs/report/boxplots.log",
    benchmark:
        "results/benchmarks/report/boxplots.tsv"
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/report_boxplots.py"


rule report_tables:
    localrule: True  # seconds of work: on a cluster, not worth a job
    input:
        **report_tables(),
    output:
        report("results/report/tables.html", caption="../report/tables.rst", category="Tables"),
    log:
        "results/logs/report/tables.log",
    benchmark:
        "results/benchmarks/report/tables.tsv"
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/report_tables.py"
