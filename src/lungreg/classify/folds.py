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

PREDICTION_COLUMNS = ["subject", "label", "repeat", "fold", "probability", "predicted"]


def make_folds(cohort: pd.DataFrame, n_folds: int, seed: int, repeats: int = 1) -> pd.DataFrame:
    """Repeated stratified patient-level folds: subject, label, repeat, fold, seeded.

    Repeat r splits the labelled subjects into `n_folds` stratified folds with seed `seed + r`
    (repeat 0 is the single split of `seed`); in every repeat each subject is in exactly one test
    fold. The split depends only on the sorted subject ids, their labels, `n_folds` and `seed`.
    """
    problem = feasibility(cohort, n_folds)
    if problem:
        raise ValueError(f"cannot cross-validate: {problem}")
    subjects = labelled_subjects(cohort)
    tables = []
    for repeat in range(int(repeats)):
        fold = np.full(len(subjects), -1, dtype=int)
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=int(seed) + repeat)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The least populated class")
            for k, (_, test) in enumerate(splitter.split(subjects["subject"], subjects["label"])):
                fold[test] = k
        tables.append(subjects.assign(repeat=repeat, fold=fold))
    return pd.concat(tables, ignore_index=True)


def write_folds(cohort: pd.DataFrame, n_folds: int, seed: int, path: str | Path, repeats: int = 1) -> pd.DataFrame:
    folds = make_folds(cohort, n_folds, seed, repeats)
    io.write_table(folds, path)
    counts = folds[folds["repeat"] == 0]["label"].value_counts()
    log.info(
        "%d repeats of %d folds of %d subjects (%s); seeds %d..%d",
        repeats,
        n_folds,
        counts.sum(),
        ", ".join(f"{k}: {v}" for k, v in counts.items()),
        seed,
        seed + repeats - 1,
    )
    return folds


def read_folds(path: str | Path) -> pd.DataFrame:
    folds = io.read_table(path)
    missing = {"subject", "label", "repeat", "fold"} - set(folds.columns)
    if missing:
        raise io.CorruptFileError(path, f"lacks column(s) {', '.join(sorted(missing))}")
    return folds.astype({"subject": str, "label": str, "repeat": int, "fold": int})


def encode(labels: Sequence[str]) -> np.ndarray:
    """1 for ILD, 0 for healthy."""
    labels = np.asarray(labels, dtype=str)
    unknown = sorted(set(labels) - set(LABELS))
    if unknown:
        raise ValueError(f"unknown label(s) {unknown}; expected {LABELS}")
    return (labels == POSITIVE).astype(int)


def predictions_frame(subjects: pd.DataFrame, fold: int, probability: np.ndarray, repeat: int = 0) -> pd.DataFrame:
    probability = np.asarray(probability, float)
    return pd.DataFrame(
        {
            "subject": subjects["subject"].to_numpy(),
            "label": subjects["label"].to_numpy(),
            "repeat": int(repeat),
            "fold": int(fold),
            "probability": probability,
            "predicted": np.where(probability >= 0.5, POSITIVE, NEGATIVE),
        }
    )[PREDICTION_COLUMNS]


def split_fold(folds: pd.DataFrame, fold: int, repeat: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training subjects, test subjects) of one fold of one repeat."""
    split = folds[folds["repeat"] == repeat] if "repeat" in folds else folds
    if fold not in set(split["fold"]):
        raise ValueError(f"fold {fold} of repeat {repeat} is not in the fold table")
    return split[split["fold"] != fold].reset_index(drop=True), split[split["fold"] == fold].reset_index(drop=True)
