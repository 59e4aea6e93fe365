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
        ("identity_refined", "inhale_exhale"): TINY_VALIDATION,
        ("syn", "inhale_exhale"): TINY_VALIDATION,
        ("sitk_bspline", "inhale_exhale"): TINY_VALIDATION,
        ("convexadam", "inhale_exhale"): TINY_VALIDATION,  # on by default (config/config.yaml)
    }
    table1 = table(tiny_study, "table1_dice")
    methods = ["unregistered", "proposed", "proposed_refined", "identity_refined", "syn", "sitk_bspline", "convexadam"]
    assert list(table1["method"]) == methods
    assert (table1["inhale_exhale_pairs"] == TINY_VALIDATION).all()
    assert table1.set_index("method").loc["proposed", "all_combinations_pairs"] == TINY_VALIDATION**2
    assert table1["inhale_exhale_dice_mean"].between(1, 100).all()
    table2 = table(tiny_study, "table2_landmarks")
    assert list(table2["method"]) == list(table1["method"])
    assert (table2["landmarks_scored"] == 11 * TINY_VALIDATION).all()
    # every intra-patient pair has 11 landmark rows: the own pairs (unregistered, proposed and its
    # refined row on every subject, the refinement from the identity and the three baselines on
    # the validation subjects), and the diagonal of all_combinations (unregistered, proposed)
    intra = 3 * TINY_SUBJECTS + 4 * TINY_VALIDATION + 2 * TINY_VALIDATION
    assert len(table(tiny_study, "landmarks")) == 11 * intra
    jacobian = table(tiny_study, "jacobian")
    assert len(jacobian) == 9 and (jacobian["pairs_with_folding"] == 0).all()
    assert len(table(tiny_study, "endpoint_error")) == 7
    classification = table(tiny_study, "classification")
    assert set(classification["classifier"]) == {"cnn", "logistic"}
    sources = table(tiny_study, "classification_sources")
    assert set(sources["source"]) == {"proposed_refined", "ground_truth"}


def test_tiny_study_measures_the_refinement_against_its_budget_from_both_starts(tiny_study):
    """refine_budget: the network's prediction and the identity, at budget 0, the curve's budgets
    and the full one, on the validation pairs; its ends are the tables' own rows."""
    budget = table(tiny_study, "refine_budget")
    full = "10+20"  # the schema's default stages
    expected = ["0+0", "5+5", "5+10", full]
    assert list(budget["budget"]) == expected * 2
    assert list(budget["start"]) == ["network"] * 4 + ["identity"] * 4
    assert (budget["pairs"] == TINY_VALIDATION).all()
    ends = budget.set_index(["start", "budget"])
    table1 = table(tiny_study, "table1_dice").set_index("method")
    for start, budget_name, method in (
        ("network", "0+0", "proposed"),
        ("network", full, "proposed_refined"),
        ("identity", "0+0", "unregistered"),
        ("identity", full, "identity_refined"),
    ):
        assert ends.loc[(start, budget_name), "method"] == method
        assert ends.loc[(start, budget_name), "dice_mean"] == pytest.approx(
            table1.loc[method, "inhale_exhale_dice_mean"]
        )
    assert (tiny_study / "results/report/refine_budget.png").stat().st_size > 10_000


def test_tiny_study_writes_every_subjects_checks_to_qc_and_crops_nothing(tiny_study):
    qc = table(tiny_study, "qc")
    subjects = qc[qc["method"].isna()]
    assert subjects.groupby("subject").size().to_dict() == {s: 8 for s in subjects["subject"].unique()}
    assert subjects["subject"].nunique() == TINY_SUBJECTS
    cropped = subjects[subjects["check"] == "mask_cropped"]
    assert len(cropped) == 2 * TINY_SUBJECTS and (cropped["value"] == 0).all()  # the grid holds the whole view
    in_view = subjects[subjects["check"] == "landmarks_in_view"]
    assert (in_view["value"] == in_view["limit"]).all()  # 11 of 11 synthetic landmarks


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


def elastix_manifest(folder, data):
    """The real CT pair as a one-subject, unlabelled cohort, in the README's manifest format."""
    manifest = folder / "subjects.tsv"
    names = ["baseline", "followup"]
    rows = {
        "subject": "elastix01",
        "label": "",
        **{phase: str(data / f"{n}.mha") for phase, n in zip(("exhale", "inhale"), names)},
        **{f"{phase}_mask": str(data / f"{n}_mask.mha") for phase, n in zip(("exhale", "inhale"), names)},
        **{f"{phase}_landmarks": str(data / f"{n}_landmarks.txt") for phase, n in zip(("exhale", "inhale"), names)},
    }
    pd.DataFrame([rows]).to_csv(manifest, sep="\t", index=False)
    return manifest


def run_summary(result) -> str:
    """The run's last lines from its summary of problems on (Snakemake adds a few lines of its own)."""
    lines = (result.stdout + result.stderr).strip().splitlines()
    starts = [i for i, line in enumerate(lines) if "problem(s) in this run" in line]
    assert starts, "no summary of problems at the end of the run:\n" + "\n".join(lines[-20:])
    summary = lines[starts[-1] :]
    assert len(summary) <= int(summary[0].split("problem(s)")[0].split()[-1]) + 6, summary  # at the very end
    return "\n".join(summary)


def test_real_ct_pair_with_the_ct_preset_scores_51_pairs_and_reports_a_bad_setting_at_the_end(
    tmp_path, elastix_lung_pair
):
    """config/ct.yaml (auto grid, CT window) on the real pair: the 51 landmark pairs in both original
    views are scored, nothing cropped. Two deliberate faults, a window that clips 12% of the
    follow-up's (inhale) lung and a B-spline that may not iterate, reach qc.tsv and the run's last lines."""
    workdir = copy_workflow(tmp_path / "study")
    manifest = elastix_manifest(tmp_path, elastix_lung_pair)
    faults = tmp_path / "faults.yaml"
    faults.write_text(
        "preprocess: {intensity_range: [-1000, 300]}\n"  # the fault: below -1000 HU is clipped
        "model: {width: 0.125}\n"
        "train: {epochs: 2}\n"
        "refine: {stages: []}\n"
        "inference: {protocols: [inhale_exhale], chunks: {inhale_exhale: 1}}\n"
        "baselines: {syn: {enabled: false}, sitk_bspline: {linear_iterations: 0, bspline_iterations: 0},"
        " elastix: {linear_iterations: 20, bspline_iterations: 20}}\n"  # the preset's peers, quick
        "threads: {gpu_jobs: 1}\n"
    )
    result = snakemake(workdir, "--config", f"subjects={manifest}", configfiles=(workdir / "config/ct.yaml", faults))
    output = result.stdout + result.stderr
    assert "ILD classification: skipped" in output and "split: 1 subjects, too few" in output
    table2 = table(workdir, "table2_landmarks").set_index("method")
    assert (table2["landmarks_scored"] == 51).all() and (table2["landmarks_excluded"] == 49).all()
    assert 20 < table2.loc["unregistered", "ds_mean"] < 50  # about 34 mm before registration
    assert table(workdir, "table1_dice").set_index("method").loc["proposed", "evaluated_on"].startswith("all subj")
    assert not (workdir / "results/tables/classification.tsv").exists()
    qc = table(workdir, "qc")
    problems = qc[qc["problem"]]
    assert set(problems["check"]) >= {"lung_clipped_low", "baseline_flag"}
    clipped = problems[problems["check"] == "lung_clipped_low"]
    assert list(clipped["phase"]) == ["inhale"] and clipped["value"].between(0.1, 0.15).all()  # the follow-up
    assert (qc.loc[qc["check"] == "mask_cropped", "value"] == 0).all()
    assert "zero_iterations" in problems.loc[problems["check"] == "baseline_flag", "message"].iloc[0]
    end = run_summary(result)
    assert "subject elastix01, inhale: 12." in end and "sitk_bspline inhale_exhale" in end


def test_real_ct_pair_with_the_mri_defaults_stops_before_training_naming_the_ct_preset(tmp_path, elastix_lung_pair):
    workdir = copy_workflow(tmp_path / "study")
    manifest = elastix_manifest(tmp_path, elastix_lung_pair)
    result = snakemake(workdir, "--config", f"subjects={manifest}", configfiles=(), check=False)
    assert result.returncode != 0
    end = run_summary(result)
    assert "subject elastix01" in end and "of the lung voxels lie below the intensity window" in end
    assert "preprocess.intensity_range [0, 1300]" in end and "config/ct.yaml" in end
    assert not (workdir / "results/tables").exists() and not (workdir / "results/model").exists()
    # a grid set by hand that crops the lungs stops too, naming the share and the setting
    grid = tmp_path / "grid.yaml"
    grid.write_text("preprocess: {intensity_range: [-1024, 300], grid_shape: [24, 48, 48]}\n")
    result = snakemake(workdir, "--config", f"subjects={manifest}", configfiles=(grid,), check=False)
    end = run_summary(result)
    assert result.returncode != 0 and "of the inhale lung mask (preprocess.max_mask_crop: 1.0%)" in end
    assert "set preprocess.grid_shape: auto" in end and not (workdir / "results/tables").exists()
