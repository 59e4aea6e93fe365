"""Scoring one registered pair, the same way for every method.

A method hands over its transform as a physical displacement field on the fixed grid (ITK
convention); everything here is computed from that field, so the network, the identity and the
classical baselines are measured by one piece of code. The summary tables: `tables`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import SimpleITK as sitk

from . import io, metrics
from .geometry import Grid, resample
from .network.transform import displacement_transform
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


def landmark_rows(pair: Pair, fixed: Phase, moving: Phase, displacement: np.ndarray) -> pd.DataFrame:
    """One row per landmark of an intra-patient pair; out-of-view ones kept, flagged, not scored."""
    if not pair.intra_patient or fixed.landmarks.empty:
        return pd.DataFrame(columns=LANDMARK_COLUMNS)
    in_view = fixed.landmarks["in_view"].astype(bool).to_numpy() & moving.landmarks["in_view"].astype(bool).to_numpy()
    errors = np.full((len(in_view), 4), np.nan)
    if in_view.any():
        errors[in_view] = metrics.landmark_errors(
            displacement,
            fixed.grid,
            fixed.landmarks.loc[in_view, ["x", "y", "z"]].to_numpy(),
            moving.landmarks.loc[in_view, ["x", "y", "z"]].to_numpy(),
        )
    rows = pd.DataFrame(errors, columns=["dx", "dy", "dz", "ds"])
    rows.insert(0, "in_view", in_view)
    rows.insert(0, "landmark", fixed.landmarks["landmark"].astype(str).to_numpy())
    rows.insert(0, "pair", pair.name)
    return rows


def evaluate_pair(
    pair: Pair, fixed: Phase, moving: Phase, displacement: np.ndarray, truth: sitk.Image | None = None
) -> tuple[dict, pd.DataFrame]:
    """Metrics of one pair (a table row) and its landmark rows."""
    landmarks = landmark_rows(pair, fixed, moving, displacement)
    scored = landmarks[landmarks["in_view"].astype(bool)] if len(landmarks) else landmarks
    row = {
        **pair.as_row(),
        "intra_patient": pair.intra_patient,
        "dice": metrics.dice(warp_mask(moving, fixed.grid, displacement), fixed.mask),
        "landmarks_scored": len(scored),
        "landmarks_excluded": len(landmarks) - len(scored),
        **{axis: float(scored[axis].mean()) if len(scored) else np.nan for axis in ("dx", "dy", "dz", "ds")},
        **metrics.jacobian_statistics(metrics.jacobian_determinant(displacement, fixed.grid), fixed.mask),
    }
    if truth is not None:
        row.update(metrics.endpoint_errors(displacement, fixed.grid, truth, fixed.mask))
    return row, landmarks
