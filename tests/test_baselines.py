"""Classical baselines (ANTsPy SyN, SimpleITK affine + B-spline / demons, ConvexAdam, elastix):
conventions and pitfalls.

Synthetic phantoms are analytic functions of PHYSICAL position, so a known translation or smooth
deformation between fixed and moving is exact whatever the grids; the real thorax CT checks the
affine stage against a known rigid transform.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from lungreg import metrics
from lungreg.evaluate import Phase, evaluate_pair, load_phase
from lungreg.geometry import Grid, image_from_array
from lungreg.network.transform import displacement_transform, identity_displacement
from lungreg.registration.base import LoadedPair
from lungreg.registration.baselines import common, convexadam, elastix
from lungreg.registration.baselines.common import RegistrationError
from lungreg.registration.baselines.convexadam import convexadam_displacement
from lungreg.registration.baselines.registrar import build_baseline, resolve_options
from lungreg.registration.baselines.sitk import sitk_affine
from lungreg.study import BASELINE_METHODS, Pair

SITK_METHODS = ("sitk_bspline", "sitk_demons")
REPO = Path(__file__).resolve().parents[1]


def rotation_z(degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def centred_grid(size_xyz, spacing, direction=np.eye(3), centre=(0.0, 0.0, 0.0)) -> Grid:
    size, spacing = np.asarray(size_xyz), np.asarray(spacing, float)
    origin = np.asarray(centre) - direction @ (spacing * (size - 1) / 2)
    return Grid(tuple(int(v) for v in size), tuple(spacing), tuple(origin), tuple(np.asarray(direction).ravel()))


# ------------------------------------------------------------------- an analytic thorax phantom

RNG = np.random.default_rng(7)
LUNG_CENTRES = np.array([[-42.0, 0.0, 5.0], [42.0, 0.0, 5.0]])
LUNG_RADII = np.array([32.0, 45.0, 55.0])
VESSELS = np.concatenate([c + RNG.uniform(-0.6, 0.6, (12, 3)) * LUNG_RADII for c in LUNG_CENTRES])


def _soft_inside(points: np.ndarray, centre, radii, width: float = 4.0) -> np.ndarray:
    """~1 inside an ellipsoid, ~0 outside, a smooth edge about `width` mm wide."""
    level = np.sqrt((((points - centre) / radii) ** 2).sum(-1))
    return 1.0 / (1.0 + np.exp((level - 1.0) * np.min(radii) / width))


def phantom(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image values in [0, 1] and the lung mask at physical `points` (..., 3): a bright body,
    two dark lungs with bright "vessel" blobs."""
    image = 0.8 * _soft_inside(points, (0.0, 0.0, 0.0), (105.0, 85.0, 80.0))
    lungs = np.zeros(points.shape[:-1])
    for centre in LUNG_CENTRES:
        lungs = np.maximum(lungs, _soft_inside(points, centre, LUNG_RADII))
    image = image * (1.0 - 0.8 * lungs)
    for vessel in VESSELS:
        image += 0.5 * lungs * np.exp(-((points - vessel) ** 2).sum(-1) / (2 * 7.0**2))
    return np.clip(image, 0.0, 1.0).astype(np.float32), lungs > 0.5


def make_phase(grid: Grid, correspondence, landmarks: np.ndarray | None = None) -> Phase:
    """A phase whose voxel at x shows the phantom at correspondence(x)."""
    image, mask = phantom(correspondence(grid.voxel_centres()))
    table = pd.DataFrame(columns=["landmark", "x", "y", "z", "in_view"])
    if landmarks is not None:
        table = pd.DataFrame(
            {
                "landmark": [f"l{i}" for i in range(len(landmarks))],
                "x": landmarks[:, 0],
                "y": landmarks[:, 1],
                "z": landmarks[:, 2],
                "in_view": True,
            }
        )
    return Phase(image_from_array(image, grid), mask, grid, table)


def loaded_pair(fixed: Phase, moving: Phase, name: str = "s01") -> LoadedPair:
    return LoadedPair(Pair(name, "inhale", name, "exhale"), fixed, moving)


# ------------------------------------------------------------------------ options, pyramid


def test_options_are_checked_and_every_method_builds():
    for method in BASELINE_METHODS:
        registrar = build_baseline(method, {}, threads=1)
        assert (registrar.name, registrar.device, registrar.threads, registrar.batch_size) == (method, "cpu", 1, 1)
    with pytest.raises(ValueError, match="unknown option"):
        build_baseline("sitk_bspline", {"grid_spacing": 20}, 1)
    with pytest.raises(ValueError, match="unknown baseline method"):
        build_baseline("deeds", {}, 1)


def test_the_workflow_config_options_are_accepted():
    yaml = pytest.importorskip("yaml")
    from pathlib import Path

    from snakemake.utils import validate

    repo = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    validate(
        config, str(repo / "config" / "schemas" / "config.schema.yaml")
    )  # the schema's defaults, as the rules get them
    workflow_keys = {"enabled", "protocols", "chunks", "subjects"}  # rules/common.smk BASELINE_KEYS
    for method, section in config["baselines"].items():
        resolve_options(method, {k: v for k, v in section.items() if k not in workflow_keys})


def test_pyramid_keeps_enough_voxels_at_the_coarsest_level():
    # the default study's cropped lungs (~ 36 x 24 x 22 voxels): too small to shrink
    assert common.pyramid_schedule((36, 24, 22), (8.3, 8.3, 12.5), 5000) == ([1], [0.0])
    factors, sigmas = common.pyramid_schedule((150, 110, 55), (2.1, 2.1, 4.7), 200_000)
    assert factors == [4, 2, 1] and sigmas == pytest.approx([4.2, 2.1, 0.0])
    for factor in factors:
        assert min(np.asarray((150, 110, 55)) // factor) >= 12 and 200_000 / factor**3 >= 1000
    # few mask voxels limit the pyramid even when the box is large
    assert common.pyramid_schedule((150, 110, 55), (2.1, 2.1, 4.7), 3000)[0] == [1]


def test_itk_threads_are_set_and_restored(monkeypatch):
    monkeypatch.setenv(common.ITK_THREADS_ENV, "7")
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    with common.itk_threads(1):
        assert os.environ[common.ITK_THREADS_ENV] == "1"
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 1
    assert os.environ[common.ITK_THREADS_ENV] == "7"
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == before


# ------------------------------------------------------------------- real thorax CT, known rigid


def test_sitk_affine_recovers_the_known_rotation_of_the_thorax_ct(cip_thorax_ct64):
    def scaled(name: str) -> sitk.Image:  # CT HU: clip [-1000, 300] to [0, 1]
        image = sitk.Cast(sitk.ReadImage(str(cip_thorax_ct64 / name)), sitk.sitkFloat32)
        return sitk.Cast(sitk.IntensityWindowing(image, -1000, 300, 0, 1), sitk.sitkFloat32)

    fixed, moving = scaled("ct-64.nrrd"), scaled("ct-64-transformed.nrrd")
    mask = sitk.ReadImage(str(cip_thorax_ct64 / "wholeLung-64.nrrd")) > 0

    # Which way does tr.tfm go? The transformed file holds the same voxels as ct-64 under a header
    # with direction R and origin o2, so fixed point p (voxel i = (p - o1) / s) sits at moving point
    # q = o2 + R (p - o1). tr.tfm's matrix is R^T: it is the INVERSE of that, the moving -> fixed
    # map; the fixed -> moving transform a registration must find (ITK convention) is its inverse.
    tr = sitk.AffineTransform(sitk.ReadTransform(str(cip_thorax_ct64 / "tr.tfm")))
    truth = tr.GetInverse()
    rotation = np.asarray(moving.GetDirection()).reshape(3, 3)

    def header_map(p):
        return np.asarray(moving.GetOrigin()) + rotation @ (np.asarray(p) - np.asarray(fixed.GetOrigin()))

    for p in ([0.0, 0.0, 0.0], [10.0, -100.0, -200.0]):
        np.testing.assert_allclose(truth.TransformPoint(p), header_map(p), atol=1e-6)
    np.testing.assert_allclose(np.asarray(tr.GetMatrix()).reshape(3, 3), rotation.T, atol=1e-9)

    # REGULAR sampling of a quarter of the cropped lung box keeps the test quick
    affine, notes = sitk_affine(fixed, moving, mask, {"sampling_percentage": 0.25, "mask_dilation_mm": 0.0}, "thorax")
    assert notes["linear_flag"] == "ok", notes
    matrix = np.asarray(affine.GetMatrix()).reshape(3, 3)
    angle = np.degrees(np.arctan2(matrix[1, 0], matrix[0, 0]))
    assert abs(angle - 20.0) < 1.0
    np.testing.assert_allclose(matrix, rotation, atol=np.radians(1.0))
    # translation at the lung's centre (at the world origin it would mix in the rotation error)
    centre = np.asarray(
        mask.TransformContinuousIndexToPhysicalPoint(
            np.argwhere(sitk.GetArrayFromImage(mask))[:, ::-1].mean(0).tolist()
        )
    )
    found = np.asarray(affine.TransformPoint(centre.tolist())) - centre
    expected = np.asarray(truth.TransformPoint(centre.tolist())) - centre
    assert np.linalg.norm(expected) > 20.0  # the shift is real
    assert np.all(np.abs(found - expected) < 1.0), (found, expected)


# ------------------------------------------------------------------- the rejection-sampling trap


def _box_scene(grid: Grid, shift=(0.0, 0.0, 0.0)) -> tuple[sitk.Image, np.ndarray]:
    """Seed 002's experiment in 3D: a textured box at a fixed physical place; mask = box + 5 mm."""
    points = grid.voxel_centres() - np.asarray(shift)
    lo, hi = np.array([-16.0, -12.0, -8.0]), np.array([16.0, 12.0, 8.0])
    inside = np.all((points > lo) & (points < hi), axis=-1)
    texture = (
        0.5 + 0.25 * np.sin(points[..., 0] / 4.0) * np.cos(points[..., 1] / 5.0) + 0.1 * np.sin(points[..., 2] / 3.0)
    )
    image = image_from_array(
        sitk.GetArrayFromImage(
            sitk.SmoothingRecursiveGaussian(image_from_array((inside * texture).astype(np.float32), grid), 1.5)
        ),
        grid,
    )
    return image, np.all((points > lo - 5) & (points < hi + 5), axis=-1)


def test_masked_registration_does_not_depend_on_the_image_extent():
    shift = (1.6, 3.0, -1.2)  # mm, the moving box sits here relative to the fixed one
    spacing = (2.0, 2.0, 2.0)
    small = Grid((40, 40, 24), spacing, (-39.0, -39.0, -23.0), tuple(np.eye(3).ravel()))
    large = Grid((160, 160, 96), spacing, (-159.0, -159.0, -95.0), tuple(np.eye(3).ravel()))  # 4x the extent
    options = {"mask_dilation_mm": 4.0, "crop_margin_mm": 6.0, "linear_stages": ["rigid"]}
    centre = np.zeros(3)
    found, crops = [], []
    for grid in (small, large):
        fixed, mask = _box_scene(grid)
        moving, _ = _box_scene(grid, shift)
        crop, _ = common.crop_to_mask(fixed, common.dilate_mask(common.mask_image(mask, fixed), 4.0), 6.0)
        crops.append(crop)
        affine, notes = sitk_affine(fixed, moving, mask, options, f"extent {grid.size}")
        assert notes["linear_flag"] == "ok", notes
        found.append(np.asarray(affine.TransformPoint(centre.tolist())) - centre)
    # every metric sample comes from the crop: the same physical box, the same voxels, on both canvases
    assert crops[0].GetSize() == crops[1].GetSize() and crops[0].GetSize() < small.size
    np.testing.assert_allclose(crops[0].GetOrigin(), crops[1].GetOrigin())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(crops[0]), sitk.GetArrayFromImage(crops[1]))
    np.testing.assert_allclose(found[0], found[1], atol=0.1 * spacing[0])  # within 0.1 voxel
    np.testing.assert_allclose(found[0], shift, atol=0.5 * spacing[0])  # and right


# ------------------------------------------------------------------- no overlap: a clear error


def test_no_overlap_raises_a_clear_error_naming_the_pair():
    grid = centred_grid((24, 24, 16), (6.0, 6.0, 8.0))
    fixed = make_phase(grid, lambda p: p)
    far = Grid(grid.size, grid.spacing, tuple(np.asarray(grid.origin) + [1000.0, 0.0, 0.0]), grid.direction)
    moving = make_phase(far, lambda p: p - [1000.0, 0.0, 0.0])
    # without an initialiser the images share no extent
    with pytest.raises(RegistrationError, match=r"s01_inhale__s01_exhale: only 0\.0% of the fixed lung-mask points"):
        build_baseline("sitk_bspline", {"initializer": "none"}, 1).register([loaded_pair(fixed, moving)])
    with pytest.raises(RegistrationError, match="s01_inhale__s01_exhale"):
        build_baseline("syn", {"initializer": "none"}, 1).register([loaded_pair(fixed, moving)])
    # the centred initialiser cannot help a mask in one corner of a large image against a small one
    corner = np.zeros(grid.shape, bool)
    corner[:3, :3, :3] = True
    tiny = centred_grid((6, 6, 4), (6.0, 6.0, 8.0))
    with pytest.raises(RegistrationError, match="corner pair: only 0.0%"):
        sitk_affine(
            fixed.image, make_phase(tiny, lambda p: p).image, corner, {"initializer": "geometry"}, "corner pair"
        )
    # on_error: identity keeps the chunk going, with the failure in the flag
    result = build_baseline("sitk_demons", {"initializer": "none", "on_error": "identity"}, 1).register(
        [loaded_pair(fixed, moving)]
    )[0]
    assert result.notes["flag"] == "failed" and "only 0.0%" in result.notes["stop_condition"]


def test_zero_iteration_runs_are_flagged():
    grid = centred_grid((24, 24, 16), (6.0, 6.0, 8.0))
    fixed = make_phase(grid, lambda p: p)
    moving = make_phase(grid, lambda p: p - [4.0, 0.0, 0.0])
    _, notes = sitk_affine(fixed.image, moving.image, fixed.mask, {"linear_iterations": 0})
    assert "rigid:zero_iterations" in notes["linear_flag"] and "affine:zero_iterations" in notes["linear_flag"]
    result = build_baseline("sitk_demons", {"demons_iterations": [0]}, 1).register([loaded_pair(fixed, moving)])[0]
    assert "deformable:zero_iterations" in result.notes["flag"]
    assert (
        common.assess_stage("GradientDescentOptimizerv4Template: Gradient magnitude tolerance met", 1, 1, True)
        == "zero_gradient"
    )
    assert common.assess_stage("LBFGSBOptimizerv4: Function tolerance reached", 12, 12, True, 0.5, 0.2) == "ok"
    assert (
        common.assess_stage("x: Maximum number of iterations (100) exceeded", 100, 100, True, 0.2, 0.5)
        == "metric_worse"
    )


# ------------------------------------------------------------------- conventions, both libraries


# elastix's defaults take ~20 s here: its conventions need far fewer iterations (the defaults are
# run on a default-cohort pair below)
QUICK = {"elastix": {"linear_iterations": 50, "bspline_iterations": 50}}


@pytest.mark.parametrize("method", ["syn", *SITK_METHODS, "convexadam", "elastix"])
def test_a_known_translation_comes_out_with_the_right_sign(method):
    """Moving = fixed content moved by +t (mm): T(x) = x + t maps fixed points to moving points.
    The library's own warped image (ConvexAdam's apply_convex, elastix's transformix) is the moving
    image resampled through OUR field: the conversion to the project's convention is right."""
    t = np.array([6.0, -4.5, 5.0])
    grid = centred_grid((32, 28, 20), (6.0, 6.0, 8.0), rotation_z(10.0))  # a rotated header too
    fixed = make_phase(grid, lambda p: p)
    moving = make_phase(grid, lambda p: p - t)
    result = build_baseline(method, QUICK.get(method, {}), 1).register([loaded_pair(fixed, moving)])[0]

    assert result.displacement.shape == (*grid.shape, 3)
    assert result.seconds > 0 and np.isfinite(result.seconds)
    for key in ("flag", "stop_condition", "iterations", "metric_value", "initial_overlap", "final_overlap"):
        assert key in result.notes
    if method in (*SITK_METHODS, "elastix"):
        assert result.notes["flag"] == "ok", result.notes
        assert result.notes["stop_condition"] and result.notes["iterations"] > 0
        assert "affine_stop_condition" in result.notes and "rigid_iterations" in result.notes
    if method == "elastix":
        assert result.notes["iterations"] == 50 and result.notes["rigid_iterations"] == 50
        assert "Maximum number of iterations" in result.notes["stop_condition"]
        assert result.notes["metric_value"] < result.notes["affine_initial_metric_value"] < 0  # NCC, minimised

    inside = fixed.mask
    # ConvexAdam searches in voxels: within a quarter voxel here (its sub-voxel z shifts fall short on
    # 20 slices of 8 mm); the convention itself is pinned by the warped image below
    tolerance = np.asarray(grid.spacing) / 4 if method == "convexadam" else 1.0
    median = np.median(result.displacement[inside], axis=0)
    assert np.all(np.abs(median - t) <= tolerance), (median, t)
    centre = grid.voxel_centres()[inside].mean(0)
    if method != "convexadam":  # the affine part alone maps the lung centre by t as well (ConvexAdam has none)
        np.testing.assert_allclose(np.asarray(result.affine.TransformPoint(centre.tolist())) - centre, t, atol=1.5)
    # resampling the moving image through OUR field reproduces the library's own warped image
    ours = sitk.GetArrayFromImage(
        sitk.Resample(
            moving.image,
            fixed.image,
            displacement_transform(result.displacement, grid),
            sitk.sitkLinear,
            0.0,
            sitk.sitkFloat32,
        )
    )
    theirs = sitk.GetArrayFromImage(result.warped)
    assert Grid.of(result.warped).matches_grid(grid)
    np.testing.assert_allclose(ours[inside], theirs[inside], atol=2e-3)
    # and the field is what the shared evaluation code measures: far better than unregistered
    row, _ = evaluate_pair(Pair("s01", "inhale", "s01", "exhale"), fixed, moving, result.displacement)
    before, _ = evaluate_pair(Pair("s01", "inhale", "s01", "exhale"), fixed, moving, identity_displacement(grid, grid))
    assert row["dice"] > before["dice"] + 0.05


# ------------------------------------------------------------------- SyN on a known deformation


def known_field(points: np.ndarray) -> np.ndarray:
    """A smooth, invertible fixed -> moving displacement (mm): a shift plus two lung-sized bumps
    ("diaphragm" motion along z, expansion along x); max |du/dx| ~ 0.2."""
    u = np.broadcast_to(np.array([2.0, -1.5, 3.0]), points.shape).copy()
    for sign, centre in zip((-1.0, 1.0), LUNG_CENTRES):
        bump = np.exp(-((points - (centre + [0.0, 0.0, -30.0])) ** 2).sum(-1) / (2 * 38.0**2))
        u[..., 2] += 14.0 * bump
        u[..., 0] += sign * 6.0 * bump
    return u


def test_syn_beats_unregistered_on_a_known_smooth_deformation():
    grid = centred_grid((40, 36, 24), (6.0, 6.0, 8.0))
    landmarks = np.concatenate(
        [c + np.array([[0, 0, 0], [12, 15, 20], [-10, -12, -25], [8, -18, 10], [-5, 10, -12]]) for c in LUNG_CENTRES]
    ).astype(float)
    fixed = make_phase(grid, lambda p: p + known_field(p), landmarks)
    moving = make_phase(grid, lambda p: p, landmarks + known_field(landmarks))
    result = build_baseline("syn", {}, 1).register([loaded_pair(fixed, moving)])[0]
    pair = Pair("s01", "inhale", "s01", "exhale")
    unregistered, _ = evaluate_pair(pair, fixed, moving, identity_displacement(grid, grid))
    registered, _ = evaluate_pair(pair, fixed, moving, result.displacement)
    assert result.notes["flag"] == "ok"
    assert registered["dice"] > unregistered["dice"] + 0.05, (registered["dice"], unregistered["dice"])
    assert registered["ds"] < 0.5 * unregistered["ds"], (registered["ds"], unregistered["ds"])
    # inside the lungs the field is close to the truth, and does not fold
    error = np.linalg.norm(result.displacement - known_field(grid.voxel_centres()), axis=-1)[fixed.mask]
    assert np.median(error) < 3.0
    assert registered["jacobian_fraction_nonpositive"] == 0.0
    np.testing.assert_allclose(
        metrics.landmark_errors(known_field(grid.voxel_centres()), grid, landmarks, landmarks + known_field(landmarks))[
            :, 3
        ],
        0,
        atol=0.6,
    )


# ------------------------------------------------------------------- ConvexAdam and elastix


def test_convexadam_and_elastix_options_are_checked():
    for method, bad in (
        ("convexadam", {"grid_sp": 6}),  # its own argument name is not ours
        ("convexadam", {"smoothing": 4}),  # it smooths with an odd box only
        ("convexadam", {"grid_spacing": 0}),
        ("elastix", {"metric": "AdvancedNormalizedCorrelation"}),
        ("elastix", {"linear_stages": ["similarity"]}),
        ("elastix", {"ErodeMask": "false"}),
    ):
        with pytest.raises(ValueError, match="convexadam|elastix|unknown"):
            resolve_options(method, bad)
    assert resolve_options("convexadam", {"smoothing": 3})["smoothing"] == 3
    assert resolve_options("elastix", {})["erode_mask"] is False  # the thin-mask pitfall, off by default


def test_convexadam_field_matches_its_own_warp_when_the_moving_grid_differs():
    """The moving image on a larger, shifted grid: ConvexAdam registers it after resampling through
    the centred initial transform (a shift of whole voxels here, so that this resampling copies
    voxels and apply_convex's warp interpolates once, like ours); our field composes both and
    reproduces its warped image, on odd sizes (padded for its pooling, cropped back)."""
    t = np.array([5.0, -4.0, 6.0])
    grid = centred_grid((41, 35, 23), (6.0, 5.5, 8.0), rotation_z(-15.0), centre=(3.0, -2.0, 10.0))
    offset = np.array([-2.0, 0.0, 1.0])  # voxels between the origins; the sizes differ by 4, 2, 0
    shift = grid.index_to_world_matrix @ (offset + np.array([4, 2, 0]) / 2)  # between the grid centres
    origin = tuple(np.asarray(grid.origin) + grid.index_to_world_matrix @ offset)
    moving_grid = Grid((45, 37, 23), grid.spacing, origin, grid.direction)
    fixed = make_phase(grid, lambda p: p)
    moving = make_phase(moving_grid, lambda p: p - t)
    result = build_baseline("convexadam", {}, 1).register([loaded_pair(fixed, moving)])[0]
    np.testing.assert_allclose(result.affine.GetTranslation(), shift, atol=1e-6)  # the grid centres, not t
    assert np.linalg.norm(shift - t) > 5.0
    assert result.notes["flag"] == "ok" and result.notes["padded_shape"] == "24x36x42"
    assert result.displacement.shape == (*grid.shape, 3)
    # found the residual motion (t - shift) beyond the initial shift: within 1.5 mm (z voxels are 8 mm)
    np.testing.assert_allclose(np.median(result.displacement[fixed.mask], axis=0), t, atol=1.5)
    ours = sitk.GetArrayFromImage(
        sitk.Resample(
            moving.image, fixed.image, displacement_transform(result.displacement, grid), sitk.sitkLinear, 0.0
        )
    )
    np.testing.assert_allclose(ours[fixed.mask], sitk.GetArrayFromImage(result.warped)[fixed.mask], atol=1e-4)


def test_convexadam_voxel_displacement_to_the_project_convention():
    """One voxel along array axis 0 (z) of a rotated, anisotropic grid is spacing_z mm along the
    grid's third direction; the initial transform acts after it."""
    grid = centred_grid((6, 5, 4), (1.0, 2.0, 3.0), rotation_z(30.0), centre=(10.0, 20.0, 30.0))
    voxels = np.zeros((*grid.shape, 3))
    voxels[..., 0] = 1.0  # +1 voxel along z
    voxels[..., 2] = 0.5  # +0.5 voxel along x
    shift = sitk.Euler3DTransform()
    shift.SetTranslation((1.0, -2.0, 0.5))
    u = convexadam_displacement(voxels, grid, shift)
    expected = 3.0 * grid.direction_matrix[:, 2] + 0.5 * 1.0 * grid.direction_matrix[:, 0] + [1.0, -2.0, 0.5]
    np.testing.assert_allclose(u, np.broadcast_to(expected, u.shape), atol=1e-9)


def test_convexadam_on_a_grid_too_small_for_its_coarse_grid_says_which_setting_to_change():
    grid = centred_grid((24, 24, 12), (8.0, 8.0, 12.0))  # 12 slices: 2 cells of 6
    fixed, moving = make_phase(grid, lambda p: p), make_phase(grid, lambda p: p - [4.0, 0.0, 0.0])
    with pytest.raises(RegistrationError, match=r"s01_inhale__s01_exhale: .*\(2, 4, 4\) cells .*set grid_spacing to 4"):
        build_baseline("convexadam", {}, 1).register([loaded_pair(fixed, moving)])
    result = build_baseline("convexadam", {"grid_spacing": 4}, 1).register([loaded_pair(fixed, moving)])[0]
    assert result.notes["flag"] == "ok"


def test_convexadam_masks_are_written_in_the_array_order_it_reads(tmp_path):
    """Its masked mode reads nibabel's get_fdata(): that must be the images' (z, y, x) array, padded."""
    nibabel = pytest.importorskip("nibabel")
    grid = centred_grid((7, 5, 3), (1.0, 1.0, 2.0))
    array = np.zeros(grid.shape, np.uint8)
    array[1, 2, 3:6] = 1
    mask = image_from_array(array, grid)
    path = convexadam._mask_file(mask, 0.0, tmp_path / "mask.nii", 6)
    read = nibabel.load(path).get_fdata()
    assert read.shape == (6, 6, 12)
    np.testing.assert_array_equal(read[:3, :5, :7], array)
    assert not read[3:].any() and not read[:, 5:].any()  # edge values: the mask touches no far edge


def test_convexadam_masked_mode_runs_on_odd_sizes_and_needs_the_moving_mask():
    t = np.array([4.0, -3.0, 5.0])
    grid = centred_grid((33, 29, 21), (6.0, 6.0, 8.0))
    fixed, moving = make_phase(grid, lambda p: p), make_phase(grid, lambda p: p - t)
    registrar = build_baseline("convexadam", {"masks": True, "mask_dilation_mm": 10.0}, 1)
    result = registrar.register([loaded_pair(fixed, moving)])[0]  # odd sizes: its masked mode needs them even
    assert result.notes["flag"] == "ok"
    error = np.median(result.displacement[fixed.mask], axis=0) - t
    assert np.linalg.norm(error) < 0.5 * np.linalg.norm(t), error  # registered (less well: see the module)
    with pytest.raises(ValueError, match="needs the moving lung mask"):
        registrar.register_pair(fixed.image, moving.image, fixed.mask, "p")


def test_importing_convexadam_leaves_the_warning_filters_alone():
    """convexAdam's modules run warnings.filterwarnings("ignore") on import: every later warning of the
    job would vanish. Through `convexadam_modules` the filters are those of before."""
    check = (
        "import warnings\n{}\nbefore = list(warnings.filters)\n{}\n"
        "print(warnings.filters == before, ('ignore', None, Warning, None, 0) in warnings.filters)"
    )
    raw = ("import torch, nibabel, scipy.ndimage, SimpleITK", "import convexAdam.convex_adam_MIND")
    ours = ("from lungreg.registration.baselines.convexadam import convexadam_modules", "convexadam_modules()")
    outputs = []
    for setup, code in (raw, ours):
        done = subprocess.run(
            [sys.executable, "-c", check.format(setup, code)], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(done.stdout.split())
    assert outputs == [["False", "True"], ["True", "False"]]


def test_torch_and_itk_python_threads_are_set_and_restored():
    before = torch.get_num_threads()
    with convexadam.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    itk = elastix.elastix_modules()
    before = itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads()
    with elastix.elastix_threads(itk, 1):
        assert itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads() == 1
    assert itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads() == before


def test_elastix_maps_and_transformix_field_follow_the_itk_geometry(tmp_path, monkeypatch):
    """Our initial transform as an elastix map, through transformix, on a rotated anisotropic grid
    with an origin far from zero, equals SimpleITK's field of the same transform (Direction
    written column by column, Euler angles and centre as ITK's); `linear_part` is that transform.
    Transformix leaves no file behind (it writes its field to the working directory unless told)."""
    monkeypatch.chdir(tmp_path)
    itk = elastix.elastix_modules()
    c, s = np.cos(np.radians(15.0)), np.sin(np.radians(15.0))
    tilted = rotation_z(25.0) @ np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])  # not symmetric
    grid = centred_grid((9, 7, 5), (1.5, 2.0, 3.5), tilted, centre=(40.0, -70.0, 120.0))
    euler = sitk.Euler3DTransform((41.0, -69.0, 118.0), 0.1, -0.05, 0.2, (3.0, -1.0, 2.0))
    maps = itk.ParameterObject.New()
    maps.AddParameterMap(elastix.initial_map(euler, grid))
    moving = image_from_array(np.zeros(grid.shape, np.float32), grid)
    field, _ = elastix.elastix_displacement(itk, maps, grid, moving)
    np.testing.assert_allclose(field, common.transform_to_displacement(euler, grid), atol=1e-4)
    other = centred_grid((4, 6, 3), (3.0, 1.0, 2.0), rotation_z(-40.0), centre=(30.0, -60.0, 110.0))
    field, _ = elastix.elastix_displacement(itk, maps, other, moving)  # any grid: one conversion
    np.testing.assert_allclose(field, common.transform_to_displacement(euler, other), atol=1e-4)
    affine = elastix.linear_part(itk, maps)
    for point in ([0.0, 0.0, 0.0], [40.0, -70.0, 120.0]):
        np.testing.assert_allclose(affine.TransformPoint(point), euler.TransformPoint(point), atol=1e-9)
    assert list(tmp_path.iterdir()) == []


def test_elastix_on_a_thin_lung_mask_needs_the_mask_not_eroded():
    """The issue's pitfall: elastix's default ErodeMask leaves no valid sample in a thin mask
    ("No valid voxels (0/1000)"): reported with the pair's name and elastix's own reason; with
    erode_mask false (our default) the same pair registers."""
    t = np.array([6.0, -4.5, 5.0])
    grid = centred_grid((32, 28, 20), (6.0, 6.0, 8.0), rotation_z(10.0))
    fixed, moving = make_phase(grid, lambda p: p), make_phase(grid, lambda p: p - t)
    thin = np.zeros(grid.shape, bool)
    thin[9:11, 4:24, 4:28] = True  # two slices
    fixed.mask = thin
    options = {"mask_dilation_mm": 0.0, **QUICK["elastix"]}
    with pytest.raises(RegistrationError, match=r"s01_inhale__s01_exhale: elastix failed: .*No valid voxels \(0/"):
        build_baseline("elastix", {**options, "erode_mask": True}, 1).register([loaded_pair(fixed, moving)])
    result = build_baseline("elastix", options, 1).register([loaded_pair(fixed, moving)])[0]
    assert result.notes["flag"] == "ok"
    np.testing.assert_allclose(np.median(result.displacement[thin], axis=0), t, atol=1.0)


@pytest.mark.parametrize("method", ["convexadam", "elastix"])
def test_the_peers_give_the_same_field_twice(method):
    """The tables are reproducible run to run: elastix's random sampling is seeded (`seed`)."""
    grid = centred_grid((24, 20, 16), (6.0, 6.0, 8.0))
    fixed, moving = make_phase(grid, lambda p: p), make_phase(grid, lambda p: p - [3.0, 2.0, -4.0])
    options = {"elastix": {"linear_iterations": 20, "bspline_iterations": 20}}.get(method, {})
    first, second = (
        build_baseline(method, options, 1).register([loaded_pair(fixed, moving)])[0].displacement for _ in range(2)
    )
    np.testing.assert_array_equal(first, second)


# ------------------------------------------------------------------- a default-cohort pair


@pytest.fixture(scope="module")
def default_cohort_pair(tmp_path_factory) -> LoadedPair:
    """One subject of the default synthetic cohort (config/config.yaml, the schema's defaults),
    preprocessed as the workflow does: its inhale (moving) -> exhale (fixed) pair."""
    from snakemake.utils import validate

    from lungreg.preprocess import PreprocessSettings, preprocess_subject
    from lungreg.study import PREPROCESS_WORKFLOW_KEYS, PreprocessedLayout
    from lungreg.synthetic.render import synthesize_subject
    from lungreg.synthetic.settings import SyntheticCohortSettings

    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    validate(config, str(REPO / "config" / "schemas" / "config.schema.yaml"))
    synthetic = SyntheticCohortSettings.from_config(config["synthetic"])
    section = {k: v for k, v in config["preprocess"].items() if k not in PREPROCESS_WORKFLOW_KEYS}
    section["grid_shape"] = list(synthetic.covering_shape(config["preprocess"]["factor"]))
    folder = tmp_path_factory.mktemp("default_cohort")
    subject = "sub-002"  # a validation subject of the default split
    synthesize_subject(synthetic, subject, folder / "raw")
    names = ("inhale", "exhale", "inhale_mask", "exhale_mask", "inhale_landmarks", "exhale_landmarks")
    inputs = {
        name: folder / "raw" / (f"{name}.csv" if name.endswith("landmarks") else f"{name}.nii.gz") for name in names
    }
    settings = PreprocessSettings.from_config(section, config["pairs"]["fixed_phase"])
    preprocess_subject(subject, inputs, settings, folder / "preprocessed" / subject)
    layout = PreprocessedLayout(folder / "preprocessed")
    return LoadedPair(
        Pair(subject, "inhale", subject, "exhale"),
        load_phase(layout, subject, "exhale"),
        load_phase(layout, subject, "inhale"),
    )


@pytest.mark.parametrize("method", ["convexadam", "elastix"])
def test_the_peers_defaults_do_not_fold_on_a_default_cohort_pair(default_cohort_pair, method):
    item = default_cohort_pair
    assert item.fixed.grid.shape == (24, 48, 48)  # the default study's grid
    result = build_baseline(method, {}, 1).register([item])[0]
    assert result.notes["flag"] == "ok", result.notes
    registered, _ = evaluate_pair(item.pair, item.fixed, item.moving, result.displacement)
    unregistered, _ = evaluate_pair(
        item.pair, item.fixed, item.moving, identity_displacement(item.fixed.grid, item.moving.grid)
    )
    assert registered["jacobian_fraction_nonpositive"] == 0.0 and registered["jacobian_min"] > 0.2, registered
    assert registered["dice"] > unregistered["dice"] + 0.05, (registered["dice"], unregistered["dice"])
    assert registered["ds"] < 0.5 * unregistered["ds"], (registered["ds"], unregistered["ds"])
