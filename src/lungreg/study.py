"""The study design: the methods and classifiers, the split, the pairs of each protocol, their chunks.

These functions are called both when Snakemake plans the workflow (rules/common.smk) and inside
the jobs, so that the two always agree. Nothing here imports torch: planning stays light.

The registries (`METHODS`, `CLASSIFIERS`) are the one list of what the study compares: the rules
build their wildcards from them, the tables and figures their names and order. A new method is a
registrar (lungreg.registration) and one line in `METHODS`; a new classifier of the regional
statistics is an estimator (lungreg.classify.tabular) and one line in `CLASSIFIERS`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from .config import settings_from

log = logging.getLogger(__name__)

PHASES = ("inhale", "exhale")
PROTOCOLS = ("inhale_exhale", "all_combinations", "cohort")
TOO_SMALL_SPLIT = "train_and_validation"
NEGATIVE, POSITIVE = "healthy", "ILD"  # ILD is the positive class
LABELS = (NEGATIVE, POSITIVE)


# ------------------------------------------------------------------------- registries


@dataclass(frozen=True)
class Method:
    """A registration method: its name in paths and tables, its display name, who registers it."""

    name: str
    label: str  # in the tables' `name` column and the figures
    # identity, network (a trained variant of the network), instance (the refinement from the
    # identity: instance optimisation without a network) or baseline (classical)
    kind: str
    affine: bool = True  # network variants: with the linear branch (False: the paper's ablation)
    network: str | None = None  # a refined row: the trained variant whose outputs it refines

    @property
    def refined(self) -> bool:
        """Whether the method runs the refinement (lungreg.network.refine) on `refine: protocols`."""
        return self.network is not None or self.kind == "instance"

    @property
    def model(self) -> str:
        """The trained network variant a network method runs (its own name, or the refined one's)."""
        return self.network or self.name


# In the order of the tables and figures. A network variant is a trained model; its refined row
# (`<variant>_refined`, lungreg.network.refine) runs that model and refines each pair's outputs.
METHODS = (
    Method("unregistered", "Unregistered", "identity"),
    Method("proposed", "Proposed", "network"),
    Method("proposed_refined", "Proposed + refinement", "network", network="proposed"),
    # The same refinement started from the identity: what the network's prediction adds is
    # measured against it (same settings, pairs and scoring).
    Method("identity_refined", "Refinement from the identity", "instance"),
    Method("proposed_without_affine", "Proposed w/o affine", "network", affine=False),
    Method(
        "proposed_without_affine_refined",
        "Proposed w/o affine + refinement",
        "network",
        affine=False,
        network="proposed_without_affine",
    ),
    Method("syn", "SyN (ANTsPy)", "baseline"),
    Method("sitk_bspline", "SimpleITK affine + B-spline", "baseline"),
    Method("sitk_demons", "SimpleITK affine + demons", "baseline"),
    Method("convexadam", "ConvexAdam", "baseline"),
    Method("elastix", "elastix affine + B-spline", "baseline"),
)
METHOD = {m.name: m for m in METHODS}
NETWORK_METHODS = tuple(m.name for m in METHODS if m.kind == "network")
NETWORK_VARIANTS = tuple(m.name for m in METHODS if m.kind == "network" and not m.refined)  # trained models


def refined_method(variant: str) -> str:
    """The refined row of a trained network variant."""
    return next(m.name for m in METHODS if m.network == variant)


BASELINE_METHODS = tuple(m.name for m in METHODS if m.kind == "baseline")
IDENTITY_REFINED = "identity_refined"  # the refinement's reference without a network (kind instance)

# Keys of the config's refine: section that the workflow reads (which protocols get refined rows);
# the rest is lungreg.network.refine.RefineSettings. Here, not there: planning must not import torch.
REFINE_WORKFLOW_KEYS = ("protocols", "budget_curve")
# Keys of the config's preprocess: section for the rule lung_mask only (lungreg.lungmask), not the
# preprocessing of lungreg.preprocess.PreprocessSettings.
PREPROCESS_WORKFLOW_KEYS = ("auto_mask",)

GROUND_TRUTH = "ground_truth"  # the synthetic cohort's exact fields, as a field source
FIELD_SOURCES = (*NETWORK_METHODS, *BASELINE_METHODS, GROUND_TRUTH)  # what classify: may classify


def method_label(name: str) -> str:
    """The display name of a method (the name itself for a method the registry does not know)."""
    return METHOD[name].label if name in METHOD else name


def method_rank(name: str) -> int:
    """Position of a method in the tables and figures; unknown methods come last."""
    return METHODS.index(METHOD[name]) if name in METHOD else len(METHODS)


@dataclass(frozen=True)
class Classifier:
    """An ILD classifier: its name in paths and tables, and what it reads."""

    name: str
    features: str  # fields (the displacement fields, a torch model) or regional (the statistics table)


CLASSIFIERS = (
    Classifier("cnn", "fields"),
    Classifier("logistic", "regional"),
    Classifier("lda", "regional"),
    Classifier("random_forest", "regional"),
)
FIELD_CLASSIFIERS = tuple(c.name for c in CLASSIFIERS if c.features == "fields")
REGIONAL_CLASSIFIERS = tuple(c.name for c in CLASSIFIERS if c.features == "regional")


# ------------------------------------------------------------------------------ split


def other_phase(phase: str) -> str:
    return {"inhale": "exhale", "exhale": "inhale"}[phase]


@dataclass(frozen=True)
class SplitSettings:
    """How many subjects are held out for validation (the config's `split:` section).

    `n_validation` (a count) when given, else round(validation_fraction x subjects), lowered so
    that at least `min_training` subjects train. With fewer than `min_subjects` subjects, or no
    validation subject left, every subject is used for training and for evaluation.
    """

    validation_fraction: float  # the paper's 13 of 41: 0.3170732 (config/config.yaml)
    n_validation: int | None = None  # an explicit count (then validation_fraction and min_training are not used)
    min_training: int = 8
    min_subjects: int = 4
    seed: int = 2018

    def __post_init__(self) -> None:
        if self.n_validation is not None and (isinstance(self.n_validation, bool) or int(self.n_validation) < 0):
            raise ValueError(f"split.n_validation must be a count >= 0 or null, got {self.n_validation!r}")
        if not 0 <= float(self.validation_fraction) < 1:
            raise ValueError(f"split.validation_fraction must be in [0, 1), got {self.validation_fraction!r}")

    @classmethod
    def from_config(cls, section: dict | None) -> "SplitSettings":
        return settings_from(cls, section, "split")

    def n_validation_for(self, n_subjects: int) -> int:
        """The validation count for a cohort of `n_subjects` (0: no split)."""
        if n_subjects < self.min_subjects:
            return 0
        if self.n_validation is not None:
            return int(self.n_validation) if int(self.n_validation) < n_subjects else 0
        wanted = int(np.floor(n_subjects * float(self.validation_fraction) + 0.5))
        return max(0, min(wanted, n_subjects - self.min_training))

    def describe(self, n_subjects: int) -> str:
        """One line: the resolved split and where it comes from."""
        n = self.n_validation_for(n_subjects)
        if not n:
            return f"split: {n_subjects} subjects, too few to hold any out: training and evaluating on all of them"
        rule = (
            f"split.n_validation: {self.n_validation}"
            if self.n_validation is not None
            else f"split.validation_fraction {float(self.validation_fraction):.4g} of {n_subjects}, "
            f"keeping at least split.min_training {self.min_training} for training"
        )
        return f"split: {n} validation and {n_subjects - n} training subjects ({rule})"


def split_subjects(subjects: pd.DataFrame, n_validation: int, seed: int, min_subjects: int = 4) -> pd.Series:
    """Patient-level split, seeded and stratified by label (unlabelled subjects form a stratum).

    With fewer than `min_subjects` subjects, or no room for both sets, every subject is used for
    training and for evaluation: unsupervised registration needs no labels, and the tables say so.
    (`SplitSettings.n_validation_for` gives `n_validation` from the config.)
    """
    n = len(subjects)
    if n < min_subjects or not 0 < n_validation < n:
        log.info("%d subjects: too few for a split; training and evaluating on all of them", n)
        return pd.Series(TOO_SMALL_SPLIT, index=subjects.index, name="split")
    strata = subjects["label"].fillna("").replace("", "unlabelled")
    stratify = strata if strata.value_counts().min() >= 2 else None
    _, held_out = train_test_split(subjects.index, test_size=n_validation, stratify=stratify, random_state=seed)
    validation = subjects.index.isin(held_out)
    return pd.Series(np.where(validation, "validation", "train"), index=subjects.index, name="split")


@dataclass(frozen=True)
class Pair:
    """A registration pair: the moving image is warped onto the fixed image's grid."""

    moving_subject: str
    moving_phase: str
    fixed_subject: str
    fixed_phase: str

    @property
    def name(self) -> str:
        return f"{self.moving_subject}_{self.moving_phase}__{self.fixed_subject}_{self.fixed_phase}"

    @property
    def intra_patient(self) -> bool:
        return self.moving_subject == self.fixed_subject

    def as_row(self) -> dict[str, str]:
        return {
            "pair": self.name,
            "moving_subject": self.moving_subject,
            "moving_phase": self.moving_phase,
            "fixed_subject": self.fixed_subject,
            "fixed_phase": self.fixed_phase,
        }


def evaluation_subjects(cohort: pd.DataFrame) -> list[str]:
    """Validation subjects, or everyone when the cohort was too small to split."""
    chosen = cohort[cohort["split"].isin(["validation", TOO_SMALL_SPLIT])]
    return chosen["subject"].tolist()


def too_small_to_split(cohort: pd.DataFrame) -> bool:
    """Whether the cohort was trained and evaluated on all its subjects (see `split_subjects`)."""
    return bool((cohort["split"] == TOO_SMALL_SPLIT).any())


def training_subjects(cohort: pd.DataFrame) -> list[str]:
    return cohort[cohort["split"].isin(["train", TOO_SMALL_SPLIT])]["subject"].tolist()


def protocol_pairs(protocol: str, cohort: pd.DataFrame, fixed_phase: str = "exhale") -> list[Pair]:
    """The pairs of a protocol (moving = the other phase, fixed = `fixed_phase`).

    inhale_exhale: every subject's own pair (tables summarise the evaluation subjects);
    all_combinations: moving of patient i onto fixed of patient j over the evaluation subjects;
    cohort: the same over all subjects.
    """
    moving_phase = other_phase(fixed_phase)
    if protocol == "inhale_exhale":
        return [Pair(s, moving_phase, s, fixed_phase) for s in cohort["subject"]]
    if protocol == "all_combinations":
        group = evaluation_subjects(cohort)
    elif protocol == "cohort":
        group = cohort["subject"].tolist()
    else:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    return [Pair(i, moving_phase, j, fixed_phase) for i in group for j in group]


def training_pairs(cohort: pd.DataFrame, fixed_phase: str, both_directions: bool, inter_patient: bool) -> list[Pair]:
    """Pairs the network trains on: training subjects only, never the validation ones."""
    subjects = training_subjects(cohort)
    moving_phase = other_phase(fixed_phase)
    pairs = [Pair(s, moving_phase, s, fixed_phase) for s in subjects]
    if both_directions:
        pairs += [Pair(s, fixed_phase, s, moving_phase) for s in subjects]
    if inter_patient:
        pairs += [Pair(i, moving_phase, j, fixed_phase) for i in subjects for j in subjects if i != j]
    return pairs


def validation_pairs(cohort: pd.DataFrame, fixed_phase: str) -> list[Pair]:
    moving_phase = other_phase(fixed_phase)
    return [Pair(s, moving_phase, s, fixed_phase) for s in evaluation_subjects(cohort)]


def n_chunks(n_pairs: int, requested: int) -> int:
    return max(1, min(requested, n_pairs))


def chunk_pairs(pairs: list[Pair], chunks: int, index: int) -> list[Pair]:
    """Contiguous block `index` of `chunks` near-equal blocks (keeps a moving image's pairs together)."""
    bounds = np.linspace(0, len(pairs), n_chunks(len(pairs), chunks) + 1).round().astype(int)
    return pairs[bounds[index] : bounds[index + 1]]


@dataclass(frozen=True)
class PreprocessedLayout:
    """Where preprocessing writes a subject's phase (one place that knows the file names)."""

    root: Path

    def image(self, subject: str, phase: str) -> Path:
        return Path(self.root) / subject / f"{phase}_image.nii.gz"

    def mask(self, subject: str, phase: str) -> Path:
        return Path(self.root) / subject / f"{phase}_mask.nii.gz"

    def landmarks(self, subject: str, phase: str) -> Path:
        return Path(self.root) / subject / f"{phase}_landmarks.csv"

    def qc(self, subject: str) -> Path:
        """The subject's checks (lungreg.preprocess.QC_COLUMNS): crop, clipping, landmarks in view."""
        return Path(self.root) / subject / "qc.tsv"

    def auto_mask(self, subject: str, phase: str) -> Path:
        """The automatic lung mask of a phase without one, on its image's own grid (lungreg.lungmask)."""
        return Path(self.root) / subject / f"{phase}_auto_mask.nii.gz"

    def auto_mask_qc(self, subject: str, phase: str) -> Path:
        """The automatic mask's checks (volume, lungs found), gathered into qc.tsv."""
        return Path(self.root) / subject / f"{phase}_auto_mask_qc.tsv"


# ------------------------------------------------------------------- classification


def labelled_subjects(cohort: pd.DataFrame) -> pd.DataFrame:
    """subject, label of the subjects labelled healthy or ILD (unlabelled ones are left out)."""
    labels = cohort["label"].fillna("").astype(str)
    chosen = cohort.loc[labels.isin(LABELS), ["subject", "label"]]
    return chosen.sort_values("subject").reset_index(drop=True)


def feasibility(cohort: pd.DataFrame, n_folds: int) -> str | None:
    """Why `n_folds`-fold classification of `cohort` is impossible, or None when it is possible.

    Needs at least 2 subjects of each class (so that every training fold holds both classes),
    at least `n_folds` subjects in the larger class (scikit-learn's stratified k-fold), and at
    least 3 subjects in every training fold (more than the 2 classes: LDA needs it).
    """
    counts = labelled_subjects(cohort)["label"].value_counts()
    n_healthy, n_ild = int(counts.get(NEGATIVE, 0)), int(counts.get(POSITIVE, 0))
    if n_folds < 2:
        return f"{n_folds} folds; at least 2 are needed"
    if min(n_healthy, n_ild) < 2:
        return f"{n_healthy} healthy and {n_ild} ILD subjects labelled; at least 2 of each are needed"
    if max(n_healthy, n_ild) < n_folds:
        return (
            f"{n_healthy} healthy and {n_ild} ILD subjects are too few for {n_folds} folds "
            f"(the larger class needs at least {n_folds})"
        )
    n_subjects = n_healthy + n_ild
    if n_subjects - math.ceil(n_subjects / n_folds) < 3:
        return (
            f"{n_subjects} labelled subjects in {n_folds} folds leave "
            f"{n_subjects - math.ceil(n_subjects / n_folds)} to train on; at least 3 are needed"
        )
    return None
