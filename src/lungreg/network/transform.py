"""The spatial transformer: grid integration, affine grids, composition, warping, and the
conversion of the network's grids to physical-space transforms.

Coordinate conventions live here and nowhere else:
- tensors are (N, C, D, H, W) with D = z, H = y, W = x (the numpy (z, y, x) array order);
- a sampling grid is (N, D, H, W, 3) whose last axis is (x, y, z) in *normalised* moving-image
  coordinates, as `torch.nn.functional.grid_sample` expects;
- normalisation uses align_corners=True: -1 is the centre of the first voxel and +1 the centre
  of the last one, so normalised n and voxel index i relate by n = 2 i / (size - 1) - 1;
- the grid maps each fixed-image voxel to the point of the moving image it takes its value
  from (the "pull" or resampling direction, like ITK's fixed-to-moving transforms);
- spatial gradients Phi are (N, 3, D, H, W), channel 0 along x (W), 1 along y (H), 2 along z (D).
Outside this module everything is physical (ITK/LPS mm, see `geometry`).
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..geometry import Grid

# For each component of the (x, y, z) grid, the tensor dimension of (N, C, D, H, W) it runs along.
_AXIS_OF_COMPONENT = (4, 3, 2)


def identity_grid(shape_dhw: tuple[int, int, int], batch: int = 1, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised identity sampling grid, (N, D, H, W, 3) with (x, y, z) last."""
    axes = [torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype) for n in shape_dhw]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([x, y, z], dim=-1).expand(batch, *shape_dhw, 3)


def block_centres(
    shape_dhw: tuple[int, int, int], level: int, batch: int = 1, device=None, dtype=torch.float32
) -> torch.Tensor:
    """Normalised points (N, d, h, w, 3) at the centres of the `level`^3 voxel blocks of a grid.

    The points where a coarse loss level is evaluated: `level` 1 is `identity_grid`; at level 2
    they are the centres of the 2 x 2 x 2 blocks that `avg_pool3d(image, 2, ceil_mode=True)`
    averages (a last, incomplete block is centred on its last voxel).
    """
    if level == 1:
        return identity_grid(shape_dhw, batch, device, dtype)
    axes = []
    for n in shape_dhw:
        centres = (torch.arange(-(-n // level), device=device, dtype=dtype) * level + (level - 1) / 2).clamp(max=n - 1)
        axes.append(2 * centres / max(n - 1, 1) - 1)
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([x, y, z], dim=-1).expand(batch, *z.shape, 3)


def grid_displacement_mm(
    grid: torch.Tensor, points: torch.Tensor, shape_dhw: tuple[int, int, int], spacing_xyz: torch.Tensor
) -> torch.Tensor:
    """The grid's displacement from `points` in mm along the grid axes, (N, 3, d, h, w).

    `grid` holds the images of the normalised `points` of a grid of `shape_dhw` voxels with
    spacing `spacing_xyz` ((N, 3) or (3,), x, y, z): exact in mm when the moving image shares the
    fixed grid (both phases of a subject do); for other pairs, in moving voxels of the fixed
    size. Regularisers use it: its spatial derivatives are the physical ones up to the grid's
    direction (a rotation, which leaves their norms unchanged).
    """
    half_extent = torch.tensor([(n - 1) / 2 for n in shape_dhw[::-1]], device=grid.device, dtype=grid.dtype)
    spacing = spacing_xyz.to(grid.device, grid.dtype).reshape(-1, 1, 1, 1, 3)
    return ((grid - points) * half_extent * spacing).permute(0, 4, 1, 2, 3)


def jacobian_determinant_fd(grid: torch.Tensor) -> torch.Tensor:
    """det of the finite-difference Jacobian of a sampling grid w.r.t. the voxel index, (N, D, H, W).

    The same differences as `metrics.jacobian_determinant` (numpy.gradient: central inside, one-
    sided at the border) of the exported field: the physical field is an affine image of the grid,
    so its determinant is this one times det(moving index-to-world) / det(fixed index-to-world),
    which is 1 for a subject's two phases and positive for any two grids of like orientation.
    """
    return finite_difference_determinant(grid) * math.prod((n - 1) / 2 for n in grid.shape[1:4])  # index / normalised


def finite_difference_determinant(points: torch.Tensor) -> torch.Tensor:
    """det of the finite-difference Jacobian of points (N, D, H, W, 3) (x, y, z last) w.r.t. the voxel
    index, (N, D, H, W): numpy.gradient's differences (central inside, one-sided at the border), the
    3 x 3 determinant by cofactors (a few passes over the volume, no per-voxel matrix)."""
    components = points.movedim(-1, 1).contiguous()  # (N, 3, D, H, W): each component contiguous
    columns = [_twice_gradient(components, dim) for dim in (4, 3, 2)]  # 2 d/dx, 2 d/dy, 2 d/dz
    (a, b, c), (d, e, f), (g, h, i) = [[column[:, k] for column in columns] for k in range(3)]
    minors = (
        torch.addcmul(e * i, f, h, value=-1),
        torch.addcmul(f * g, d, i, value=-1),
        torch.addcmul(d * h, e, g, value=-1),
    )
    return torch.addcmul(torch.addcmul(a * minors[0], b, minors[1]), c, minors[2]).mul_(0.125)  # det(2 J) / 8


def _twice_gradient(values: torch.Tensor, dim: int) -> torch.Tensor:
    """2 x numpy.gradient along `dim` (f[i+1] - f[i-1] inside, 2 (f[1] - f[0]) and 2 (f[-1] - f[-2]) at
    the ends): one pass, where torch.gradient's division and concatenation take three."""
    n = values.shape[dim]
    out = torch.empty_like(values)
    torch.sub(values.narrow(dim, 2, n - 2), values.narrow(dim, 0, n - 2), out=out.narrow(dim, 1, n - 2))
    for end, (later, earlier) in ((0, (1, 0)), (n - 1, (n - 1, n - 2))):
        torch.sub(values.narrow(dim, later, 1), values.narrow(dim, earlier, 1), out=out.narrow(dim, end, 1))
        out.narrow(dim, end, 1).mul_(2)
    return out


def axial_displacements(gradients: torch.Tensor) -> torch.Tensor:
    """Cumulative sums of the spatial gradients along their own axes, minus the identity.

    Channel c of the result is [G(p)]_c - p_c in normalised units, with the paper's
    [G(p)]_c = sum_{i <= p_c} Phi_c(i) - 1 (voxel units): all-ones gradients give zeros, and since
    every gradient is positive each [G]_c is strictly increasing along its own axis.
    """
    components = []
    for channel, dim in enumerate(_AXIS_OF_COMPONENT):
        size = gradients.shape[dim]
        index = torch.cumsum(gradients[:, channel], dim=dim - 1) - 1.0  # dim - 1: channel axis gone
        position = torch.arange(size, device=gradients.device, dtype=gradients.dtype)
        view = [1, 1, 1]
        view[dim - 2] = size
        components.append((index - position.view(view)) * (2.0 / max(size - 1, 1)))
    return torch.stack(components, dim=1)


def deform_points(gradients: torch.Tensor, points: torch.Tensor, integration: str = "sequential") -> torch.Tensor:
    """Carry normalised `points` (N, D, H, W, 3) through the deformable transform of `gradients`.

    "paper": all three components of G are read at the point at once, G(q) = q + d(q). Each grid
    line is monotonic, but shear between neighbouring lines accumulates along the cumulative sum
    and the 3-D Jacobian can turn negative (it folds for random weights).
    "sequential": the same cumulative sums applied as three one-axis sweeps, x then y then z; each
    sweep q -> (..., q_c + d_c(q), ...) only moves points along axis c and is strictly increasing
    along it, so its Jacobian determinant is d[G]_c/dq_c > 0 and the composition cannot fold.
    Displacements are read with border extension, so the map continues with slope 1 outside.
    Both are the identity for all-ones gradients and agree to first order for small ones.
    """
    displacement = axial_displacements(gradients)
    if integration == "paper":
        sampled = F.grid_sample(
            displacement, points.to(displacement.dtype), mode="bilinear", padding_mode="border", align_corners=True
        )
        return points + sampled.permute(0, 2, 3, 4, 1)
    if integration != "sequential":
        raise ValueError(f"unknown integration {integration!r}: expected 'sequential' or 'paper'")
    for channel in range(3):
        moved = (
            points[..., channel]
            + F.grid_sample(
                displacement[:, channel : channel + 1],
                points.to(displacement.dtype),
                mode="bilinear",
                padding_mode="border",
                align_corners=True,
            )[:, 0]
        )
        points = torch.cat([points[..., :channel], moved.unsqueeze(-1), points[..., channel + 1 :]], dim=-1)
    return points


def affine_grid(theta: torch.Tensor, shape_dhw: tuple[int, int, int]) -> torch.Tensor:
    """Normalised grid of a 3 x 4 affine `theta` acting on (x, y, z, 1), (N, D, H, W, 3)."""
    return F.affine_grid(theta, [theta.shape[0], 1, *shape_dhw], align_corners=True)


def sampling_grid(gradients: torch.Tensor, theta: torch.Tensor | None, integration: str = "sequential") -> torch.Tensor:
    """The grid of W(W(S, G_N), G_A) = S(G_N(G_A(p))): the affine maps each fixed voxel first and
    the deformable transform is applied to that point. Composing the transforms and sampling the
    image once avoids a second interpolation blur.
    """
    shape = tuple(gradients.shape[2:])
    if theta is None:
        points = identity_grid(shape, gradients.shape[0], gradients.device, gradients.dtype)
    else:
        points = affine_grid(theta.to(gradients.dtype), shape)
    return deform_points(gradients, points, integration)


def map_normalised_points(
    gradients: torch.Tensor, theta: torch.Tensor | None, points: torch.Tensor, integration: str = "sequential"
) -> torch.Tensor:
    """The network's continuous transform at arbitrary normalised fixed points (N, K, 3).

    The same composition as `sampling_grid`, evaluated anywhere rather than at voxel centres
    (used to check the Jacobian of the continuous map, and to map points exactly).
    """
    points = points.to(gradients.dtype)
    if theta is not None:
        theta = theta.to(gradients.dtype)
        points = points @ theta[:, :, :3].transpose(1, 2) + theta[:, :, 3].unsqueeze(1)
    return deform_points(gradients, points[:, None, None], integration)[:, 0, 0]


def warp(image: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Resample `image` (N, C, D, H, W) at `grid`; trilinear, zero outside the moving volume."""
    return F.grid_sample(image, grid.to(image.dtype), mode=mode, padding_mode="zeros", align_corners=True)


# ------------------------------------------------------------------ to physical space


def _normalised_to_index_matrix(grid: Grid) -> np.ndarray:
    """4 x 4 homogeneous matrix taking normalised (x, y, z) to voxel indices of `grid`."""
    half_extent = (np.asarray(grid.size, float) - 1.0) / 2.0
    matrix = np.eye(4)
    matrix[:3, :3] = np.diag(half_extent)
    matrix[:3, 3] = half_extent
    return matrix


def _index_to_world_matrix(grid: Grid) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = grid.index_to_world_matrix
    matrix[:3, 3] = grid.origin
    return matrix


def normalised_to_world(grid: Grid) -> np.ndarray:
    """4 x 4 homogeneous matrix taking normalised (x, y, z) of `grid` to physical mm."""
    return _index_to_world_matrix(grid) @ _normalised_to_index_matrix(grid)


def world_to_normalised(grid: Grid) -> np.ndarray:
    """4 x 4 homogeneous matrix taking physical mm to normalised (x, y, z) of `grid` (grid_sample's)."""
    return np.linalg.inv(normalised_to_world(grid))


def index_to_world(grid: Grid) -> np.ndarray:
    """4 x 4 homogeneous matrix taking voxel indices (x, y, z) of `grid` to physical mm (`Grid.index_to_world`)."""
    return _index_to_world_matrix(grid)


def stacked(matrices: list[np.ndarray], like: torch.Tensor) -> torch.Tensor:
    """Per-pair matrices (N, ...) as a tensor of `like`'s dtype on its device."""
    return torch.as_tensor(np.stack(matrices), dtype=like.dtype, device=like.device)


def apply_affine(points: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Points (N, ..., 3) through per-batch-item homogeneous 4 x 4 `matrices` (N, 4, 4)."""
    flat = points.reshape(points.shape[0], -1, 3)
    moved = torch.baddbmm(matrices[:, None, :3, 3], flat, matrices[:, :3, :3].transpose(1, 2))
    return moved.reshape(points.shape)


def voxel_centres(grids: list[Grid], device=None, dtype=torch.float64) -> torch.Tensor:
    """Physical voxel centres (N, z, y, x, 3) of grids of one shape (`Grid.voxel_centres`, batched)."""
    k, j, i = torch.meshgrid(*(torch.arange(n, device=device, dtype=dtype) for n in grids[0].shape), indexing="ij")
    index = torch.stack([i, j, k], dim=-1).expand(len(grids), *grids[0].shape, 3)
    return apply_affine(index, stacked([index_to_world(g) for g in grids], index))


def affine_to_physical(theta: np.ndarray, fixed: Grid, moving: Grid) -> sitk.AffineTransform:
    """The network's normalised 3 x 4 affine as an ITK transform (fixed mm -> moving mm)."""
    theta_h = np.vstack([np.asarray(theta, float).reshape(3, 4), [0, 0, 0, 1]])
    physical = normalised_to_world(moving) @ theta_h @ world_to_normalised(fixed)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(physical[:3, :3].ravel().tolist())
    transform.SetTranslation(physical[:3, 3].tolist())
    return transform


def float64_grid(grid: torch.Tensor) -> torch.Tensor:
    """A normalised grid (N, D, H, W, 3) in float64. A float32 grid's offset from the float32
    identity is exact in float32 (the two are close), so it is added to the float64 identity:
    float32 then rounds the displacement, not the position, and the identity's own float32 grid
    becomes exactly the float64 identity (the refinement from the identity with no steps is
    Unregistered to the last digit)."""
    if grid.dtype == torch.float64:
        return grid
    shape, n = tuple(grid.shape[1:4]), grid.shape[0]
    offset = grid.float() - identity_grid(shape, n, grid.device, torch.float32)
    return identity_grid(shape, n, grid.device, torch.float64) + offset.double()


def physical_displacement(grid: torch.Tensor, fixed: list[Grid], moving: list[Grid]) -> torch.Tensor:
    """Physical displacement fields (N, z, y, x, 3) of normalised grids (N, D, H, W, 3), on their device.

    ITK displacement-field convention: at every fixed voxel centre x, the offset in mm to the
    moving-image point the voxel takes its value from, so T(x) = x + u(x). Computed in float64.
    """
    grid = float64_grid(grid)
    moving_points = apply_affine(grid, stacked([normalised_to_world(m) for m in moving], grid))
    return moving_points - voxel_centres(fixed, grid.device)


def grid_to_displacement(grid: np.ndarray, fixed: Grid, moving: Grid) -> np.ndarray:
    """Physical displacement field (z, y, x, 3) of a normalised grid (D, H, W, 3) (`physical_displacement`)."""
    return physical_displacement(torch.as_tensor(grid)[None], [fixed], [moving])[0].numpy()


def identity_displacement(fixed: Grid, moving: Grid) -> np.ndarray:
    """Displacement of the voxel-identity between two grids of equal shape.

    This is what the network outputs at initialisation and what "Unregistered" means for the
    preprocessed arrays: voxel p of the fixed grid reads voxel p of the moving grid. For the two
    phases of one subject (one common grid) it is zero.
    """
    if fixed.size != moving.size:
        raise ValueError(f"grids differ in size: {fixed.size} vs {moving.size}")
    return grid_to_displacement(identity_grid(fixed.shape, dtype=torch.float64).numpy()[0], fixed, moving)


def displacement_image(displacement: np.ndarray, fixed: Grid) -> sitk.Image:
    """A float64 vector image holding a (z, y, x, 3) field on `fixed` (what ITK transforms need)."""
    image = sitk.GetImageFromArray(np.asarray(displacement, dtype=np.float64), isVector=True)
    return fixed.apply_to(image)


def displacement_transform(
    displacement: np.ndarray | sitk.Image, fixed: Grid | None = None
) -> sitk.DisplacementFieldTransform:
    """An ITK DisplacementFieldTransform of a field given as array (with its grid) or image."""
    image = displacement if isinstance(displacement, sitk.Image) else displacement_image(displacement, fixed)
    if image.GetPixelID() != sitk.sitkVectorFloat64:
        image = sitk.Cast(image, sitk.sitkVectorFloat64)
    return sitk.DisplacementFieldTransform(image)
