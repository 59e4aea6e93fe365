"""Scoring in torch (`evaluate.score_batch`, `network.scoring`) against the reference
(`evaluate.evaluate_pair`: numpy, scipy and SimpleITK), on random fields, real masks and landmarks
(../shared/data), anisotropic spacing and oblique directions, and the real fields of a study.

The tolerances, stated once:
- the warped mask (linear interpolation, then > 0.5) may differ from SimpleITK's only in voxels
  whose interpolated value SimpleITK puts within WARP_TIE of 0.5 (both compute in float64, so
  only a rounding at an exact tie flips a voxel); the Dice then differs by at most 2 / (mask
  voxels) per differing voxel, which is 0 in every case below;
- landmark errors, end-point errors and the Jacobian statistics within ATOL (float64 rounding;
  the fraction of voxels with det J <= 0 exactly).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter

from lungreg import io, metrics
from lungreg.evaluate import Phase, evaluate_pair, load_phase, moving_points, score_batch
from lungreg.geometry import Grid, image_from_array, resample
from lungreg.network import scoring
from lungreg.network.transform import displacement_transform, physical_displacement
from lungreg.study import Pair, PreprocessedLayout

WARP_TIE = 1e-9
ATOL = 1e-9
METRIC_KEYS = ("dx", "dy", "dz", "ds", "jacobian_min", "log_jacobian_std", "epe_mean", "epe_p95")
INTRA = Pair("a", "inhale", "a", "exhale")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rotation(*angles: float) -> np.ndarray:
    matrix = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        turn = np.eye(3)
        i, j = [a for a in range(3) if a != axis]
        turn[[i, i, j, j], [i, j, i, j]] = c, -s, s, c
        matrix = matrix @ turn
    return matrix


FIXED = Grid((30, 24, 14), (1.3, 1.7, 2.9), (5.0, -3.0, 10.0), tuple(rotation(0.2, 0.0, 0.3).ravel()))
MOVING = Grid((30, 24, 14), (1.4, 1.6, 3.1), (3.0, -1.0, 12.0), tuple(rotation(0.25, 0.1, 0.3).ravel()))
TRUTH = Grid((22, 19, 11), (1.9, 2.1, 3.5), (0.0, -5.0, 8.0), tuple(rotation(0.0, 0.0, 0.1).ravel()))


def ellipsoid(grid: Grid, centre, radii) -> np.ndarray:
    k, j, i = np.meshgrid(*(np.arange(n) for n in grid.shape), indexing="ij")
    return ((i - centre[0]) / radii[0]) ** 2 + ((j - centre[1]) / radii[1]) ** 2 + ((k - centre[2]) / radii[2]) ** 2 < 1


def phase(mask: np.ndarray, grid: Grid, landmarks: np.ndarray, image: sitk.Image | None = None) -> Phase:
    frame = pd.DataFrame(np.asarray(landmarks, float).reshape(-1, 3), columns=["x", "y", "z"])
    frame.insert(0, "landmark", [f"l{i}" for i in range(len(frame))])
    frame["in_view"] = True
    image = image if image is not None else image_from_array(mask.astype(np.float32), grid)
    return Phase(image, np.asarray(mask, bool), grid, frame)


def smooth_field(grid: Grid, seed: int, amplitude_mm: float, sigma: float = 2.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = [gaussian_filter(rng.normal(size=grid.shape), sigma) for _ in range(3)]
    return np.stack([amplitude_mm * n / np.abs(n).max() for n in noise], axis=-1)


def linear_mask_values(moving: Phase, fixed_grid: Grid, displacement: np.ndarray) -> np.ndarray:
    """SimpleITK's linearly interpolated moving mask before the threshold (what the tie rule reads)."""
    mask = moving.grid.apply_to(sitk.GetImageFromArray(moving.mask.astype(np.float32)))
    return sitk.GetArrayFromImage(
        resample(mask, fixed_grid, "linear", 0.0, displacement_transform(displacement, fixed_grid))
    )


def assert_scores_match(
    pair: Pair, fixed: Phase, moving: Phase, displacement: np.ndarray, truth=None, points=None
) -> dict:
    """score_batch against evaluate_pair on one pair, within the stated tolerances; the reference row.
    `points`: the moving points scored (default: those of `displacement`)."""
    reference, reference_landmarks = evaluate_pair(pair, fixed, moving, displacement, truth)
    points = moving_points(displacement, fixed.grid, moving.grid) if points is None else points
    score = score_batch([pair], [fixed], [moving], [points], [truth])[0]
    warped = score.warped_mask.numpy()
    values = linear_mask_values(moving, fixed.grid, displacement)
    differing = warped != (values > 0.5)
    assert np.all(np.abs(values[differing] - 0.5) <= WARP_TIE), "a warped voxel differs away from a tie"
    total = warped.sum() + fixed.mask.sum()
    bound = 2 * differing.sum() / max(total, 1) + 1e-15
    assert score.row["dice"] == pytest.approx(reference["dice"], abs=bound, nan_ok=True)
    assert list(score.row) == list(reference)
    for key, value in reference.items():
        if key in METRIC_KEYS:
            assert score.row[key] == pytest.approx(value, abs=ATOL, nan_ok=True), key
        elif key != "dice":
            assert score.row[key] == value or (pd.isna(value) and pd.isna(score.row[key])), key
    assert list(score.landmarks.columns) == list(reference_landmarks.columns)
    np.testing.assert_allclose(
        score.landmarks[["dx", "dy", "dz", "ds"]].to_numpy(float),
        reference_landmarks[["dx", "dy", "dz", "ds"]].to_numpy(float),
        atol=ATOL,
    )
    return reference


# ------------------------------------------------------------------ random fields, oblique grids


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_fields_on_anisotropic_oblique_grids_match_the_reference(seed):
    rng = np.random.default_rng(seed)
    fixed_points = FIXED.index_to_world(rng.uniform(-3, np.asarray(FIXED.size) + 2, (25, 3)))  # some outside
    fixed = phase(ellipsoid(FIXED, (15, 12, 7), (11, 8, 5)), FIXED, fixed_points)
    moving = phase(ellipsoid(MOVING, (16, 11, 6), (10, 9, 5)), MOVING, fixed_points + rng.normal(0, 3, (25, 3)))
    field = smooth_field(FIXED, seed, amplitude_mm=4.0) + (moving.grid.origin[0] - fixed.grid.origin[0]) / 2
    truth = image_from_array(smooth_field(TRUTH, seed + 10, 5.0), TRUTH, is_vector=True)
    row = assert_scores_match(INTRA, fixed, moving, field, truth)
    assert 0.3 < row["dice"] < 1 and row["landmarks_scored"] == 25 and row["jacobian_min"] > 0


def random_case(seed: int) -> tuple[Phase, Phase, np.ndarray, sitk.Image]:
    rng = np.random.default_rng(seed)
    fixed_points = FIXED.index_to_world(rng.uniform(-3, np.asarray(FIXED.size) + 2, (25, 3)))  # some outside
    fixed = phase(ellipsoid(FIXED, (15, 12, 7), (11, 8, 5)), FIXED, fixed_points)
    moving = phase(ellipsoid(MOVING, (16, 11, 6), (10, 9, 5)), MOVING, fixed_points + rng.normal(0, 3, (25, 3)))
    field = smooth_field(FIXED, seed, amplitude_mm=4.0)
    truth = image_from_array(smooth_field(TRUTH, seed + 10, 5.0), TRUTH, is_vector=True)
    return fixed, moving, field, truth


def test_slabs_of_a_few_planes_give_the_same_scores(monkeypatch):
    """The CPU path works slab by slab along z (scoring.SLAB_VOXELS); slabs of 1 and 3 planes, their
    halos at every slab boundary, score as the reference."""
    fixed, moving, field, truth = random_case(4)
    for planes in (1, 3):
        monkeypatch.setattr(scoring, "SLAB_VOXELS", planes * FIXED.size[0] * FIXED.size[1])
        assert len(scoring.slabs(FIXED.shape[0], FIXED.size[0] * FIXED.size[1], torch.device("cpu"))) > 4
        assert_scores_match(INTRA, fixed, moving, field, truth)


def test_two_threads_split_one_volumes_samples_and_give_the_same_warped_mask():
    """On the CPU grid_sample runs batch items in parallel, so a pair's samples are split into one
    item per thread (scoring.sample_border): the warped mask is the same bit for bit."""
    grid = Grid((48, 40, 24), (1.5, 1.5, 2.5), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    moving = phase(ellipsoid(grid, (24, 20, 12), (18, 15, 10)), grid, np.zeros((0, 3)))
    points = moving_points(smooth_field(grid, 6, 4.0), grid, grid)[None]
    masks = torch.as_tensor(moving.mask[None, None], dtype=torch.float64)
    one = scoring.warp_masks(masks, points)
    torch.set_num_threads(2)
    try:
        assert scoring._thread_parts(masks, points.reshape(1, -1, 1, 1, 3)) == 2
        assert torch.equal(scoring.warp_masks(masks, points), one)
    finally:
        torch.set_num_threads(1)


def test_the_networks_float32_sampling_grid_scores_as_its_physical_field():
    """The network hands over its sampling grid in float32; it is scored as the float64 physical
    field made from it (what the pair's files hold) is by the reference."""
    fixed, moving, field, truth = random_case(5)
    grid = moving_points(field, FIXED, MOVING).to(torch.float32)
    displacement = physical_displacement(grid[None], [FIXED], [MOVING])[0].numpy()
    assert grid.dtype == torch.float32
    assert_scores_match(INTRA, fixed, moving, displacement, truth, points=grid)


def test_folding_fields_and_masks_at_the_grid_border_match_the_reference():
    """A field rough enough to fold, moving masks touching every face of their grid (where ITK's
    field of view, half a voxel beyond the outer centres, cuts the border extension)."""
    fixed = phase(ellipsoid(FIXED, (15, 12, 7), (16, 14, 9)), FIXED, np.zeros((0, 3)))
    moving = phase(ellipsoid(MOVING, (15, 12, 7), (17, 15, 9)), MOVING, np.zeros((0, 3)))
    field = smooth_field(FIXED, 5, amplitude_mm=12.0, sigma=1.0)
    row = assert_scores_match(Pair("a", "inhale", "b", "exhale"), fixed, moving, field)
    assert row["jacobian_fraction_nonpositive"] > 0 and row["jacobian_min"] < 0


def test_half_voxel_shifts_put_voxels_on_exact_ties_and_stay_within_the_tie_rule():
    grid = Grid((20, 16, 10), (2.0, 2.0, 3.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    fixed = phase(ellipsoid(grid, (10, 8, 5), (6, 5, 3)), grid, np.zeros((0, 3)))
    moving = phase(ellipsoid(grid, (10, 8, 5), (6, 5, 3)), grid, np.zeros((0, 3)))
    field = np.broadcast_to(np.array([1.0, -1.0, 1.5]), grid.shape + (3,)).copy()  # half a voxel each way
    values = linear_mask_values(moving, grid, field)
    assert np.isclose(values, 0.5).any()  # the case is there
    assert_scores_match(INTRA, fixed, moving, field)


def test_a_batch_equals_its_pairs_one_by_one_and_grids_of_other_shapes_are_scored_alone():
    other = Grid((28, 24, 14), MOVING.spacing, MOVING.origin, MOVING.direction)
    fixed = phase(ellipsoid(FIXED, (15, 12, 7), (11, 8, 5)), FIXED, np.zeros((0, 3)))
    movings = [
        phase(ellipsoid(MOVING, (16, 11, 6), (10, 9, 5)), MOVING, np.zeros((0, 3))),
        phase(ellipsoid(MOVING, (14, 13, 7), (9, 9, 5)), MOVING, np.zeros((0, 3))),
        phase(ellipsoid(other, (14, 12, 7), (10, 9, 5)), other, np.zeros((0, 3))),
    ]
    pairs = [Pair(f"m{k}", "inhale", "f", "exhale") for k in range(3)]
    fields = [smooth_field(FIXED, k, 3.0) for k in range(3)]
    points = [moving_points(f, FIXED, m.grid) for f, m in zip(fields, movings)]
    together = score_batch(pairs, [fixed] * 3, movings, points, [None] * 3)
    for k in range(3):
        alone = score_batch([pairs[k]], [fixed], [movings[k]], [points[k]], [None])[0]
        assert together[k].row == alone.row
        assert torch.equal(together[k].warped_mask, alone.warped_mask)
        reference, _ = evaluate_pair(pairs[k], fixed, movings[k], fields[k])
        assert together[k].row["dice"] == reference["dice"]


def test_empty_masks_give_nans_and_no_overlap_gives_zero():
    grid = Grid((16, 12, 10), (2.0, 2.0, 3.0), (0, 0, 0), tuple(np.eye(3).ravel()))
    fixed = phase(ellipsoid(grid, (4, 4, 4), (3, 2.5, 2)), grid, np.zeros((0, 3)))
    apart = phase(ellipsoid(grid, (12, 8, 6), (3, 2.5, 2)), grid, np.zeros((0, 3)))
    empty = phase(np.zeros(grid.shape, bool), grid, np.zeros((0, 3)))
    zero = np.zeros(grid.shape + (3,))
    truth = image_from_array(zero, grid, is_vector=True)
    row = assert_scores_match(INTRA, fixed, apart, zero, truth)
    assert row["dice"] == 0.0 and row["landmarks_scored"] == 0
    row = assert_scores_match(INTRA, empty, empty, zero, truth)
    assert np.isnan(row["dice"]) and np.isnan(row["jacobian_min"]) and np.isnan(row["epe_mean"])


@pytest.mark.parametrize("n", [1, 2, 3, 20, 1001])
def test_percentile_is_numpys(n):
    values = np.random.default_rng(n).normal(size=n)
    for q in (0, 5, 50, 95, 100):
        assert scoring.percentile(torch.from_numpy(values), q) == np.percentile(values, q)


def test_jacobian_and_mask_box_against_the_reference_on_the_whole_grid():
    points = FIXED.voxel_centres()
    field = np.stack([0.05 * points[..., 1], 0.1 * points[..., 0], -0.02 * points[..., 2]], -1)
    field += smooth_field(FIXED, 3, 1.0)
    np.testing.assert_allclose(
        scoring.jacobian_determinant(moving_points(field, FIXED, MOVING), FIXED, MOVING).numpy(),
        metrics.jacobian_determinant(field, FIXED),
        atol=ATOL,
    )
    mask = torch.zeros(FIXED.shape, dtype=torch.bool)
    mask[0, 3:5, 20:] = True
    assert scoring.mask_box(mask) == (slice(0, 1), slice(3, 5), slice(20, 30))
    assert scoring.mask_box(torch.zeros_like(mask)) is None


# ------------------------------------------------------------------ real data


def test_real_ct_masks_and_landmarks_on_grids_of_different_size(elastix_lung_pair):
    """The elastix pair: two real lung masks on grids of different size and origin, its 100
    landmarks (some outside a field of view), a smooth field plus the landmarks' mean offset,
    and a true field on a coarser grid."""
    fixed_image = sitk.ReadImage(str(elastix_lung_pair / "baseline_mask.mha"))
    moving_image = sitk.ReadImage(str(elastix_lung_pair / "followup_mask.mha"))
    fixed_points = io.read_landmarks(elastix_lung_pair / "baseline_landmarks.txt")
    moving_points_mm = io.read_landmarks(elastix_lung_pair / "followup_landmarks.txt")
    fixed = phase(sitk.GetArrayFromImage(fixed_image) > 0, Grid.of(fixed_image), fixed_points)
    moving = phase(sitk.GetArrayFromImage(moving_image) > 0, Grid.of(moving_image), moving_points_mm)
    assert fixed.grid.size != moving.grid.size
    field = smooth_field(fixed.grid, 0, 6.0, sigma=4.0) + (moving_points_mm - fixed_points).mean(axis=0)
    coarse = Grid((58, 79, 43), (2.7, 2.7, 7.5), fixed.grid.origin, fixed.grid.direction)
    truth = image_from_array(smooth_field(coarse, 1, 8.0), coarse, is_vector=True)
    row = assert_scores_match(INTRA, fixed, moving, field, truth)
    assert row["dice"] > 0.5 and row["landmarks_scored"] == 100


def test_real_ct_with_an_oblique_header(cip_thorax_ct64):
    """The CIP thorax: the lung regions against the same voxels under a header rotated 20 degrees about
    z and shifted. The field that maps each fixed voxel centre onto the same voxel of the rotated
    grid gives Dice 1; a smooth field on top of it, a real score."""
    fixed_image = sitk.ReadImage(str(cip_thorax_ct64 / "lm-64.nrrd"))
    moving_image = sitk.ReadImage(str(cip_thorax_ct64 / "lm-64-transformed.nrrd"))
    fixed_grid, moving_grid = Grid.of(fixed_image), Grid.of(moving_image)
    assert not np.allclose(moving_grid.direction_matrix, np.eye(3))
    fixed = phase(sitk.GetArrayFromImage(fixed_image) > 0, fixed_grid, np.zeros((0, 3)))
    moving = phase(sitk.GetArrayFromImage(moving_image) > 0, moving_grid, np.zeros((0, 3)))
    centres = fixed_grid.voxel_centres()
    same_voxel = moving_grid.index_to_world(fixed_grid.world_to_index(centres)) - centres
    row = assert_scores_match(INTRA, fixed, moving, same_voxel)
    assert row["dice"] == 1.0 and row["jacobian_min"] == pytest.approx(1.0)
    assert_scores_match(INTRA, fixed, moving, same_voxel + smooth_field(fixed_grid, 2, 5.0, sigma=3.0))


# ------------------------------------------------------------------ a study's real fields


def test_the_fields_of_a_study_score_as_the_reference_and_as_its_tables(tiny_study):
    """Every saved field of the tiny study (the network, its refinement, SyN, SimpleITK): the torch
    scoring equals the reference on it, and the study's table (scored from the unrounded field
    before it was saved as float32) within the float32 rounding of the saved field."""
    results = tiny_study / "results"
    table = pd.read_csv(results / "tables" / "pairs.tsv", sep="\t").set_index(["method", "protocol", "pair"])
    layout = PreprocessedLayout(results / "preprocessed")
    checked = 0
    for field_path in sorted(results.glob("registration/*/inhale_exhale/chunk-*/*/displacement.nii.gz")):
        method, protocol, pair_name = field_path.parts[-5], field_path.parts[-4], field_path.parts[-2]
        moving_name, fixed_name = pair_name.split("__")
        pair = Pair(*moving_name.rsplit("_", 1), *fixed_name.rsplit("_", 1))
        fixed, moving = (
            load_phase(layout, pair.fixed_subject, "exhale"),
            load_phase(layout, pair.moving_subject, "inhale"),
        )
        field = sitk.GetArrayFromImage(sitk.ReadImage(str(field_path))).astype(np.float64)
        truth = io.read_intermediate_image(
            results / "cohort" / "synthetic" / pair.fixed_subject / "gt_displacement_fixed-exhale.nii.gz"
        )
        reference = assert_scores_match(pair, fixed, moving, field, truth)
        row = table.loc[(method, protocol, pair_name)]
        assert row["dice"] == pytest.approx(reference["dice"], abs=1e-3)
        for key in ("ds", "jacobian_min", "log_jacobian_std", "epe_mean"):
            assert row[key] == pytest.approx(reference[key], abs=1e-3), (method, pair_name, key)
        checked += 1
    assert checked >= 4 * 3  # four methods' inhale-exhale pairs
