"""Evaluation metrics, one function each, shared by the network and every baseline.

All of them work on physical-space quantities: masks on a grid, landmarks in mm, and
displacement fields in the ITK convention (T(x) = x + u(x), fixed -> moving, mm).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import map_coordinates

from .geometry import Grid


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two binary masks on the same grid; NaN when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / total) if total else float("nan")


def sample_displacement(displacement: np.ndarray, grid: Grid, points: np.ndarray) -> np.ndarray:
    """Displacement (n, 3) at physical `points`, trilinear, border-extended outside the grid."""
    index = grid.world_to_index(np.asarray(points, float).reshape(-1, 3))
    coordinates = index[:, ::-1].T  # (z, y, x) array order
    return np.stack(
        [map_coordinates(displacement[..., c], coordinates, order=1, mode="nearest") for c in range(3)],
        axis=-1,
    )


def map_points(displacement: np.ndarray, grid: Grid, points: np.ndarray) -> np.ndarray:
    """Map fixed-image points through T(x) = x + u(x) into the moving image."""
    points = np.asarray(points, float).reshape(-1, 3)
    return points + sample_displacement(displacement, grid, points)


def landmark_errors(
    displacement: np.ndarray, grid: Grid, fixed_points: np.ndarray, moving_points: np.ndarray
) -> np.ndarray:
    """Per landmark |dx|, |dy|, |dz| and the Euclidean ds (mm), shape (n, 4).

    Each fixed landmark is carried through the fixed -> moving transform and compared with its
    corresponding moving landmark; a perfect registration gives zeros.
    """
    residual = map_points(displacement, grid, fixed_points) - np.asarray(moving_points, float).reshape(-1, 3)
    return np.column_stack([np.abs(residual), np.linalg.norm(residual, axis=1)])


def jacobian_determinant(displacement: np.ndarray, grid: Grid) -> np.ndarray:
    """det(I + du/dx) at every voxel, derivatives in physical space (spacing and direction).

    Central differences inside, one-sided at the border (numpy.gradient).
    """
    # d u_c / d index_a, with index axes in x, y, z order
    per_index = np.stack(
        [np.stack(np.gradient(displacement[..., c], axis=(2, 1, 0)), axis=-1) for c in range(3)],
        axis=-2,
    )  # (z, y, x, 3 components, 3 index axes)
    jacobian = np.eye(3) + per_index @ np.linalg.inv(grid.index_to_world_matrix)
    return np.linalg.det(jacobian)


def jacobian_statistics(determinant: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Minimum, fraction <= 0 and std of log J inside `mask` (NaNs when the mask is empty)."""
    values = determinant[np.asarray(mask, bool)]
    if values.size == 0:
        return {"jacobian_min": np.nan, "jacobian_fraction_nonpositive": np.nan, "log_jacobian_std": np.nan}
    positive = values[values > 0]
    return {
        "jacobian_min": float(values.min()),
        "jacobian_fraction_nonpositive": float(np.mean(values <= 0)),
        "log_jacobian_std": float(np.std(np.log(positive))) if positive.size else np.nan,
    }


def endpoint_errors(displacement: np.ndarray, grid: Grid, truth: sitk.Image, mask: np.ndarray) -> dict[str, float]:
    """End-point error against a ground-truth field (any grid), inside `mask` of `grid`, mm."""
    inside = np.asarray(mask, bool)
    if not inside.any():
        return {"epe_mean": np.nan, "epe_p95": np.nan}
    points = grid.voxel_centres()[inside]
    true_grid = Grid.of(truth)
    true_field = sitk.GetArrayFromImage(truth).astype(float)
    error = np.linalg.norm(displacement[inside] - sample_displacement(true_field, true_grid, points), axis=1)
    return {"epe_mean": float(error.mean()), "epe_p95": float(np.percentile(error, 95))}
