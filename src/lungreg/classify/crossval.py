"""Cross-validation: one fold job (train on the other folds, predict this one), for either kind of classifier."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from .. import io, torch_io
from ..study import CLASSIFIERS, FIELD_CLASSIFIERS, REGIONAL_CLASSIFIERS
from .cnn import CnnSettings, predict_cnn, prepare_cnn_input, train_cnn
from .features import read_fields, read_regional_features
from .folds import encode, predictions_frame, read_folds, split_fold
from .tabular import fit_predict_sklearn

log = logging.getLogger(__name__)


def cross_validate_table(
    features: pd.DataFrame,
    folds: pd.DataFrame,
    classifier: str,
    options: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Out-of-fold predictions of a scikit-learn classifier on a regional feature table
    (indexed by subject), one fit per fold, exactly as the fold jobs do it."""
    frames = []
    for fold in sorted(set(folds["fold"])):
        train, test = split_fold(folds, fold)
        probability, _ = fit_predict_sklearn(
            classifier,
            options,
            seed,
            features.loc[train["subject"]].to_numpy(),
            encode(train["label"]),
            features.loc[test["subject"]].to_numpy(),
        )
        frames.append(predictions_frame(test, fold, probability))
    return pd.concat(frames, ignore_index=True)


def run_fold(
    classifier: str,
    fold: int,
    folds_path: str | Path,
    features_path: str | Path,
    options: Mapping[str, Any] | None,
    seed: int,
    predictions_out: str | Path,
    model_out: str | Path,
) -> pd.DataFrame:
    """One fold job: train `classifier` on the other folds, predict this fold, write both files.

    `features_path`: the fields file (cnn) or the regional feature table (scikit-learn).
    Labels come from the fold table only.
    """
    began = time.perf_counter()
    folds = read_folds(folds_path)
    train, test = split_fold(folds, int(fold))
    fold_seed = int(seed) + int(fold)
    if classifier in FIELD_CLASSIFIERS:
        data = read_fields(features_path)
        position = {s: i for i, s in enumerate(data["subjects"])}
        _check_present(folds["subject"], position, features_path)
        settings = CnnSettings.from_config(options)
        fields = prepare_cnn_input(data["fields"].numpy(), data["masks"].numpy(), settings)
        checkpoint, history = train_cnn(
            fields[[position[s] for s in train["subject"]]], encode(train["label"]), settings, fold_seed
        )
        probability = predict_cnn(checkpoint, fields[[position[s] for s in test["subject"]]])
        artefact = {**checkpoint, "history": history.to_dict("list")}
    elif classifier in REGIONAL_CLASSIFIERS:
        table = read_regional_features(features_path)
        _check_present(folds["subject"], set(table.index), features_path)
        probability, model = fit_predict_sklearn(
            classifier,
            options,
            fold_seed,
            table.loc[train["subject"]].to_numpy(),
            encode(train["label"]),
            table.loc[test["subject"]].to_numpy(),
        )
        artefact = {"model": model, "features": list(table.columns)}
    else:
        raise ValueError(f"unknown classifier {classifier!r}; expected one of {', '.join(c.name for c in CLASSIFIERS)}")
    artefact.update(
        classifier=classifier,
        fold=int(fold),
        seed=fold_seed,
        train_subjects=train["subject"].tolist(),
        test_subjects=test["subject"].tolist(),
    )
    torch_io.save_torch(artefact, model_out)
    predictions = predictions_frame(test, int(fold), probability)
    io.write_table(predictions, predictions_out)
    log.info(
        "%s fold %d: trained on %d, tested on %d subjects, accuracy %.3f, in %.1f s",
        classifier,
        fold,
        len(train),
        len(test),
        float((predictions["predicted"] == predictions["label"]).mean()),
        time.perf_counter() - began,
    )
    return predictions


def _check_present(subjects: pd.Series, available, path) -> None:
    missing = sorted(set(subjects) - set(available))
    if missing:
        raise ValueError(f"{path}: no features for subject(s) {', '.join(missing)}")
