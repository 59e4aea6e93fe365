# ILD classification (healthy vs ILD) from the residual deformation of each labelled subject's own
# inhale-exhale registration by the network: stratified k-fold at patient level, one job per
# (classifier, fold), a shallow 3D CNN and a scikit-learn baseline on the same folds.

from snakemake.logging import logger

from lungreg import classify

CLASSIFY = config.get("classify", {})
CLASSIFY_METHOD = CLASSIFY.get("method", "proposed")
CLASSIFY_FOLDS = int(CLASSIFY.get("folds", 5))
CLASSIFY_CLASSIFIERS = list(CLASSIFY.get("classifiers", ["cnn", "logistic"]))
CLASSIFY_SKLEARN = [c for c in CLASSIFY_CLASSIFIERS if c in classify.SKLEARN_CLASSIFIERS]
CLASSIFY_LABELLED = classify.labelled_subjects(COHORT)


def classification_skip_reason():
    """Why this configuration has no classification, or None when it has one."""
    if not CLASSIFY.get("enabled", True):
        return "disabled (classify: enabled: false)"
    if config["inference"].get("save_fields", "intra_patient") == "none":
        return "inference: save_fields is none, so no inhale-exhale field is written"
    problem = classify.feasibility(COHORT, CLASSIFY_FOLDS)
    return f"skipped: {problem}" if problem else None


CLASSIFY_SKIP = classification_skip_reason()
if CLASSIFY_SKIP:
    logger.warning(f"ILD classification: {CLASSIFY_SKIP}")


def classification_outputs(wildcards=None):
    """Final files of the classification; empty when it is disabled or the cohort is too small."""
    if CLASSIFY_SKIP:
        return []
    return ["results/classification/folds.tsv", "results/tables/classification.tsv",
            "results/classification/predictions.tsv", "results/classification/roc.png"]


def classify_field_paths(wildcards=None):
    """subject -> its inhale-exhale displacement field, inside the chunk folder that writes it."""
    pairs = method_pairs(CLASSIFY_METHOD, "inhale_exhale")
    count = chunk_count(CLASSIFY_METHOD, "inhale_exhale")
    labelled = set(CLASSIFY_LABELLED["subject"])
    folder = f"results/registration/{CLASSIFY_METHOD}/inhale_exhale"
    return {p.fixed_subject: f"{folder}/chunk-{c}/{p.name}/displacement.nii.gz"
            for c in range(count) for p in study.chunk_pairs(pairs, count, c) if p.fixed_subject in labelled}


def classify_chunks(wildcards):
    """The chunk folders (directory() outputs of register_network) holding the labelled subjects."""
    return sorted({str(Path(path).parent.parent) for path in classify_field_paths().values()})


def classify_mask_paths(wildcards=None):
    return {s: str(PREPROCESSED.mask(s, FIXED_PHASE)) for s in CLASSIFY_LABELLED["subject"]}


def classify_fold_predictions(wildcards=None):
    return {c: [f"results/classification/{c}/fold-{k}/predictions.tsv" for k in range(CLASSIFY_FOLDS)]
            for c in CLASSIFY_CLASSIFIERS}


rule classify_folds:
    output:
        "results/classification/folds.tsv",
    params:
        cohort=CLASSIFY_LABELLED,
        folds=CLASSIFY_FOLDS,
        seed=CLASSIFY.get("seed", 2018),
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
        masks=lambda wildcards: list(classify_mask_paths().values()),
    output:
        fields="results/classification/features/fields.pt",
        table="results/classification/features/regional_features.tsv",
    params:
        fields=classify_field_paths(),
        masks=classify_mask_paths(),
        masked=CLASSIFY.get("masked", True),
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
        options=CLASSIFY.get("cnn", {}),
        seed=CLASSIFY.get("seed", 2018),
    log:
        "results/logs/classify/{classifier}_fold-{fold}.log",
    benchmark:
        "results/benchmarks/classify/{classifier}_fold-{fold}.tsv"
    wildcard_constraints:
        classifier="cnn",
        fold=r"\d+",
    threads: CLASSIFY.get("threads", 1)
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
        options=lambda wildcards: CLASSIFY.get(wildcards.classifier, {}),
        seed=CLASSIFY.get("seed", 2018),
    log:
        "results/logs/classify/{classifier}_fold-{fold}.log",
    benchmark:
        "results/benchmarks/classify/{classifier}_fold-{fold}.tsv"
    wildcard_constraints:
        classifier=alternatives(classify.SKLEARN_CLASSIFIERS),
        fold=r"\d+",
    threads: 1
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/classify_fold.py"


rule classify_summary:
    input:
        **classify_fold_predictions(),
    output:
        table="results/tables/classification.tsv",
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
