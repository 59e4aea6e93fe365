"""The classification table (per fold, mean, std, pooled) and the ROC figure of the pooled predictions."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats
from sklearn import metrics
from sklearn.metrics import roc_curve

from .. import io
from ..plots import plt, save_figure
from .folds import PREDICTION_COLUMNS, encode

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = [
    "classifier",
    "repeat",
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
INTERVAL_METRICS = ("accuracy", "balanced_accuracy", "auc")  # with a bootstrap interval
TESTED_METRICS = ("balanced_accuracy", "auc")  # with a permutation p-value against chance
UNCERTAINTY_COLUMNS = [
    *(f"{m}_{end}" for m in INTERVAL_METRICS for end in ("ci_low", "ci_high")),
    *(f"{m}_p_value" for m in TESTED_METRICS),
]


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


# --------------------------------------------------------------- uncertainty (41 subjects)


def fast_metric(name: str, y: np.ndarray, probability: np.ndarray) -> float:
    """accuracy, balanced_accuracy (threshold 0.5) or auc of 0/1 labels, in numpy: the same values as
    scikit-learn's (tests/test_classify.py), fast enough for thousands of resamples."""
    predicted = probability >= 0.5
    positive = y == 1
    n_positive, n_negative = int(positive.sum()), int((~positive).sum())
    if name == "accuracy":
        return float(np.mean(predicted == positive))
    if not (n_positive and n_negative):
        return np.nan
    if name == "balanced_accuracy":
        return float((predicted[positive].mean() + (~predicted[~positive]).mean()) / 2)
    if name == "auc":  # Mann-Whitney U / (n+ n-), ties counted half (mid-ranks)
        ranks = stats.rankdata(probability)
        return float((ranks[positive].sum() - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative))
    raise ValueError(f"unknown metric {name!r}")


def repeated_metric(name: str, y: np.ndarray, probabilities: np.ndarray) -> float:
    """The metric of each repeat's out-of-fold predictions (rows of `probabilities`), averaged."""
    return float(np.nanmean([fast_metric(name, y, row) for row in probabilities]))


def bootstrap_interval(
    name: str, y: np.ndarray, probabilities: np.ndarray, resamples: int, seed: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of `repeated_metric` over the subjects, stratified by label.

    scipy.stats.bootstrap with each class a sample of its own (`paired=False`: resampled
    independently): a resample draws as many healthy subjects, with replacement, from the healthy
    ones and as many ILD subjects from the ILD ones as the cohort holds (pROC's stratified
    bootstrap). It never holds one class only, so balanced accuracy and AUC are defined in every
    resample, whatever the cohort's size (an unstratified resample of 3 healthy + 13 ILD subjects
    lacks the healthy class once in 28 draws: its metric, and so the percentile interval, is NaN).
    The statistic is the metric averaged over the CV repeats of the resampled subjects. NaN when a
    class has fewer than 2 subjects (nothing to resample; the workflow never classifies those).
    """
    classes = tuple(np.flatnonzero(y == label) for label in (0, 1))
    if min(len(c) for c in classes) < 2:
        return np.nan, np.nan

    def statistic(*samples):
        index = np.concatenate([np.asarray(sample, dtype=int) for sample in samples])
        return repeated_metric(name, y[index], probabilities[:, index])

    result = stats.bootstrap(
        classes,
        statistic,
        n_resamples=int(resamples),
        vectorized=False,
        paired=False,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(int(seed)),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def permutation_p_value(name: str, y: np.ndarray, probabilities: np.ndarray, permutations: int, seed: int) -> float:
    """One-sided p-value of the out-of-fold predictions against chance: the share of label
    permutations whose `repeated_metric` reaches the observed one, (1 + k) / (1 + permutations).

    The predictions were made without the test labels, so under "the field says nothing about the
    label" every permutation of the labels is as likely as the observed one.
    """
    rng = np.random.default_rng(int(seed))
    observed = repeated_metric(name, y, probabilities)
    reached = sum(repeated_metric(name, rng.permutation(y), probabilities) >= observed for _ in range(permutations))
    return (1 + reached) / (1 + int(permutations))


def subject_matrix(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(labels 0/1, probabilities (repeats, subjects), subjects) of one classifier's predictions."""
    table = frame.pivot(index="subject", columns="repeat", values="probability").sort_index()
    if table.isna().any().any():
        raise ValueError("a subject lacks an out-of-fold prediction in some repeat")
    labels = frame.drop_duplicates("subject").set_index("subject").loc[table.index, "label"]
    return encode(labels), table.to_numpy().T, list(table.index)


def uncertainty(frame: pd.DataFrame, resamples: int, permutations: int, seed: int) -> dict[str, float]:
    """Bootstrap intervals and permutation p-values of one classifier (UNCERTAINTY_COLUMNS)."""
    y, probabilities, _ = subject_matrix(frame)
    row = {}
    for name in INTERVAL_METRICS:
        row[f"{name}_ci_low"], row[f"{name}_ci_high"] = bootstrap_interval(name, y, probabilities, resamples, seed)
    for name in TESTED_METRICS:
        row[f"{name}_p_value"] = permutation_p_value(name, y, probabilities, permutations, seed)
    return row


def summary_table(
    predictions: Mapping[str, pd.DataFrame], resamples: int = 2000, permutations: int = 1000, seed: int = 2018
) -> pd.DataFrame:
    """The classification table: one row per classifier and scope.

    Columns:
      classifier   cnn, logistic, ...
      repeat       the cross-validation repeat ("0", "1", ...; fold seeds seed + repeat), or "all"
      fold         for a repeat: the test fold ("0", "1", ...) or "pooled" (all that repeat's
                   out-of-fold predictions); for "all": "mean" / "std" of the per-fold values over
                   every fold of every repeat (std: ddof 1; undefined values, e.g. the AUC of a
                   one-class fold, skipped), or "pooled": the per-repeat pooled values averaged
                   over the repeats -- the figure to quote, with its uncertainty:
      accuracy_ci_low/_high, balanced_accuracy_ci_low/_high, auc_ci_low/_high: 95 % percentile
                   bootstrap intervals over the subjects, stratified by label (`bootstrap_interval`), and
      balanced_accuracy_p_value, auc_p_value: label-permutation p-values against chance
                   (`permutation_p_value`); only on the ("all", "pooled") row
      n_subjects   subjects in the fold (pooled: all; mean / std: of the fold sizes)
      accuracy, balanced_accuracy, auc, sensitivity (recall of ILD), specificity (recall of
                   healthy): see classification_metrics; threshold 0.5 on P(ILD)
      tn, fp, fn, tp  confusion counts, ILD positive; per fold and per repeat pooled; empty otherwise
    """
    rows = []
    for classifier, frame in predictions.items():
        per_fold, per_repeat = [], []
        for repeat, part in frame.groupby("repeat", sort=True):
            for fold, fold_part in part.groupby("fold", sort=True):
                per_fold.append(
                    {
                        "classifier": classifier,
                        "repeat": str(int(repeat)),
                        "fold": str(int(fold)),
                        "n_subjects": len(fold_part),
                        **classification_metrics(fold_part["label"], fold_part["probability"], fold_part["predicted"]),
                    }
                )
            per_repeat.append(
                {
                    "classifier": classifier,
                    "repeat": str(int(repeat)),
                    "fold": "pooled",
                    "n_subjects": len(part),
                    **classification_metrics(part["label"], part["probability"], part["predicted"]),
                }
            )
        folds, repeats = pd.DataFrame(per_fold), pd.DataFrame(per_repeat)
        scope = {"classifier": classifier, "repeat": "all"}
        mean = {**scope, "fold": "mean", "n_subjects": folds["n_subjects"].mean(), **folds[METRICS].mean().to_dict()}
        std = {**scope, "fold": "std", "n_subjects": folds["n_subjects"].std(), **folds[METRICS].std().to_dict()}
        pooled = {
            **scope,
            "fold": "pooled",
            "n_subjects": repeats["n_subjects"].iloc[0],
            **repeats[METRICS].mean().to_dict(),
            **uncertainty(frame, resamples, permutations, seed),
        }
        rows += per_fold + per_repeat + [mean, std, pooled]
    table = pd.DataFrame(rows, columns=SUMMARY_COLUMNS + UNCERTAINTY_COLUMNS)
    return table.astype({c: "Int64" for c in COUNTS})


def read_predictions(paths: Sequence[str | Path]) -> pd.DataFrame:
    frames = [io.read_table(p) for p in paths]
    for path, frame in zip(paths, frames):
        missing = set(PREDICTION_COLUMNS) - set(frame.columns)
        if missing:
            raise io.CorruptFileError(path, f"lacks column(s) {', '.join(sorted(missing))}")
    frame = pd.concat(frames, ignore_index=True)[PREDICTION_COLUMNS]
    twice = frame.duplicated(["subject", "repeat"])
    if twice.any():
        repeated = sorted(set(frame.loc[twice, "subject"]))
        raise ValueError(f"subject(s) predicted in more than one fold of a repeat: {', '.join(repeated)}")
    return frame.astype({"subject": str, "label": str, "predicted": str, "repeat": int, "fold": int})


def roc_figure(predictions: Mapping[str, pd.DataFrame], table: pd.DataFrame, path: str | Path) -> None:
    """ROC curves of the out-of-fold probabilities averaged over the repeats, one per classifier,
    with the repeat-averaged AUC, its bootstrap interval and permutation p-value (from `table`)."""
    figure, axis = plt.subplots(figsize=(4.6, 4.2))
    quoted = table[(table["repeat"] == "all") & (table["fold"] == "pooled")].set_index("classifier")
    for classifier, frame in predictions.items():
        y, probabilities, _ = subject_matrix(frame)
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, probabilities.mean(axis=0))
        row = quoted.loc[classifier]
        interval = f"[{row['auc_ci_low']:.2f}, {row['auc_ci_high']:.2f}]"
        label = f"{classifier}: AUC {row['auc']:.2f} {interval}, p {row['auc_p_value']:.3g}"
        axis.plot(fpr, tpr, label=label)
    axis.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8, label="chance")
    repeats = next(iter(predictions.values()))["repeat"].nunique() if predictions else 0
    axis.set(
        xlabel="1 - specificity",
        ylabel="sensitivity (ILD)",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title=f"ILD classification, out-of-fold ({repeats} CV repeats)",
    )
    axis.legend(loc="lower right", fontsize=7)
    save_figure(figure, path)


def summarize(
    prediction_paths: Mapping[str, Sequence[str | Path]],
    table_out: str | Path,
    pooled_out: str | Path,
    roc_out: str | Path,
    resamples: int = 2000,
    permutations: int = 1000,
    seed: int = 2018,
) -> pd.DataFrame:
    """The summary job: the classification table, all predictions in one file, the ROC figure."""
    predictions = {c: read_predictions(paths) for c, paths in prediction_paths.items()}
    table = summary_table(predictions, resamples, permutations, seed)
    io.write_table(table, table_out)
    pooled = pd.concat([f.assign(classifier=c) for c, f in predictions.items()], ignore_index=True)
    io.write_table(pooled[["classifier", *PREDICTION_COLUMNS]], pooled_out)
    roc_figure(predictions, table, roc_out)
    for row in table[(table["repeat"] == "all") & (table["fold"] == "pooled")].itertuples():
        log.info(
            "%s: balanced accuracy %.3f [%.3f, %.3f] (p %.3g), AUC %.3f [%.3f, %.3f] (p %.3g)",
            row.classifier,
            row.balanced_accuracy,
            row.balanced_accuracy_ci_low,
            row.balanced_accuracy_ci_high,
            row.balanced_accuracy_p_value,
            row.auc,
            row.auc_ci_low,
            row.auc_ci_high,
            row.auc_p_value,
        )
    return table


SOURCE_COLUMNS = [
    "source",
    "classifier",
    "n_subjects",
    "repeats",
    "balanced_accuracy",
    "balanced_accuracy_ci_low",
    "balanced_accuracy_ci_high",
    "balanced_accuracy_p_value",
    "auc",
    "auc_ci_low",
    "auc_ci_high",
    "auc_p_value",
    "epe_mean",
    "epe_pairs",
]


def sources_table(tables: Mapping[str, pd.DataFrame], endpoint_errors: Mapping[str, tuple[float, int]]) -> pd.DataFrame:
    """Where the ILD signal is lost: per field source and classifier, the quoted (repeat-averaged,
    pooled) balanced accuracy and AUC with their intervals and p-values, beside the source's
    end-point error (mm, mean over the labelled subjects' inhale-exhale pairs; 0 for the ground
    truth itself, empty where no ground truth exists)."""
    rows = []
    for source, table in tables.items():
        quoted = table[(table["repeat"] == "all") & (table["fold"] == "pooled")]
        repeats = int((table["fold"] == "pooled").sum() / max(len(quoted), 1)) - 1
        epe, pairs = endpoint_errors.get(source, (np.nan, 0))
        for row in quoted.to_dict("records"):
            rows.append({"source": source, **row, "repeats": repeats, "epe_mean": epe, "epe_pairs": pairs})
    return pd.DataFrame(rows)[SOURCE_COLUMNS] if rows else pd.DataFrame(columns=SOURCE_COLUMNS)


def read_summary(path: str | Path) -> pd.DataFrame:
    return io.read_table(path).astype({"repeat": str, "fold": str})


def source_endpoint_error(
    pairs: pd.DataFrame, source: str, labelled: Sequence[str], synthetic: bool
) -> tuple[float, int]:
    """Mean end-point error (mm) of a source's inhale-exhale fields over the labelled subjects,
    and the number of pairs it is the mean of; the ground truth's is 0 (on the synthetic cohort)."""
    if source == "ground_truth":
        return (0.0, len(labelled)) if synthetic else (np.nan, 0)
    rows = pairs[
        (pairs["method"] == source) & (pairs["protocol"] == "inhale_exhale") & pairs["fixed_subject"].isin(labelled)
    ]
    known = rows["epe_mean"].dropna() if "epe_mean" in rows else pd.Series(dtype=float)
    return (float(known.mean()) if len(known) else np.nan), len(known)


def write_classification_tables(
    method: str,
    summary_paths: Mapping[str, str | Path],
    pairs_path: str | Path,
    labelled: Sequence[str],
    synthetic: bool,
    table_out: str | Path,
    sources_out: str | Path,
) -> pd.DataFrame:
    """results/tables/classification.tsv (the chosen source's summary, with a `source` column) and
    classification_sources.tsv (`sources_table`: every source beside its end-point error)."""
    tables = {source: read_summary(path) for source, path in summary_paths.items()}
    io.write_table(tables[method].assign(source=method)[["source", *tables[method].columns]], table_out)
    pairs = io.read_table(pairs_path)
    errors = {source: source_endpoint_error(pairs, source, labelled, synthetic) for source in tables}
    sources = sources_table(tables, errors)
    io.write_table(sources, sources_out)
    for row in sources.itertuples():
        log.info(
            "%s / %s: balanced accuracy %.3f [%.3f, %.3f], AUC %.3f [%.3f, %.3f]; end-point error %.2f mm",
            row.source,
            row.classifier,
            row.balanced_accuracy,
            row.balanced_accuracy_ci_low,
            row.balanced_accuracy_ci_high,
            row.auc,
            row.auc_ci_low,
            row.auc_ci_high,
            row.epe_mean,
        )
    return sources
