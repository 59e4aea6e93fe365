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
from .tabular import fit_predict_sklearn, selected_columns

log = logging.getLogger(__name__)


def cross_validate_table(
    features: pd.DataFrame,
    folds: pd.DataFrame,
    classifier: str,
    options: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Out-of-fold predictions of a scikit-learn classifier on a regional feature table
    (indexed by subject), one fit per fold of every repeat, exactly as the fold jobs do it."""
    frames, columns = [], selected_columns(features.columns, options)
    for repeat, fold in parts_of(folds):
        train, test = split_fold(folds, fold, repeat)
        probability, _ = fit_predict_sklearn(
            classifier,
            options,
            part_seed(seed, repeat, fold),
            features.loc[train["subject"], columns].to_numpy(),
            encode(train["label"]),
            features.loc[test["subject"], columns].to_numpy(),
        )
        frames.append(predictions_frame(test, fold, probability, repeat))
    return pd.concat(frames, ignore_index=True)


def parts_of(folds: pd.DataFrame) -> list[tuple[int, int]]:
    """Every (repeat, fold) of a fold table, in order."""
    return sorted({(int(r), int(k)) for r, k in zip(folds["repeat"], folds["fold"])})


def part_seed(seed: int, repeat: int, fold: int) -> int:
    """The classifier's seed for one fold of one repeat (repeat 0, fold k: seed + k, as before repeats)."""
    return int(seed) + 1000 * int(repeat) + int(fold)


def run_parts(
    classifier: str,
    parts: list[tuple[int, int]],
    folds_path: str | Path,
    features_path: str | Path,
    options: Mapping[str, Any] | None,
    seed: int,
    predictions_out: str | Path,
    model_out: str | Path,
) -> pd.DataFrame:
    """One classification job: for each (repeat, fold) of `parts`, train `classifier` on the other
    folds of that repeat and predict this fold; writes the predictions and the fitted models.

    `features_path`: the fields file (cnn) or the regional feature table (scikit-learn).
    Labels come from the fold table only.
    """
    began = time.perf_counter()
    folds = read_folds(folds_path)
    frames, artefacts = [], []
    if classifier in FIELD_CLASSIFIERS:
        data = read_fields(features_path)
        position = {s: i for i, s in enumerate(data["subjects"])}
        _check_present(folds["subject"], position, features_path)
        settings = CnnSettings.from_config(options)
        fields = prepare_cnn_input(data["fields"].numpy(), data["masks"].numpy(), settings)
    elif classifier in REGIONAL_CLASSIFIERS:
        table = read_regional_features(features_path)
        _check_present(folds["subject"], set(table.index), features_path)
    else:
        raise ValueError(f"unknown classifier {classifier!r}; expected one of {', '.join(c.name for c in CLASSIFIERS)}")
    for repeat, fold in parts:
        train, test = split_fold(folds, int(fold), int(repeat))
        fold_seed = part_seed(seed, repeat, fold)
        if classifier in FIELD_CLASSIFIERS:
            checkpoint, history = train_cnn(
                fields[[position[s] for s in train["subject"]]], encode(train["label"]), settings, fold_seed
            )
            probability = predict_cnn(checkpoint, fields[[position[s] for s in test["subject"]]])
            artefact = {**checkpoint, "history": history.to_dict("list")}
        else:
            columns = selected_columns(table.columns, options)
            probability, model = fit_predict_sklearn(
                classifier,
                options,
                fold_seed,
                table.loc[train["subject"], columns].to_numpy(),
                encode(train["label"]),
                table.loc[test["subject"], columns].to_numpy(),
            )
            artefact = {"model": model, "features": columns}
        artefact.update(
            classifier=classifier,
            repeat=int(repeat),
            fold=int(fold),
            seed=fold_seed,
            train_subjects=train["subject"].tolist(),
            test_subjects=test["subject"].tolist(),
        )
        artefacts.append(artefact)
        frames.append(predictions_frame(test, int(fold), probability, int(repeat)))
    torch_io.save_torch(artefacts, model_out)
    predictions = pd.concat(frames, ignore_index=True)
    io.write_table(predictions, predictions_out)
    log.info(
        "%s, %d fold(s): accuracy %.3f over %d test predictions, in %.1f s",
        classifier,
        len(parts),
        float((predictions["predicted"] == predictions["label"]).mean()),
        len(predictions),
        time.perf_counter() - began,
    )
    return predictions


def _check_present(subjects: pd.Series, available, path) -> None:
    missing = sorted(set(subjects) - set(available))
    if missing:
        raise ValueError(f"{path}: no features for subject(s) {', '.join(missing)}")
