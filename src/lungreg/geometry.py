"""Physical-space geometry: grids, index <-> world mapping, resampling.

Conventions (the ITK ones, used everywhere outside the network code):
- a point is physical x, y, z in mm in ITK/LPS world coordinates;
- a continuous index is (i, j, k) in x, y, z order; world = origin + D @ (spacing * index);
- numpy arrays from SimpleITK are indexed [k, j, i] (z, y, x); grid shapes in the config
  are given in that array order (the paper's 64 x 192 x 192 is z, y, x).
"""

from __future__ import annotations

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


def common_grid(grids: list[Grid], reference: Grid, factor: float, shape_zyx: tuple[int, int, int]) -> Grid:
    """The grid both phases of a subject are resampled onto.

    Direction of the reference (fixed-phase) image; its spacing divided by `factor` (2/3 in
    the paper, so voxels 1.5 times larger); the configured shape; centred on the union of the
    fields of view of all `grids`, so that different sizes and origins of the phases are fine.
    """
    direction = reference.direction_matrix
    local = np.concatenate([g.corners() for g in grids]) @ direction  # coordinates along the axes
    centre = direction @ ((local.min(axis=0) + local.max(axis=0)) / 2)
    spacing = np.asarray(reference.spacing) / factor
    size = np.asarray(shape_zyx[::-1])
    origin = centre - direction @ (spacing * (size - 1) / 2)
    return Grid(tuple(int(s) for s in size), tuple(spacing), tuple(origin), reference.direction)


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
