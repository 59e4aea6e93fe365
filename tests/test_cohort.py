"""The embedded synthetic cohort: reproducible, exact ground truth, physiological motion, and a
label signal in the motion only, of a calibrated strength."""

from __future__ import annotations

import dataclasses
import filecmp
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import ndimage

from lungreg.io import read_landmarks
from lungreg.synthetic import anatomy
from lungreg.synthetic.anatomy import LANDMARK_NAMES
from lungreg.synthetic.calibration import calibration_accuracy
from lungreg.synthetic.render import OUTPUT_FILES, synthesize_subject
from lungreg.synthetic.settings import SyntheticCohortSettings, subject_table

log = logging.getLogger(__name__)

SMALL = dict(n_subjects=3, n_ild=2, shape=(24, 48, 48))
DEFAULT_CONFIG = {
    "n_subjects": 41,
    "n_ild": 29,
    "shape": [36, 72, 72],
    "field_of_view_mm": [300, 400, 400],
    "effect_size": 1.0,
    "seed": 2018,
}


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _field_transform(path: Path) -> sitk.DisplacementFieldTransform:
    """The stored fields are float32; DisplacementFieldTransform needs float64."""
    return sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory) -> tuple[SyntheticCohortSettings, Path]:
    """All subjects of a 3-subject cohort at a small shape, generated in one loop."""
    settings = SyntheticCohortSettings(**SMALL)
    root = tmp_path_factory.mktemp("small_cohort")
    for subject in settings.subject_ids():
        synthesize_subject(settings, subject, root / subject)
    return settings, root


@pytest.fixture(scope="module")
def default_subjects(tmp_path_factory) -> tuple[SyntheticCohortSettings, Path, list[str]]:
    """Four subjects of the default cohort (default shape and settings)."""
    settings = SyntheticCohortSettings()
    root = tmp_path_factory.mktemp("default_cohort")
    subjects = settings.subject_ids()[:4]
    for subject in subjects:
        synthesize_subject(settings, subject, root / subject)
    return settings, root, subjects


# ----------------------------------------------------------------------------- settings


def test_from_config_reads_the_default_section_and_rejects_unknown_keys():
    assert SyntheticCohortSettings.from_config(DEFAULT_CONFIG) == SyntheticCohortSettings()
    assert SyntheticCohortSettings.from_config({}) == SyntheticCohortSettings()
    custom = SyntheticCohortSettings.from_config({"noise_std": 0, "intensities": {"fat": 1500}})
    assert custom.noise_std == 0.0 and custom.intensities.fat == 1500.0 and custom.intensities.lung == 90.0
    with pytest.raises(ValueError, match="unknown key.*n_subject"):
        SyntheticCohortSettings.from_config({"n_subject": 3})
    with pytest.raises(ValueError, match="intensities.*unknown key.*bone_marrow"):
        SyntheticCohortSettings.from_config({"intensities": {"bone_marrow": 3}})
    with pytest.raises(ValueError, match="n_ild"):
        SyntheticCohortSettings.from_config({"n_subjects": 5, "n_ild": 6})
    with pytest.raises(ValueError, match="shape"):
        SyntheticCohortSettings.from_config({"shape": [36, 72]})


def test_grid_is_centred_with_identity_direction_and_fov_over_shape():
    grid = SyntheticCohortSettings(shape=(96, 288, 288)).grid
    assert grid.shape == (96, 288, 288)
    assert np.allclose(grid.spacing, (400 / 288, 400 / 288, 300 / 96))
    assert np.allclose(grid.direction, np.eye(3).ravel())
    assert np.allclose(grid.corners().mean(axis=0), 0)


# ------------------------------------------------------------------------------ subjects


def test_subject_table_has_29_ild_and_12_healthy_drawn_from_the_seed():
    settings = SyntheticCohortSettings()
    table = subject_table(settings)
    assert list(table.columns) == ["subject", "label"]
    assert table["subject"].tolist() == [f"sub-{i:03d}" for i in range(1, 42)]
    assert table["label"].value_counts().to_dict() == {"ILD": 29, "healthy": 12}
    pd.testing.assert_frame_equal(table, subject_table(settings))
    assert (table["label"].iloc[:29] != "ILD").any(), "ILD subjects must not simply be the first 29"
    other = subject_table(dataclasses.replace(settings, seed=7))
    assert not other["label"].equals(table["label"])


def test_unknown_subject_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="sub-099.*not in the synthetic cohort"):
        synthesize_subject(SyntheticCohortSettings(**SMALL), "sub-099", tmp_path)


def test_synthesis_is_reproducible_and_a_subject_alone_equals_it_in_the_loop(small_cohort, tmp_path):
    settings, root = small_cohort
    synthesize_subject(settings, "sub-002", tmp_path / "alone")
    for name in OUTPUT_FILES:
        assert filecmp.cmp(root / "sub-002" / name, tmp_path / "alone" / name, shallow=False), name
    synthesize_subject(dataclasses.replace(settings, seed=7), "sub-002", tmp_path / "other_seed")
    other = _array(tmp_path / "other_seed" / "inhale.nii.gz")
    assert not np.array_equal(_array(root / "sub-002" / "inhale.nii.gz"), other)
    assert not np.array_equal(_array(root / "sub-001" / "inhale.nii.gz"), _array(root / "sub-002" / "inhale.nii.gz"))


def test_outputs_have_the_promised_types_grid_and_contents(small_cohort):
    settings, root = small_cohort
    labels = dict(subject_table(settings).itertuples(index=False))
    for subject in settings.subject_ids():
        folder = root / subject
        assert sorted(p.name for p in folder.iterdir()) == sorted(OUTPUT_FILES)
        for name, pixel in (
            ("inhale", sitk.sitkFloat32),
            ("exhale", sitk.sitkFloat32),
            ("inhale_mask", sitk.sitkUInt8),
            ("exhale_mask", sitk.sitkUInt8),
        ):
            image = sitk.ReadImage(str(folder / f"{name}.nii.gz"))
            assert image.GetPixelID() == pixel and settings.grid.matches(image), name
        for name in ("gt_displacement_fixed-exhale.nii.gz", "gt_displacement_fixed-inhale.nii.gz"):
            image = sitk.ReadImage(str(folder / name))
            assert image.GetNumberOfComponentsPerPixel() == 3 and settings.grid.matches(image)
        for phase in ("inhale", "exhale"):
            assert set(np.unique(_array(folder / f"{phase}_mask.nii.gz"))) == {0, 1}
            table = pd.read_csv(folder / f"{phase}_landmarks.csv")
            assert list(table.columns) == ["landmark", "x", "y", "z"]
            assert tuple(table["landmark"]) == LANDMARK_NAMES
        params = json.loads((folder / "parameters.json").read_text())
        assert params["label"] == labels[subject] and params["subject"] == subject


# -------------------------------------------------------------------- exact ground truth


def test_ground_truth_fields_map_the_landmarks_to_each_other_subvoxel(small_cohort):
    settings, root = small_cohort
    voxel = min(settings.grid.spacing)
    for subject in settings.subject_ids():
        folder = root / subject
        inhale = read_landmarks(folder / "inhale_landmarks.csv")
        exhale = read_landmarks(folder / "exhale_landmarks.csv")
        fixed_exhale = _field_transform(folder / "gt_displacement_fixed-exhale.nii.gz")
        fixed_inhale = _field_transform(folder / "gt_displacement_fixed-inhale.nii.gz")
        to_inhale = np.array([fixed_exhale.TransformPoint(tuple(p)) for p in exhale])
        to_exhale = np.array([fixed_inhale.TransformPoint(tuple(p)) for p in inhale])
        error_e = np.linalg.norm(to_inhale - inhale, axis=1)
        error_i = np.linalg.norm(to_exhale - exhale, axis=1)
        log.info(
            "%s landmark error through the stored fields: exhale-fixed max %.3f mm, inhale-fixed max %.3f mm "
            "(voxel %.1f mm; landmark motion up to %.1f mm)",
            subject,
            error_e.max(),
            error_i.max(),
            voxel,
            np.linalg.norm(exhale - inhale, axis=1).max(),
        )
        assert error_e.max() < 0.1 * voxel and error_i.max() < 0.1 * voxel
        assert np.linalg.norm(exhale - inhale, axis=1).max() > 10, "the landmarks should move"


def test_landmarks_lie_inside_the_lungs_and_well_inside_the_field_of_view(small_cohort):
    settings, root = small_cohort
    grid = settings.grid
    half = np.asarray(grid.size) * np.asarray(grid.spacing) / 2
    for subject in settings.subject_ids():
        for phase in ("inhale", "exhale"):
            points = read_landmarks(root / subject / f"{phase}_landmarks.csv")
            assert np.all(np.abs(points) < half - 10)
            mask = _array(root / subject / f"{phase}_mask.nii.gz")
            index = np.rint(grid.world_to_index(points)).astype(int)
            assert mask[index[1:, 2], index[1:, 1], index[1:, 0]].all(), f"{subject} {phase}: not all in the lung"


def test_inverse_field_has_a_tiny_residual_inside_the_lung(small_cohort):
    """y + u_i(y) = x must satisfy phi(x) = y; checked on the voxel centres (no interpolation)."""
    settings, root = small_cohort
    grid = settings.grid
    for subject in settings.subject_ids():
        folder = root / subject
        field = _array(folder / "gt_displacement_fixed-inhale.nii.gz").reshape(-1, 3).astype(float)
        lung = _array(folder / "inhale_mask.nii.gz").reshape(-1).astype(bool)
        y = grid.voxel_centres().reshape(-1, 3)
        model, _ = anatomy.build_model(settings, subject)
        residual = np.linalg.norm(model.phi(y + field)[0] - y, axis=1)
        recorded = json.loads((folder / "parameters.json").read_text())["inverse_residual_mm"]
        log.info(
            "%s inverse residual |phi(x) - y|: lung mean %.2g max %.2g mm; whole FOV mean %.2g max %.2g mm, "
            "%.3f %% of voxels above 0.1 mm",
            subject,
            residual[lung].mean(),
            residual[lung].max(),
            residual.mean(),
            residual.max(),
            100 * (residual > 0.1).mean(),
        )
        assert residual[lung].mean() < 1e-3 and residual[lung].max() < 1e-2
        assert (residual > 0.1).mean() < 0.005  # only thin slivers where the sliding lung leaves a gap
        assert recorded["lung_max"] < 1e-2


def test_ground_truth_field_explains_the_images(default_subjects):
    """Warping inhale through the exhale-fixed field reproduces exhale; masks agree."""
    settings, root, subjects = default_subjects
    unregistered = []
    for subject in subjects:
        folder = root / subject
        transform = _field_transform(folder / "gt_displacement_fixed-exhale.nii.gz")
        exhale = sitk.ReadImage(str(folder / "exhale.nii.gz"))
        inhale = sitk.ReadImage(str(folder / "inhale.nii.gz"))
        warped = sitk.GetArrayFromImage(sitk.Resample(inhale, exhale, transform, sitk.sitkLinear, 0.0))
        fixed, moving = sitk.GetArrayFromImage(exhale), sitk.GetArrayFromImage(inhale)
        # compare where the GT maps inside the inhale FOV (the abdomen leaves it at the bottom)
        field = _array(folder / "gt_displacement_fixed-exhale.nii.gz")
        grid = settings.grid
        mapped_inside = ndimage.binary_erosion(grid.contains(grid.voxel_centres() + field))
        body = (fixed > 300) & mapped_inside
        mse_registered = np.mean((warped - fixed)[body] ** 2)
        mse_identity = np.mean((moving - fixed)[body] ** 2)
        inhale_mask = sitk.Cast(sitk.ReadImage(str(folder / "inhale_mask.nii.gz")), sitk.sitkFloat32)
        warped_mask = sitk.GetArrayFromImage(sitk.Resample(inhale_mask, exhale, transform, sitk.sitkLinear, 0.0)) > 0.5
        exhale_mask = _array(folder / "exhale_mask.nii.gz")
        dice = _dice(warped_mask, exhale_mask)
        unregistered.append(_dice(_array(folder / "inhale_mask.nii.gz"), exhale_mask))
        log.info(
            "%s MSE in body: identity %.0f, through GT %.0f (x%.1f); warped-mask Dice %.3f; unregistered %.3f",
            subject,
            mse_identity,
            mse_registered,
            mse_identity / mse_registered,
            dice,
            unregistered[-1],
        )
        assert mse_registered < mse_identity / 8
        assert dice > 0.95
    assert 0.6 < np.mean(unregistered) < 0.85


def test_motion_is_mostly_craniocaudal_largest_at_the_base_and_slides(default_subjects):
    settings, root, subjects = default_subjects
    grid = settings.grid
    for subject in subjects:
        field = _array(root / subject / "gt_displacement_fixed-exhale.nii.gz")
        lung = _array(root / subject / "exhale_mask.nii.gz").astype(bool)
        z = grid.index_to_world(np.argwhere(lung)[:, ::-1])[:, 2]
        height = (z - z.min()) / (z.max() - z.min())
        u = np.abs(field[lung])
        basal, apical = u[height < 1 / 3, 2].mean(), u[height > 2 / 3, 2].mean()
        assert basal > 2 * apical and basal > 10
        assert u[:, 2].mean() > u[:, 0].mean() and u[:, 2].mean() > u[:, 1].mean()
        # sliding: u_z jumps across the lateral lung wall (inside vs the next voxel outside, along x)
        inside = lung[:, :, 1:-1] & ~lung[:, :, 2:]  # lung voxel whose +x neighbour is not lung
        jump = np.abs(field[:, :, 1:-1, 2][inside] - field[:, :, 2:, 2][inside])
        assert np.median(jump) > 2.0, f"{subject}: no sliding at the lung wall"


def test_intensities_are_mri_like_and_fat_exceeds_the_clip(default_subjects):
    settings, root, subjects = default_subjects
    for subject in subjects:
        image = _array(root / subject / "inhale.nii.gz")
        lung = _array(root / subject / "inhale_mask.nii.gz").astype(bool)
        assert 50 < np.median(image[lung]) < 150
        assert np.median(image[:, :4, :]) < 3 * settings.noise_std  # air in front of the chest
        assert 0.005 < (image > 1300).mean() < 0.2  # subcutaneous fat partly above the paper's clip
        assert image.dtype == np.float32


# --------------------------------------------------------------------------- the label


def test_the_label_changes_only_motion_parameters_and_nothing_at_effect_zero():
    settings = SyntheticCohortSettings()
    motion_keys = {"basal_strain", "peripheral_reduction", "lateral_expansion", "ap_expansion", "heterogeneity_mm"}
    for effect in (settings.effect_size, 0.0):
        drawn = [
            anatomy._draw_parameters(
                dataclasses.replace(settings, effect_size=effect), anatomy._streams(settings, 4)[0], ild=ild
            )
            for ild in (False, True)
        ]
        differing = {k for k in drawn[0] if drawn[0][k] != drawn[1][k]} - {"label"}
        assert differing == (motion_keys if effect else set())


def test_inhale_image_does_not_depend_on_the_label():
    """The classifier must learn from motion only: anatomy and intensities ignore the label."""
    settings = SyntheticCohortSettings(**SMALL)
    points = settings.grid.voxel_centres().reshape(-1, 3).astype(np.float32)
    images = []
    for ild in (False, True):
        streams = anatomy._streams(settings, 1)
        model = anatomy.SubjectModel(settings, anatomy._draw_parameters(settings, streams[0], ild=ild), streams[1])
        images.append(model.render(model.pose_inhale.invert(points)))
    assert np.array_equal(images[0], images[1])


def test_effect_size_zero_is_at_chance_and_the_default_is_informative_not_saturated():
    """Calibration: logistic regression on regional GT-motion statistics, stratified 5-fold.

    Small shape and two seeds to stay fast; the full calibration (default shape, 5 seeds) is
    reported in the module docs.
    """
    shape = (24, 48, 48)
    null = calibration_accuracy(SyntheticCohortSettings(shape=shape, effect_size=0.0), seeds=(1, 2))
    default = calibration_accuracy(SyntheticCohortSettings(shape=shape), seeds=(1, 2))
    log.info("calibration at effect 0:\n%s\nat the default effect:\n%s", null, default)
    assert null["balanced_accuracy"].mean() < 0.65
    assert null["accuracy"].mean() < 0.8  # majority rate 29/41 = 0.71
    assert default["accuracy"].mean() > 0.8
    assert default["balanced_accuracy"].mean() > 0.7
