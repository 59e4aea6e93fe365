"""Stratified, seeded, patient-level folds, and the labels as the classifiers see them."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from .. import io
from ..study import LABELS, NEGATIVE, POSITIVE, feasibility, labelled_subjects

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ["subject", "label", "fold", "probability", "predicted"]


def make_folds(cohort: pd.DataFrame, n_folds: int, seed: int) -> pd.DataFrame:
    """Stratified patient-level folds: subject, label, fold (0 .. n_folds-1), seeded.

    Each labelled subject is in exactly one test fold; the split depends only on the sorted
    subject ids, their labels, `n_folds` and `seed`.
    """
    problem = feasibility(cohort, n_folds)
    if problem:
        raise ValueError(f"cannot cross-validate: {problem}")
    subjects = labelled_subjects(cohort)
    fold = np.full(len(subjects), -1, dtype=int)
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=int(seed))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        for k, (_, test) in enumerate(splitter.split(subjects["subject"], subjects["label"])):
            fold[test] = k
    return subjects.assign(fold=fold)


def write_folds(cohort: pd.DataFrame, n_folds: int, seed: int, path: str | Path) -> pd.DataFrame:
    folds = make_folds(cohort, n_folds, seed)
    io.write_table(folds, path)
    log.info(
        "%d folds of %d subjects (%s); seed %d",
        n_folds,
        len(folds),
        ", ".join(f"{k}: {v}" for k, v in folds["label"].value_counts().items()),
        seed,
    )
    return folds


def read_folds(path: str | Path) -> pd.DataFrame:
    folds = io.read_table(path)
    missing = {"subject", "label", "fold"} - set(folds.columns)
    if missing:
        raise io.CorruptFileError(path, f"lacks column(s) {', '.join(sorted(missing))}")
    return folds.astype({"subject": str, "label": str, "fold": int})


def encode(labels: Sequence[str]) -> np.ndarray:
    """1 for ILD, 0 for healthy."""
    labels = np.asarray(labels, dtype=str)
    unknown = sorted(set(labels) - set(LABELS))
    if unknown:
        raise ValueError(f"unknown label(s) {unknown}; expected {LABELS}")
    return (labels == POSITIVE).astype(int)


def predictions_frame(subjects: pd.DataFrame, fold: int, probability: np.ndarray) -> pd.DataFrame:
    probability = np.asarray(probability, float)
    return pd.DataFrame(
        {
            "subject": subjects["subject"].to_numpy(),
            "label": subjects["label"].to_numpy(),
            "fold": int(fold),
            "probability": probability,
            "predicted": np.where(probability >= 0.5, POSITIVE, NEGATIVE),
        }
    )[PREDICTION_COLUMNS]


def split_fold(folds: pd.DataFrame, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    if fold not in set(folds["fold"]):
        raise ValueError(f"fold {fold} is not in the fold table (folds {sorted(set(folds['fold']))})")
    return folds[folds["fold"] != fold].reset_index(drop=True), folds[folds["fold"] == fold].reset_index(drop=True)
