"""ILD classification (healthy vs ILD) from the residual motion of each patient's own registration.

What the classifiers see (Christodoulidis et al. 2018, "Clinical relevance"): for every labelled
subject, the residual deformation G - G_I of its inhale -> exhale registration by the trained
network, i.e. the displacement field (3 components x, y, z, mm, ITK convention) on the fixed
phase's common grid, optionally multiplied by the fixed lung mask.  The registration never sees
a label.

Two classifiers, cross-validated on exactly the same folds:

* ``cnn``: a shallow 3D CNN on the field (average-pooled by ``pool`` inside the network), binary
  cross-entropy -- class-weighted by default (``pos_weight`` = healthy / ILD count of the
  *training* fold, so the majority class does not win by default) -- Adam, learning rate 1e-4
  halved every 50 epochs (``StepLR``), a fixed number of epochs (no early stopping, so nothing is
  tuned on the test fold), seeded: on CPU two runs give the same weights.  By default each
  field is centred on its own lung mean (``center_fields``, per subject, label-free) and
  training mirrors subjects left-right at random (``flip``); both helped on the synthetic
  cohort (ground-truth fields, 36 subjects, 3x the default effect: balanced accuracy 0.72 ->
  0.86-0.89).
* ``logistic`` (and optionally ``random_forest``): scikit-learn on pooled regional statistics of
  the field (``regional_features``), standardised inside a ``Pipeline`` so that the scaler is
  fitted on the training fold only.

No information from a test fold reaches its model: the fold split is fixed before training
(``make_folds``: stratified, patient level, seeded), the CNN's input scaling (``FieldScaler``)
and the class weights are fitted on the training fold, and the decision threshold is a fixed 0.5.

Files (see rules/classify.smk): ``folds.tsv`` (subject, label, fold); ``fields.pt`` (the CNN
input of every labelled subject) and ``regional_features.tsv`` (subject + statistics, no
labels); per classifier and fold ``predictions.tsv`` (subject, label, fold, probability,
predicted) and ``classifier.pt``; the summary ``results/tables/classification.tsv``
(``summary_table``) and a ROC figure of the pooled out-of-fold predictions.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from . import io
from .geometry import Grid
from .metrics import jacobian_determinant

log = logging.getLogger(__name__)

NEGATIVE, POSITIVE = "healthy", "ILD"  # ILD is the positive class
LABELS = (NEGATIVE, POSITIVE)
SKLEARN_CLASSIFIERS = ("logistic", "random_forest")
CLASSIFIERS = ("cnn", *SKLEARN_CLASSIFIERS)
COMPONENTS = ("x", "y", "z")
REGIONS = ("apical", "middle", "basal", "central", "peripheral")
PREDICTION_COLUMNS = ["subject", "label", "fold", "probability", "predicted"]
SUMMARY_COLUMNS = ["classifier", "fold", "n_subjects", "accuracy", "balanced_accuracy", "auc",
                   "sensitivity", "specificity", "tn", "fp", "fn", "tp"]
METRICS = ["accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity"]
COUNTS = ["tn", "fp", "fn", "tp"]


# ------------------------------------------------------------------------------ subjects


def labelled_subjects(cohort: pd.DataFrame) -> pd.DataFrame:
    """subject, label of the subjects labelled healthy or ILD (unlabelled ones are left out)."""
    labels = cohort["label"].fillna("").astype(str)
    chosen = cohort.loc[labels.isin(LABELS), ["subject", "label"]]
    return chosen.sort_values("subject").reset_index(drop=True)


def feasibility(cohort: pd.DataFrame, n_folds: int) -> str | None:
    """Why `n_folds`-fold classification of `cohort` is impossible, or None when it is possible.

    Needs at least 2 subjects of each class (so that every training fold holds both classes)
    and at least `n_folds` subjects in the larger class (scikit-learn's stratified k-fold).
    """
    counts = labelled_subjects(cohort)["label"].value_counts()
    n_healthy, n_ild = int(counts.get(NEGATIVE, 0)), int(counts.get(POSITIVE, 0))
    if n_folds < 2:
        return f"{n_folds} folds; at least 2 are needed"
    if min(n_healthy, n_ild) < 2:
        return f"{n_healthy} healthy and {n_ild} ILD subjects labelled; at least 2 of each are needed"
    if max(n_healthy, n_ild) < n_folds:
        return (f"{n_healthy} healthy and {n_ild} ILD subjects are too few for {n_folds} folds "
                f"(the larger class needs at least {n_folds})")
    return None


def make_folds(cohort: pd.DataFrame, n_folds: int, seed: int) -> pd.DataFrame:
    """Stratified patient-level folds: subject, label, fold (0 .. n_folds-1), seeded.

    Each labelled subject is in exactly one test fold; the split depends only on the sorted
    subject ids, their labels, `n_folds` and `seed`.
    """
    from sklearn.model_selection import StratifiedKFold

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
    log.info("%d folds of %d subjects (%s); seed %d", n_folds, len(folds),
             ", ".join(f"{k}: {v}" for k, v in folds["label"].value_counts().items()), seed)
    return folds


def read_folds(path: str | Path) -> pd.DataFrame:
    folds = io.read_table(path)
    missing = {"subject", "label", "fold"} - set(folds.columns)
    if missing:
        raise io.CorruptFileError(path, f"lacks column(s) {', '.join(sorted(missing))}")
    return folds.astype({"subject": str, "label": str, "fold": int})


# ------------------------------------------------------------------------------ features


def read_field(path: str | Path) -> tuple[np.ndarray, Grid]:
    """A displacement field written by the workflow: (z, y, x, 3) float32 (x, y, z in mm), grid."""
    image = io.read_intermediate_image(path)
    if image.GetNumberOfComponentsPerPixel() != 3 or image.GetDimension() != 3:
        raise io.CorruptFileError(path, "not a 3D displacement field with 3 components")
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image).astype(np.float32), Grid.of(image)


def read_mask(path: str | Path, grid: Grid) -> np.ndarray:
    import SimpleITK as sitk

    image = io.read_intermediate_image(path)
    if not grid.matches(image):
        raise ValueError(f"{path}: the lung mask is not on the displacement field's grid")
    return sitk.GetArrayFromImage(image) > 0


def lung_regions(mask: np.ndarray, grid: Grid) -> dict[str, np.ndarray]:
    """Boolean masks of the lung's regions (each a subset of `mask`).

    apical / middle / basal: thirds of the lung's extent along world z (ITK/LPS: z points to the
    head); peripheral: voxels at most the median distance (mm) from the lung boundary; central:
    the rest.
    """
    from scipy import ndimage

    lung = np.asarray(mask, bool)
    if not lung.any():
        raise ValueError("empty lung mask: no regional statistics")
    index = np.argwhere(lung)  # (n, 3) in z, y, x order
    z = grid.index_to_world(index[:, ::-1])[:, 2]
    height = (z - z.min()) / max(float(z.max() - z.min()), 1e-6)
    depth = ndimage.distance_transform_edt(lung, sampling=grid.spacing[::-1])[lung]
    peripheral = depth <= np.median(depth)
    selections = {"apical": height > 2 / 3, "middle": (height >= 1 / 3) & (height <= 2 / 3),
                  "basal": height < 1 / 3, "central": ~peripheral, "peripheral": peripheral}
    regions = {}
    for name, chosen in selections.items():
        region = np.zeros_like(lung)
        region[tuple(index[chosen].T)] = True
        regions[name] = region
    return regions


def regional_features(displacement: np.ndarray, mask: np.ndarray, grid: Grid) -> dict[str, float]:
    """Pooled statistics of a field in each lung region (``lung_regions``).

    Per region: mean and standard deviation of each component (``{region}_u{c}_mean``,
    ``{region}_u{c}_std``, mm), the mean displacement magnitude (``{region}_norm_mean``), and the
    mean and standard deviation of the Jacobian determinant (``{region}_jacobian_mean``,
    ``{region}_jacobian_std``, from ``metrics.jacobian_determinant``).  Regions without a voxel
    give NaN.
    """
    displacement = np.asarray(displacement, dtype=float)
    determinant = jacobian_determinant(displacement, grid)
    norm = np.linalg.norm(displacement, axis=-1)
    features: dict[str, float] = {}
    for region, inside in lung_regions(mask, grid).items():
        u = displacement[inside]
        empty = not inside.any()
        for c, name in enumerate(COMPONENTS):
            features[f"{region}_u{name}_mean"] = np.nan if empty else float(u[:, c].mean())
            features[f"{region}_u{name}_std"] = np.nan if empty else float(u[:, c].std())
        features[f"{region}_norm_mean"] = np.nan if empty else float(norm[inside].mean())
        features[f"{region}_jacobian_mean"] = np.nan if empty else float(determinant[inside].mean())
        features[f"{region}_jacobian_std"] = np.nan if empty else float(determinant[inside].std())
    return features


def cnn_input(displacement: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """(3, z, y, x) float32 channels x, y, z of the field, zero outside `mask` when one is given."""
    channels = np.moveaxis(np.asarray(displacement, np.float32), -1, 0)
    return channels * np.asarray(mask, np.float32)[None] if mask is not None else channels.copy()


def center_fields(fields: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Subtract each subject's mean displacement inside its lung (per component).

    A per-subject transform that uses no label and no other subject: it removes the global
    translation (patient repositioning, mean breathing shift) and, for a masked field, turns
    the jump to zero at the lung boundary into the local deviation from the mean.  Voxels that
    were zero outside the mask (masked fields) stay zero.
    """
    fields = np.asarray(fields, np.float32)
    lung = np.asarray(masks, bool)[:, None]
    count = np.maximum(lung.sum(axis=(2, 3, 4), keepdims=True), 1)
    mean = np.where(lung, fields, 0).sum(axis=(2, 3, 4), keepdims=True) / count
    outside_zero = np.all(np.where(lung, 0, fields) == 0, axis=(1, 2, 3, 4), keepdims=True)
    centered = fields - mean
    return np.where(outside_zero & ~lung, 0, centered).astype(np.float32)


def build_features(field_paths: Mapping[str, str], mask_paths: Mapping[str, str], masked: bool,
                   fields_out: str | Path, table_out: str | Path) -> pd.DataFrame:
    """The features job: every subject's CNN input (``fields_out``) and regional statistics.

    `field_paths` / `mask_paths`: subject -> displacement field / fixed lung mask.  The masks
    define the regions of the statistics whatever `masked` says; `masked` only decides whether
    the CNN sees the field outside the lung.  ``fields_out`` holds subjects, fields (n, 3, z, y,
    x) float32 and masks (n, z, y, x) bool.  No label is read or written here.
    """
    import torch

    began = time.perf_counter()
    subjects = sorted(field_paths)
    rows, arrays, masks, first_grid = [], [], [], None
    for subject in subjects:
        displacement, grid = read_field(field_paths[subject])
        if first_grid is None:
            first_grid = grid
        elif grid.shape != first_grid.shape:
            raise ValueError(f"subject {subject}: field shape {grid.shape} differs from {first_grid.shape}; "
                             "the classifier needs one common grid")
        mask = read_mask(mask_paths[subject], grid)
        rows.append({"subject": subject, **regional_features(displacement, mask, grid)})
        arrays.append(cnn_input(displacement, mask if masked else None))
        masks.append(mask)
    if not subjects:
        raise ValueError("no subject to gather features of")
    io.save_torch({"subjects": subjects, "fields": torch.from_numpy(np.stack(arrays)),
                   "masks": torch.from_numpy(np.stack(masks)), "masked": bool(masked), "components": COMPONENTS,
                   "spacing": first_grid.spacing}, fields_out)
    table = pd.DataFrame(rows)
    io.write_table(table, table_out)
    log.info("features of %d subjects (%s, masked=%s) in %.1f s", len(subjects), "x".join(map(str, first_grid.shape)),
             masked, time.perf_counter() - began)
    return table


def read_regional_features(path: str | Path) -> pd.DataFrame:
    table = io.read_table(path)
    if "subject" not in table.columns:
        raise io.CorruptFileError(path, "lacks the subject column")
    return table.astype({"subject": str}).set_index("subject")


def read_fields(path: str | Path) -> dict:
    data = io.load_torch(path)
    if not isinstance(data, dict) or not {"subjects", "fields", "masks"} <= set(data):
        raise io.CorruptFileError(path, "not a fields file of the classify_features rule")
    return data


# ------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class CnnSettings:
    """The shallow CNN and its training (config ``classify: cnn:``)."""

    epochs: int = 150
    width: int = 8  # channels of the first convolution; 2 x width after it
    batch_size: int = 4
    learning_rate: float = 1e-4
    halve_every: int = 50  # StepLR: learning rate x 0.5 every this many epochs
    pool: int = 2  # average-pool the field by this inside the network (1: full resolution)
    spatial: int = 2  # the last features are averaged onto spatial^3 cells (1: global average)
    dropout: float = 0.2
    weight_decay: float = 0.0
    class_weighted: bool = True  # BCE pos_weight = n_healthy / n_ILD of the training fold
    center: bool = True  # subtract each subject's mean displacement in the lung (center_fields)
    flip: bool = True  # augmentation: random left-right mirror (x axis reversed, x component negated)
    device: str = "auto"

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> "CnnSettings":
        return _from_section(cls, section, "classify.cnn")


def _from_section(cls, section: Mapping[str, Any] | None, where: str):
    section = dict(section or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**section)


# ------------------------------------------------------------------------ scikit-learn


def sklearn_classifier(name: str, options: Mapping[str, Any] | None, seed: int):
    """A fresh, unfitted scikit-learn pipeline; every preprocessing step lives inside it.

    logistic: median imputation, StandardScaler, L2 LogisticRegression (class_weight balanced
    unless ``class_weighted: false``); random_forest: imputation and a RandomForestClassifier.
    Other options go to the estimator (e.g. ``C``, ``n_estimators``).
    """
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    options = dict(options or {})
    weight = "balanced" if options.pop("class_weighted", True) else None
    if name == "logistic":
        estimator = LogisticRegression(**{"C": 1.0, "max_iter": 5000, "class_weight": weight, **options})
        return make_pipeline(SimpleImputer(strategy="median"), StandardScaler(), estimator)
    if name == "random_forest":
        estimator = RandomForestClassifier(**{"n_estimators": 300, "min_samples_leaf": 2, "class_weight": weight,
                                              "random_state": int(seed), "n_jobs": 1, **options})
        return make_pipeline(SimpleImputer(strategy="median"), estimator)
    raise ValueError(f"unknown scikit-learn classifier {name!r}; expected one of {SKLEARN_CLASSIFIERS}")


def fit_predict_sklearn(name: str, options: Mapping[str, Any] | None, seed: int, x_train: np.ndarray,
                        y_train: np.ndarray, x_test: np.ndarray):
    """Fit on the training fold only; P(ILD) of the test fold and the fitted pipeline."""
    model = sklearn_classifier(name, options, seed)
    model.fit(x_train, y_train)
    positive = list(model.classes_).index(1)
    return model.predict_proba(x_test)[:, positive], model


# --------------------------------------------------------------------------------- CNN


def _torch_modules():
    import torch
    from torch import nn

    class ShallowCNN(nn.Module):
        """Average-pool by ``pool``, three 3x3x3 convolutions (LeakyReLU, max-pooling after the
        first two), adaptive average pooling onto ``spatial``^3 cells (2: keeps coarse position,
        apex vs base, left vs right), dropout and one linear unit giving the logit of P(ILD)."""

        def __init__(self, settings: CnnSettings, in_channels: int = 3):
            super().__init__()
            w = int(settings.width)
            pool = int(settings.pool)
            self.features = nn.Sequential(
                nn.AvgPool3d(pool, ceil_mode=True) if pool > 1 else nn.Identity(),
                nn.Conv3d(in_channels, w, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool3d(2, ceil_mode=True),
                nn.Conv3d(w, 2 * w, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool3d(2, ceil_mode=True),
                nn.Conv3d(2 * w, 2 * w, 3, padding=1), nn.LeakyReLU(0.1),
                nn.AdaptiveAvgPool3d(int(settings.spatial)),
            )
            cells = int(settings.spatial) ** 3
            self.head = nn.Sequential(nn.Flatten(), nn.Dropout(settings.dropout), nn.Linear(2 * w * cells, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x))[:, 0]

    return ShallowCNN


def shallow_cnn(settings: CnnSettings, in_channels: int = 3):
    return _torch_modules()(settings, in_channels)


@dataclass(frozen=True)
class FieldScaler:
    """Per-channel scale (root mean square over the training fields); no shift, so a masked
    field stays zero outside the lung.  Fitted on the training fold only."""

    scale: tuple[float, ...]

    @classmethod
    def fit(cls, fields: np.ndarray) -> "FieldScaler":
        fields = np.asarray(fields, np.float64)
        rms = np.sqrt(np.mean(fields**2, axis=(0, *range(2, fields.ndim))))
        return cls(tuple(float(s) if s > 0 else 1.0 for s in rms))

    def transform(self, fields: np.ndarray) -> np.ndarray:
        scale = np.asarray(self.scale, np.float32).reshape(1, -1, *([1] * (np.ndim(fields) - 2)))
        return (np.asarray(fields, np.float32) / scale).astype(np.float32)


def prepare_cnn_input(fields: np.ndarray, masks: np.ndarray, settings: CnnSettings) -> np.ndarray:
    """The per-subject input transform of the CNN (no label, no other subject): centring."""
    return center_fields(fields, masks) if settings.center else np.asarray(fields, np.float32)


def train_cnn(x_train: np.ndarray, y_train: np.ndarray, settings: CnnSettings, seed: int,
              device: str | None = None) -> tuple[dict, pd.DataFrame]:
    """Train the shallow CNN on the training fold; returns (checkpoint, history).

    x_train: (n, 3, z, y, x) fields (after ``prepare_cnn_input``); y_train: 1 = ILD, 0 = healthy.
    The checkpoint holds the state dict, the settings and the fitted FieldScaler.  Seeded: on
    CPU with the same threads two runs give identical weights.
    """
    import torch

    from .train import choose_device

    y_train = np.asarray(y_train, np.float32)
    if len(np.unique(y_train)) < 2:
        raise ValueError("the training fold holds a single class")
    target = choose_device(device or settings.device)
    scaler = FieldScaler.fit(x_train)
    x = torch.from_numpy(scaler.transform(x_train)).to(target)
    y = torch.from_numpy(y_train).to(target)
    torch.manual_seed(int(seed))
    model = shallow_cnn(settings, x.shape[1]).to(target)
    n_pos, n_neg = float(y_train.sum()), float(len(y_train) - y_train.sum())
    pos_weight = torch.tensor(n_neg / n_pos if settings.class_weighted else 1.0, device=target)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimiser, step_size=settings.halve_every, gamma=0.5)
    order = torch.Generator().manual_seed(int(seed))
    history = []
    began = time.perf_counter()
    for epoch in range(1, settings.epochs + 1):
        model.train()
        permutation = torch.randperm(len(y), generator=order).to(target)
        total = 0.0
        for start in range(0, len(y), settings.batch_size):
            batch = permutation[start : start + settings.batch_size]
            inputs = x[batch]
            if settings.flip:
                mirrored = (torch.rand(len(batch), generator=order) < 0.5).to(target)
                sign = torch.tensor([-1.0, 1.0, 1.0], device=target).view(1, 3, 1, 1, 1)
                flipped = torch.flip(inputs, dims=(-1,)) * sign
                inputs = torch.where(mirrored.view(-1, 1, 1, 1, 1), flipped, inputs)
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), y[batch])
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(batch)
        history.append({"epoch": epoch, "train_loss": total / len(y), "learning_rate": optimiser.param_groups[0]["lr"]})
        scheduler.step()
    log.info("CNN trained on %d subjects (%d ILD) for %d epochs on %s in %.1f s; final loss %.4f",
             len(y), int(n_pos), settings.epochs, target, time.perf_counter() - began, history[-1]["train_loss"])
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    checkpoint = {"state_dict": state, "settings": dataclasses.asdict(settings), "scaler": scaler.scale,
                  "in_channels": int(x.shape[1]), "pos_weight": float(pos_weight)}
    return checkpoint, pd.DataFrame(history)


def predict_cnn(checkpoint: dict, x: np.ndarray, device: str | None = None) -> np.ndarray:
    """P(ILD) of each field (n, 3, z, y, x) with a checkpoint of `train_cnn`."""
    import torch

    from .train import choose_device

    settings = CnnSettings(**checkpoint["settings"])
    target = choose_device(device or settings.device)
    model = shallow_cnn(settings, checkpoint["in_channels"]).to(target)
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    inputs = torch.from_numpy(FieldScaler(tuple(checkpoint["scaler"])).transform(x))
    with torch.no_grad():
        out = [torch.sigmoid(model(inputs[i : i + 8].to(target))).cpu() for i in range(0, len(inputs), 8)]
    return torch.cat(out).numpy().astype(float) if out else np.zeros(0)


# ------------------------------------------------------------------------------- folds


def encode(labels: Sequence[str]) -> np.ndarray:
    """1 for ILD, 0 for healthy."""
    labels = np.asarray(labels, dtype=str)
    unknown = sorted(set(labels) - set(LABELS))
    if unknown:
        raise ValueError(f"unknown label(s) {unknown}; expected {LABELS}")
    return (labels == POSITIVE).astype(int)


def predictions_frame(subjects: pd.DataFrame, fold: int, probability: np.ndarray) -> pd.DataFrame:
    probability = np.asarray(probability, float)
    return pd.DataFrame({"subject": subjects["subject"].to_numpy(), "label": subjects["label"].to_numpy(),
                         "fold": int(fold), "probability": probability,
                         "predicted": np.where(probability >= 0.5, POSITIVE, NEGATIVE)})[PREDICTION_COLUMNS]


def split_fold(folds: pd.DataFrame, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    if fold not in set(folds["fold"]):
        raise ValueError(f"fold {fold} is not in the fold table (folds {sorted(set(folds['fold']))})")
    return folds[folds["fold"] != fold].reset_index(drop=True), folds[folds["fold"] == fold].reset_index(drop=True)


def cross_validate_table(features: pd.DataFrame, folds: pd.DataFrame, classifier: str,
                         options: Mapping[str, Any] | None = None, seed: int = 0) -> pd.DataFrame:
    """Out-of-fold predictions of a scikit-learn classifier on a regional feature table
    (indexed by subject), one fit per fold, exactly as the fold jobs do it."""
    frames = []
    for fold in sorted(set(folds["fold"])):
        train, test = split_fold(folds, fold)
        probability, _ = fit_predict_sklearn(classifier, options, seed, features.loc[train["subject"]].to_numpy(),
                                             encode(train["label"]), features.loc[test["subject"]].to_numpy())
        frames.append(predictions_frame(test, fold, probability))
    return pd.concat(frames, ignore_index=True)


def run_fold(classifier: str, fold: int, folds_path: str | Path, features_path: str | Path,
             options: Mapping[str, Any] | None, seed: int, predictions_out: str | Path,
             model_out: str | Path) -> pd.DataFrame:
    """One fold job: train `classifier` on the other folds, predict this fold, write both files.

    `features_path`: the fields file (cnn) or the regional feature table (scikit-learn).
    Labels come from the fold table only.
    """
    began = time.perf_counter()
    folds = read_folds(folds_path)
    train, test = split_fold(folds, int(fold))
    fold_seed = int(seed) + int(fold)
    if classifier == "cnn":
        data = read_fields(features_path)
        position = {s: i for i, s in enumerate(data["subjects"])}
        _check_present(folds["subject"], position, features_path)
        settings = CnnSettings.from_config(options)
        fields = prepare_cnn_input(data["fields"].numpy(), data["masks"].numpy(), settings)
        checkpoint, history = train_cnn(fields[[position[s] for s in train["subject"]]], encode(train["label"]),
                                        settings, fold_seed)
        probability = predict_cnn(checkpoint, fields[[position[s] for s in test["subject"]]])
        artefact = {**checkpoint, "history": history.to_dict("list")}
    elif classifier in SKLEARN_CLASSIFIERS:
        table = read_regional_features(features_path)
        _check_present(folds["subject"], set(table.index), features_path)
        probability, model = fit_predict_sklearn(classifier, options, fold_seed,
                                                 table.loc[train["subject"]].to_numpy(), encode(train["label"]),
                                                 table.loc[test["subject"]].to_numpy())
        artefact = {"model": model, "features": list(table.columns)}
    else:
        raise ValueError(f"unknown classifier {classifier!r}; expected one of {CLASSIFIERS}")
    artefact.update(classifier=classifier, fold=int(fold), seed=fold_seed,
                    train_subjects=train["subject"].tolist(), test_subjects=test["subject"].tolist())
    io.save_torch(artefact, model_out)
    predictions = predictions_frame(test, int(fold), probability)
    io.write_table(predictions, predictions_out)
    log.info("%s fold %d: trained on %d, tested on %d subjects, accuracy %.3f, in %.1f s", classifier, fold,
             len(train), len(test), float((predictions["predicted"] == predictions["label"]).mean()),
             time.perf_counter() - began)
    return predictions


def _check_present(subjects: pd.Series, available, path) -> None:
    missing = sorted(set(subjects) - set(available))
    if missing:
        raise ValueError(f"{path}: no features for subject(s) {', '.join(missing)}")


# ----------------------------------------------------------------------------- metrics


def classification_metrics(labels: Sequence[str], probability: Sequence[float],
                           predicted: Sequence[str]) -> dict[str, float]:
    """accuracy, balanced_accuracy, auc, sensitivity, specificity, tn, fp, fn, tp (ILD positive).

    All from scikit-learn: accuracy_score, balanced_accuracy_score, roc_auc_score (NaN when only
    one class is present), recall_score of ILD (sensitivity) and of healthy (specificity; NaN
    when the class is absent), confusion_matrix with labels (healthy, ILD).  With one class
    present, balanced accuracy is scikit-learn's: the recall of that class.
    """
    from sklearn import metrics

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
            "tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp),
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
            row = {"classifier": classifier, "fold": str(int(fold)), "n_subjects": len(part),
                   **classification_metrics(part["label"], part["probability"], part["predicted"])}
            per_fold.append(row)
        folds = pd.DataFrame(per_fold)
        mean = {"classifier": classifier, "fold": "mean", "n_subjects": folds["n_subjects"].mean(),
                **folds[METRICS].mean().to_dict()}
        std = {"classifier": classifier, "fold": "std", "n_subjects": folds["n_subjects"].std(),
               **folds[METRICS].std().to_dict()}
        pooled = {"classifier": classifier, "fold": "pooled", "n_subjects": len(frame),
                  **classification_metrics(frame["label"], frame["probability"], frame["predicted"])}
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
    from sklearn.metrics import roc_auc_score, roc_curve

    from .plots import plt, save_figure

    figure, axis = plt.subplots(figsize=(4.2, 4.0))
    for classifier, frame in predictions.items():
        y = encode(frame["label"])
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, frame["probability"])
        axis.plot(fpr, tpr, label=f"{classifier} (AUC {roc_auc_score(y, frame['probability']):.2f})")
    axis.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8, label="chance")
    axis.set(xlabel="1 - specificity", ylabel="sensitivity (ILD)", xlim=(0, 1), ylim=(0, 1.02),
             title="ILD classification, out-of-fold")
    axis.legend(loc="lower right", fontsize=8)
    save_figure(figure, path)


def summarize(prediction_paths: Mapping[str, Sequence[str | Path]], table_out: str | Path,
              pooled_out: str | Path, roc_out: str | Path) -> pd.DataFrame:
    """The summary job: the classification table, all predictions in one file, the ROC figure."""
    predictions = {c: read_predictions(paths) for c, paths in prediction_paths.items()}
    table = summary_table(predictions)
    io.write_table(table, table_out)
    pooled = pd.concat([f.assign(classifier=c) for c, f in predictions.items()], ignore_index=True)
    io.write_table(pooled[["classifier", *PREDICTION_COLUMNS]], pooled_out)
    roc_figure(predictions, roc_out)
    for row in table[table["fold"].isin(["mean", "pooled"])].itertuples():
        log.info("%s %s: accuracy %.3f, balanced accuracy %.3f, AUC %.3f", row.classifier, row.fold,
                 row.accuracy, row.balanced_accuracy, row.auc)
    return table
