# Paths, the sample sheet, wildcard constraints and every input function. Rules hold no logic.
# Planning imports only torch-free library modules (tests/test_architecture.py checks it).

import os
import re
import time
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

from lungreg import manifest, study
from lungreg.io import InputError
from lungreg.lungmask import AutoMaskSettings
from lungreg.synthetic.settings import SyntheticCohortSettings, subject_table
from lungreg.workflow import job_environment, run_problems

RUN_STARTED = time.time()  # the end-of-run summary lists the problems logged since

# Jobs import the library from this checkout, also inside --sdm conda environments. (Set with
# update(): `snakemake --lint` takes an item assignment for a variable the user must define.)
os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [f"{workflow.basedir}/src", os.environ.get("PYTHONPATH")])))
# Every job's OpenMP settings, inherited from here (OpenMP reads them before a job's code runs).
job_environment(config["threads"]["openmp"])

# ------------------------------------------------------------------------- paths
# Every results/ path of the workflow, once; the rules and input functions use these names.

COHORT_TABLE = "results/cohort/subjects.tsv"
SYNTHETIC = "results/cohort/synthetic/{subject}"
SYNTHETIC_FILES = {item: f"{item}.nii.gz" for item in ("inhale", "exhale", "inhale_mask", "exhale_mask")}
SYNTHETIC_FILES |= {item: f"{item}.csv" for item in ("inhale_landmarks", "exhale_landmarks")}
PREPROCESSED = study.PreprocessedLayout(Path("results/preprocessed"))
IMAGE_INDEX = f"{PREPROCESSED.root}/{{protocol}}_images.tsv"
MODEL = "results/model/{variant}"
CHUNK = "results/registration/{method}/{protocol}/chunk-{chunk}"  # a folder; {CHUNK}_metrics.tsv beside it
TABLE = "results/tables/{table}.tsv"
CLASSIFICATION = "results/classification"
SOURCE = f"{CLASSIFICATION}/{{source}}"  # one field source's features, classifier jobs and summary
PART = f"{SOURCE}/{{classifier}}/{{part}}"  # a job: repeat-{r} (all its folds) or repeat-{r}_fold-{k}
FIGURES = "results/report"


def log_path(name):
    return f"results/logs/{name}.log"


def benchmark_path(name):
    return f"results/benchmarks/{name}.tsv"


def synthetic_path(subject, item):
    return f"{SYNTHETIC.format(subject=subject)}/{SYNTHETIC_FILES[item]}"


def truth_path(subject, phase=None):
    """Ground-truth field of a synthetic subject's own pair, on the fixed phase's grid."""
    return f"{SYNTHETIC.format(subject=subject)}/gt_displacement_fixed-{phase or FIXED_PHASE}.nii.gz"


def model_path(variant):
    return f"{MODEL.format(variant=variant)}/model.pt"


def chunk_path(method, protocol, chunk):
    return CHUNK.format(method=method, protocol=protocol, chunk=chunk)


def table_path(table):
    return TABLE.format(table=table)


# ----------------------------------------------------------------- the cohort

FIXED_PHASE = config["pairs"]["fixed_phase"]
AUTO_MASK = config["preprocess"]["auto_mask"]  # the lung_mask jobs' settings (a phase without a mask)


def load_cohort():
    """Subjects with label, input files and split, and the manifest's checks (None for the synthetic
    cohort); every input checked before any job runs."""
    checks = None
    if config["subjects"]:
        try:
            frame = manifest.read_manifest(config["subjects"])
            validate(frame, "../config/schemas/subjects.schema.yaml")
            auto_mask = AutoMaskSettings.from_config(AUTO_MASK)
            checks = manifest.check_subjects(frame, "results/.cache/input_checks.json", auto_mask)
        except InputError as error:
            raise WorkflowError(f"bad input: {error}") from None
    else:
        frame = subject_table(SyntheticCohortSettings.from_config(config["synthetic"]))
        for item in SYNTHETIC_FILES:
            frame[item] = [synthetic_path(s, item) for s in frame["subject"]]
    split = study.SplitSettings.from_config(config["split"])
    n_validation = split.n_validation_for(len(frame))
    logger.info(split.describe(len(frame)))
    frame["split"] = study.split_subjects(frame, n_validation, split.seed, split.min_subjects)
    return frame.reset_index(drop=True), checks


def preprocess_section():
    """The preprocess: section the jobs get, `grid_shape: auto` resolved for this cohort: a manifest's
    from its lung masks (`cohort_grid_shape`; each subject centred on its lungs), the synthetic
    cohort's the shape that holds its rendered field of view (it has no masks while planning)."""
    section = {k: v for k, v in config["preprocess"].items() if k not in study.PREPROCESS_WORKFLOW_KEYS}
    if section["grid_shape"] != "auto":
        outside = (
            manifest.lungs_outside_grid(CHECKS, FIXED_PHASE, section["factor"], section["grid_shape"]) if CHECKS else []
        )
        for subject, phase in outside:
            logger.warning(
                f"subject {subject}, {phase}: the lung mask reaches outside preprocess.grid_shape "
                f"{section['grid_shape']}; its preprocess job measures the share cropped (grid_shape: auto avoids it)"
            )
        return section
    if CHECKS is None:
        synthetic = SyntheticCohortSettings.from_config(config["synthetic"])
        section["grid_shape"] = list(synthetic.covering_shape(section["factor"]))
        logger.info(f"preprocess: grid_shape auto: {section['grid_shape']} (z, y, x), the synthetic field of view")
        return section
    shape = manifest.lung_grid_shape(CHECKS, FIXED_PHASE, section["factor"], section["grid_margin_mm"])
    section["cohort_grid_shape"] = list(shape)
    logger.info(
        f"preprocess: grid_shape auto: {list(shape)} (z, y, x), the lung masks' boxes + {section['grid_margin_mm']} mm"
    )
    return section


COHORT, CHECKS = load_cohort()
PREPROCESS = preprocess_section()
SUBJECTS = COHORT["subject"].tolist()
SYNTHETIC_COHORT = not config["subjects"]
VARIANTS = config["network"]["variants"]
REFINED = sum(stage["steps"] for stage in config["refine"]["stages"]) > 0
NETWORK_ROWS = [m for v in VARIANTS for m in ([v, study.refined_method(v)] if REFINED else [v])]
# The refinement from the identity beside the refined rows: what the network's prediction adds
IDENTITY_REFINED_ROWS = [study.IDENTITY_REFINED] if REFINED else []
PROTOCOLS = config["inference"]["protocols"]
PAIRS = {protocol: study.protocol_pairs(protocol, COHORT, FIXED_PHASE) for protocol in study.PROTOCOLS}
BASELINES = [m for m, options in config["baselines"].items() if options["enabled"]]
BASELINE_KEYS = ("enabled", "protocols", "chunks", "subjects")  # workflow keys; the rest goes to the method


def alternatives(values):
    """A wildcard constraint matching exactly `values` (nothing when there are none)."""
    return "|".join(re.escape(v) for v in values) if values else "^$"


wildcard_constraints:
    subject=alternatives(SUBJECTS),
    phase="inhale|exhale",
    protocol=alternatives(study.PROTOCOLS),
    variant=alternatives(study.NETWORK_VARIANTS),
    method=alternatives([m.name for m in study.METHODS]),
    chunk=r"\d+",
    source=alternatives(study.FIELD_SOURCES),
    classifier=alternatives([c.name for c in study.CLASSIFIERS]),
    part=r"repeat-\d+(_fold-\d+)?",


# ------------------------------------------------------------------ preprocessing


def auto_mask_phases(subject):
    """The phases of a manifest's subject without a mask: rule lung_mask segments them."""
    row = COHORT.set_index("subject").loc[subject]
    return [p for p in ("inhale", "exhale") if not row[f"{p}_mask"]]


def subject_inputs(wildcards):
    """The raw files of one subject (so that a changed file reruns only that subject); an automatic
    lung mask in place of an empty mask cell."""
    row = COHORT.set_index("subject").loc[wildcards.subject]
    inputs = {item: row[item] for item in ["inhale", "exhale", "inhale_mask", "exhale_mask"]}
    for phase in auto_mask_phases(wildcards.subject):
        inputs[f"{phase}_mask"] = str(PREPROCESSED.auto_mask(wildcards.subject, phase))
    if row["inhale_landmarks"]:  # optional: "" (subjects.schema.yaml) when a subject has none
        inputs |= {item: row[item] for item in ["inhale_landmarks", "exhale_landmarks"]}
    return inputs


def auto_mask_image(wildcards):
    return COHORT.set_index("subject").loc[wildcards.subject, wildcards.phase]


def subject_qc_files(wildcards=None):
    """Every subject's checks (crop, clipping, landmarks; an automatic mask's), gathered into
    results/tables/qc.tsv."""
    automatic = [str(PREPROCESSED.auto_mask_qc(s, p)) for s in SUBJECTS for p in auto_mask_phases(s)]
    return [str(PREPROCESSED.qc(s)) for s in SUBJECTS] + automatic


def preprocessed_files(subject, phase):
    return [
        str(PREPROCESSED.image(subject, phase)),
        str(PREPROCESSED.mask(subject, phase)),
        str(PREPROCESSED.landmarks(subject, phase)),
    ]


def pair_files(pairs):
    """The preprocessed files of the pairs' images: O(pairs) set work, O(distinct images) paths."""
    images = {(p.moving_subject, p.moving_phase) for p in pairs} | {(p.fixed_subject, p.fixed_phase) for p in pairs}
    return sorted(f for subject, phase in images for f in preprocessed_files(subject, phase))


# ----------------------------------------------------------------------- training


def training_pairs():
    options = config["network"]["training_pairs"]
    return study.training_pairs(COHORT, FIXED_PHASE, options["both_directions"], options["inter_patient"])


def pair_rows(pairs):
    return [p.as_row() for p in pairs]


def train_inputs(wildcards):
    return pair_files(training_pairs() + study.validation_pairs(COHORT, FIXED_PHASE))


def model_settings(wildcards):
    return {**config["model"], "affine": study.METHOD[wildcards.variant].affine}


def refine_settings():
    """The refine: section without its workflow keys (lungreg.network.refine.RefineSettings)."""
    return {k: v for k, v in config["refine"].items() if k not in study.REFINE_WORKFLOW_KEYS}


# The loss: section the training gets. Without refinement stages there is nothing to distil (the
# targets are refinements), so a run with refinement off trains without it, with a note.
LOSS = dict(config["loss"])
if LOSS["distillation"] and not config["refine"]["stages"]:
    logger.info(f"loss: distillation {LOSS['distillation']} left out: refine.stages is empty (no targets)")
    LOSS["distillation"] = 0.0


def training_refine_section(wildcards):
    """The refinement that makes the distillation targets (None without distillation, so that
    changing the refinement then retrains nothing)."""
    return refine_settings() if LOSS["distillation"] else None


# ------------------------------------------------------------------- registration


def method_pairs(method, protocol):
    """The network registers every subject's own pair (the classifier needs them all); the
    classical baselines register the evaluation subjects' pairs (the tables) unless their
    `subjects: all` asks for every subject's (a field source of the classification), and so does
    the refinement from the identity (a reference for the tables)."""
    evaluation_only = method == study.IDENTITY_REFINED or (
        method in BASELINES and config["baselines"][method]["subjects"] == "evaluation"
    )
    if evaluation_only and protocol == "inhale_exhale":
        evaluated = set(study.evaluation_subjects(COHORT))
        return [p for p in PAIRS[protocol] if p.fixed_subject in evaluated]
    return PAIRS[protocol]


def chunk_count(method, protocol):
    """Chunks of a protocol for a method: the baselines have their own (CPU-bound) chunking."""
    if method in BASELINES:
        requested = config["baselines"][method]["chunks"]
    else:
        requested = config["inference"]["chunks"][protocol]
    return study.n_chunks(len(method_pairs(method, protocol)), requested)


def chunk_pairs(wildcards):
    count = chunk_count(wildcards.method, wildcards.protocol)
    return study.chunk_pairs(method_pairs(wildcards.method, wildcards.protocol), count, int(wildcards.chunk))


def chunks_of(method, protocol):
    """(chunk folder, its pairs) of every chunk of a method's protocol."""
    pairs, count = method_pairs(method, protocol), chunk_count(method, protocol)
    return [(chunk_path(method, protocol, c), study.chunk_pairs(pairs, count, c)) for c in range(count)]


# A chunk of an inter-patient protocol reads the fixed images of every subject of the protocol,
# so listing them per chunk would make planning O(chunks x subjects) input files (40 000 pairs of
# the cohort protocol in 64 chunks: ~80 000 DAG edges, ~30 s). Such a chunk depends instead on
# one table of the protocol's preprocessed images (rule image_index), written once after all of
# them: planning is O(chunks + subjects).
INTER_PATIENT_PROTOCOLS = ("all_combinations", "cohort")


def protocol_images(protocol):
    """(subject, phase) of every image the protocol's pairs read, sorted."""
    pairs = PAIRS[protocol]
    return sorted(
        {(p.moving_subject, p.moving_phase) for p in pairs} | {(p.fixed_subject, p.fixed_phase) for p in pairs}
    )


def image_index_inputs(wildcards):
    return [f for subject, phase in protocol_images(wildcards.protocol) for f in preprocessed_files(subject, phase)]


def image_index_rows(wildcards):
    return [
        dict(
            zip(
                ("subject", "phase", "image", "mask", "landmarks"),
                (subject, phase, *preprocessed_files(subject, phase)),
            )
        )
        for subject, phase in protocol_images(wildcards.protocol)
    ]


def chunk_inputs(wildcards):
    pairs = chunk_pairs(wildcards)
    if wildcards.protocol in INTER_PATIENT_PROTOCOLS:
        files = [IMAGE_INDEX.format(protocol=wildcards.protocol)]
    else:
        files = pair_files(pairs)
    if SYNTHETIC_COHORT:
        files += [truth_path(p.fixed_subject) for p in pairs if p.intra_patient]
    return files


def chunk_truth(wildcards):
    """Ground-truth fields by subject, for the end-point error (synthetic cohort only)."""
    if not SYNTHETIC_COHORT:
        return {}
    return {p.fixed_subject: truth_path(p.fixed_subject) for p in chunk_pairs(wildcards) if p.intra_patient}


def network_model(wildcards):
    """The trained model a network method runs (a refined row runs its variant's)."""
    return model_path(study.METHOD[wildcards.method].model)


def refine_section(wildcards):
    """The refinement's settings, for the refined rows only (so that changing them reruns only those)."""
    if not study.METHOD[wildcards.method].refined:
        return {}
    return refine_settings()


def chunk_pair_rows(wildcards):
    return pair_rows(chunk_pairs(wildcards))


def method_protocols():
    """(method, protocol) for every registration the configuration asks for."""
    chosen = [(m, p) for m in ["unregistered", *NETWORK_ROWS, *IDENTITY_REFINED_ROWS] for p in PROTOCOLS]
    chosen = [(m, p) for m, p in chosen if not study.METHOD[m].refined or p in config["refine"]["protocols"]]
    chosen += [(m, p) for m in BASELINES for p in config["baselines"][m]["protocols"]]
    return chosen


def registration_results(kind):
    """The `kind` (metrics or landmarks) table of every chunk of every registration."""
    return [f"{folder}_{kind}.tsv" for m, p in method_protocols() for folder, _ in chunks_of(m, p)]


# The refinement's accuracy against its budget, from the network and from the identity
# (lungreg.registration.budget): the first variant's refined row beside identity_refined.
BUDGET_CURVE = "results/registration/refine_budget_metrics.tsv"
BUDGET_VARIANT = VARIANTS[0]


def budget_curve_enabled():
    """Whether the study has a refine_budget table: refined rows on inhale_exhale and budgets to try."""
    refined_pairs = (study.refined_method(BUDGET_VARIANT), "inhale_exhale") in method_protocols()
    return REFINED and refined_pairs and bool(config["refine"]["budget_curve"])


def budget_pairs():
    """The evaluation subjects' inhale-exhale pairs (identity_refined's own pairs)."""
    return method_pairs(study.IDENTITY_REFINED, "inhale_exhale")


def budget_curve_inputs(wildcards):
    pairs = budget_pairs()
    truths = [truth_path(p.fixed_subject) for p in pairs] if SYNTHETIC_COHORT else []
    return {"model": model_path(BUDGET_VARIANT), "pairs": pair_files(pairs) + truths}


def budget_curve_truth(wildcards):
    return {p.fixed_subject: truth_path(p.fixed_subject) for p in budget_pairs()} if SYNTHETIC_COHORT else {}


def budget_curve_table(wildcards=None):
    """The tables job's input of the curve (none when the study has no curve)."""
    return [BUDGET_CURVE] if budget_curve_enabled() else []


def baseline_options(wildcards):
    return {k: v for k, v in config["baselines"][wildcards.method].items() if k not in BASELINE_KEYS}


# ----------------------------------------------------------------- classification

CLASSIFY = config["classify"]
GROUND_TRUTH = study.GROUND_TRUTH


def classify_method():
    """classify.method, `auto` resolved: the refined row of the first network variant where it
    registers inhale_exhale, else that variant's single pass."""
    if CLASSIFY["method"] != "auto":
        return CLASSIFY["method"]
    refined = study.refined_method(VARIANTS[0])
    return refined if (refined, "inhale_exhale") in method_protocols() else VARIANTS[0]


def classify_sources():
    """The field sources, classify.method first; classify.sources' `auto`: the first network variant's
    rows, and the ground truth where it exists (the synthetic cohort; a manifest has no exact fields)."""
    sources = CLASSIFY["sources"]
    if sources == "auto":
        registered = [m for m, p in method_protocols() if p == "inhale_exhale"]
        sources = [m for m in NETWORK_ROWS if study.METHOD[m].model == VARIANTS[0] and m in registered]
        sources += [GROUND_TRUTH] if SYNTHETIC_COHORT else []
    return [CLASSIFY_METHOD, *[s for s in sources if s != CLASSIFY_METHOD]]


CLASSIFY_METHOD = classify_method()  # the field source of results/tables/classification.tsv
CLASSIFY_SOURCES = classify_sources()
CLASSIFY_FOLDS = CLASSIFY["folds"]
CLASSIFY_REPEATS = CLASSIFY["repeats"]
CLASSIFY_CLASSIFIERS = CLASSIFY["classifiers"]
CLASSIFY_LABELLED = study.labelled_subjects(COHORT)


def source_problem(source, key):
    """Why `source` (asked for by classify.`key`) has no inhale-exhale field for every labelled
    subject, with the fix; None when it has."""
    if source == GROUND_TRUTH:
        fix = f"remove it from classify.{key}, or set classify.{key}: auto"
        return None if SYNTHETIC_COHORT else f"ground_truth exists for the synthetic cohort only; {fix}"
    if (source, "inhale_exhale") not in method_protocols():
        return f"{source} does not register the inhale_exhale protocol in this configuration"
    covered = {p.fixed_subject for _, pairs in chunks_of(source, "inhale_exhale") for p in pairs}
    missing = sorted(set(CLASSIFY_LABELLED["subject"]) - covered)
    if missing:
        hint = f"; set baselines: {source}: subjects: all" if source in BASELINES else ""
        return f"{source} registers no inhale-exhale pair of {len(missing)} labelled subject(s){hint}"
    return None


def classification_skip_reason():
    """Why this configuration has no classification, or None when it has one."""
    if not CLASSIFY["enabled"]:
        return "disabled (classify: enabled: false)"
    if config["inference"]["save_fields"] == "none":
        return "inference: save_fields is none, so no inhale-exhale field is written"
    problem = study.feasibility(COHORT, CLASSIFY_FOLDS)
    return f"skipped: {problem}" if problem else None


CLASSIFY_SKIP = classification_skip_reason()
if CLASSIFY_SKIP:
    logger.warning(f"ILD classification: {CLASSIFY_SKIP}")
else:
    if CLASSIFY["sources"] == "auto":
        left_out = "" if SYNTHETIC_COHORT else f" ({GROUND_TRUTH} left out: it exists for the synthetic cohort only)"
        logger.info(f"classify: sources auto: {', '.join(CLASSIFY_SOURCES)}{left_out}")
    for key, sources in (("method", CLASSIFY_SOURCES[:1]), ("sources", CLASSIFY_SOURCES[1:])):
        for source in sources:
            if source_problem(source, key):
                raise WorkflowError(f"classify: {key}: field source {source}: {source_problem(source, key)}")


def classification_parts():
    """The classifier jobs of a source: one per repeat, or one per fold of each repeat."""
    repeats = range(CLASSIFY_REPEATS)
    if CLASSIFY["jobs"] == "per_repeat":
        return [f"repeat-{r}" for r in repeats]
    return [f"repeat-{r}_fold-{k}" for r in repeats for k in range(CLASSIFY_FOLDS)]


def part_items(wildcards):
    """(repeat, fold) of every fold the job `wildcards.part` runs."""
    fields = dict(item.split("-") for item in wildcards.part.split("_"))
    folds = [int(fields["fold"])] if "fold" in fields else range(CLASSIFY_FOLDS)
    return [(int(fields["repeat"]), k) for k in folds]


def classification_outputs(wildcards=None):
    """Final files of the classification; empty when it is disabled or the cohort is too small."""
    if CLASSIFY_SKIP:
        return []
    return [
        f"{CLASSIFICATION}/folds.tsv",
        table_path("classification"),
        table_path("classification_sources"),
        *[f"{SOURCE.format(source=s)}/roc.png" for s in CLASSIFY_SOURCES],
    ]


def source_field_paths(source):
    """subject -> its inhale-exhale displacement field from `source` (a chunk folder's, or the truth)."""
    labelled = set(CLASSIFY_LABELLED["subject"])
    if source == GROUND_TRUTH:
        return {s: truth_path(s) for s in sorted(labelled)}
    return {
        p.fixed_subject: f"{folder}/{p.name}/displacement.nii.gz"
        for folder, pairs in chunks_of(source, "inhale_exhale")
        for p in pairs
        if p.fixed_subject in labelled
    }


def classify_field_paths(wildcards):
    return source_field_paths(wildcards.source)


def classify_field_inputs(wildcards):
    """The chunk folders (directory() outputs) holding the fields, or the ground-truth files."""
    paths = source_field_paths(wildcards.source)
    if wildcards.source == GROUND_TRUTH:
        return sorted(paths.values())
    return sorted({str(Path(path).parent.parent) for path in paths.values()})


def classify_mask_paths(wildcards=None):
    return {s: str(PREPROCESSED.mask(s, FIXED_PHASE)) for s in CLASSIFY_LABELLED["subject"]}


def classify_mask_files(wildcards):
    return list(classify_mask_paths().values())


def classifier_options(wildcards):
    return CLASSIFY[wildcards.classifier]


def classify_part_predictions(wildcards):
    return {
        c: [
            f"{PART.format(source=wildcards.source, classifier=c, part=p)}/predictions.tsv"
            for p in classification_parts()
        ]
        for c in CLASSIFY_CLASSIFIERS
    }


def classify_source_summaries(wildcards=None):
    return {s: f"{SOURCE.format(source=s)}/classification.tsv" for s in CLASSIFY_SOURCES}


# ------------------------------------------------------------------------- report

REPORT_METHOD = VARIANTS[0] if config["report"]["method"] == "auto" else config["report"]["method"]


def report_pair_folders():
    """{pair name: (pair, its chunk folder)} of the inhale-exhale pairs the report's overlays show."""
    if (
        (REPORT_METHOD, "inhale_exhale") not in method_protocols()
        or REPORT_METHOD == "unregistered"
        or config["inference"]["save_fields"] == "none"
    ):
        logger.warning(f"report: no overlays, {REPORT_METHOD} writes no inhale_exhale pair files in this configuration")
        return {}
    subjects = config["report"]["subjects"]
    if isinstance(subjects, int):
        subjects = study.evaluation_subjects(COHORT)[:subjects]
    unknown = sorted(set(subjects) - set(SUBJECTS))
    if unknown:
        raise WorkflowError(f"report: subjects: unknown subject(s) {', '.join(unknown)}")
    found = {p.fixed_subject: (p, folder) for folder, pairs in chunks_of(REPORT_METHOD, "inhale_exhale") for p in pairs}
    return {found[s][0].name: found[s] for s in subjects if s in found}


REPORT_PAIRS = report_pair_folders()


def report_pair_inputs(wildcards):
    pair, chunk = REPORT_PAIRS[wildcards.pair]
    return {
        "registration": chunk,
        "fixed": str(PREPROCESSED.image(pair.fixed_subject, pair.fixed_phase)),
        "moving": str(PREPROCESSED.image(pair.moving_subject, pair.moving_phase)),
        "fixed_mask": str(PREPROCESSED.mask(pair.fixed_subject, pair.fixed_phase)),
    }


def report_pair_folder(wildcards):
    """The pair's own folder inside its chunk (displacement.nii.gz, warped.nii.gz...)."""
    return f"{REPORT_PAIRS[wildcards.pair][1]}/{wildcards.pair}"


def report_tables(wildcards=None):
    """Every table of results/tables/ by name."""
    names = TABLES + (["classification", "classification_sources"] if classification_outputs() else [])
    return {name: table_path(name) for name in names}


def report_outputs(wildcards=None):
    """The report's figures (snakemake --report): overlays and a Jacobian map, boxplots, tables page."""
    pairs = list(REPORT_PAIRS)
    return (
        [f"{FIGURES}/overlays/{REPORT_METHOD}/{p}.png" for p in pairs]
        + [f"{FIGURES}/jacobian/{REPORT_METHOD}/{p}.png" for p in pairs[:1]]
        + [f"{FIGURES}/dice.png", f"{FIGURES}/landmark_errors.png", f"{FIGURES}/tables.html"]
        + ([f"{FIGURES}/refine_budget.png"] if budget_curve_enabled() else [])
    )


# ------------------------------------------------------------------------ targets

TABLES = ["pairs", "landmarks", "table1_dice", "table2_landmarks", "jacobian", "endpoint_error", "qc"]
TABLES += ["refine_budget"] if budget_curve_enabled() else []
QC_TABLE = table_path("qc")


def summarise_problems(succeeded):
    """The run's last lines (onsuccess / onerror): one per problem in qc.tsv and in the jobs' logs."""
    problems = run_problems("results/logs", RUN_STARTED, QC_TABLE)
    if not problems:
        logger.info("No problems found (results/tables/qc.tsv)." if succeeded else "")
        return
    where = "results/tables/qc.tsv and results/logs/" if succeeded else "results/logs/"
    logger.warning(f"{len(problems)} problem(s) in this run ({where}):")
    for line in problems:
        logger.warning(f"  {line}")


def final_outputs(wildcards=None):
    return (
        [COHORT_TABLE]
        + [model_path(v) for v in VARIANTS]
        + [table_path(t) for t in TABLES]
        + classification_outputs()
        + report_outputs()
    )
