"""The scikit-learn classifiers of the regional statistics; every preprocessing step inside the pipeline."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.ensemble import RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..study import REGIONAL_CLASSIFIERS
from .features import feature_columns


def sklearn_classifier(name: str, options: Mapping[str, Any] | None, seed: int):
    """A fresh, unfitted scikit-learn pipeline; every preprocessing step lives inside it.

    logistic: median imputation, StandardScaler, L2 LogisticRegression (class_weight balanced
    unless ``class_weighted: false``); lda: imputation, StandardScaler and a linear discriminant
    with Ledoit-Wolf shrinkage of the covariance (strong on a few dozen subjects; priors equal
    when class-weighted); random_forest: imputation and a RandomForestClassifier. Other options
    go to the estimator (e.g. ``C``, ``n_estimators``); ``features`` is read by the fold job.
    """
    options = dict(options or {})
    options.pop("features", None)
    weight = "balanced" if options.pop("class_weighted", True) else None
    if name == "lda":
        priors = [0.5, 0.5] if weight else None
        estimator = LinearDiscriminantAnalysis(**{"solver": "lsqr", "shrinkage": "auto", "priors": priors, **options})
        return make_pipeline(SimpleImputer(strategy="median"), StandardScaler(), estimator)
    if name == "logistic":
        estimator = LogisticRegression(**{"C": 1.0, "max_iter": 5000, "class_weight": weight, **options})
        return make_pipeline(SimpleImputer(strategy="median"), StandardScaler(), estimator)
    if name == "random_forest":
        estimator = RandomForestClassifier(
            **{
                "n_estimators": 300,
                "min_samples_leaf": 2,
                "class_weight": weight,
                "random_state": int(seed),
                "n_jobs": 1,
                **options,
            }
        )
        return make_pipeline(SimpleImputer(strategy="median"), estimator)
    raise ValueError(f"unknown scikit-learn classifier {name!r}; expected one of {REGIONAL_CLASSIFIERS}")


def selected_columns(columns, options: Mapping[str, Any] | None) -> list[str]:
    """The feature-table columns a classifier reads (its ``features`` option, default all)."""
    return feature_columns(columns, (options or {}).get("features", "all"))


def fit_predict_sklearn(
    name: str,
    options: Mapping[str, Any] | None,
    seed: int,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
):
    """Fit on the training fold only; P(ILD) of the test fold and the fitted pipeline."""
    model = sklearn_classifier(name, options, seed)
    model.fit(x_train, y_train)
    positive = list(model.classes_).index(1)
    return model.predict_proba(x_test)[:, positive], model
