"""The study design: the split, the registration pairs of each protocol, and their chunks.

These functions are called both when Snakemake plans the workflow (rules/common.smk) and inside
the jobs, so that the two always agree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

log = logging.getLogger(__name__)

PHASES = ("inhale", "exhale")
PROTOCOLS = ("inhale_exhale", "all_combinations", "cohort")
NETWORK_METHODS = ("proposed", "proposed_without_affine")  # the network variants (method names)
TOO_SMALL_SPLIT = "train_and_validation"


def other_phase(phase: str) -> str:
    return {"inhale": "exhale", "exhale": "inhale"}[phase]


def split_subjects(subjects: pd.DataFrame, n_validation: int, seed: int, min_subjects: int = 4) -> pd.Series:
    """Patient-level split, seeded and stratified by label (unlabelled subjects form a stratum).

    With fewer than `min_subjects` subjects, or no room for both sets, every subject is used for
    training and for evaluation: unsupervised registration needs no labels, and the tables say so.
    """
    n = len(subjects)
    if n < min_subjects or not 0 < n_validation < n:
        log.warning("%d subjects: too few for a split; training and evaluating on all of them", n)
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
        return {"pair": self.name, "moving_subject": self.moving_subject, "moving_phase": self.moving_phase,
                "fixed_subject": self.fixed_subject, "fixed_phase": self.fixed_phase}


def evaluation_subjects(cohort: pd.DataFrame) -> list[str]:
    """Validation subjects, or everyone when the cohort was too small to split."""
    chosen = cohort[cohort["split"].isin(["validation", TOO_SMALL_SPLIT])]
    return chosen["subject"].tolist()


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
