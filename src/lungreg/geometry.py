"""Physical-space geometry: grids, index <-> world mapping, resampling.

Conventions (the ITK ones, used everywhere outside the network code):
- a point is physical x, y, z in mm in ITK/LPS world coordinates;
- a continuous index is (i, j, k) in x, y, z order; world = origin + D @ (spacing * index);
- numpy arrays from SimpleITK are indexed [k, j, i] (z, y, x); grid shapes in the config
  are given in that array order (the paper's 64 x 192 x 192 is z, y, x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

INTERPOLATORS = {
    "nearest": sitk.sitkNearestNeighbor,
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,  # cubic B-spline
}


@dataclass(frozen=True)
class Grid:
    """A sampling grid in physical space (the geometry of an image without its voxels)."""

    size: tuple[int, int, int]  # x, y, z
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # row-major 3 x 3

    @classmethod
    def of(cls, image: sitk.Image) -> "Grid":
        return cls(
            tuple(int(s) for s in image.GetSize()),
            tuple(float(s) for s in image.GetSpacing()),
            tuple(float(o) for o in image.GetOrigin()),
            tuple(float(d) for d in image.GetDirection()),
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (z, y, x)."""
        return self.size[::-1]

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def index_to_world_matrix(self) -> np.ndarray:
        """3 x 3 matrix M with world = origin + M @ index."""
        return self.direction_matrix @ np.diag(self.spacing)

    def index_to_world(self, index: np.ndarray) -> np.ndarray:
        """Continuous indices (..., 3) in x, y, z order to physical points (..., 3)."""
        return np.asarray(index, float) @ self.index_to_world_matrix.T + np.asarray(self.origin)

    def world_to_index(self, points: np.ndarray) -> np.ndarray:
        """Physical points (..., 3) to continuous indices (..., 3) in x, y, z order."""
        inverse = np.linalg.inv(self.index_to_world_matrix)
        return (np.asarray(points, float) - np.asarray(self.origin)) @ inverse.T

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Whether each point lies in the field of view (within half a voxel of the outer centres)."""
        index = self.world_to_index(points)
        return np.all((index >= -0.5) & (index <= np.asarray(self.size) - 0.5), axis=-1)

    def voxel_centres(self) -> np.ndarray:
        """Physical coordinates of every voxel centre, shape (z, y, x, 3)."""
        k, j, i = np.meshgrid(*(np.arange(n) for n in self.shape), indexing="ij")
        return self.index_to_world(np.stack([i, j, k], axis=-1))

    def corners(self) -> np.ndarray:
        """The 8 outer corners of the field of view (voxel edges, not centres), (8, 3)."""
        lo, hi = -0.5, np.asarray(self.size) - 0.5
        index = np.array([[x, y, z] for x in (lo, hi[0]) for y in (lo, hi[1]) for z in (lo, hi[2])])
        return self.index_to_world(index)

    def reference_image(self, pixel_type: int = sitk.sitkUInt8) -> sitk.Image:
        image = sitk.Image(list(self.size), pixel_type)
        self.apply_to(image)
        return image

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def matches(self, image: sitk.Image, tolerance: float = 1e-4) -> bool:
        return self.matches_grid(Grid.of(image), tolerance)

    def matches_grid(self, other: "Grid", tolerance: float = 1e-4) -> bool:
        """Same size, and spacing, origin and direction equal within `tolerance` (see `matches`)."""
        return (
            self.size == other.size
            and np.allclose(self.spacing, other.spacing, rtol=tolerance, atol=tolerance)
            and np.allclose(self.origin, other.origin, rtol=tolerance, atol=tolerance * 100)
            and np.allclose(self.direction, other.direction, atol=tolerance)
        )


def _along_axes(points: np.ndarray, reference: Grid) -> tuple[np.ndarray, np.ndarray]:
    """The box of `points` (n, 3) along the reference grid's axes: (low, high) coordinates."""
    local = np.asarray(points, float).reshape(-1, 3) @ reference.direction_matrix
    return local.min(axis=0), local.max(axis=0)


def grid_around(points: np.ndarray, reference: Grid, factor: float, shape_zyx: tuple[int, int, int]) -> Grid:
    """A grid of shape `shape_zyx` (z, y, x) centred on the box of `points` (n, 3, physical mm).

    Direction of the reference (fixed-phase) image; its spacing divided by `factor` (2/3 in the
    paper, so voxels 1.5 times larger); the box is taken along the reference's axes.
    """
    low, high = _along_axes(points, reference)
    direction = reference.direction_matrix
    centre = direction @ ((low + high) / 2)
    spacing = np.asarray(reference.spacing) / factor
    size = np.asarray(shape_zyx[::-1])
    origin = centre - direction @ (spacing * (size - 1) / 2)
    return Grid(tuple(int(s) for s in size), tuple(spacing), tuple(origin), reference.direction)


def common_grid(grids: list[Grid], reference: Grid, factor: float, shape_zyx: tuple[int, int, int]) -> Grid:
    """The grid both phases of a subject are resampled onto, centred on their fields of view.

    `grid_around` the corners of every field of view in `grids`, so that different sizes and
    origins of the phases are fine.
    """
    return grid_around(np.concatenate([g.corners() for g in grids]), reference, factor, shape_zyx)


def covering_shape(
    points: np.ndarray, reference: Grid, factor: float, margin_mm: float = 0.0, tolerance: float = 1e-3
) -> tuple[int, int, int]:
    """The smallest shape (z, y, x) of a `grid_around` `points` that holds their box plus `margin_mm`
    on every side: per axis ceil((extent + 2 margin) / (reference spacing / factor)), an extent
    within `tolerance` voxels of a whole number rounded down (so 36 voxels at factor 2/3 give 24)."""
    low, high = _along_axes(points, reference)
    voxels = (high - low + 2 * margin_mm) / (np.asarray(reference.spacing) / factor)
    return tuple(int(max(1, math.ceil(v - tolerance))) for v in voxels[::-1])


def region_corners(lungs: np.ndarray, fields_of_view: np.ndarray, reference: Grid, margin_mm: float) -> np.ndarray:
    """The 8 corners (n, 3 -> 8, 3, physical mm) of the box, along the reference's axes, of the points
    `lungs` grown by `margin_mm` on every side and cut to the box of the points `fields_of_view`
    (no grid reaches beyond the images for a margin's sake)."""
    low, high = _along_axes(lungs, reference)
    fov_low, fov_high = _along_axes(fields_of_view, reference)
    low, high = np.maximum(low - margin_mm, fov_low), np.minimum(high + margin_mm, fov_high)
    local = np.array([[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])
    return local @ reference.direction_matrix.T


def mask_box_corners(mask: sitk.Image) -> np.ndarray:
    """The 8 physical corners (voxel edges) of the box of a mask's set voxels, (8, 3); empty: (0, 3)."""
    array = sitk.GetArrayViewFromImage(mask) != 0
    if not array.any():
        return np.zeros((0, 3))
    bounds = []
    for axis in (2, 1, 0):  # x, y, z: array axes k, j, i
        occupied = np.flatnonzero(array.any(axis=tuple(a for a in range(3) if a != axis)))
        bounds.append((occupied[0] - 0.5, occupied[-1] + 0.5))
    index = np.array([[x, y, z] for x in bounds[0] for y in bounds[1] for z in bounds[2]])
    return Grid.of(mask).index_to_world(index)


def resample(
    image: sitk.Image, grid: Grid, interpolator: str, default: float = 0.0, transform: sitk.Transform | None = None
) -> sitk.Image:
    """Resample `image` onto `grid` (through `transform`, fixed-to-moving, if given)."""
    return sitk.Resample(
        image,
        grid.reference_image(),
        transform or sitk.Transform(),
        INTERPOLATORS[interpolator],
        default,
        image.GetPixelID(),
    )


def image_from_array(array: np.ndarray, grid: Grid, is_vector: bool = False) -> sitk.Image:
    """A SimpleITK image holding `array` ((z, y, x) or (z, y, x, 3) for vectors) on `grid`."""
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    return grid.apply_to(image)


def fov_mask(image_grid: Grid, target: Grid) -> np.ndarray:
    """Which voxels of `target` lie inside the field of view of `image_grid`, (z, y, x) bool."""
    return image_grid.contains(target.voxel_centres())
