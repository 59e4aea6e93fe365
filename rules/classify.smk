# ILD classification (healthy vs ILD) from the residual deformation of each labelled subject's own
# inhale-exhale registration by the network: stratified k-fold at patient level, one job per
# (classifier, fold), a shallow 3D CNN and a scikit-learn baseline on the same folds.

rule classify_folds:
    localrule: True  # seconds of work: on a cluster, not worth a job
    output:
        "results/classification/folds.tsv",
    params:
        cohort=CLASSIFY_LABELLED,
        folds=CLASSIFY_FOLDS,
        seed=CLASSIFY["seed"],
    log:
        "results/logs/classify/folds.log",
    benchmark:
        "results/benchmarks/classify/folds.tsv"
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/classify_folds.py"


rule classify_features:
    input:
        chunks=classify_chunks,
        masks=classify_mask_files,
    output:
        fields="results/classification/features/fields.pt",
        table="results/classification/features/regional_features.tsv",
    params:
        fields=classify_field_paths(),
        masks=classify_mask_paths(),
        masked=CLASSIFY["masked"],
    log:
        "results/logs/classify/features.log",
    benchmark:
        "results/benchmarks/classify/features.tsv"
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/classify_features.py"


rule classify_cnn:
    input:
        folds="results/classification/folds.tsv",
        features="results/classification/features/fields.pt",
    output:
        predictions="results/classification/{classifier}/fold-{fold}/predictions.tsv",
        model="results/classification/{classifier}/fold-{fold}/classifier.pt",
    params:
        options=CLASSIFY["cnn"],
        seed=CLASSIFY["seed"],
    log:
        "results/logs/classify/{classifier}_fold-{fold}.log",
    benchmark:
        "results/benchmarks/classify/{classifier}_fold-{fold}.tsv"
    wildcard_constraints:
        classifier="cnn",
        fold=r"\d+",
    threads: CLASSIFY["threads"]
    resources:
        gpu=1,
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/classify_fold.py"


rule classify_sklearn:
    input:
        folds="results/classification/folds.tsv",
        features="results/classification/features/regional_features.tsv",
    output:
        predictions="results/classification/{classifier}/fold-{fold}/predictions.tsv",
        model="results/classification/{classifier}/fold-{fold}/classifier.pt",
    params:
        options=classifier_options,
        seed=CLASSIFY["seed"],
    log:
        "results/logs/classify/{classifier}_fold-{fold}.log",
    benchmark:
        "results/benchmarks/classify/{classifier}_fold-{fold}.tsv"
    wildcard_constraints:
        classifier=alternatives(study.REGIONAL_CLASSIFIERS),
        fold=r"\d+",
    threads: 1
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/classify_fold.py"


rule classify_summary:
    localrule: True  # seconds of work: on a cluster, not worth a job
    input:
        **classify_fold_predictions(),
    output:
        table=report(
            "results/tables/classification.tsv",
            caption="../report/tables/classification.rst",
            category="Tables",
        ),
        predictions="results/classification/predictions.tsv",
        roc=report(
            "results/classification/roc.png",
            caption="../report/roc.rst",
            category="Classification",
        ),
    params:
        classifiers=CLASSIFY_CLASSIFIERS,
    log:
        "results/logs/classify/summary.log",
    benchmark:
        "results/benchmarks/classify/summary.tsv"
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/classify_summary.py"
