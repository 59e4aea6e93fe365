# ILD classification (healthy vs ILD) from the residual deformation of each labelled subject's own
# inhale-exhale registration: repeated stratified k-fold at patient level (the same folds for
# every field source and classifier), one job per (source, classifier, repeat) or per fold of it
# (classify: jobs), a shallow 3D CNN and scikit-learn classifiers of regional statistics. Every
# source (classify: method and sources) gets its own summary; results/tables/classification.tsv
# is the method's, classification_sources.tsv compares the sources beside their end-point error.


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
        repeats=CLASSIFY_REPEATS,
        seed=CLASSIFY["seed"],
    script:
        "../scripts/classify_folds.py"


rule classify_features:
    input:
        fields=classify_field_inputs,
        masks=classify_mask_files,
    output:
        fields=f"{SOURCE}/features/fields.pt",
        table=f"{SOURCE}/features/regional_features.tsv",
    log:
        log_path("classify/{source}/features"),
    benchmark:
        benchmark_path("classify/{source}/features")
    conda:
        "../envs/torch.yaml"
    params:
        fields=classify_field_paths,
        masks=classify_mask_paths(),
        masked=CLASSIFY["masked"],
    script:
        "../scripts/classify_features.py"


rule classify_sklearn:
    input:
        folds=rules.classify_folds.output[0],
        features=rules.classify_features.output.table,
    output:
        predictions=f"{PART}/predictions.tsv",
        model=f"{PART}/classifier.pt",
    log:
        log_path("classify/{source}/{classifier}_{part}"),
    benchmark:
        benchmark_path("classify/{source}/{classifier}_{part}")
    wildcard_constraints:
        classifier=alternatives(study.REGIONAL_CLASSIFIERS),
    conda:
        "../envs/torch.yaml"
    threads: 1
    params:
        folds=part_items,
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
    threads: CLASSIFY["threads"]
    resources:
        gpu=1,


rule classify_summary:
    input:
        unpack(classify_part_predictions),
    output:
        table=f"{SOURCE}/classification.tsv",
        predictions=f"{SOURCE}/predictions.tsv",
        roc=report(
            f"{SOURCE}/roc.png",
            caption="../report/roc.rst",
            category="Classification",
            labels={"field source": "{source}"},
        ),
    log:
        log_path("classify/{source}/summary"),
    benchmark:
        benchmark_path("classify/{source}/summary")
    localrule: True  # seconds of work: on a cluster, not worth a job
    conda:
        "../envs/torch.yaml"
    params:
        classifiers=CLASSIFY_CLASSIFIERS,
        resamples=CLASSIFY["bootstrap_resamples"],
        permutations=CLASSIFY["permutations"],
        seed=CLASSIFY["seed"],
    script:
        "../scripts/classify_summary.py"


rule classification_tables:
    input:
        unpack(classify_source_summaries),
        pairs=table_path("pairs"),
    output:
        table=report(
            table_path("classification"),
            caption="../report/tables/classification.rst",
            category="Tables",
        ),
        sources=report(
            table_path("classification_sources"),
            caption="../report/tables/classification_sources.rst",
            category="Tables",
        ),
    log:
        log_path("classify/tables"),
    benchmark:
        benchmark_path("classify/tables")
    localrule: True  # seconds of work: on a cluster, not worth a job
    conda:
        "../envs/torch.yaml"
    params:
        method=CLASSIFY_METHOD,
        sources=CLASSIFY_SOURCES,
        labelled=CLASSIFY_LABELLED["subject"].tolist(),
        synthetic=SYNTHETIC_COHORT,
    script:
        "../scripts/classification_tables.py"
