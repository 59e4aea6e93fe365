"""ILD classification: folds, metrics, no leakage, the CNN, and the workflow's fold jobs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics as skm

from lungreg import io, torch_io
from lungreg.classify.cnn import CnnSettings, FieldScaler, predict_cnn, prepare_cnn_input, train_cnn
from lungreg.classify.crossval import cross_validate_table, run_fold
from lungreg.classify.features import (
    REGIONS,
    build_features,
    center_fields,
    lung_regions,
    read_field,
    read_fields,
    read_mask,
    read_regional_features,
    regional_features,
)
from lungreg.classify.folds import make_folds, predictions_frame, split_fold
from lungreg.classify.summary import COUNTS, METRICS, SUMMARY_COLUMNS, classification_metrics, summarize
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


def test_cohorts_too_small_for_the_folds_are_reported_not_split():
    assert "at least 2 of each" in feasibility(labelled_cohort(0, 0, n_unlabelled=1), 5)
    assert "too few for 5 folds" in feasibility(labelled_cohort(3, 3), 5)
    assert feasibility(labelled_cohort(6, 6), 5) is None
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


def test_summary_table_per_fold_mean_std_and_pooled_rows(tmp_path):
    rng = np.random.default_rng(2)
    folds = make_folds(labelled_cohort(10, 15), 5, seed=0)
    probability = np.clip(rng.random(len(folds)) * 0.8 + 0.3 * (folds["label"] == "ILD"), 0, 1)
    predictions = predictions_frame(folds, 0, probability).assign(fold=folds["fold"].to_numpy())
    paths = []
    for k, part in predictions.groupby("fold"):
        paths.append(tmp_path / f"fold-{k}.tsv")
        io.write_table(part, paths[-1])
    table = summarize({"logistic": paths}, tmp_path / "table.tsv", tmp_path / "all.tsv", tmp_path / "roc.png")
    assert (tmp_path / "roc.png").stat().st_size > 0
    written = io.read_table(tmp_path / "table.tsv")
    assert list(written.columns) == SUMMARY_COLUMNS
    assert list(written["fold"].astype(str)) == ["0", "1", "2", "3", "4", "mean", "std", "pooled"]
    per_fold = table[table["fold"].str.isdigit()]
    for metric in METRICS:
        assert table.loc[table["fold"] == "mean", metric].item() == pytest.approx(per_fold[metric].mean())
        assert table.loc[table["fold"] == "std", metric].item() == pytest.approx(per_fold[metric].std(ddof=1))
    pooled = table[table["fold"] == "pooled"].iloc[0]
    y = (predictions["label"] == "ILD").to_numpy()
    assert pooled["auc"] == pytest.approx(skm.roc_auc_score(y, predictions["probability"]))
    for count in COUNTS:
        assert pooled[count] == per_fold[count].sum()
    assert pooled["tn"] + pooled["fp"] + pooled["fn"] + pooled["tp"] == len(folds)


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
        run_fold(
            "logistic",
            0,
            tmp_path / "folds.tsv",
            tmp_path / f"{variant}.tsv",
            {},
            0,
            tmp_path / f"{variant}_predictions.tsv",
            tmp_path / f"{variant}.pt",
        )
        models.append(torch_io.load_torch(tmp_path / f"{variant}.pt")["model"])
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
        run_fold(
            "cnn",
            0,
            tmp_path / "folds.tsv",
            tmp_path / f"{variant}_fields.pt",
            cnn,
            0,
            tmp_path / f"{variant}_cnn.tsv",
            tmp_path / f"{variant}_cnn.pt",
        )
        scales.append(torch_io.load_torch(tmp_path / f"{variant}_cnn.pt")["scaler"])
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


def ground_truth_features(effect_size: float, seed: int, root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Regional features of the exact exhale-fixed fields of a synthetic cohort."""
    settings = SyntheticCohortSettings.from_config(
        {"n_subjects": N_SUBJECTS, "n_ild": N_ILD, "shape": SHAPE, "effect_size": effect_size, "seed": seed}
    )
    subjects = subject_table(settings)
    rows = []
    for subject in subjects["subject"]:
        folder = root / f"effect-{effect_size}_seed-{seed}" / subject
        synthesize_subject(settings, subject, folder)
        field, grid = read_field(folder / "gt_displacement_fixed-exhale.nii.gz")
        mask = read_mask(folder / "exhale_mask.nii.gz", grid)
        rows.append({"subject": subject, **regional_features(field, mask, grid)})
    return subjects, pd.DataFrame(rows).set_index("subject")


def cross_validated_balanced_accuracy(subjects: pd.DataFrame, features: pd.DataFrame, fold_seed: int) -> float:
    folds = make_folds(subjects, 5, fold_seed)
    predictions = cross_validate_table(features, folds, "logistic", {}, seed=0)
    assert sorted(predictions["subject"]) == sorted(subjects["subject"])
    return classification_metrics(predictions["label"], predictions["probability"], predictions["predicted"])[
        "balanced_accuracy"
    ]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ground_truth_cohorts")


def test_no_effect_gives_chance_and_a_strong_effect_is_detected(synthetic_root):
    """Effect size 0: both groups come from one distribution, so cross-validated balanced
    accuracy must be at chance (0.5 +- 0.2 averaged over 3 cohorts x 3 fold seeds; a leak of
    the test labels would push it up).  Three times the default effect: >= 0.8."""
    null = [
        cross_validated_balanced_accuracy(*ground_truth_features(0.0, seed, synthetic_root), fold_seed)
        for seed in (1, 2, 3)
        for fold_seed in FOLD_SEEDS
    ]
    strong_cohort = ground_truth_features(3.0, 1, synthetic_root)
    strong = [cross_validated_balanced_accuracy(*strong_cohort, fold_seed) for fold_seed in FOLD_SEEDS]
    print(
        f"balanced accuracy, effect 0: {np.round(null, 3)} mean {np.mean(null):.3f}; "
        f"effect 3: {np.round(strong, 3)} mean {np.mean(strong):.3f}"
    )
    assert abs(np.mean(null) - 0.5) <= 0.2
    assert np.mean(strong) >= 0.8


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


def test_dry_run_has_one_job_per_classifier_and_fold(tmp_path):
    output = dry_run(
        tmp_path,
        "synthetic: {n_subjects: 12, n_ild: 6}\nclassify: {classifiers: [cnn, logistic, random_forest]}\n",
        "results/tables/classification.tsv",
    )
    jobs = re.findall(r"rule (classify_\w+):\n(?:    .*\n)*?    wildcards: classifier=(\w+), fold=(\d+)", output)
    assert sorted({(c, int(k)) for _, c, k in jobs}) == [
        (c, k) for c in ("cnn", "logistic", "random_forest") for k in range(5)
    ]
    assert len(jobs) == 15
    assert {rule for rule, c, _ in jobs if c == "cnn"} == {"classify_cnn"}
    for rule, count in (("classify_folds", 1), ("classify_features", 1), ("classify_summary", 1)):
        assert re.search(rf"^{rule}\s+{count}$", output, re.MULTILINE), rule


def test_dry_run_of_a_cohort_too_small_skips_classification(tmp_path):
    output = dry_run(tmp_path, "synthetic: {n_subjects: 1, n_ild: 0}\n")
    assert "ILD classification: skipped" in output
    assert "classify_" not in output
