"""Automatic lung masks of CT (lungreg.lungmask): each step on a phantom with known lungs, physical
space under a flipped axis, the refusal of non-CT images, the QC rows, the planning box and its
cache, and the real scans against their expert masks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from lungreg import manifest
from lungreg.geometry import Grid, mask_box_corners, resample
from lungreg.io import InputError, read_table
from lungreg.lungmask import AutoMaskSettings, check_ct, looks_like_ct, planning_box, segment_lungs, superior_axis
from lungreg.metrics import dice
from lungreg.preprocess import QC_COLUMNS, auto_lung_mask

SETTINGS = AutoMaskSettings()
LUNG_AXES_MM = np.array([55.0, 80.0, 110.0])  # x, y, z semi-axes of each lung
LUNG_CENTRES_MM = np.array([[-70.0, 0.0, 0.0], [70.0, 0.0, 0.0]])


def phantom_grid(size=(80, 64, 48), spacing=(5.0, 5.0, 6.0)) -> Grid:
    """A chest-sized grid centred on the origin, identity direction."""
    size, spacing = np.asarray(size), np.asarray(spacing, float)
    return Grid(
        tuple(int(s) for s in size), tuple(spacing), tuple(-spacing * (size - 1) / 2), (1, 0, 0, 0, 1, 0, 0, 0, 1)
    )


def inside_tube(points: np.ndarray, start, end, radius: float) -> np.ndarray:
    start, end = np.asarray(start, float), np.asarray(end, float)
    axis = end - start
    t = np.clip(((points - start) @ axis) / (axis @ axis), 0, 1)
    return np.linalg.norm(points - (start + t[..., None] * axis), axis=-1) <= radius


def chest_phantom(grid: Grid, axes=LUNG_AXES_MM, centres=LUNG_CENTRES_MM, seed: int = 0):
    """CT in HU: a body (40 HU) in air (-1000), padding (-2048) outside a round field of view, two
    lungs (-850, with vessels at 40 HU), a trachea and main bronchi (-1000) reaching the top border,
    a stomach bubble (-1000) below the lungs. Returns the image (int16) and the lungs' true mask."""
    points = grid.voxel_centres()
    x, y = points[..., 0], points[..., 1]
    values = np.full(grid.shape, -1000.0)
    values[(x / 160) ** 2 + (y / 120) ** 2 <= 1] = 40.0
    lungs = np.zeros(grid.shape, bool)
    for centre in centres:
        lungs |= (((points - centre) / axes) ** 2).sum(axis=-1) <= 1
    values[lungs] = -850.0
    for centre in centres:  # vessels: holes in the thresholded lungs, inside the lung mask
        for offset in ([0, 20, 0], [10, -30, 40], [-10, 10, -50]):
            values[np.linalg.norm(points - centre - offset, axis=-1) <= 8] = 40.0
    top = grid.index_to_world(np.asarray(grid.size) - 1)[2] + 10
    carina = np.array([0.0, -20.0, 80.0])
    airways = inside_tube(points, carina, [0.0, -20.0, top], 9.0)
    for centre in centres:
        airways |= inside_tube(points, carina, centre + [-np.sign(centre[0]) * 45, -10, 50], 6.0)
    values[airways] = -1000.0
    values[np.linalg.norm(points - [40.0, -30.0, -125.0], axis=-1) <= 22] = -1000.0  # stomach gas
    values += np.random.default_rng(seed).normal(0, 20, grid.shape)
    values[x**2 + y**2 > 190**2] = -2048.0  # outside the scanner's field of view
    image = grid.apply_to(sitk.GetImageFromArray(np.round(values).astype(np.int16)))
    return image, lungs & ~airways


def lung_volume_ml(axes=LUNG_AXES_MM) -> float:
    return 2 * 4 / 3 * np.pi * np.prod(axes) / 1000


def test_the_phantoms_lungs_are_found_without_outside_air_padding_airways_or_stomach():
    image, truth = chest_phantom(phantom_grid())
    result = segment_lungs(image, SETTINGS)
    found = sitk.GetArrayFromImage(result.mask).astype(bool)
    assert Grid.of(result.mask).matches(image) and result.mask.GetPixelID() == sitk.sitkUInt8
    assert dice(found, truth) > 0.97
    assert result.lungs == 2 and result.volume_ml == pytest.approx(lung_volume_ml(), rel=0.05)
    points = Grid.of(image).voxel_centres()
    assert not found[np.linalg.norm(points - [40.0, -30.0, -125.0], axis=-1) <= 15].any()  # the stomach
    assert not found[inside_tube(points, [0, -20, 90], [0, -20, 200], 7.0)].any()  # the trachea
    assert 3 < result.airway_ml < 60  # the trachea and main bronchi (about 22 ml here), not the lungs
    vessel = np.linalg.norm(points - LUNG_CENTRES_MM[0] - [0, 20, 0], axis=-1) <= 6
    assert found[vessel].all()  # holes filled


def test_without_airway_removal_the_trachea_would_stay_and_the_lungs_count_as_two_through_it():
    """The airway step is what removes the trachea: with no trachea in the top slices (an area limit
    of 0 mm^2), it stays in the mask; the lungs still count as two (split by the junction erosion)."""
    image, truth = chest_phantom(phantom_grid())
    kept = segment_lungs(image, dataclasses.replace(SETTINGS, trachea_area_mm2=0.0))
    points = Grid.of(image).voxel_centres()
    assert sitk.GetArrayFromImage(kept.mask).astype(bool)[inside_tube(points, [0, -20, 90], [0, -20, 140], 5.0)].any()
    assert kept.airway_ml == 0 and kept.lungs == 2


def test_a_lung_cut_by_a_tight_field_of_view_is_kept_and_a_lone_lung_counts_as_one():
    """Air against the border over a small share of its surface is a lung, not the outside (the
    elastix pair's case); with one lung in view the QC count is 1."""
    grid = phantom_grid(size=(48, 64, 48))  # x within +-117.5 mm: both lungs (to +-125) cut by the x faces
    image, truth = chest_phantom(grid)
    result = segment_lungs(image, SETTINGS)
    assert dice(sitk.GetArrayFromImage(result.mask).astype(bool), truth) > 0.95
    one = chest_phantom(phantom_grid(), centres=LUNG_CENTRES_MM[:1])[0]
    assert segment_lungs(one, SETTINGS).lungs == 1


def test_a_flipped_head_foot_axis_gives_the_same_mask_in_physical_space():
    """The trachea is found at the superior end whatever the array order: the same phantom stored
    with the z axis reversed (direction z -1) gives the same mask, resampled by SimpleITK."""
    image, _ = chest_phantom(phantom_grid())
    flipped = sitk.Flip(image, [False, False, True], flipAboutOrigin=False)
    assert superior_axis(image) == (0, True) and superior_axis(flipped) == (0, False)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(flipped)[::-1], sitk.GetArrayViewFromImage(image))
    ours, theirs = segment_lungs(image, SETTINGS), segment_lungs(flipped, SETTINGS)
    back = resample(theirs.mask, Grid.of(image), "nearest")
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(ours.mask))
    assert theirs.airway_ml == pytest.approx(ours.airway_ml)


def test_an_image_that_is_not_ct_is_refused_with_the_column_to_fill(tmp_path):
    image, _ = chest_phantom(phantom_grid())
    mri = sitk.Cast(image + 2048, sitk.sitkInt16)  # positive intensities: no air in Hounsfield units
    assert looks_like_ct(image) and not looks_like_ct(mri)
    path = tmp_path / "in.nii.gz"
    sitk.WriteImage(mri, str(path))
    with pytest.raises(InputError) as error:
        auto_lung_mask("m01", "inhale", path, SETTINGS, tmp_path / "mask.nii.gz", tmp_path / "qc.tsv")
    message = str(error.value)
    assert message.startswith(f"subject m01: {path}: inhale: no inhale_mask given")
    assert "Hounsfield units" in message and "give the inhale_mask column a lung mask" in message
    assert not (tmp_path / "mask.nii.gz").exists() and not (tmp_path / "qc.tsv").exists()
    check_ct("m01", path, image, "inhale")  # CT passes


def test_the_mask_and_its_checks_are_written_and_implausible_lungs_are_problems(tmp_path):
    image, _ = chest_phantom(phantom_grid())
    sitk.WriteImage(image, str(tmp_path / "ct.mha"))
    auto_lung_mask("c01", "exhale", tmp_path / "ct.mha", SETTINGS, tmp_path / "m.nii.gz", tmp_path / "qc.tsv")
    written = sitk.ReadImage(str(tmp_path / "m.nii.gz"))
    assert Grid.of(written).matches(image)
    qc = read_table(tmp_path / "qc.tsv")
    assert list(qc.columns) == QC_COLUMNS
    assert list(qc["check"]) == ["auto_mask_volume_low", "auto_mask_volume_high", "auto_mask_lungs"]
    assert qc["value"].iloc[0] == pytest.approx(lung_volume_ml(), rel=0.05) and not qc["problem"].any()
    assert list(qc["limit"]) == [500.0, 9000.0, 2]
    # small lungs (2 x 0.16 l) and a lone lung: problem rows naming the setting and the file to check
    small = chest_phantom(phantom_grid(), axes=np.array([25.0, 35.0, 45.0]))[0]
    sitk.WriteImage(small, str(tmp_path / "small.mha"))
    auto_lung_mask("c02", "inhale", tmp_path / "small.mha", SETTINGS, tmp_path / "s.nii.gz", tmp_path / "s.tsv")
    problems = read_table(tmp_path / "s.tsv").set_index("check")
    assert problems.loc["auto_mask_volume_low", "problem"] and not problems.loc["auto_mask_volume_high", "problem"]
    assert "below preprocess.auto_mask.min_volume_ml (500 ml)" in problems.loc["auto_mask_volume_low", "message"]
    assert str(tmp_path / "s.nii.gz") in problems.loc["auto_mask_volume_low", "message"]
    lone = chest_phantom(phantom_grid(), centres=LUNG_CENTRES_MM[:1])[0]
    sitk.WriteImage(lone, str(tmp_path / "lone.mha"))
    auto_lung_mask("c03", "inhale", tmp_path / "lone.mha", SETTINGS, tmp_path / "l.nii.gz", tmp_path / "l.tsv")
    lungs = read_table(tmp_path / "l.tsv").set_index("check").loc["auto_mask_lungs"]
    assert lungs["problem"] and lungs["value"] == 1 and "found 1 lung(s), not two" in lungs["message"]


def test_the_planning_box_holds_the_full_mask_and_a_manifest_without_masks_is_checked_and_cached(tmp_path):
    image, _ = chest_phantom(phantom_grid(spacing=(2.5, 2.5, 3.0), size=(160, 128, 96)))
    full = mask_box_corners(segment_lungs(image, SETTINGS).mask)
    coarse = planning_box(image, SETTINGS)
    np.testing.assert_allclose(coarse.min(axis=0), full.min(axis=0), atol=4.0)  # within a planning voxel
    np.testing.assert_allclose(coarse.max(axis=0), full.max(axis=0), atol=4.0)
    for phase in ("inhale", "exhale"):
        sitk.WriteImage(image, str(tmp_path / f"{phase}.mha"))
    pd.DataFrame([{"subject": "c01", "label": "ILD", "inhale": "inhale.mha", "exhale": "exhale.mha"}]).to_csv(
        tmp_path / "subjects.tsv", sep="\t", index=False
    )  # no mask columns at all
    frame = manifest.read_manifest(tmp_path / "subjects.tsv")
    assert list(frame["inhale_mask"]) == [""] and list(frame["exhale_mask"]) == [""]
    cache = tmp_path / "cache.json"
    report = manifest.check_subjects(frame, cache, SETTINGS)
    assert (
        report["c01"].auto_masks == ("inhale", "exhale") and "automatic lung mask: inhale, exhale" in report.lines()[0]
    )
    np.testing.assert_allclose(report["c01"].lung_corners["inhale"], coarse)
    assert report.files_read == 4  # two images, each read for its grid and for its lungs
    assert manifest.check_subjects(frame, cache, SETTINGS).files_read == 0  # cached
    other = dataclasses.replace(SETTINGS, air_hu=-500.0)  # other settings: the lungs again, not the grids
    assert manifest.check_subjects(frame, cache, other).files_read == 2


def test_a_manifest_of_mri_without_masks_stops_while_checking(tmp_path):
    image, _ = chest_phantom(phantom_grid())
    sitk.WriteImage(sitk.Cast(image + 2048, sitk.sitkInt16), str(tmp_path / "mri.nii.gz"))
    row = {"subject": "m01", "label": "", "inhale": "mri.nii.gz", "exhale": "mri.nii.gz", "exhale_mask": ""}
    pd.DataFrame([row]).to_csv(tmp_path / "subjects.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match=r"^subject m01: .*mri.nii.gz: inhale: no inhale_mask given, and the auto"):
        manifest.check_subjects(manifest.read_manifest(tmp_path / "subjects.tsv"), tmp_path / "cache.json")
    assert not (tmp_path / "cache.json").exists()


# ---------------------------------------------------------------------------- real scans

REAL_SCANS = {  # image, expert mask, lungs in view
    "elastix_baseline": ("elastix_lung_pair", "baseline.mha", "baseline_mask.mha", 1),
    "elastix_followup": ("elastix_lung_pair", "followup.mha", "followup_mask.mha", 1),
    "cip_ct64": ("cip_thorax_ct64", "ct-64.nrrd", "wholeLung-64.nrrd", 2),
}


@pytest.mark.parametrize("scan", list(REAL_SCANS))
def test_automatic_masks_of_the_real_scans_agree_with_their_expert_masks(scan, request):
    """Dice >= 0.95 against the expert masks (measured: README.md, "A CT cohort"); the elastix pair
    holds one lung (a tight field of view), the CIP thorax both."""
    folder, image_name, mask_name, lungs = REAL_SCANS[scan]
    data = request.getfixturevalue(folder)
    image = sitk.ReadImage(str(data / image_name))
    expert = sitk.GetArrayFromImage(sitk.ReadImage(str(data / mask_name))) != 0
    result = segment_lungs(image, SETTINGS)
    found = sitk.GetArrayFromImage(result.mask) != 0
    score = dice(found, expert)
    expert_ml = expert.sum() * np.prod(image.GetSpacing()) / 1000
    print(f"{scan}: Dice {score:.4f}, {result.volume_ml:.0f} ml (expert {expert_ml:.0f} ml)")
    assert score >= 0.95
    assert result.lungs == lungs and 0 < result.airway_ml < SETTINGS.airway_max_ml
    box = planning_box(image, SETTINGS)
    expert_box = mask_box_corners(sitk.ReadImage(str(data / mask_name)))
    assert np.abs(box.min(axis=0) - expert_box.min(axis=0)).max() < 8  # mm: well inside grid_margin_mm (15)
    assert np.abs(box.max(axis=0) - expert_box.max(axis=0)).max() < 8
