"""ILD classification: folds, metrics, no leakage, the CNN, and the workflow's fold jobs."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics as skm

from lungreg import io, torch_io
from lungreg.classify.cnn import CnnSettings, FieldScaler, predict_cnn, prepare_cnn_input, train_cnn
from lungreg.classify.crossval import cross_validate_table, run_parts
from lungreg.classify.features import (
    REGIONS,
    build_features,
    center_fields,
    cnn_input,
    lung_regions,
    motion_features,
    read_field,
    read_fields,
    read_mask,
    read_regional_features,
    regional_features,
)
from lungreg.classify.folds import encode, make_folds, predictions_frame, split_fold
from lungreg.classify.summary import (
    COUNTS,
    METRICS,
    SUMMARY_COLUMNS,
    UNCERTAINTY_COLUMNS,
    bootstrap_interval,
    classification_metrics,
    fast_metric,
    permutation_p_value,
    repeated_metric,
    subject_matrix,
    summarize,
    summary_table,
)
from lungreg.geometry import Grid
from lungreg.study import feasibility
from lungreg.synthetic.render import synthesize_subject
from lungreg.synthetic.settings import SyntheticCohortSettings, subject_table

REPO = Path(__file__).resolve().parents[1]


def labelled_cohort(n_healthy: int, n_ild: int, n_unlabelled: int = 0) -> pd.DataFrame:
    labels = ["healthy"] * n_healthy + ["ILD"] * n_ild + [""] * n_unlabelled
    order = np.random.default_rng(0).permutation(len(labels))
    return pd.DataFrame(
        {"subject": [f"sub-{i:03d}" for i in range(1, len(labels) + 1)], "label": [labels[i] for i in order]}
    )


# --------------------------------------------------------------------------------- folds


def test_folds_are_stratified_cover_every_subject_once_and_follow_the_seed():
    subjects = labelled_cohort(12, 29, n_unlabelled=3)
    folds = make_folds(subjects, 5, seed=2018)
    labelled = subjects[subjects["label"] != ""]
    assert sorted(folds["subject"]) == sorted(labelled["subject"])  # each labelled subject once; unlabelled out
    assert set(folds["fold"]) == set(range(5))
    assert dict(zip(folds["subject"], folds["label"])) == dict(zip(labelled["subject"], labelled["label"]))
    counts = folds.groupby(["fold", "label"]).size().unstack()
    for label, total in (("healthy", 12), ("ILD", 29)):  # stratified: each fold within one of total / 5
        assert counts[label].sum() == total
        assert counts[label].max() - counts[label].min() <= 1
    pd.testing.assert_frame_equal(folds, make_folds(subjects.sample(frac=1, random_state=3), 5, seed=2018))
    assert not folds["fold"].equals(make_folds(subjects, 5, seed=2019)["fold"])
    repeated = make_folds(subjects, 5, seed=2018, repeats=3)  # repeat r: the split of seed + r
    for repeat in range(3):
        split = repeated[repeated["repeat"] == repeat].drop(columns="repeat").reset_index(drop=True)
        single = make_folds(subjects, 5, seed=2018 + repeat).drop(columns="repeat")
        pd.testing.assert_frame_equal(split, single)


def test_cohorts_too_small_for_the_folds_are_reported_not_split():
    assert "at least 2 of each" in feasibility(labelled_cohort(0, 0, n_unlabelled=1), 5)
    assert "too few for 5 folds" in feasibility(labelled_cohort(3, 3), 5)
    assert feasibility(labelled_cohort(6, 6), 5) is None
    # 2 + 2 in 2 folds trains on 2 subjects, one per class: LDA cannot fit it (a job failed so)
    assert "leave 2 to train on; at least 3" in feasibility(labelled_cohort(2, 2), 2)
    assert feasibility(labelled_cohort(3, 3), 2) is None and feasibility(labelled_cohort(2, 3), 3) is None
    with pytest.raises(ValueError, match="cannot cross-validate"):
        make_folds(labelled_cohort(1, 8), 5, seed=0)


# ------------------------------------------------------------------------------- metrics


def test_metrics_match_hand_computed_values_and_scikit_learn():
    labels = ["ILD", "ILD", "ILD", "healthy", "healthy"]
    probability = [0.9, 0.6, 0.3, 0.4, 0.7]
    predicted = ["ILD", "ILD", "healthy", "healthy", "ILD"]  # threshold 0.5
    got = classification_metrics(labels, probability, predicted)
    # tp = 2, fn = 1, tn = 1, fp = 1; AUC: 3 of the 6 (ILD, healthy) pairs ranked correctly
    assert (got["tn"], got["fp"], got["fn"], got["tp"]) == (1, 1, 1, 2)
    assert got["accuracy"] == pytest.approx(3 / 5)
    assert got["sensitivity"] == pytest.approx(2 / 3)
    assert got["specificity"] == pytest.approx(1 / 2)
    assert got["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert got["auc"] == pytest.approx(0.5)

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    p = np.clip(0.5 * y + 0.6 * rng.random(60) - 0.05, 0, 1)
    names = np.where(y == 1, "ILD", "healthy")
    got = classification_metrics(names, p, np.where(p >= 0.5, "ILD", "healthy"))
    yhat = (p >= 0.5).astype(int)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, yhat))
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, yhat))
    assert got["auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert got["sensitivity"] == pytest.approx(skm.recall_score(y, yhat))
    assert got["specificity"] == pytest.approx(skm.recall_score(1 - y, 1 - yhat))
    assert [got[k] for k in ("tn", "fp", "fn", "tp")] == skm.confusion_matrix(y, yhat).ravel().tolist()


def test_summary_table_per_fold_per_repeat_mean_std_and_quoted_rows(tmp_path):
    rng = np.random.default_rng(2)
    folds = make_folds(labelled_cohort(10, 15), 5, seed=0, repeats=2)
    probability = np.clip(rng.random(len(folds)) * 0.8 + 0.3 * (folds["label"] == "ILD"), 0, 1)
    predictions = pd.concat(
        [
            predictions_frame(part, 0, probability[part.index], int(repeat)).assign(fold=part["fold"].to_numpy())
            for repeat, part in folds.groupby("repeat")
        ],
        ignore_index=True,
    )
    paths = []
    for (repeat, k), part in predictions.groupby(["repeat", "fold"]):
        paths.append(tmp_path / f"repeat-{repeat}_fold-{k}.tsv")
        io.write_table(part, paths[-1])
    table = summarize(
        {"logistic": paths}, tmp_path / "table.tsv", tmp_path / "all.tsv", tmp_path / "roc.png", 500, 200, 0
    )
    assert (tmp_path / "roc.png").stat().st_size > 0
    written = io.read_table(tmp_path / "table.tsv")
    assert list(written.columns) == SUMMARY_COLUMNS + UNCERTAINTY_COLUMNS
    scopes = list(zip(written["repeat"].astype(str), written["fold"].astype(str)))
    per_repeat = [[(str(r), str(k)) for k in range(5)] + [(str(r), "pooled")] for r in range(2)]
    assert scopes == per_repeat[0][:5] + per_repeat[1][:5] + [("0", "pooled"), ("1", "pooled")] + [
        ("all", "mean"),
        ("all", "std"),
        ("all", "pooled"),
    ]
    per_fold = table[table["fold"].str.isdigit()]
    quoted = table[(table["repeat"] == "all") & (table["fold"] == "pooled")].iloc[0]
    for metric in METRICS:
        assert table.loc[table["fold"] == "mean", metric].item() == pytest.approx(per_fold[metric].mean())
        assert table.loc[table["fold"] == "std", metric].item() == pytest.approx(per_fold[metric].std(ddof=1))
    repeat_pooled = table[(table["fold"] == "pooled") & (table["repeat"] != "all")]
    for repeat, row in zip(("0", "1"), repeat_pooled.itertuples()):
        part = predictions[predictions["repeat"] == int(repeat)]
        y = (part["label"] == "ILD").to_numpy()
        assert row.auc == pytest.approx(skm.roc_auc_score(y, part["probability"]))
        assert row.tn + row.fp + row.fn + row.tp == len(part) == 25
        for count in COUNTS:
            assert getattr(row, count) == per_fold[per_fold["repeat"] == repeat][count].sum()
    for metric in ("accuracy", "balanced_accuracy", "auc"):  # the quoted figure: the repeats' mean, in its interval
        assert quoted[metric] == pytest.approx(repeat_pooled[metric].mean())
        assert quoted[f"{metric}_ci_low"] <= quoted[metric] <= quoted[f"{metric}_ci_high"]
    for metric in ("balanced_accuracy", "auc"):
        assert 1 / 201 <= quoted[f"{metric}_p_value"] <= 1


def test_fast_metrics_equal_scikit_learns_with_ties():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 41)
    p = np.round(np.clip(0.4 * y + 0.7 * rng.random(41), 0, 1), 1)  # rounded: many ties
    assert fast_metric("auc", y, p) == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
    assert fast_metric("accuracy", y, p) == pytest.approx(skm.accuracy_score(y, p >= 0.5))
    assert fast_metric("balanced_accuracy", y, p) == pytest.approx(skm.balanced_accuracy_score(y, p >= 0.5))
    assert np.isnan(fast_metric("auc", np.ones(5, int), p[:5]))


def test_bootstrap_interval_is_scipys_percentile_bootstrap_within_each_class():
    """With one repeat, the interval equals scipy.stats.bootstrap of scikit-learn's metric with the
    healthy and the ILD subjects as two samples resampled independently (`paired=False`: a stratified
    bootstrap), drawn from the same generator."""
    from scipy import stats

    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 41)
    p = np.clip(0.3 * y + 0.7 * rng.random(41), 0, 1)
    classes = (np.flatnonzero(y == 0), np.flatnonzero(y == 1))
    for name, metric in (
        ("auc", lambda i: skm.roc_auc_score(y[i], p[i])),
        ("balanced_accuracy", lambda i: skm.balanced_accuracy_score(y[i], p[i] >= 0.5)),
    ):
        ours = bootstrap_interval(name, y, p[None], resamples=1000, seed=7)
        reference = stats.bootstrap(
            classes,
            lambda healthy, ild: metric(np.concatenate([healthy, ild]).astype(int)),
            n_resamples=1000,
            vectorized=False,
            paired=False,
            method="percentile",
            rng=np.random.default_rng(7),
        ).confidence_interval
        assert ours == pytest.approx((reference.low, reference.high), abs=1e-12), name
    # Several repeats: the statistic of a resample is the repeats' mean.
    probabilities = np.stack([p, np.clip(p + 0.1 * rng.standard_normal(41), 0, 1)])
    low, high = bootstrap_interval("auc", y, probabilities, resamples=1000, seed=7)
    assert low < repeated_metric("auc", y, probabilities) < high


@pytest.mark.parametrize("n_healthy, n_ild", [(8, 8), (3, 13)])
def test_small_and_unbalanced_cohorts_get_every_interval_finite_and_in_range(n_healthy, n_ild):
    """The workflow's defaults (5 folds, 5 repeats, 2000 resamples) on 16 subjects: every quoted
    interval exists and lies in [0, 1] around its figure. An unstratified resample of 3 + 13 subjects
    lacks the healthy class once in 28 draws ((13/16)^16), so its percentile interval is NaN (below)."""
    from scipy import stats

    rng = np.random.default_rng(n_healthy)
    folds = make_folds(labelled_cohort(n_healthy, n_ild), 5, seed=0, repeats=5)
    probability = np.clip(0.5 * rng.random(len(folds)) + 0.3 * (folds["label"] == "ILD"), 0, 1)
    predictions = pd.concat(
        [
            predictions_frame(part, 0, probability[part.index], int(repeat)).assign(fold=part["fold"].to_numpy())
            for repeat, part in folds.groupby("repeat")
        ],
        ignore_index=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # e.g. "Mean of empty slice" from a one-class resample
        table = summary_table({"logistic": predictions}, resamples=2000, permutations=200, seed=2018)
    quoted = table[(table["repeat"] == "all") & (table["fold"] == "pooled")].iloc[0]
    for metric in ("accuracy", "balanced_accuracy", "auc"):
        low, high = quoted[f"{metric}_ci_low"], quoted[f"{metric}_ci_high"]
        assert np.isfinite([low, high]).all(), metric
        assert 0 <= low <= quoted[metric] <= high <= 1, metric
    if n_healthy == 3:
        y, probabilities, _ = subject_matrix(predictions)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            unstratified = stats.bootstrap(
                (np.arange(len(y)),),
                lambda i: repeated_metric("auc", y[np.asarray(i, int)], probabilities[:, np.asarray(i, int)]),
                n_resamples=2000,
                vectorized=False,
                method="percentile",
                rng=np.random.default_rng(2018),
            )
        assert np.isnan(unstratified.confidence_interval.low)


def test_permutation_p_value_is_small_for_a_real_signal_and_not_for_none():
    rng = np.random.default_rng(6)
    y = np.array([0] * 12 + [1] * 29)
    perfect = (y + 0.1 * rng.random(41))[None] / 1.2
    assert permutation_p_value("auc", y, perfect, 500, seed=0) == pytest.approx(1 / 501)
    noise = rng.random((3, 41))
    assert permutation_p_value("auc", y, noise, 500, seed=0) > 0.05


# ------------------------------------------------------------------------------ features


def test_features_job_writes_masked_fields_and_regional_statistics_without_labels(tmp_path):
    from lungreg.geometry import Grid, image_from_array

    grid = Grid((10, 8, 12), (2.0, 2.5, 3.0), (-10.0, 5.0, 0.0), tuple(np.eye(3).ravel()))
    mask = np.zeros(grid.shape, np.uint8)
    mask[2:10, 2:6, 2:8] = 1
    shift = np.array([1.5, -2.0, 4.0], np.float32)  # a pure translation (x, y, z mm)
    fields, masks = {}, {}
    for subject, scale in (("sub-b", 1.0), ("sub-a", 2.0)):
        field = np.broadcast_to(scale * shift, (*grid.shape, 3)).astype(np.float32)
        fields[subject], masks[subject] = str(tmp_path / f"{subject}_u.nii.gz"), str(tmp_path / f"{subject}_m.nii.gz")
        io.write_image(image_from_array(field, grid, is_vector=True), fields[subject])
        io.write_image(image_from_array(mask, grid), masks[subject])
    table = build_features(fields, masks, True, tmp_path / "fields.pt", tmp_path / "regional.tsv")
    data = read_fields(tmp_path / "fields.pt")
    assert data["subjects"] == ["sub-a", "sub-b"] and tuple(data["fields"].shape) == (2, 3, *grid.shape)
    assert torch.all(data["fields"][:, :, mask == 0] == 0)
    np.testing.assert_allclose(data["fields"][1, :, 3, 3, 3].numpy(), shift)
    written = read_regional_features(tmp_path / "regional.tsv")
    assert "label" not in written.columns and list(written.index) == ["sub-a", "sub-b"]
    for region in REGIONS:  # a translation: component means = the shift, no spread, J = 1
        np.testing.assert_allclose(written.loc["sub-b", [f"{region}_u{c}_mean" for c in "xyz"]], shift, rtol=1e-5)
        assert written.loc["sub-b", f"{region}_uz_std"] == pytest.approx(0, abs=1e-5)
        assert written.loc["sub-b", f"{region}_jacobian_mean"] == pytest.approx(1.0)
    assert len(table) == 2
    regions = lung_regions(mask, grid)
    thirds = regions["apical"].astype(int) + regions["middle"] + regions["basal"]
    halves = regions["central"].astype(int) + regions["peripheral"]
    assert np.array_equal(thirds, mask) and np.array_equal(halves, mask)
    assert regions["apical"][9][mask[9] == 1].all() and not regions["apical"][2].any()  # apex: high world z


# --------------------------------------------------------------- fitted on training only


def regional_table(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        rng.normal(size=(n, 4)) * [1, 10, 100, 0.1] + [0, 5, -50, 1],
        index=[f"sub-{i:03d}" for i in range(1, n + 1)],
        columns=list("abcd"),
    )


def test_scaling_is_fitted_on_the_training_fold_only(tmp_path):
    subjects = labelled_cohort(8, 12)
    folds = make_folds(subjects, 5, seed=1)
    io.write_table(folds, tmp_path / "folds.tsv")
    train, test = split_fold(folds, 0)
    features = regional_table(len(subjects), seed=0).loc[folds["subject"]]
    models = []
    for variant, shift in (("a", 0.0), ("b", 1e4)):  # the test fold's features wildly changed
        table = features.copy()
        table.loc[test["subject"]] += shift
        io.write_table(table.rename_axis("subject").reset_index(), tmp_path / f"{variant}.tsv")
        run_parts(
            "logistic",
            [(0, 0)],
            tmp_path / "folds.tsv",
            tmp_path / f"{variant}.tsv",
            {},
            0,
            tmp_path / f"{variant}_predictions.tsv",
            tmp_path / f"{variant}.pt",
        )
        models.append(torch_io.load_torch(tmp_path / f"{variant}.pt")[0]["model"])
    scaler_a, scaler_b = models[0].named_steps["standardscaler"], models[1].named_steps["standardscaler"]
    written = read_regional_features(tmp_path / "a.tsv")  # as the job read it (6 digits)
    np.testing.assert_allclose(scaler_a.mean_, written.loc[train["subject"]].mean().to_numpy())
    np.testing.assert_allclose(scaler_a.mean_, scaler_b.mean_)
    np.testing.assert_allclose(scaler_a.scale_, scaler_b.scale_)
    np.testing.assert_allclose(models[0][-1].coef_, models[1][-1].coef_)

    # The CNN's input scale likewise comes from the training fold's fields alone.
    fields = np.random.default_rng(3).normal(size=(len(folds), 3, 6, 8, 8)).astype(np.float32)
    masks = np.ones((len(folds), 6, 8, 8), bool)
    cnn = {"epochs": 1, "width": 2, "batch_size": 8, "pool": 1}
    scales = []
    for variant, factor in (("a", 1.0), ("b", 100.0)):
        changed = fields.copy()
        changed[folds["fold"].to_numpy() == 0] *= factor
        torch_io.save_torch(
            {
                "subjects": folds["subject"].tolist(),
                "fields": torch.from_numpy(changed),
                "masks": torch.from_numpy(masks),
            },
            tmp_path / f"{variant}_fields.pt",
        )
        run_parts(
            "cnn",
            [(0, 0)],
            tmp_path / "folds.tsv",
            tmp_path / f"{variant}_fields.pt",
            cnn,
            0,
            tmp_path / f"{variant}_cnn.tsv",
            tmp_path / f"{variant}_cnn.pt",
        )
        scales.append(torch_io.load_torch(tmp_path / f"{variant}_cnn.pt")[0]["scaler"])
    assert scales[0] == scales[1]
    prepared = center_fields(fields, masks)[folds["fold"].to_numpy() != 0]
    assert scales[0] == FieldScaler.fit(prepared).scale


# --------------------------------------------------------------------------- the CNN


def separable_fields(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uz grows towards the base in ILD, towards the apex in healthy subjects, plus noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    ramp = np.linspace(-1, 1, 8)[:, None, None]
    fields = rng.normal(scale=0.3, size=(n, 3, 8, 12, 12)).astype(np.float32)
    fields[:, 2] += np.where(y == 1, -1, 1)[:, None, None, None] * ramp * rng.uniform(2, 4, n)[:, None, None, None]
    return fields.astype(np.float32), np.ones((n, 8, 12, 12), bool), y


def test_cnn_learns_a_trivially_separable_case_and_is_reproducible():
    torch.set_num_threads(1)
    settings = CnnSettings(epochs=80, width=4, pool=1)  # the paper's optimiser: Adam, lr 1e-4
    x, masks, y = separable_fields(16, seed=0)
    x = prepare_cnn_input(x, masks, settings)
    checkpoint, history = train_cnn(x, y, settings, seed=5)
    assert history["train_loss"].iloc[-1] < 0.5 * history["train_loss"].iloc[0]
    x_new, masks_new, y_new = separable_fields(12, seed=1)
    probability = predict_cnn(checkpoint, prepare_cnn_input(x_new, masks_new, settings))
    assert np.mean((probability >= 0.5) == (y_new == 1)) == 1.0
    again, _ = train_cnn(x, y, settings, seed=5)
    for name, weights in checkpoint["state_dict"].items():
        assert torch.equal(weights, again["state_dict"][name]), name


def test_cnn_uses_the_papers_optimiser_schedule():
    settings = CnnSettings(epochs=6, width=2, batch_size=8, halve_every=2, pool=1)
    x, masks, y = separable_fields(8, seed=2)
    _, history = train_cnn(x, y, settings, seed=0)
    assert settings.learning_rate == 1e-4
    np.testing.assert_allclose(history["learning_rate"], [1e-4, 1e-4, 5e-5, 5e-5, 2.5e-5, 2.5e-5])


# ----------------------------------------------------------- honest evaluation (leakage)

N_SUBJECTS, N_ILD, SHAPE = 30, 15, [16, 32, 32]
FOLD_SEEDS = (0, 1, 2)


SOURCES = ("ground_truth", "registered")
NULL_CNN = {"epochs": 40, "width": 4}  # a shorter CNN: the question is leakage, not accuracy


def registered_field(folder: Path) -> np.ndarray:
    """The subject's exhale-fixed field by a registration of its images: the refinement of an
    untrained (identity) network, i.e. instance optimisation alone, which no label can reach."""
    from lungreg.network.model import ModelSettings, RegistrationNet
    from lungreg.network.refine import RefineSettings, RefineStage, refine_batch
    from lungreg.network.transform import grid_to_displacement

    def volume(name):
        image = io.read_intermediate_image(folder / name)
        return torch.from_numpy(np.clip(sitk_array(image) / 1300.0, 0, 1).astype(np.float32))[None, None], image

    (moving, image), (fixed, _), (mask, _) = (
        volume("inhale.nii.gz"),
        volume("exhale.nii.gz"),
        volume("exhale_mask.nii.gz"),
    )
    grid = Grid.of(image)
    stages = (RefineStage(steps=25, control_stride=4, loss_level=2, learning_rate=0.1, diffusion=0.03),)
    torch.manual_seed(0)
    net = RegistrationNet(ModelSettings(width=0.125)).eval()
    out, _ = refine_batch(net, moving, fixed, (mask > 0).float(), torch.tensor([grid.spacing]), RefineSettings(stages))
    return grid_to_displacement(out.grid[0].double().numpy(), grid, grid)


def sitk_array(image) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image).astype(np.float32)


def cohort_features(effect_size: float, seed: int, root: Path) -> tuple[pd.DataFrame, dict]:
    """A synthetic cohort's subjects and, per field source, its regional statistics and CNN input."""
    settings = SyntheticCohortSettings.from_config(
        {"n_subjects": N_SUBJECTS, "n_ild": N_ILD, "shape": SHAPE, "effect_size": effect_size, "seed": seed}
    )
    subjects = subject_table(settings)
    rows, fields, masks = {s: [] for s in SOURCES}, {s: [] for s in SOURCES}, []
    for subject in subjects["subject"]:
        folder = root / f"effect-{effect_size}_seed-{seed}" / subject
        if not (folder / "parameters.json").is_file():
            synthesize_subject(settings, subject, folder)
        truth, grid = read_field(folder / "gt_displacement_fixed-exhale.nii.gz")
        mask = read_mask(folder / "exhale_mask.nii.gz", grid)
        masks.append(mask)
        for source, field in (("ground_truth", truth), ("registered", registered_field(folder))):
            rows[source].append(
                {"subject": subject, **regional_features(field, mask, grid), **motion_features(field, mask, grid)}
            )
            fields[source].append(cnn_input(field, mask))
    return subjects, {
        s: (pd.DataFrame(rows[s]).set_index("subject"), np.stack(fields[s]), np.stack(masks)) for s in SOURCES
    }


def cross_validated_balanced_accuracy(
    subjects: pd.DataFrame, features: tuple, fold_seed: int, classifier: str = "logistic", repeats: int = 1
) -> float:
    """The repeat-averaged balanced accuracy of out-of-fold predictions, as the fold jobs make them."""
    table, fields, masks = features
    folds = make_folds(subjects, 5, fold_seed, repeats)
    if classifier == "cnn":
        settings = CnnSettings.from_config(NULL_CNN)
        prepared = prepare_cnn_input(fields, masks, settings)
        position = {s: i for i, s in enumerate(table.index)}
        frames = []
        for repeat, fold in sorted({(r, k) for r, k in zip(folds["repeat"], folds["fold"])}):
            train, test = split_fold(folds, fold, repeat)
            checkpoint, _ = train_cnn(
                prepared[[position[s] for s in train["subject"]]], encode(train["label"]), settings, 0
            )
            probability = predict_cnn(checkpoint, prepared[[position[s] for s in test["subject"]]])
            frames.append(predictions_frame(test, fold, probability, repeat))
        predictions = pd.concat(frames)
    else:
        predictions = cross_validate_table(table, folds, classifier, {"features": "all"}, seed=0)
    assert sorted(predictions["subject"]) == sorted(subjects["subject"].tolist() * repeats)
    return float(np.mean([
        classification_metrics(p["label"], p["probability"], p["predicted"])["balanced_accuracy"]
        for _, p in predictions.groupby("repeat")
    ]))  # fmt: skip


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ground_truth_cohorts")


@pytest.fixture(scope="module")
def null_cohorts(synthetic_root) -> list:
    return [cohort_features(0.0, seed, synthetic_root) for seed in (1, 2, 3)]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("classifier", ["logistic", "lda", "random_forest", "cnn"])
def test_no_effect_gives_chance_for_every_classifier_and_field_source(null_cohorts, source, classifier):
    """Effect size 0: both groups come from one distribution, so cross-validated balanced
    accuracy must be at chance (0.5 +- 0.2 averaged over 3 cohorts; a leak of the test labels
    into fitting, scaling, feature selection or the threshold would push it up), for the exact
    fields and for fields registered from the images, and for every classifier."""
    fold_seeds = (0,) if classifier == "cnn" else FOLD_SEEDS
    null = [
        cross_validated_balanced_accuracy(subjects, sources[source], fold_seed, classifier)
        for subjects, sources in null_cohorts
        for fold_seed in fold_seeds
    ]
    print(f"{source} / {classifier}, effect 0: balanced accuracy {np.round(null, 3)} mean {np.mean(null):.3f}")
    assert abs(np.mean(null) - 0.5) <= 0.2


def test_a_strong_effect_is_detected_from_the_exact_fields(synthetic_root):
    """Three times the default effect: >= 0.8 with every scikit-learn classifier."""
    subjects, sources = cohort_features(3.0, 1, synthetic_root)
    for classifier in ("logistic", "lda", "random_forest"):
        strong = [
            cross_validated_balanced_accuracy(subjects, sources["ground_truth"], fold_seed, classifier)
            for fold_seed in FOLD_SEEDS
        ]
        print(f"{classifier}, effect 3: {np.round(strong, 3)} mean {np.mean(strong):.3f}")
        assert np.mean(strong) >= 0.8, classifier


# ------------------------------------------------------------------------- the workflow


def dry_run(tmp_path: Path, config: str, *targets: str) -> str:
    """`snakemake -n` of the real Snakefile in a scratch working directory."""
    (tmp_path / "config").symlink_to(REPO / "config")  # the Snakefile's configfile is relative to it
    extra = tmp_path / "extra.yaml"
    extra.write_text(config)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            str(REPO / "Snakefile"),
            "-d",
            str(tmp_path),
            "-n",
            "--configfile",
            str(REPO / "tests/config/tiny.yaml"),
            str(extra),
            "--",
            *targets,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.parametrize("jobs", ["per_fold", "per_repeat"])
def test_dry_run_schedules_one_job_per_source_classifier_and_repeat_or_fold(tmp_path, jobs):
    output = dry_run(
        tmp_path,
        "synthetic: {n_subjects: 12, n_ild: 6}\n"
        f"classify: {{classifiers: [cnn, logistic, random_forest], repeats: 2, jobs: {jobs}, "
        "method: proposed, sources: [ground_truth]}\n",
        "results/tables/classification.tsv",
    )
    jobs_found = re.findall(
        r"rule (classify_\w+):\n(?:    .*\n)*?    wildcards: source=(\w+), classifier=(\w+), part=([\w-]+)", output
    )
    parts = [f"repeat-{r}" for r in range(2)]
    if jobs == "per_fold":
        parts = [f"repeat-{r}_fold-{k}" for r in range(2) for k in range(5)]
    expected = [
        (s, c, p) for s in ("ground_truth", "proposed") for c in ("cnn", "logistic", "random_forest") for p in parts
    ]
    assert sorted((s, c, p) for _, s, c, p in jobs_found) == sorted(expected)
    assert {rule for rule, _, c, _ in jobs_found if c == "cnn"} == {"classify_cnn"}
    for rule, count in (
        ("classify_folds", 1),
        ("classify_features", 2),
        ("classify_summary", 2),
        ("classification_tables", 1),
    ):
        assert re.search(rf"^{rule}\s+{count}$", output, re.MULTILINE), rule


def test_a_field_source_that_misses_labelled_subjects_stops_planning(tmp_path):
    (tmp_path / "config").symlink_to(REPO / "config")
    extra = tmp_path / "extra.yaml"
    extra.write_text("classify: {method: syn}\n")
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n",
         "--configfile", str(REPO / "tests/config/tiny.yaml"), str(extra)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "field source syn: syn registers no inhale-exhale pair of" in result.stdout + result.stderr
    assert "subjects: all" in result.stdout + result.stderr


def small_labelled_manifest(folder: Path, labels: list[str]) -> Path:
    """A manifest of small real files (random CT-like values, a box mask per phase): enough to plan."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    rows, rng = [], np.random.default_rng(0)
    for number, label in enumerate(labels, start=1):
        row = {"subject": f"s{number:02d}", "label": label}
        for phase in ("inhale", "exhale"):
            image = sitk.GetImageFromArray(rng.uniform(-1000, 300, (8, 10, 12)).astype(np.float32))
            mask = sitk.GetImageFromArray(np.pad(np.ones((4, 6, 8), np.uint8), 2))
            for name, item in (
                (f"{row['subject']}_{phase}.nii.gz", image),
                (f"{row['subject']}_{phase}_mask.mha", mask),
            ):
                item.SetSpacing((8.0, 8.0, 10.0))
                sitk.WriteImage(item, str(folder / name))
            row |= {phase: f"{row['subject']}_{phase}.nii.gz", f"{phase}_mask": f"{row['subject']}_{phase}_mask.mha"}
        rows.append(row)
    pd.DataFrame(rows).to_csv(folder / "subjects.tsv", sep="\t", index=False)
    return folder / "subjects.tsv"


def plan_manifest(tmp_path: Path, config: str = "") -> subprocess.CompletedProcess:
    """`snakemake -n` of a labelled manifest with the default configuration (config/config.yaml), plus `config`."""
    manifest = small_labelled_manifest(tmp_path / "data", ["healthy"] * 3 + ["ILD"] * 5)
    extra = tmp_path / "extra.yaml"
    extra.write_text(config or "{}\n")
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path / "run"), "-n"]
    command += ["--configfile", str(extra), "--config", f"subjects={manifest}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_a_labelled_manifest_plans_its_classification_with_the_default_configuration(tmp_path):
    """classify: method and sources auto: the refined network row and its single pass; the ground
    truth exists for the synthetic cohort only, so a manifest leaves it out with a note."""
    result = plan_manifest(tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "classify: sources auto: proposed_refined, proposed (ground_truth left out" in output
    sources = set(re.findall(r"wildcards: source=(\w+), classifier=", output))
    assert sources == {"proposed_refined", "proposed"}
    # without refinement, auto is the single pass (the schema's old default, proposed_refined, stopped here)
    result = plan_manifest(tmp_path / "single", "refine: {stages: []}\n")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "classify: sources auto: proposed (ground_truth" in output
    assert set(re.findall(r"wildcards: source=(\w+), classifier=", output)) == {"proposed"}


def test_a_field_source_a_manifest_cannot_have_stops_planning_naming_the_key_and_the_fix(tmp_path):
    result = plan_manifest(tmp_path, "classify: {sources: [proposed, ground_truth]}\n")
    assert result.returncode != 0
    assert (
        "classify: sources: field source ground_truth: ground_truth exists for the synthetic cohort only; "
        "remove it from classify.sources, or set classify.sources: auto"
    ) in result.stdout + result.stderr


def test_dry_run_of_a_cohort_too_small_skips_classification(tmp_path):
    output = dry_run(tmp_path, "synthetic: {n_subjects: 1, n_ild: 0}\n")
    assert "ILD classification: skipped" in output
    assert "classify_" not in output
