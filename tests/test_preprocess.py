"""Preprocessing: intensities, resampling onto one common grid, landmarks, written files."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nibabel
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from lungreg.geometry import Grid, common_grid, mask_box_corners
from lungreg.io import InputError, read_landmarks, read_table
from lungreg.manifest import check_subjects, lung_grid_shape, lungs_outside_grid, read_manifest
from lungreg.preprocess import (
    QC_COLUMNS,
    PreprocessSettings,
    clip_and_scale,
    covering_shape,
    mask_fraction_outside,
    preprocess_subject,
    resample_image,
    resample_mask,
)

PHASES = ("inhale", "exhale")


def rotation(degrees: float, axis=(0.0, 0.0, 1.0)) -> tuple[float, ...]:
    """Row-major 3 x 3 rotation about `axis` (Rodrigues)."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.radians(degrees)
    return tuple((np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k).ravel())


def image_on(grid: Grid, values: np.ndarray, pixel=np.float32) -> sitk.Image:
    image = sitk.GetImageFromArray(np.asarray(values, pixel))
    return grid.apply_to(image)


def write_phase(folder: Path, phase: str, image: sitk.Image, mask: sitk.Image | None = None) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    if mask is None:
        mask = sitk.Cast(image * 0 + 1, sitk.sitkUInt8)
    paths = {phase: folder / f"{phase}.nii.gz", f"{phase}_mask": folder / f"{phase}_mask.nii.gz"}
    sitk.WriteImage(image, str(paths[phase]))
    sitk.WriteImage(mask, str(paths[f"{phase}_mask"]))
    return paths


def write_csv(points, path: Path, names=None) -> Path:
    frame = pd.DataFrame(np.asarray(points, float), columns=["x", "y", "z"])
    if names is not None:
        frame.insert(0, "name", names)
    frame.to_csv(path, index=False)
    return path


def settings(
    shape, factor=2 / 3, low=0.0, high=1.0, masks="nearest", reference="exhale", max_crop=1.0
) -> PreprocessSettings:
    """Settings for these tests; their masks often fill the whole image, so cropping is allowed unless asked."""
    return PreprocessSettings((low, high), factor, tuple(shape), masks, reference, max_mask_crop=max_crop)


def read_outputs(out: Path) -> dict:
    result = {}
    for phase in PHASES:
        result[phase] = sitk.ReadImage(str(out / f"{phase}_image.nii.gz"))
        result[f"{phase}_mask"] = sitk.ReadImage(str(out / f"{phase}_mask.nii.gz"))
        result[f"{phase}_landmarks"] = pd.read_csv(out / f"{phase}_landmarks.csv")
    return result


# --------------------------------------------------------------------------- settings


def test_settings_from_config_and_their_checks():
    section = {
        "intensity_range": [0, 1300],
        "factor": 0.6666667,
        "grid_shape": [24, 48, 48],
        "mask_interpolation": "nearest",
    }
    s = PreprocessSettings.from_config(section, "exhale")
    assert s == PreprocessSettings((0.0, 1300.0), 0.6666667, (24, 48, 48), "nearest", "exhale")
    assert isinstance(s.grid_shape[0], int) and isinstance(s.intensity_range[0], float)
    with pytest.raises(Exception):
        s.factor = 1.0  # frozen
    for bad in (
        {"intensity_range": [300, -1000]},
        {"factor": 0},
        {"grid_shape": [24, 48]},
        {"grid_shape": [24, 48.5, 48]},
        {"grid_shape": "automatic"},
        {"max_mask_crop": 1.5},
        {"max_clipped_lung": -0.1},
        {"mask_interpolation": "cubic"},
        {"grid_shap": [1, 2, 3]},
    ):
        with pytest.raises(ValueError):
            PreprocessSettings.from_config({**section, **bad}, "exhale")
    with pytest.raises(ValueError, match="reference phase"):
        PreprocessSettings.from_config(section, "baseline")
    with pytest.raises(ValueError, match="lacks: factor"):
        PreprocessSettings.from_config({k: v for k, v in section.items() if k != "factor"}, "inhale")
    auto = PreprocessSettings.from_config({**section, "grid_shape": "auto", "cohort_grid_shape": [7, 8, 9]}, "exhale")
    assert auto.auto and auto.shape == (7, 8, 9) and s.shape == (24, 48, 48)


# ------------------------------------------------------------------------ intensities


def test_clip_and_scale_is_exact_below_inside_and_above_the_range():
    values = np.array([-3000, -1024, -1000, -675, -350, 0, 300, 301, 3071], np.int16).reshape(1, 3, 3)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-10.0, 5.0, 3.0))
    scaled = clip_and_scale(image, -1000, 300)
    expected = np.array([0, 0, 0, 0.25, 0.5, 1000 / 1300, 1, 1, 1], np.float32).reshape(1, 3, 3)
    assert scaled.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(scaled), expected)
    assert Grid.of(scaled) == Grid.of(image)
    floats = sitk.GetImageFromArray(np.array([[[-0.5, 0.0, 0.1, 0.75, 2.0, 1e30]]]))
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(clip_and_scale(floats, 0.0, 2.0)), np.array([[[0, 0, 0.05, 0.375, 1, 1]]], np.float32)
    )
    with pytest.raises(ValueError):
        clip_and_scale(image, 300, -1000)


# ------------------------------------------------------------------------- resampling


def analytic(points: np.ndarray) -> np.ndarray:
    """A smooth function of physical position with values in [0.2, 0.8]."""
    x, y, z = np.moveaxis(points, -1, 0)
    return 0.5 + 0.2 * np.sin(2 * np.pi * x / 45) * np.cos(2 * np.pi * y / 55) + 0.1 * np.sin(2 * np.pi * z / 70 + 0.3)


def test_resampling_matches_simpleitk_and_the_analytic_function(tmp_path):
    # anisotropic spacing, direction rotated 15 degrees about an oblique axis
    grid = Grid((40, 36, 26), (1.1, 1.4, 2.3), (-20.0, 10.0, -30.0), rotation(15, (0.3, 0.2, 1.0)))
    image = image_on(grid, analytic(grid.voxel_centres()))
    inputs = {**write_phase(tmp_path / "in", "inhale", image), **write_phase(tmp_path / "in", "exhale", image)}
    summary = preprocess_subject("a1", inputs, settings((20, 28, 32)), tmp_path / "out")  # larger than the image
    out = read_outputs(tmp_path / "out")
    new = summary.grid
    assert new.spacing == pytest.approx(tuple(s * 1.5 for s in grid.spacing))
    np.testing.assert_allclose(new.direction, grid.direction, atol=1e-6)

    # 1. the same as SimpleITK's own cubic B-spline resampling onto that grid
    reference = sitk.Resample(
        sitk.ReadImage(str(inputs["inhale"])),
        new.reference_image(),
        sitk.Transform(),
        sitk.sitkBSpline,
        0.0,
        sitk.sitkFloat32,
    )
    ours = sitk.GetArrayFromImage(out["inhale"])
    np.testing.assert_allclose(ours, sitk.GetArrayFromImage(reference), atol=1e-6, rtol=0)
    in_memory = resample_image(clip_and_scale(image, 0.0, 1.0), new)
    np.testing.assert_allclose(sitk.GetArrayFromImage(in_memory), ours, atol=1e-6, rtol=0)

    # 2. close to the function itself at the new voxel centres, away from the original border
    centres = new.voxel_centres()
    index = grid.world_to_index(centres)
    inner = np.all((index >= 2) & (index <= np.asarray(grid.size) - 3), axis=-1)
    outside = ~grid.contains(centres)
    assert inner.sum() > 2000 and outside.sum() > 100
    np.testing.assert_allclose(ours[inner], analytic(centres[inner]), atol=5e-3, rtol=0)
    assert np.all(ours[outside] == 0)  # outside the original field of view


def test_bspline_overshoot_is_clamped_to_unit_range():
    grid = Grid((12, 12, 12), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), rotation(0))
    step = np.zeros(grid.shape, np.float32)
    step[:, :, 6:] = 1.0  # a sharp edge makes cubic B-spline ring
    shifted = Grid((20, 10, 10), (0.37, 1.0, 1.0), (0.1, 1.0, 1.0), grid.direction)
    raw = sitk.GetArrayFromImage(
        sitk.Resample(
            image_on(grid, step), shifted.reference_image(), sitk.Transform(), sitk.sitkBSpline, 0.0, sitk.sitkFloat32
        )
    )
    assert raw.min() < -1e-3 and raw.max() > 1 + 1e-3
    clamped = sitk.GetArrayFromImage(resample_image(image_on(grid, step), shifted))
    assert clamped.min() == 0.0 and clamped.max() == 1.0
    np.testing.assert_array_equal(clamped, np.clip(raw, 0, 1))


def test_mask_resampling_nearest_and_linear():
    grid = Grid((40, 40, 20), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), rotation(10))
    centres = grid.voxel_centres()
    ball = (np.linalg.norm(centres - grid.index_to_world(np.array([19.5, 19.5, 9.5])), axis=-1) < 14).astype(np.uint8)
    mask = image_on(grid, ball, np.uint8)
    target = Grid((28, 28, 14), (1.5, 1.5, 3.0), grid.origin, grid.direction)
    inside = np.linalg.norm(target.voxel_centres() - grid.index_to_world(np.array([19.5, 19.5, 9.5])), axis=-1) < 14
    for how in ("nearest", "linear"):
        out = resample_mask(mask, target, how)
        array = sitk.GetArrayFromImage(out)
        assert out.GetPixelID() == sitk.sitkUInt8 and set(np.unique(array)) == {0, 1}
        assert Grid.of(out) == target
        volume = array.sum() * np.prod(target.spacing)
        assert volume == pytest.approx(ball.sum() * np.prod(grid.spacing), rel=0.1)
        dice = 2 * (array.astype(bool) & inside).sum() / (array.sum() + inside.sum())
        assert dice > 0.93, (how, dice)
    with pytest.raises(ValueError):
        resample_mask(mask, target, "cubic")


# ------------------------------------------------------------------------ common grid


@pytest.mark.parametrize("degrees", [0, 15])
def test_common_grid_has_the_configured_shape_centred_on_the_union(tmp_path, degrees):
    direction = rotation(degrees)
    inhale = Grid((30, 26, 12), (1.2, 1.2, 2.5), (-10.0, -5.0, 0.0), direction)
    exhale = Grid((34, 22, 15), (1.2, 1.2, 2.5), (-18.0, 2.0, -9.0), direction)
    grid = common_grid([inhale, exhale], exhale, 2 / 3, (10, 20, 26))
    assert grid.shape == (10, 20, 26) and grid.direction == direction
    assert grid.spacing == pytest.approx((1.8, 1.8, 3.75))
    # centre of the grid's extent = centre of the union of both fields of view, along its axes
    d = np.asarray(direction).reshape(3, 3)
    union = np.concatenate([inhale.corners(), exhale.corners()]) @ d
    np.testing.assert_allclose(grid.corners().mean(axis=0) @ d, (union.min(0) + union.max(0)) / 2, atol=1e-9)
    if degrees == 0:
        np.testing.assert_allclose(
            grid.corners().mean(axis=0), [(-18.6 + 25.4) / 2, (-5.6 + 27.8) / 2, (-10.25 + 28.75) / 2], atol=1e-9
        )

    # through preprocess_subject: both phases written on that one grid
    rng = np.random.default_rng(0)
    inputs = {}
    for phase, g in (("inhale", inhale), ("exhale", exhale)):
        inputs.update(write_phase(tmp_path / "in", phase, image_on(g, rng.uniform(0, 1, g.shape))))
    summary = preprocess_subject("c1", inputs, settings((10, 20, 26)), tmp_path / "out")
    assert summary.grid.matches_grid(grid, 1e-6)
    out = read_outputs(tmp_path / "out")
    for key in ("inhale", "exhale", "inhale_mask", "exhale_mask"):
        assert grid.matches(out[key]), key


def test_covering_shape_holds_both_fields_of_view():
    a = Grid((30, 26, 12), (1.2, 1.2, 2.5), (-10.0, -5.0, 0.0), rotation(0))
    b = Grid((34, 22, 15), (1.2, 1.2, 2.5), (-18.0, 2.0, -9.0), rotation(0))
    shape = covering_shape([a, b], b, 2 / 3)
    assert shape == (11, 19, 25)  # union z: 39 mm / 3.75, y: 33.4 / 1.8, x: 44 / 1.8, rounded up
    corners = np.concatenate([a.corners(), b.corners()])
    assert common_grid([a, b], b, 2 / 3, shape).contains(corners).all()
    for axis in range(3):  # one voxel fewer along any axis no longer holds them
        smaller = list(shape)
        smaller[axis] -= 1
        assert not common_grid([a, b], b, 2 / 3, tuple(smaller)).contains(corners).all()


# -------------------------------------------------------------------------- landmarks


def test_preprocessing_moves_no_landmark_by_more_than_half_a_voxel(tmp_path):
    sigma = 2.5
    direction = rotation(15, (0.2, -0.4, 1.0))
    inhale = Grid((80, 72, 44), (0.9, 1.0, 1.7), (0.0, 0.0, 0.0), direction)
    exhale = Grid((76, 78, 40), (0.9, 1.0, 1.7), (2.0, -3.0, 4.0), direction)
    # four blobs about 28 mm apart, off the voxel centres, at least 20 mm inside both images
    centre = inhale.index_to_world((np.asarray(inhale.size) - 1) / 2)
    offsets = np.array([[-10.3, -9.6, -10.2], [10.1, 10.4, -9.7], [-9.8, 10.2, 10.3], [10.2, -10.1, 9.9]])
    blobs = centre + offsets @ np.asarray(direction).reshape(3, 3).T

    def blob_image(grid: Grid) -> sitk.Image:
        centres = grid.voxel_centres()
        values = sum(np.exp(-np.sum((centres - b) ** 2, axis=-1) / (2 * sigma**2)) for b in blobs)
        return image_on(grid, values)

    inputs = {
        **write_phase(tmp_path / "in", "inhale", blob_image(inhale)),
        **write_phase(tmp_path / "in", "exhale", blob_image(exhale)),
        "inhale_landmarks": write_csv(blobs, tmp_path / "in" / "inhale.csv", ["a", "b", "c", "d"]),
        "exhale_landmarks": write_csv(blobs, tmp_path / "in" / "exhale.csv", ["a", "b", "c", "d"]),
    }
    summary = preprocess_subject(
        "b1", inputs, settings(covering_shape([inhale, exhale], exhale, 2 / 3)), tmp_path / "out"
    )
    assert (summary.landmarks, summary.in_view, summary.excluded) == (4, 4, 0)
    out = read_outputs(tmp_path / "out")
    for phase in PHASES:
        table = out[f"{phase}_landmarks"]
        assert list(table.columns) == ["landmark", "x", "y", "z", "in_view"]
        assert list(table["landmark"]) == ["a", "b", "c", "d"] and table["in_view"].all()
        np.testing.assert_array_equal(table[["x", "y", "z"]].to_numpy(), blobs)  # they do not move
        image = out[phase]
        grid = Grid.of(image)
        values = sitk.GetArrayFromImage(image).astype(float)
        centres = grid.voxel_centres()
        for blob in blobs:
            near = np.linalg.norm(centres - blob, axis=-1) < 4 * sigma  # blobs are > 8 sigma apart
            weights = values[near]
            centroid = (centres[near] * weights[:, None]).sum(axis=0) / weights.sum()
            assert np.linalg.norm(centroid - blob) < 0.5 * min(grid.spacing), (phase, blob, centroid)


def test_landmarks_outside_a_field_of_view_are_flagged_not_in_view(tmp_path):
    g = Grid((20, 20, 10), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), rotation(0))
    image = image_on(g, np.full(g.shape, 0.5))
    # 0: in view; 1: inhale point outside the inhale image; 2: exhale point outside the exhale image;
    # 3: inside both images but outside the (smaller, centred) common grid x, y in [6.5, 12.5]
    inhale_points = [[10, 10, 9], [25, 10, 9], [10, 10, 9], [5, 5, 5]]
    exhale_points = [[10, 11, 8], [10, 10, 9], [10, -3, 9], [5, 5, 5]]
    inputs = {
        **write_phase(tmp_path / "in", "inhale", image),
        **write_phase(tmp_path / "in", "exhale", image),
        "inhale_landmarks": write_csv(inhale_points, tmp_path / "in" / "i.csv"),
        "exhale_landmarks": write_csv(exhale_points, tmp_path / "in" / "e.csv"),
    }
    summary = preprocess_subject("f1", inputs, settings((3, 6, 6), factor=1.0), tmp_path / "out")
    assert (summary.in_view, summary.excluded) == (1, 3)
    out = read_outputs(tmp_path / "out")
    for phase in PHASES:
        assert list(out[f"{phase}_landmarks"]["in_view"]) == [True, False, False, False]
        assert list(out[f"{phase}_landmarks"]["landmark"]) == [0, 1, 2, 3]


def test_without_landmarks_the_tables_have_a_header_only(tmp_path):
    g = Grid((8, 8, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), rotation(0))
    image = image_on(g, np.full(g.shape, 0.5))
    inputs = {
        **write_phase(tmp_path / "in", "inhale", image),
        **write_phase(tmp_path / "in", "exhale", image),
        "inhale_landmarks": "",
        "exhale_landmarks": None,
    }
    summary = preprocess_subject("n1", inputs, settings((4, 4, 4)), tmp_path / "out")
    assert (summary.landmarks, summary.in_view, summary.excluded) == (0, 0, 0)
    for phase in PHASES:
        assert (tmp_path / "out" / f"{phase}_landmarks.csv").read_text() == "landmark,x,y,z,in_view\n"


def cropped_subject(tmp_path: Path) -> tuple[dict, np.ndarray, Grid]:
    g = Grid((20, 20, 10), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), rotation(0))
    mask = np.zeros(g.shape, np.uint8)
    mask[:, :, :10] = 1  # left half; a centred grid 10 voxels wide keeps x in [5, 15) only
    inputs = {
        **write_phase(tmp_path / "in", "inhale", image_on(g, np.full(g.shape, 0.5)), image_on(g, mask, np.uint8)),
        **write_phase(tmp_path / "in", "exhale", image_on(g, np.full(g.shape, 0.5))),
    }
    return inputs, mask, g


def test_a_grid_cropping_more_of_a_lung_mask_than_allowed_stops_before_anything_is_written(tmp_path, caplog):
    inputs, _, _ = cropped_subject(tmp_path)
    with caplog.at_level(logging.ERROR, logger="lungreg.preprocess"):
        with pytest.raises(InputError) as error:
            preprocess_subject("w1", inputs, settings((10, 20, 10), factor=1.0, max_crop=0.01), tmp_path / "out")
    message = str(error.value)
    assert message.startswith(f"subject w1: {inputs['inhale_mask']}: inhale: ")
    assert "crops 50.0% of the inhale lung mask (preprocess.max_mask_crop: 1.0%)" in message
    assert "set preprocess.grid_shape: auto" in message and "\n" not in message
    assert "exhale" in caplog.text  # the exhale mask (all ones) is cropped too: logged, one line each
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 2
    assert not (tmp_path / "out").exists()


def test_a_crop_below_the_limit_is_a_warning_with_the_fraction_lost_in_qc(tmp_path, caplog):
    inputs, mask, g = cropped_subject(tmp_path)
    tolerant = PreprocessSettings((0.0, 1.0), 1.0, (10, 20, 10), max_mask_crop=0.6)
    with caplog.at_level(logging.WARNING, logger="lungreg.preprocess"):
        summary = preprocess_subject("w1", inputs, tolerant, tmp_path / "out")
    assert summary.mask_fraction_lost == {"inhale": pytest.approx(0.5), "exhale": pytest.approx(0.5)}
    assert "subject w1, inhale: the common grid (10 x 20 x 10 voxels of 1 x 1 x 1 mm) crops 50.0%" in caplog.text
    assert mask_fraction_outside(image_on(g, mask, np.uint8), g) == 0.0
    qc = read_table(tmp_path / "out" / "qc.tsv")
    assert list(qc.columns) == QC_COLUMNS
    cropped = qc[qc["check"] == "mask_cropped"].set_index("phase")
    assert cropped["value"].to_dict() == {"inhale": 0.5, "exhale": 0.5} and cropped["problem"].all()


def test_auto_grid_centres_on_both_lung_masks_and_crops_nothing(tmp_path):
    g = Grid((40, 30, 20), (1.0, 2.0, 3.0), (5.0, -7.0, 11.0), rotation(20))
    masks = {}
    for phase, shift in (("inhale", 0), ("exhale", 3)):
        mask = np.zeros(g.shape, np.uint8)
        mask[2 + shift : 9 + shift, 4:20, 22 + shift : 33] = 1  # off-centre, different per phase
        masks[phase] = image_on(g, mask, np.uint8)
    inputs = {}
    for phase in PHASES:
        inputs |= write_phase(tmp_path / "in", phase, image_on(g, np.full(g.shape, 0.5)), masks[phase])
    auto = PreprocessSettings((0.0, 1.0), 0.5, "auto", grid_margin_mm=4.0)
    summary = preprocess_subject("a1", inputs, auto, tmp_path / "out")
    assert summary.mask_fraction_lost == {"inhale": 0.0, "exhale": 0.0}
    corners = np.concatenate([mask_box_corners(masks[p]) for p in PHASES])
    assert summary.grid.contains(corners).all()
    # the formula: per axis ceil((lung-box extent + 2 margin) / (spacing / factor)), along the grid's axes
    local = corners @ g.direction_matrix  # the masks lie 4 mm or more inside the image: the margin fits
    extent = local.max(axis=0) - local.min(axis=0)
    expected = np.ceil((extent + 8.0) / (np.asarray(g.spacing) / 0.5) - 1e-3).astype(int)
    assert summary.grid.size == tuple(expected)
    centre = summary.grid.index_to_world((np.asarray(summary.grid.size) - 1) / 2)
    np.testing.assert_allclose(centre @ g.direction_matrix, (local.max(axis=0) + local.min(axis=0)) / 2, atol=1e-9)
    # one shape for the cohort: the workflow's cohort_grid_shape wins over the subject's own
    bigger = PreprocessSettings((0.0, 1.0), 0.5, "auto", grid_margin_mm=4.0, cohort_grid_shape=(9, 10, 11))
    assert preprocess_subject("a1", inputs, bigger, tmp_path / "out2").grid.shape == (9, 10, 11)


def lung_volume(tmp_path: Path, lung_value: float, clipped: float = 0.0) -> dict:
    g = Grid((12, 12, 8), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), rotation(0))
    values = np.full(g.shape, lung_value, np.float32)
    values.reshape(-1)[: int(round(clipped * values.size))] = -3000.0  # this share below the window
    inputs = {}
    for phase in PHASES:
        inputs |= write_phase(tmp_path / "in", phase, image_on(g, values))
    return inputs


def test_a_window_that_clips_most_lung_voxels_stops_and_names_the_ct_preset(tmp_path):
    inputs = lung_volume(tmp_path, -850.0)  # Hounsfield units through the MRI window
    with pytest.raises(InputError) as error:
        preprocess_subject("ct1", inputs, settings((8, 12, 12), factor=1.0, low=0.0, high=1300.0), tmp_path / "out")
    message = str(error.value)
    assert message.startswith(f"subject ct1: {inputs['inhale']}: inhale: 100.0% of the lung voxels lie below")
    assert "preprocess.intensity_range [0, 1300]" in message and "(preprocess.max_clipped_lung: 50.0%)" in message
    assert "config/ct.yaml" in message and not (tmp_path / "out").exists()


def test_partial_clipping_is_a_warning_in_qc_and_the_right_window_none(tmp_path):
    inputs = lung_volume(tmp_path, -850.0, clipped=0.2)
    preprocess_subject("ct1", inputs, settings((8, 12, 12), factor=1.0, low=-1024.0, high=300.0), tmp_path / "out")
    qc = read_table(tmp_path / "out" / "qc.tsv").set_index(["phase", "check"])
    assert qc.loc[("inhale", "lung_clipped_low"), "value"] == pytest.approx(0.2, abs=1e-3)
    assert qc.loc[("inhale", "lung_clipped_low"), "problem"]
    assert not qc.loc[("inhale", "lung_clipped_high"), "problem"]
    clean = lung_volume(tmp_path / "clean", -850.0)
    preprocess_subject("ct2", clean, settings((8, 12, 12), factor=1.0, low=-1024.0, high=300.0), tmp_path / "out2")
    assert not read_table(tmp_path / "out2" / "qc.tsv")["problem"].any()


# -------------------------------------------------------------------------- NIfTI files


def test_written_nifti_carries_origin_spacing_and_direction(tmp_path):
    grid = Grid((22, 18, 12), (0.8, 1.3, 2.2), (-40.0, 12.5, 101.0), rotation(15, (1.0, 0.5, 0.2)))
    image = image_on(grid, analytic(grid.voxel_centres()))
    inputs = {**write_phase(tmp_path / "in", "inhale", image), **write_phase(tmp_path / "in", "exhale", image)}
    summary = preprocess_subject("n2", inputs, settings((7, 11, 13)), tmp_path / "out")
    expected = summary.grid
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    for name, pixel in (("inhale_image", sitk.sitkFloat32), ("exhale_mask", sitk.sitkUInt8)):
        path = tmp_path / "out" / f"{name}.nii.gz"
        itk = sitk.ReadImage(str(path))
        assert itk.GetPixelID() == pixel
        assert itk.GetSize() == expected.size
        np.testing.assert_allclose(itk.GetSpacing(), expected.spacing, atol=1e-5)
        np.testing.assert_allclose(itk.GetOrigin(), expected.origin, atol=1e-4)
        np.testing.assert_allclose(itk.GetDirection(), expected.direction, atol=1e-5)
        nifti = nibabel.load(str(path))
        assert nifti.shape == expected.size  # nibabel indexes i, j, k like ITK's x, y, z
        affine = np.eye(4)
        affine[:3, :3] = lps_to_ras @ expected.index_to_world_matrix
        affine[:3, 3] = lps_to_ras @ np.asarray(expected.origin)
        np.testing.assert_allclose(nifti.affine, affine, atol=1e-4)
        # the same voxel through both readers: nibabel array [i, j, k] == ITK array [k, j, i]
        np.testing.assert_array_equal(np.asarray(nifti.dataobj).transpose(2, 1, 0), sitk.GetArrayFromImage(itk))


# -------------------------------------------------------------------- the real CT pair


def test_real_ct_pair_through_manifest_checks_and_preprocessing(tmp_path, elastix_lung_pair):
    data = elastix_lung_pair
    rel = lambda name: os.path.relpath(data / name, tmp_path)  # noqa: E731 - relative to the manifest
    manifest_path = tmp_path / "subjects.tsv"
    manifest_path.write_text(
        "subject\tlabel\tinhale\texhale\tinhale_mask\texhale_mask\tinhale_landmarks\texhale_landmarks\n"
        f"elastix01\t\t{rel('baseline.mha')}\t{rel('followup.mha')}\t{rel('baseline_mask.mha')}\t"
        f"{rel('followup_mask.mha')}\t{rel('baseline_landmarks.txt')}\t{rel('followup_landmarks.txt')}\n"
    )
    frame = read_manifest(manifest_path)
    assert frame.loc[0, "label"] == "" and frame.loc[0, "inhale"] == str(data / "baseline.mha")

    report = check_subjects(frame, cache_path=tmp_path / "check.json")
    assert (report["elastix01"].landmarks, report["elastix01"].in_view, report["elastix01"].excluded) == (100, 51, 49)

    grids = {p: Grid.of(sitk.ReadImage(frame.loc[0, p])) for p in PHASES}
    assert grids["inhale"] != grids["exhale"]  # different sizes and origins
    shape = covering_shape(list(grids.values()), grids["exhale"], 2 / 3)
    assert shape == (97, 111, 81)
    s = PreprocessSettings.from_config(
        {"intensity_range": [-1000, 300], "factor": 2 / 3, "grid_shape": list(shape), "mask_interpolation": "nearest"},
        "exhale",
    )
    out = tmp_path / "out"
    summary = preprocess_subject("elastix01", frame.loc[0].to_dict(), s, out)
    assert (summary.landmarks, summary.in_view, summary.excluded) == (100, 51, 49)
    assert summary.mask_fraction_lost == {"inhale": 0.0, "exhale": 0.0}

    result = read_outputs(out)
    common = Grid.of(result["exhale"])
    assert common.shape == shape and common.spacing == pytest.approx((1.366 * 1.5, 1.366 * 1.5, 2.5 * 1.5))
    for key in ("inhale", "inhale_mask", "exhale_mask"):
        assert common.matches(result[key]), key
    for phase in PHASES:
        values = sitk.GetArrayFromImage(result[phase])
        assert values.min() >= 0 and values.max() <= 1 and 0.05 < values.mean() < 0.95
        assert sitk.GetArrayFromImage(result[f"{phase}_mask"]).sum() > 1000
        table = result[f"{phase}_landmarks"]
        original = read_landmarks(frame.loc[0, f"{phase}_landmarks"])
        np.testing.assert_array_equal(table[["x", "y", "z"]].to_numpy(), original)  # exactly preserved
        assert table["in_view"].sum() == 51 and (~table["in_view"]).sum() == 49
        assert list(table["landmark"]) == list(range(100))
    flags = [result[f"{p}_landmarks"]["in_view"].to_numpy() for p in PHASES]
    np.testing.assert_array_equal(flags[0], flags[1])


def elastix_manifest(tmp_path: Path, data: Path, inhale: str | None = None) -> pd.DataFrame:
    """The real CT pair in the README's manifest format (baseline as inhale, follow-up as exhale)."""
    rel = lambda path: os.path.relpath(path, tmp_path)  # noqa: E731 - relative to the manifest
    path = tmp_path / "subjects.tsv"
    path.write_text(
        "subject\tlabel\tinhale\texhale\tinhale_mask\texhale_mask\tinhale_landmarks\texhale_landmarks\n"
        f"elastix01\t\t{rel(inhale or data / 'baseline.mha')}\t{rel(data / 'followup.mha')}\t"
        f"{rel(data / 'baseline_mask.mha')}\t{rel(data / 'followup_mask.mha')}\t"
        f"{rel(data / 'baseline_landmarks.txt')}\t{rel(data / 'followup_landmarks.txt')}\n"
    )
    return read_manifest(path)


CT = {"intensity_range": [-1024, 300], "factor": 0.3333333, "grid_shape": "auto"}


def test_real_ct_pair_on_the_auto_grid_keeps_every_lung_voxel_and_the_51_landmark_pairs(tmp_path, elastix_lung_pair):
    frame = elastix_manifest(tmp_path, elastix_lung_pair)
    report = check_subjects(frame)
    shape = lung_grid_shape(report, "exhale", CT["factor"], 15.0)
    settings_ = PreprocessSettings.from_config({**CT, "cohort_grid_shape": list(shape)}, "exhale")
    summary = preprocess_subject("elastix01", frame.loc[0].to_dict(), settings_, tmp_path / "out")
    assert summary.grid.shape == shape
    assert summary.mask_fraction_lost == {"inhale": 0.0, "exhale": 0.0}
    assert (summary.landmarks, summary.in_view, summary.excluded) == (100, 51, 49)  # all in both originals
    qc = read_table(tmp_path / "out" / "qc.tsv")
    assert not qc["problem"].any(), qc[qc["problem"]].to_dict("records")
    # a grid set by hand: the planner knows before any job which lung masks reach outside it
    assert lungs_outside_grid(report, "exhale", 2 / 3, (24, 48, 48)) == [
        ("elastix01", "inhale"),
        ("elastix01", "exhale"),
    ]
    assert lungs_outside_grid(report, "exhale", CT["factor"], (49, 56, 41)) == []
    # never larger than the grid that holds both fields of view (the margin is cut to the images)
    grids = [Grid.of(sitk.ReadImage(frame.loc[0, p])) for p in PHASES]
    assert all(a <= b for a, b in zip(shape, covering_shape(grids, grids[1], CT["factor"])))
    assert np.prod(shape) < np.prod(covering_shape(grids, grids[1], CT["factor"]))


def write_dicom_series(image: sitk.Image, folder: Path) -> None:
    """`image` as a CT DICOM series, one file per slice (SimpleITK's series writer, GDCM)."""
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    orientation = "\\".join(f"{v:.10g}" for v in (*direction[0::3], *direction[1::3]))
    series = "1.2.826.0.1.3680043.2.1125.1.14"
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in (
            ("0008|0060", "CT"),
            ("0020|000e", series),
            ("0020|000d", series + ".0"),
            ("0020|0037", orientation),
            ("0020|0032", "\\".join(f"{v:.10g}" for v in position)),
            ("0020|0013", str(k + 1)),
            ("0018|0050", f"{image.GetSpacing()[2]:.10g}"),
            ("0028|0030", "\\".join(f"{v:.10g}" for v in image.GetSpacing()[1::-1])),
            ("0008|0018", f"{series}.{k + 1}"),
        ):
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{k:04d}.dcm"))
        writer.Execute(slice_)


def test_real_ct_as_a_dicom_series_through_the_manifest_keeps_the_mha_geometry(tmp_path, elastix_lung_pair):
    original = sitk.ReadImage(str(elastix_lung_pair / "baseline.mha"))
    write_dicom_series(original, tmp_path / "dicom" / "baseline")
    frame = elastix_manifest(tmp_path, elastix_lung_pair, inhale=tmp_path / "dicom" / "baseline")
    assert frame.loc[0, "inhale"] == str(tmp_path / "dicom" / "baseline")
    report = check_subjects(frame)  # the folder is read as one DICOM series
    assert report["elastix01"].in_view == 51
    dicom, mha = report["elastix01"].grids["inhale"], Grid.of(original)
    assert dicom.size == mha.size == (115, 157, 129)
    np.testing.assert_allclose(dicom.spacing, mha.spacing, atol=1e-6)
    np.testing.assert_allclose(dicom.origin, mha.origin, atol=1e-6)
    np.testing.assert_allclose(dicom.direction, mha.direction, atol=1e-9)
    read = sitk.ReadImage(sorted(str(p) for p in (tmp_path / "dicom" / "baseline").iterdir()))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(original))  # the HU voxels
    # and the preprocessed volumes are those of the MHA original
    (tmp_path / "mha").mkdir()
    by_mha = elastix_manifest(tmp_path / "mha", elastix_lung_pair)
    shape = lung_grid_shape(report, "exhale", CT["factor"], 15.0)
    assert shape == lung_grid_shape(check_subjects(by_mha), "exhale", CT["factor"], 15.0)
    settings_ = PreprocessSettings.from_config({**CT, "cohort_grid_shape": list(shape)}, "exhale")
    outputs = {}
    for name, table in (("dicom", frame), ("mha", by_mha)):
        summary = preprocess_subject("elastix01", table.loc[0].to_dict(), settings_, tmp_path / f"out_{name}")
        assert (summary.in_view, summary.excluded) == (51, 49)
        outputs[name] = read_outputs(tmp_path / f"out_{name}")
    for key in ("inhale", "inhale_mask"):
        assert Grid.of(outputs["dicom"][key]) == Grid.of(outputs["mha"][key])
        np.testing.assert_allclose(
            sitk.GetArrayFromImage(outputs["dicom"][key]), sitk.GetArrayFromImage(outputs["mha"][key]), atol=1e-6
        )
