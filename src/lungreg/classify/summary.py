"""The classification table (per fold, mean, std, pooled) and the ROC figure of the pooled predictions."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn import metrics
from sklearn.metrics import roc_auc_score, roc_curve

from .. import io
from ..plots import plt, save_figure
from .folds import PREDICTION_COLUMNS, encode

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = [
    "classifier",
    "fold",
    "n_subjects",
    "accuracy",
    "balanced_accuracy",
    "auc",
    "sensitivity",
    "specificity",
    "tn",
    "fp",
    "fn",
    "tp",
]
METRICS = ["accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity"]
COUNTS = ["tn", "fp", "fn", "tp"]


def classification_metrics(
    labels: Sequence[str], probability: Sequence[float], predicted: Sequence[str]
) -> dict[str, float]:
    """accuracy, balanced_accuracy, auc, sensitivity, specificity, tn, fp, fn, tp (ILD positive).

    All from scikit-learn: accuracy_score, balanced_accuracy_score, roc_auc_score (NaN when only
    one class is present), recall_score of ILD (sensitivity) and of healthy (specificity; NaN
    when the class is absent), confusion_matrix with labels (healthy, ILD).  With one class
    present, balanced accuracy is scikit-learn's: the recall of that class.
    """
    y, p, yhat = encode(labels), np.asarray(probability, float), encode(predicted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tn, fp, fn, tp = metrics.confusion_matrix(y, yhat, labels=[0, 1]).ravel()
        both = len(np.unique(y)) == 2
        return {
            "accuracy": float(metrics.accuracy_score(y, yhat)),
            "balanced_accuracy": float(metrics.balanced_accuracy_score(y, yhat)),
            "auc": float(metrics.roc_auc_score(y, p)) if both else np.nan,
            "sensitivity": float(metrics.recall_score(y, yhat, pos_label=1, zero_division=np.nan)),
            "specificity": float(metrics.recall_score(y, yhat, pos_label=0, zero_division=np.nan)),
            "tn": int(tn),
            "fp": int(fp),
            "fn": int(fn),
            "tp": int(tp),
        }


def summary_table(predictions: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The classification table: one row per classifier and scope.

    Columns:
      classifier   cnn, logistic, ...
      fold         the test fold ("0", "1", ...), "mean" or "std" of the per-fold values (std:
                   sample standard deviation, ddof 1; folds with an undefined value, e.g. AUC
                   of a fold holding one class, are skipped), or "pooled": all out-of-fold
                   predictions of the classifier together
      n_subjects   subjects in the fold (pooled: all; mean / std: of the fold sizes)
      accuracy, balanced_accuracy, auc, sensitivity (recall of ILD), specificity (recall of
                   healthy): see classification_metrics; threshold 0.5 on P(ILD)
      tn, fp, fn, tp  confusion counts, ILD positive; per fold, and pooled (their sums); empty
                   for mean and std
    """
    rows = []
    for classifier, frame in predictions.items():
        per_fold = []
        for fold, part in frame.groupby("fold", sort=True):
            row = {
                "classifier": classifier,
                "fold": str(int(fold)),
                "n_subjects": len(part),
                **classification_metrics(part["label"], part["probability"], part["predicted"]),
            }
            per_fold.append(row)
        folds = pd.DataFrame(per_fold)
        mean = {
            "classifier": classifier,
            "fold": "mean",
            "n_subjects": folds["n_subjects"].mean(),
            **folds[METRICS].mean().to_dict(),
        }
        std = {
            "classifier": classifier,
            "fold": "std",
            "n_subjects": folds["n_subjects"].std(),
            **folds[METRICS].std().to_dict(),
        }
        pooled = {
            "classifier": classifier,
            "fold": "pooled",
            "n_subjects": len(frame),
            **classification_metrics(frame["label"], frame["probability"], frame["predicted"]),
        }
        rows += per_fold + [mean, std, pooled]
    table = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    return table.astype({c: "Int64" for c in COUNTS})


def read_predictions(paths: Sequence[str | Path]) -> pd.DataFrame:
    frames = [io.read_table(p) for p in paths]
    for path, frame in zip(paths, frames):
        missing = set(PREDICTION_COLUMNS) - set(frame.columns)
        if missing:
            raise io.CorruptFileError(path, f"lacks column(s) {', '.join(sorted(missing))}")
    frame = pd.concat(frames, ignore_index=True)[PREDICTION_COLUMNS]
    if frame["subject"].duplicated().any():
        repeated = sorted(frame.loc[frame["subject"].duplicated(), "subject"])
        raise ValueError(f"subject(s) predicted in more than one fold: {', '.join(repeated)}")
    return frame.astype({"subject": str, "label": str, "predicted": str, "fold": int})


def roc_figure(predictions: Mapping[str, pd.DataFrame], path: str | Path) -> None:
    """ROC curves of the pooled out-of-fold predictions, one per classifier."""
    figure, axis = plt.subplots(figsize=(4.2, 4.0))
    for classifier, frame in predictions.items():
        y = encode(frame["label"])
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, frame["probability"])
        axis.plot(fpr, tpr, label=f"{classifier} (AUC {roc_auc_score(y, frame['probability']):.2f})")
    axis.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8, label="chance")
    axis.set(
        xlabel="1 - specificity",
        ylabel="sensitivity (ILD)",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title="ILD classification, out-of-fold",
    )
    axis.legend(loc="lower right", fontsize=8)
    save_figure(figure, path)


def summarize(
    prediction_paths: Mapping[str, Sequence[str | Path]],
    table_out: str | Path,
    pooled_out: str | Path,
    roc_out: str | Path,
) -> pd.DataFrame:
    """The summary job: the classification table, all predictions in one file, the ROC figure."""
    predictions = {c: read_predictions(paths) for c, paths in prediction_paths.items()}
    table = summary_table(predictions)
    io.write_table(table, table_out)
    pooled = pd.concat([f.assign(classifier=c) for c, f in predictions.items()], ignore_index=True)
    io.write_table(pooled[["classifier", *PREDICTION_COLUMNS]], pooled_out)
    roc_figure(predictions, roc_out)
    for row in table[table["fold"].isin(["mean", "pooled"])].itertuples():
        log.info(
            "%s %s: accuracy %.3f, balanced accuracy %.3f, AUC %.3f",
            row.classifier,
            row.fold,
            row.accuracy,
            row.balanced_accuracy,
            row.auc,
        )
    return table
