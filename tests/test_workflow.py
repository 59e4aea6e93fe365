"""The workflow end to end: the tiny synthetic study, the paper configuration's plan, bad input,
and the real CT pair through a manifest."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from workflow_runner import REPO, copy_workflow, job_counts, snakemake

pytestmark = pytest.mark.workflow

TINY_SUBJECTS, TINY_VALIDATION = 10, 3


def table(workdir, name) -> pd.DataFrame:
    return pd.read_csv(workdir / "results" / "tables" / f"{name}.tsv", sep="\t")


def test_paper_configuration_plans_paper_scale_training(tmp_path):
    workdir = copy_workflow(tmp_path)
    result = snakemake(workdir, "-n", "--configfile", str(REPO / "config/paper.yaml"), configfiles=())
    counts = job_counts(result.stdout)
    assert counts["train"] == 2  # proposed and proposed w/o affine
    assert counts["synthesize_subject"] == 41 and counts["preprocess"] == 41
    # one CNN job per repeat (5) for each field source: the refined method, the single pass, the truth
    assert counts["classify_cnn"] == 5 * 3


def test_tiny_study_produces_the_cohort_and_common_grid(tiny_study):
    cohort = pd.read_csv(tiny_study / "results/cohort/subjects.tsv", sep="\t")
    assert len(cohort) == TINY_SUBJECTS
    assert (cohort["split"] == "validation").sum() == TINY_VALIDATION
    assert set(cohort["label"]) == {"ILD", "healthy"}
    shapes = {
        sitk.ReadImage(str(tiny_study / f"results/preprocessed/{s}/{p}_image.nii.gz")).GetSize()
        for s in cohort["subject"]
        for p in ("inhale", "exhale")
    }
    assert shapes == {(24, 24, 12)}


def test_tiny_study_produces_every_table_with_the_expected_rows(tiny_study):
    pairs = table(tiny_study, "pairs")
    counts = pairs.groupby(["method", "protocol"]).size().to_dict()
    assert counts == {
        ("unregistered", "inhale_exhale"): TINY_SUBJECTS,
        ("unregistered", "all_combinations"): TINY_VALIDATION**2,
        ("proposed", "inhale_exhale"): TINY_SUBJECTS,
        ("proposed", "all_combinations"): TINY_VALIDATION**2,
        ("proposed_refined", "inhale_exhale"): TINY_SUBJECTS,
        ("syn", "inhale_exhale"): TINY_VALIDATION,
        ("sitk_bspline", "inhale_exhale"): TINY_VALIDATION,
    }
    table1 = table(tiny_study, "table1_dice")
    assert list(table1["method"]) == ["unregistered", "proposed", "proposed_refined", "syn", "sitk_bspline"]
    assert (table1["inhale_exhale_pairs"] == TINY_VALIDATION).all()
    assert table1.set_index("method").loc["proposed", "all_combinations_pairs"] == TINY_VALIDATION**2
    assert table1["inhale_exhale_dice_mean"].between(1, 100).all()
    table2 = table(tiny_study, "table2_landmarks")
    assert list(table2["method"]) == list(table1["method"])
    assert (table2["landmarks_scored"] == 11 * TINY_VALIDATION).all()
    # every intra-patient pair has 11 landmark rows: the own pairs (unregistered, proposed and its
    # refined row on every subject, the two baselines on the validation subjects), and the
    # diagonal of all_combinations (unregistered, proposed)
    intra = 3 * TINY_SUBJECTS + 2 * TINY_VALIDATION + 2 * TINY_VALIDATION
    assert len(table(tiny_study, "landmarks")) == 11 * intra
    jacobian = table(tiny_study, "jacobian")
    assert len(jacobian) == 7 and (jacobian["pairs_with_folding"] == 0).all()
    assert len(table(tiny_study, "endpoint_error")) == 5
    classification = table(tiny_study, "classification")
    assert set(classification["classifier"]) == {"cnn", "logistic"}
    sources = table(tiny_study, "classification_sources")
    assert set(sources["source"]) == {"proposed_refined", "ground_truth"}


def test_classical_baselines_beat_unregistered_on_the_tiny_study(tiny_study):
    table1 = table(tiny_study, "table1_dice").set_index("method")
    for method in ("syn", "sitk_bspline"):
        assert table1.loc[method, "inhale_exhale_dice_mean"] > table1.loc["unregistered", "inhale_exhale_dice_mean"]


def test_intra_patient_pairs_have_their_files_and_inter_patient_pairs_do_not(tiny_study):
    folders = sorted((tiny_study / "results/registration/proposed/inhale_exhale").glob("chunk-*/[!.]*"))
    assert len(folders) == TINY_SUBJECTS
    for folder in folders:
        assert {p.name for p in folder.iterdir()} == {
            "displacement.nii.gz",
            "warped.nii.gz",
            "warped_mask.nii.gz",
            "affine.tfm",
        }
    saved = (tiny_study / "results/registration/proposed/all_combinations").glob("chunk-*/[!.]*")
    for folder in saved:  # only the diagonal (a patient's own pair) of all_combinations
        moving, fixed = folder.name.split("__")
        assert moving.rsplit("_", 1)[0] == fixed.rsplit("_", 1)[0]


def test_identity_rows_match_between_unregistered_and_the_stored_field_grid(tiny_study):
    """The exported field sits on the fixed image's grid, in mm."""
    folder = next((tiny_study / "results/registration/proposed/inhale_exhale").glob("chunk-*/[!.]*"))
    fixed_subject = folder.name.split("__")[1].rsplit("_", 1)[0]
    field = sitk.ReadImage(str(folder / "displacement.nii.gz"))
    fixed = sitk.ReadImage(str(tiny_study / f"results/preprocessed/{fixed_subject}/exhale_image.nii.gz"))
    assert field.GetNumberOfComponentsPerPixel() == 3
    assert field.GetSize() == fixed.GetSize() and np.allclose(field.GetOrigin(), fixed.GetOrigin())
    assert np.allclose(field.GetSpacing(), fixed.GetSpacing()) and np.allclose(
        field.GetDirection(), fixed.GetDirection()
    )


def test_bad_manifest_stops_before_anything_is_written(tmp_path):
    workdir = copy_workflow(tmp_path / "study")
    (tmp_path / "data").mkdir()
    manifest = tmp_path / "data" / "subjects.tsv"
    manifest.write_text(
        "subject\tlabel\tinhale\texhale\tinhale_mask\texhale_mask\n"
        "p01\tILD\tmissing_in.nii.gz\tmissing_ex.nii.gz\tm1.nii.gz\tm2.nii.gz\n"
    )
    result = snakemake(workdir, "--config", f"subjects={manifest}", check=False)
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert "subject p01" in message and "missing_in.nii.gz" in message and "file not found" in message
    assert not (workdir / "results").exists()


@pytest.fixture
def real_ct_study(tmp_path, elastix_lung_pair):
    """The real CT pair as a one-subject, unlabelled cohort."""
    manifest = tmp_path / "subjects.tsv"
    names = ["baseline", "followup"]
    rows = {
        "subject": "elastix01",
        "label": "",
        **{phase: str(elastix_lung_pair / f"{n}.mha") for phase, n in zip(("exhale", "inhale"), names)},
        **{f"{phase}_mask": str(elastix_lung_pair / f"{n}_mask.mha") for phase, n in zip(("exhale", "inhale"), names)},
        **{
            f"{phase}_landmarks": str(elastix_lung_pair / f"{n}_landmarks.txt")
            for phase, n in zip(("exhale", "inhale"), names)
        },
    }
    pd.DataFrame([rows]).to_csv(manifest, sep="\t", index=False)
    config = tmp_path / "ct.yaml"
    config.write_text(
        "preprocess: {intensity_range: [-1000, 300], factor: 0.3333333, grid_shape: [49, 56, 41]}\n"
        "split: {n_validation: 0}\n"
        "model: {width: 0.125}\n"
        "train: {epochs: 2}\n"
        "inference: {protocols: [inhale_exhale], chunks: {inhale_exhale: 1}}\n"
        "baselines: {syn: {enabled: false}, sitk_bspline: {enabled: false}}\n"
        "threads: {gpu_jobs: 1}\n"
    )
    return copy_workflow(tmp_path / "study"), manifest, config


def test_real_ct_pair_runs_end_to_end_with_out_of_view_landmarks_reported(real_ct_study):
    workdir, manifest, config = real_ct_study
    result = snakemake(workdir, "--config", f"subjects={manifest}", configfiles=(config,))
    assert "ILD classification: skipped" in result.stdout + result.stderr
    table1 = table(workdir, "table1_dice").set_index("method")
    assert table1.loc["proposed", "evaluated_on"].startswith("all subjects, also used for training")
    assert table1.loc["proposed", "inhale_exhale_pairs"] == 1
    table2 = table(workdir, "table2_landmarks").set_index("method")
    assert table2.loc["unregistered", "landmarks_scored"] == 51
    assert table2.loc["unregistered", "landmarks_excluded"] == 49
    assert 20 < table2.loc["unregistered", "ds_mean"] < 50  # about 34 mm before registration
    assert not (workdir / "results/tables/classification.tsv").exists()
