"""Scoring registered pairs, the same way for every method.

A method hands over its transform as a physical displacement field on the fixed grid (ITK
convention); everything here is computed from that field, so the network, the identity and the
classical baselines are measured by one piece of code: `score_batch`, in torch on the device that
registered the pairs (`network.scoring`). `evaluate_pair` is the same row for one pair from
`metrics` and SimpleITK on the CPU, the reference the tests hold `score_batch` to. The summary
tables: `tables`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch

from . import io, metrics
from .geometry import Grid, resample
from .network import scoring
from .network.transform import displacement_transform, float64_grid
from .study import Pair, PreprocessedLayout

TIMING_COLUMNS = (
    "seconds",
    "seconds_per_pair",
    "device",
    "threads",
)  # vary run to run; everything else is reproducible


@dataclass
class Phase:
    """A preprocessed phase of one subject."""

    image: sitk.Image
    mask: np.ndarray  # (z, y, x) bool
    grid: Grid
    landmarks: pd.DataFrame  # landmark, x, y, z, in_view

    @property
    def array(self) -> np.ndarray:
        return sitk.GetArrayViewFromImage(self.image)


def load_phase(layout: PreprocessedLayout, subject: str, phase: str) -> Phase:
    image = io.read_intermediate_image(layout.image(subject, phase))
    mask = sitk.GetArrayFromImage(io.read_intermediate_image(layout.mask(subject, phase))) > 0
    landmarks_path = layout.landmarks(subject, phase)
    try:
        landmarks = pd.read_csv(landmarks_path, dtype={"landmark": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise io.CorruptFileError(landmarks_path, str(error)) from None
    return Phase(image, mask, Grid.of(image), landmarks)


def warp_mask(moving: Phase, fixed_grid: Grid, displacement: np.ndarray) -> np.ndarray:
    """The moving mask carried onto the fixed grid: linear interpolation, then > 0.5."""
    mask = moving.grid.apply_to(sitk.GetImageFromArray(moving.mask.astype(np.float32)))
    warped = resample(mask, fixed_grid, "linear", 0.0, displacement_transform(displacement, fixed_grid))
    return sitk.GetArrayFromImage(warped) > 0.5


def warp_image(moving: Phase, fixed_grid: Grid, displacement: np.ndarray) -> sitk.Image:
    return resample(moving.image, fixed_grid, "linear", 0.0, displacement_transform(displacement, fixed_grid))


LANDMARK_COLUMNS = ["pair", "landmark", "in_view", "dx", "dy", "dz", "ds"]
NO_LANDMARKS = pd.DataFrame(columns=LANDMARK_COLUMNS)  # an inter-patient pair's (made once: pandas is slow to)


def landmark_rows(pair: Pair, fixed: Phase, moving: Phase, displacement: np.ndarray) -> pd.DataFrame:
    """One row per landmark of an intra-patient pair; out-of-view ones kept, flagged, not scored."""
    return _landmark_table(pair, fixed, moving, lambda f, m: metrics.landmark_errors(displacement, fixed.grid, f, m))


def _landmark_table(
    pair: Pair, fixed: Phase, moving: Phase, errors_of: Callable[[np.ndarray, np.ndarray], np.ndarray]
) -> pd.DataFrame:
    """The landmark rows, with `errors_of(fixed points, moving points)` giving the in-view errors (n, 4)."""
    if not pair.intra_patient or fixed.landmarks.empty:
        return NO_LANDMARKS
    in_view = fixed.landmarks["in_view"].astype(bool).to_numpy() & moving.landmarks["in_view"].astype(bool).to_numpy()
    errors = np.full((len(in_view), 4), np.nan)
    if in_view.any():
        errors[in_view] = errors_of(
            fixed.landmarks.loc[in_view, ["x", "y", "z"]].to_numpy(),
            moving.landmarks.loc[in_view, ["x", "y", "z"]].to_numpy(),
        )
    rows = pd.DataFrame(errors, columns=["dx", "dy", "dz", "ds"])
    rows.insert(0, "in_view", in_view)
    rows.insert(0, "landmark", fixed.landmarks["landmark"].astype(str).to_numpy())
    rows.insert(0, "pair", pair.name)
    return rows


def _row(pair: Pair, dice: float, landmarks: pd.DataFrame, jacobian: dict, epe: dict | None) -> dict:
    """A pair's metrics row (the per-pair table's columns, in order)."""
    scored = landmarks[landmarks["in_view"].astype(bool)] if len(landmarks) else landmarks
    row = {
        **pair.as_row(),
        "intra_patient": pair.intra_patient,
        "dice": dice,
        "landmarks_scored": len(scored),
        "landmarks_excluded": len(landmarks) - len(scored),
        **{axis: float(scored[axis].mean()) if len(scored) else np.nan for axis in ("dx", "dy", "dz", "ds")},
        **jacobian,
    }
    return row if epe is None else {**row, **epe}


def evaluate_pair(
    pair: Pair, fixed: Phase, moving: Phase, displacement: np.ndarray, truth: sitk.Image | None = None
) -> tuple[dict, pd.DataFrame]:
    """Metrics of one pair (a table row) and its landmark rows: the reference, numpy and SimpleITK."""
    landmarks = landmark_rows(pair, fixed, moving, displacement)
    dice = metrics.dice(warp_mask(moving, fixed.grid, displacement), fixed.mask)
    jacobian = metrics.jacobian_statistics(metrics.jacobian_determinant(displacement, fixed.grid), fixed.mask)
    epe = None if truth is None else metrics.endpoint_errors(displacement, fixed.grid, truth, fixed.mask)
    return _row(pair, dice, landmarks, jacobian, epe), landmarks


@dataclass
class Score:
    """A scored pair: its metrics row, its landmark rows and the warped moving mask (for its files)."""

    row: dict
    landmarks: pd.DataFrame
    warped_mask: torch.Tensor  # (z, y, x) bool on the fixed grid, on the scoring device


def score_batch(
    pairs: list[Pair],
    fixed: list[Phase],
    moving: list[Phase],
    points: list[torch.Tensor],
    truths: list[sitk.Image | None],
) -> list[Score]:
    """`evaluate_pair` of every pair of a batch, in torch on the device of `points`: each pair's moving
    points (z, y, x, 3), where its fixed voxel centres land in normalised moving coordinates
    (`network.scoring`; a displacement field gives them by `moving_points`). Pair after pair, each
    in slabs of its fixed grid on the CPU (`scoring.slabs`), in float64."""
    scores = []
    for pair, fixed_phase, moving_phase, pair_points, truth in zip(pairs, fixed, moving, points, truths):
        pair_points = float64_grid(pair_points[None])[0]  # a float32 grid read as physical_displacement reads it
        grids = fixed_phase.grid, moving_phase.grid
        fixed_mask = torch.as_tensor(fixed_phase.mask, device=pair_points.device)
        warped = warped_masks([moving_phase], pair_points[None])[0]
        landmarks = _landmark_table(
            pair, fixed_phase, moving_phase, lambda f, m: scoring.landmark_errors(pair_points, *grids, f, m)
        )
        jacobian = scoring.jacobian_statistics(pair_points, *grids, fixed_mask)
        epe = None if truth is None else _endpoint_errors(pair_points, *grids, truth, fixed_mask)
        dice = scoring.dice(warped[None], fixed_mask[None])[0]
        scores.append(Score(_row(pair, dice, landmarks, jacobian, epe), landmarks, warped))
    return scores


def warped_masks(moving: list[Phase], points: torch.Tensor) -> torch.Tensor:
    """The moving phases' masks at moving points (N, z, y, x, 3) on their device: `warp_mask` in torch."""
    masks = torch.from_numpy(np.stack([m.mask for m in moving])[:, None]).to(points.device)  # bool: 1/8 the copy
    return scoring.warp_masks(masks.to(torch.float64), points)


def moving_points(displacement: np.ndarray, fixed: Grid, moving: Grid) -> torch.Tensor:
    """The moving points (z, y, x, 3) of a displacement field (numpy, mm on `fixed`), on the CPU."""
    return scoring.moving_points(torch.from_numpy(np.asarray(displacement, np.float64))[None], [fixed], [moving])[0]


def _endpoint_errors(points: torch.Tensor, fixed: Grid, moving: Grid, truth: sitk.Image, mask: torch.Tensor) -> dict:
    return scoring.endpoint_errors(points, fixed, moving, sitk.GetArrayViewFromImage(truth), Grid.of(truth), mask)
