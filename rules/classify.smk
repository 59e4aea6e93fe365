# ILD classification (healthy vs ILD) from the residual deformation of each labelled subject's own
# inhale-exhale registration by the network: stratified k-fold at patient level, one job per
# (classifier, fold), a shallow 3D CNN and a scikit-learn baseline on the same folds.


rule classify_folds:
    output:
        f"{CLASSIFICATION}/folds.tsv",
    log:
        log_path("classify/folds"),
    benchmark:
        benchmark_path("classify/folds")
    localrule: True  # seconds of work: on a cluster, not worth a job
    conda:
        "../envs/torch.yaml"
    params:
        cohort=CLASSIFY_LABELLED,
        folds=CLASSIFY_FOLDS,
        seed=CLASSIFY["seed"],
    script:
        "../scripts/classify_folds.py"


rule classify_features:
    input:
        chunks=classify_chunks,
        masks=classify_mask_files,
    output:
        fields=f"{CLASSIFICATION}/features/fields.pt",
        table=f"{CLASSIFICATION}/features/regional_features.tsv",
    log:
        log_path("classify/features"),
    benchmark:
        benchmark_path("classify/features")
    conda:
        "../envs/torch.yaml"
    params:
        fields=classify_field_paths(),
        masks=classify_mask_paths(),
        masked=CLASSIFY["masked"],
    script:
        "../scripts/classify_features.py"


# One fold job: the classifier trains on the other folds and predicts this one. The classifiers of
# the regional statistics (scikit-learn) here; the CNN on the fields below, a GPU job.
rule classify_sklearn:
    input:
        folds=rules.classify_folds.output[0],
        features=rules.classify_features.output.table,
    output:
        predictions=f"{FOLD}/predictions.tsv",
        model=f"{FOLD}/classifier.pt",
    log:
        log_path("classify/{classifier}_fold-{fold}"),
    benchmark:
        benchmark_path("classify/{classifier}_fold-{fold}")
    wildcard_constraints:
        classifier=alternatives(study.REGIONAL_CLASSIFIERS),
        fold=r"\d+",
    conda:
        "../envs/torch.yaml"
    threads: 1
    params:
        options=classifier_options,
        seed=CLASSIFY["seed"],
    script:
        "../scripts/classify_fold.py"


use rule classify_sklearn as classify_cnn with:
    input:
        folds=rules.classify_folds.output[0],
        features=rules.classify_features.output.fields,
    wildcard_constraints:
        classifier=alternatives(study.FIELD_CLASSIFIERS),
        fold=r"\d+",
    threads: CLASSIFY["threads"]
    resources:
        gpu=1,


rule classify_summary:
    input:
        **classify_fold_predictions(),
    output:
        table=report(
            table_path("classification"),
            caption="../report/tables/classification.rst",
            category="Tables",
        ),
        predictions=f"{CLASSIFICATION}/predictions.tsv",
        roc=report(
            f"{CLASSIFICATION}/roc.png",
            caption="../report/roc.rst",
            category="Classification",
        ),
    log:
        log_path("classify/summary"),
    benchmark:
        benchmark_path("classify/summary")
    localrule: True  # seconds of work: on a cluster, not worth a job
    conda:
        "../envs/torch.yaml"
    params:
        classifiers=CLASSIFY_CLASSIFIERS,
    script:
        "../scripts/classify_summary.py"
