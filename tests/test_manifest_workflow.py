"""Real cohorts through the workflow, from a manifest of files written by the test: a labelled MRI
cohort with the default configuration through classification to the tables, a labelled CT cohort
without lung masks with config/ct.yaml, and (marker slow) the real CT pair without its masks against
the run with them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from workflow_runner import REPO, copy_workflow, snakemake

from lungreg.geometry import Grid, resample
from lungreg.metrics import dice
from lungreg.synthetic.render import synthesize_subject
from lungreg.synthetic.settings import SyntheticCohortSettings, subject_table

pytestmark = pytest.mark.workflow

PHASES = ("inhale", "exhale")
TABLES = ("results/tables/classification_sources.tsv", "results/tables/qc.tsv")  # and what they need
FAST = REPO / "tests" / "config" / "manifest_fast.yaml"
INTERVALS = ("accuracy", "balanced_accuracy", "auc")
# Hounsfield units of the synthetic tissues: the renderer's intensities are these + 1000 (its empty
# background, 0, is then air at -1000 HU), and the written images are the rendered ones - 1000.
CT_HU = dict(lung=-850, vessel=40, airway_wall=-100, airway_lumen=-1000, fat=-100, muscle=50, rib=700)
CT_HU |= dict(mediastinum=40, heart=40, aorta=40, liver=60, abdomen=40, bone=700, disc=80, csf=10)


def table(workdir: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(workdir / "results" / "tables" / f"{name}.tsv", sep="\t")


def read_plain(path: Path) -> sitk.Image:
    """An image without its file's header notes (NIfTI's would not go into an MHA file)."""
    image = sitk.ReadImage(str(path))
    for key in image.GetMetaDataKeys():
        image.EraseMetaData(key)
    return image


def write_cohort(folder: Path, settings: SyntheticCohortSettings, ct: bool, masks: dict | None = None) -> Path:
    """Render the synthetic subjects and write them as a user's files (NIfTI and MHA in turn, landmark
    CSVs, masks), the manifest beside them with relative paths. `masks`: subject -> the phases whose
    mask is written in the manifest (default: both); the other cells stay empty (CT: segmented)."""
    folder.mkdir(parents=True)
    labels = subject_table(settings).set_index("subject")["label"]
    rows = []
    for number, subject in enumerate(settings.subject_ids()):
        rendered = folder / "rendered" / subject
        synthesize_subject(settings, subject, rendered)
        suffix = ".mha" if number % 2 else ".nii.gz"
        row = {"subject": subject, "label": labels[subject]}
        for phase in PHASES:
            image = read_plain(rendered / f"{phase}.nii.gz")
            if ct:
                image = sitk.Cast(sitk.Round(image - 1000.0), sitk.sitkInt16)
            sitk.WriteImage(image, str(folder / f"{subject}_{phase}{suffix}"))
            row[phase] = f"{subject}_{phase}{suffix}"
            shutil.copy(rendered / f"{phase}_landmarks.csv", folder / f"{subject}_{phase}_landmarks.csv")
            row[f"{phase}_landmarks"] = f"{subject}_{phase}_landmarks.csv"
            given = PHASES if masks is None else masks.get(subject, ())
            row[f"{phase}_mask"] = ""
            if phase in given:
                mask = read_plain(rendered / f"{phase}_mask.nii.gz")
                sitk.WriteImage(mask, str(folder / f"{subject}_{phase}_mask{suffix}"))
                row[f"{phase}_mask"] = f"{subject}_{phase}_mask{suffix}"
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame = frame.drop(columns=[c for c in frame if c.endswith("_mask") and not frame[c].any()])  # no column at all
    frame.to_csv(folder / "subjects.tsv", sep="\t", index=False)
    return folder / "subjects.tsv"


def assert_every_quoted_interval_exists(frame: pd.DataFrame, metrics=INTERVALS) -> None:
    for row in frame.to_dict("records"):
        for metric in metrics:
            low, high = row[f"{metric}_ci_low"], row[f"{metric}_ci_high"]
            assert np.isfinite([low, high]).all(), (row.get("source"), row["classifier"], metric)
            assert 0 <= low <= row[metric] <= high <= 1, (row.get("source"), row["classifier"], metric)


# ------------------------------------------------------ a labelled MRI cohort, the defaults


@pytest.fixture(scope="module")
def mri_study(tmp_path_factory) -> tuple[Path, str]:
    """8 subjects (3 healthy, 5 ILD) with masks and landmarks, the default configuration (only
    sizes and counts shrunk, tests/config/manifest_fast.yaml), up to the tables (the report's
    figures are the synthetic study's test)."""
    root = tmp_path_factory.mktemp("mri_manifest")
    settings = SyntheticCohortSettings(n_subjects=8, n_ild=5, shape=(18, 36, 36), seed=7)
    manifest = write_cohort(root / "data", settings, ct=False)
    workdir = copy_workflow(root / "study")
    result = snakemake(workdir, "--config", f"subjects={manifest}", "--", *TABLES, configfiles=(FAST,))
    return workdir, result.stdout + result.stderr


def test_a_labelled_manifest_runs_with_the_defaults_through_classification(mri_study):
    workdir, output = mri_study
    assert "classify: sources auto: proposed_refined, proposed (ground_truth left out" in output
    cohort = pd.read_csv(workdir / "results/cohort/subjects.tsv", sep="\t")
    assert sorted(cohort["label"]) == ["ILD"] * 5 + ["healthy"] * 3
    classification = table(workdir, "classification")
    assert set(classification["source"]) == {"proposed_refined"}
    assert set(classification["classifier"]) == {"logistic", "lda"}  # config/config.yaml's
    quoted = classification[(classification["repeat"] == "all") & (classification["fold"] == "pooled")]
    assert len(quoted) == 2 and (quoted["n_subjects"] == 8).all()
    assert_every_quoted_interval_exists(quoted)
    sources = table(workdir, "classification_sources")
    assert set(sources["source"]) == {"proposed_refined", "proposed"} and sources["epe_mean"].isna().all()
    assert_every_quoted_interval_exists(sources, ("balanced_accuracy", "auc"))
    assert list(table(workdir, "table1_dice")["method"]) == [
        "unregistered",
        "proposed",
        "proposed_refined",
        "identity_refined",
        "syn",
        "sitk_bspline",
        "convexadam",
    ]
    assert len(table(workdir, "endpoint_error")) == 0  # no ground truth in a manifest: header only


# ---------------------------------------------------------- a labelled CT cohort, no masks


CT_SUBJECTS = 5


@pytest.fixture(scope="module")
def ct_study(tmp_path_factory) -> tuple[Path, Path, str]:
    """5 CT-like subjects (2 healthy, 3 ILD) in Hounsfield units with config/ct.yaml: no inhale_mask
    column, and one exhale mask given (a mixed cohort); 3-fold classification (5 subjects), no
    baselines (not what this run is for)."""
    root = tmp_path_factory.mktemp("ct_manifest")
    intensities = {k: v + 1000.0 for k, v in CT_HU.items()}
    settings = SyntheticCohortSettings(
        n_subjects=CT_SUBJECTS, n_ild=3, seed=11, bias_field_strength=0.0, intensities=intensities
    )
    manifest = write_cohort(root / "data", settings, ct=True, masks={"sub-001": ("exhale",)})
    workdir = copy_workflow(root / "study")
    small = root / "small.yaml"
    small.write_text("classify: {folds: 3}\nbaselines: {syn: {enabled: false}, sitk_bspline: {enabled: false}}\n")
    configfiles = (workdir / "config/ct.yaml", FAST, small)
    result = snakemake(workdir, "--config", f"subjects={manifest}", "--", *TABLES, configfiles=configfiles)
    return workdir, root / "data", result.stdout + result.stderr


def test_a_ct_manifest_without_masks_is_segmented_and_runs_through_classification(ct_study):
    workdir, data, output = ct_study
    assert "preprocess: grid_shape auto:" in output  # planned from the automatic masks' boxes
    automatic = sorted(p.relative_to(workdir / "results/preprocessed") for p in workdir.rglob("*_auto_mask.nii.gz"))
    assert len(automatic) == 2 * CT_SUBJECTS - 1  # every phase but sub-001's exhale (its mask is given)
    assert Path("sub-001/exhale_auto_mask.nii.gz") not in automatic
    for path in automatic:
        subject, phase = path.parent.name, path.name.split("_")[0]
        mask = sitk.ReadImage(str(workdir / "results/preprocessed" / path))
        truth = sitk.ReadImage(str(data / "rendered" / subject / f"{phase}_mask.nii.gz"))
        assert mask.GetSize() == truth.GetSize() and np.allclose(mask.GetOrigin(), truth.GetOrigin())
        assert dice(sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(truth)) > 0.95, path
    qc = table(workdir, "qc")
    rows = qc[qc["check"].str.startswith("auto_mask")]
    assert len(rows) == 3 * len(automatic) and not rows["problem"].any()
    volumes = rows[rows["check"] == "auto_mask_volume_low"]["value"]
    assert volumes.between(1500, 5000).all()  # ml: both lungs of an adult, inhale and exhale
    preprocessed = qc[qc["check"] == "mask_cropped"]
    assert len(preprocessed) == 2 * CT_SUBJECTS and (preprocessed["value"] == 0).all()
    assert (table(workdir, "table2_landmarks")["landmarks_scored"] == 11 * CT_SUBJECTS).all()
    sources = table(workdir, "classification_sources")
    assert set(sources["source"]) == {"proposed_refined", "proposed"}
    assert_every_quoted_interval_exists(sources, ("balanced_accuracy", "auc"))


# ------------------------------------------------------ the real CT pair without its masks


def real_ct_manifest(folder: Path, data: Path, masks: bool) -> Path:
    """README.md's ct.tsv (inhale: baseline, exhale: follow-up), with or without the mask columns."""
    row = {"subject": "elx01", "label": ""}
    for phase, name in zip(PHASES, ("baseline", "followup")):
        row |= {phase: str(data / f"{name}.mha"), f"{phase}_landmarks": str(data / f"{name}_landmarks.txt")}
        if masks:
            row[f"{phase}_mask"] = str(data / f"{name}_mask.mha")
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([row]).to_csv(folder / "ct.tsv", sep="\t", index=False)
    return folder / "ct.tsv"


@pytest.fixture
def real_ct_runs(tmp_path, elastix_lung_pair) -> dict[str, Path]:
    """The README's CT command, once with the expert masks and once without (minutes each)."""
    runs = {}
    for kind in ("expert", "automatic"):
        root = tmp_path / kind
        manifest = real_ct_manifest(root / "data", elastix_lung_pair, masks=kind == "expert")
        workdir = copy_workflow(root / "study")
        snakemake(workdir, "--config", f"subjects={manifest}", configfiles=(workdir / "config/ct.yaml",), timeout=3600)
        runs[kind] = workdir
    return runs


@pytest.mark.slow
def test_the_real_ct_pair_without_masks_registers_as_well_as_with_its_expert_masks(real_ct_runs):
    """The landmark error of the refined network and of SyN within 10 % of the expert-mask run
    (README.md, "A CT cohort", has every row's); the preprocessed masks agree, Dice >= 0.95."""
    expert, automatic = (table(real_ct_runs[k], "table2_landmarks").set_index("method") for k in real_ct_runs)
    print(pd.DataFrame({"expert": expert["ds_mean"], "automatic": automatic["ds_mean"]}))
    assert (automatic["landmarks_scored"] == 51).all() and (expert["landmarks_scored"] == 51).all()
    for method in ("proposed_refined", "syn"):  # the workflow's registration, and the baseline that uses masks most
        assert automatic.loc[method, "ds_mean"] <= 1.1 * expert.loc[method, "ds_mean"], method
    for phase in PHASES:  # each run's grid is centred on its own masks: compared in physical space
        expert_mask, auto_mask = (
            sitk.ReadImage(str(run / f"results/preprocessed/elx01/{phase}_mask.nii.gz"))
            for run in real_ct_runs.values()
        )
        on_expert_grid = resample(auto_mask, Grid.of(expert_mask), "nearest")
        assert dice(sitk.GetArrayFromImage(on_expert_grid), sitk.GetArrayFromImage(expert_mask)) >= 0.95, phase
    qc = table(real_ct_runs["automatic"], "qc").set_index(["phase", "check"])
    assert qc.loc[("inhale", "auto_mask_lungs"), "value"] == 1  # a tight field of view: one lung in it
