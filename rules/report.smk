# Figures for `snakemake --report report.html` (one caption per figure in report/*.rst): overlays
# and a Jacobian map of a few inhale-exhale pairs (config: report), Dice and landmark-error
# boxplots, and every table on one page. Training and ROC curves come from rules train and
# classify_summary; the tables themselves are report() outputs of rules tables and classify_summary.


rule report_overlay:
    input:
        unpack(report_pair_inputs),
    output:
        report(
            f"{FIGURES}/overlays/{{method}}/{{pair}}.png",
            caption="../report/overlay.rst",
            category="Registration overlays",
            labels={"method": "{method}", "pair": "{pair}"},
        ),
    log:
        log_path("report/overlay_{method}_{pair}"),
    benchmark:
        benchmark_path("report/overlay_{method}_{pair}")
    wildcard_constraints:
        pair=alternatives(REPORT_PAIRS),
    localrule: True  # seconds of work: on a cluster, not worth a job
    conda:
        "../envs/torch.yaml"
    params:
        figure="overlay",
        pair_folder=report_pair_folder,
    script:
        "../scripts/report_pair.py"


use rule report_overlay as report_jacobian with:
    output:
        report(
            f"{FIGURES}/jacobian/{{method}}/{{pair}}.png",
            caption="../report/jacobian.rst",
            category="Jacobian determinant",
            labels={"method": "{method}", "pair": "{pair}"},
        ),
    log:
        log_path("report/jacobian_{method}_{pair}"),
    benchmark:
        benchmark_path("report/jacobian_{method}_{pair}")
    localrule: True  # not inherited by `use rule`
    params:
        figure="jacobian",


rule report_boxplots:
    input:
        pairs=rules.tables.output.pairs,
        landmarks=rules.tables.output.landmarks,
        cohort=rules.cohort_table.output[0],
    output:
        dice=report(f"{FIGURES}/dice.png", caption="../report/dice.rst", category="Dice"),
        landmarks=report(
            f"{FIGURES}/landmark_errors.png",
            caption="../report/landmark_errors.rst",
            category="Landmark errors",
        ),
    log:
        log_path("report/boxplots"),
    benchmark:
        benchmark_path("report/boxplots")
    localrule: True  # seconds of work: on a cluster, not worth a job
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/report_boxplots.py"


rule report_tables:
    input:
        **report_tables(),
    output:
        report(f"{FIGURES}/tables.html", caption="../report/tables.rst", category="Tables"),
    log:
        log_path("report/tables"),
    benchmark:
        benchmark_path("report/tables")
    localrule: True  # seconds of work: on a cluster, not worth a job
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/report_tables.py"


rule report_refine_budget:
    input:
        table=table_path("refine_budget"),
    output:
        report(f"{FIGURES}/refine_budget.png", caption="../report/refine_budget.rst", category="Refinement budget"),
    log:
        log_path("report/refine_budget"),
    benchmark:
        benchmark_path("report/refine_budget")
    localrule: True  # seconds of work: on a cluster, not worth a job
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/report_refine_budget.py"
