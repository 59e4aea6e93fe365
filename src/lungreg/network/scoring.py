"""The metrics of registered pairs in torch, on the device that registered them, a batch at a time.

A transform is scored from its moving points: where each fixed voxel centre x lands, T(x) =
x + u(x), in the moving grid's normalised coordinates (`transform`'s conventions; the network's
sampling grid is exactly that, a displacement field gives it by `moving_points`). The definitions
are those of `lungreg.metrics` and `lungreg.evaluate.warp_mask` (numpy, scipy and SimpleITK: the
reference, which tests/test_scoring.py holds these to on random and real fields):
- the moving mask is warped as ITK's resampler does with linear interpolation: inside the moving
  grid's field of view (continuous index in [-0.5, size - 0.5) on every axis) trilinear with the
  border voxels repeated, 0 outside; then > 0.5;
- landmarks and a true field are sampled trilinearly with border extension (scipy's
  `map_coordinates(order=1, mode="nearest")`);
- the Jacobian determinant is that of the field's finite differences (`numpy.gradient`: central
  inside, one-sided at the border) with derivatives in physical space: u = T(x) - x and x is
  linear in the voxel index, so det(I + du/dx) = det(dT/dindex) / det(fixed index-to-world);
- the 95th percentile is numpy's default (linear between the two nearest ranks).
Everything runs in float64 so that the tables keep their digits.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry import Grid
from . import transform


def sample_border(volumes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear samples (N, C, ...) of `volumes` (N, C, D, H, W) at normalised `points` (N, ..., 3),
    the border voxels repeated outside (scipy's mode "nearest")."""
    grid = points.reshape(points.shape[0], -1, 1, 1, 3).to(volumes.dtype)
    parts = _thread_parts(volumes, grid)
    if parts > 1:  # on the CPU grid_sample runs items in parallel, not points: one item as `parts`
        values = F.grid_sample(
            volumes.expand(parts, -1, -1, -1, -1),
            grid.reshape(parts, -1, 1, 1, 3),
            mode="bilinear",
            padding_mode="border",
            align_corners=True,
        ).reshape(1, 1, -1, 1, 1)
    else:
        values = F.grid_sample(volumes, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return values.reshape(*values.shape[:2], *points.shape[1:-1])


def _thread_parts(volumes: torch.Tensor, grid: torch.Tensor) -> int:
    """How many items one volume's many samples are split into (the CPU's threads), else 1."""
    threads = torch.get_num_threads()
    single = volumes.shape[:2] == (1, 1) and volumes.device.type == "cpu"
    points = grid.shape[1]
    return threads if single and threads > 1 and points >= 2**15 and points % threads == 0 else 1


def _map(points: torch.Tensor, matrix: np.ndarray) -> torch.Tensor:
    """Points (n, 3) of one pair through one homogeneous 4 x 4 matrix."""
    return transform.apply_affine(points[None], transform.stacked([matrix], points))[0]


def moving_points(displacement: torch.Tensor, fixed: list[Grid], moving: list[Grid]) -> torch.Tensor:
    """The moving points (N, z, y, x, 3) of displacement fields (N, z, y, x, 3, mm on the fixed grids):
    x + u(x) in normalised moving coordinates, i.e. W (x) + W' u(x) with W the moving grid's
    world-to-normalised map and W' its linear part."""
    to_moving = [transform.world_to_normalised(m) for m in moving]
    of_centres = transform.stacked(
        [w @ transform.normalised_to_world(f) for w, f in zip(to_moving, fixed)], displacement
    )
    centres = transform.affine_grid(of_centres[:, :3], tuple(displacement.shape[1:4]))  # W(x), normalised
    linear = transform.stacked([w[:3, :3] for w in to_moving], displacement)
    flat = (len(fixed), -1, 3)
    return torch.baddbmm(centres.reshape(flat), displacement.reshape(flat), linear.transpose(1, 2)).reshape(
        displacement.shape
    )


def slabs(depth: int, plane: int, device: torch.device) -> list[slice]:
    """z-slabs of a volume of `depth` planes of `plane` voxels: on the CPU of at most SLAB_VOXELS
    voxels each, so that every temporary stays small (cache-sized, and reused by the allocator: whole
    64 x 192 x 192 temporaries are mapped and faulted in afresh each time, which dominated the
    whole-volume version's time here); on a GPU one slab."""
    step = depth if device.type == "cuda" else max(1, SLAB_VOXELS // max(plane, 1))
    return [slice(z, min(z + step, depth)) for z in range(0, depth, step)]


SLAB_VOXELS = 2**18


def warp_masks(masks: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Moving masks (N, 1, D, H, W) at moving `points` (N, d, h, w, 3) (any float dtype; sampled in
    the masks' dtype): linear, then > 0.5, and 0 beyond half a voxel outside the outer voxel centres
    (ITK's field of view), (N, d, h, w) bool. Slab by slab along d."""
    size = torch.tensor(masks.shape[-3:][::-1], dtype=masks.dtype, device=masks.device)  # x, y, z
    half_voxel = 1.0 / (size - 1)  # continuous index -0.5 and size - 0.5, normalised
    faces = [
        masks[..., 0, :, :],
        masks[..., -1, :, :],
        masks[..., 0, :],
        masks[..., -1, :],
        masks[..., 0],
        masks[..., -1],
    ]
    cut = any(bool(face.any()) for face in faces)  # border extension repeats only zeros otherwise: nothing to cut
    warped = torch.empty(points.shape[:-1], dtype=torch.bool, device=points.device)
    for slab in slabs(points.shape[1], points[0, 0, ..., 0].numel(), points.device):
        part = points[:, slab].to(masks.dtype)
        warped[:, slab] = sample_border(masks, part)[:, 0] > 0.5
        if cut:
            warped[:, slab] &= ((part >= -1 - half_voxel) & (part < 1 + half_voxel)).all(dim=-1)
    return warped


def dice(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Dice of each pair of masks (N, ...) bool (`metrics.dice`: NaN when both are empty)."""
    shared = torch.count_nonzero((a & b).flatten(1), dim=1).tolist()
    totals = (torch.count_nonzero(a.flatten(1), dim=1) + torch.count_nonzero(b.flatten(1), dim=1)).tolist()
    return [float(2.0 * s / t) if t else float("nan") for s, t in zip(shared, totals)]


def landmark_errors(
    points: torch.Tensor, fixed: Grid, moving: Grid, fixed_landmarks: np.ndarray, moving_landmarks: np.ndarray
) -> np.ndarray:
    """Per landmark |dx|, |dy|, |dz| and ds (mm), (n, 4), of one pair's moving points (z, y, x, 3)
    (`metrics.landmark_errors`): each fixed landmark q carried to q + u(q), u sampled with border
    extension, against its moving landmark. With u = T - x: u(q) = T(q) - x(q), both sampled the same
    way, and x sampled with border extension is the voxel centre at q clamped to the grid."""
    q = torch.tensor(np.asarray(fixed_landmarks, float).reshape(-1, 3), device=points.device)
    moved = _map(sample_at(points, fixed, q), transform.normalised_to_world(moving))
    clamped = _map(_map(q, transform.world_to_normalised(fixed)).clamp(-1.0, 1.0), transform.normalised_to_world(fixed))
    residual = (q + (moved - clamped)).cpu().numpy() - np.asarray(moving_landmarks, float).reshape(-1, 3)
    return np.column_stack([np.abs(residual), np.linalg.norm(residual, axis=1)])


def sample_at(volume: torch.Tensor | np.ndarray, grid: Grid, world: torch.Tensor) -> torch.Tensor:
    """Trilinear samples (n, C), float64, border-extended, of `volume` (z, y, x, C; a tensor or numpy
    array of any float dtype) on `grid` at physical points `world` (n, 3, float64, on their device).
    Only the box of voxels the samples read is converted and sampled: a subgrid of `grid` (same
    spacing and direction), which gives the same values."""
    low, high = read_box(grid, _map(world, np.linalg.inv(transform.index_to_world(grid))))
    part = volume[low[2] : high[2], low[1] : high[1], low[0] : high[0]]
    if isinstance(part, np.ndarray):
        part = torch.from_numpy(np.ascontiguousarray(part, dtype=np.float64))
    part = part.to(world.device, torch.float64).movedim(-1, 0)[None]
    box = dataclasses.replace(grid, size=tuple(int(n) for n in high - low), origin=tuple(grid.index_to_world(low)))
    return sample_border(part, _map(world, transform.world_to_normalised(box))[None])[0].T


def jacobian_determinant(points: torch.Tensor, fixed: Grid, moving: Grid) -> torch.Tensor:
    """det(I + du/dx) at every voxel of moving points (..., z, y, x, 3) (`metrics.jacobian_determinant`)."""
    moving_linear = transform.normalised_to_world(moving)[:3, :3]
    scale = np.linalg.det(moving_linear) / np.linalg.det(fixed.index_to_world_matrix)
    return transform.finite_difference_determinant(points.reshape(-1, *points.shape[-4:])).reshape(
        points.shape[:-1]
    ) * float(scale)


def mask_box(mask: torch.Tensor) -> tuple[slice, slice, slice] | None:
    """The (z, y, x) slices of the box of a mask's set voxels; None when it has none."""
    plane = mask.any(dim=0)  # (y, x): one contiguous pass, then small reductions
    box = []
    for projection in (mask.flatten(1).any(dim=1), plane.any(dim=1), plane.any(dim=0)):
        occupied = torch.nonzero(projection).flatten()
        if occupied.numel() == 0:
            return None
        box.append(slice(int(occupied[0]), int(occupied[-1]) + 1))
    return tuple(box)


def jacobian_statistics(points: torch.Tensor, fixed: Grid, moving: Grid, mask: torch.Tensor) -> dict[str, float]:
    """Minimum, fraction <= 0 and std of log J inside `mask` (`metrics.jacobian_statistics`) of one
    pair's moving points (z, y, x, 3). The determinant is computed on the mask's box only, slab by
    slab, each grown by the one voxel its central differences read (one-sided only where the box
    meets the grid's border)."""
    core = mask_box(mask)
    if core is None:
        return {"jacobian_min": np.nan, "jacobian_fraction_nonpositive": np.nan, "log_jacobian_std": np.nan}
    y, x = (slice(max(c.start - 1, 0), min(c.stop + 1, n)) for c, n in zip(core[1:], mask.shape[1:]))
    inner = tuple(slice(c.start - b.start, c.stop - b.start) for c, b in zip(core[1:], (y, x)))
    found = []
    for slab in slabs(core[0].stop - core[0].start, (y.stop - y.start) * (x.stop - x.start), points.device):
        z0, z1 = core[0].start + slab.start, core[0].start + slab.stop
        low, high = max(z0 - 1, 0), min(z1 + 1, mask.shape[0])
        determinant = jacobian_determinant(points[low:high, y, x].to(torch.float64), fixed, moving)
        found.append(determinant[z0 - low : z1 - low, inner[0], inner[1]][mask[z0:z1, core[1], core[2]]])
    values = torch.cat(found)
    positive = values[values > 0]
    return {
        "jacobian_min": float(values.min()),
        "jacobian_fraction_nonpositive": int(torch.count_nonzero(values <= 0)) / values.numel(),
        "log_jacobian_std": float(torch.log(positive).std(correction=0)) if positive.numel() else np.nan,
    }


def percentile(values: torch.Tensor, q: float) -> float:
    """numpy.percentile(values, q) (method "linear") of a 1-D tensor, from its two nearest order statistics."""
    rank = q / 100 * (values.numel() - 1)
    low = math.floor(rank)
    below = float(values.kthvalue(low + 1).values)
    above = float(values.kthvalue(min(low + 2, values.numel())).values)
    fraction, step = rank - low, above - below
    return above - step * (1 - fraction) if fraction >= 0.5 else below + step * fraction  # numpy's lerp


def endpoint_errors(
    points: torch.Tensor, fixed: Grid, moving: Grid, truth: np.ndarray, truth_grid: Grid, mask: torch.Tensor
) -> dict[str, float]:
    """End-point error (mm) against a true field (z, y, x, 3; numpy) on its own grid, inside `mask` of
    the fixed grid (`metrics.endpoint_errors`), of one pair's moving points (z, y, x, 3): u = T(x) - x
    at the fixed voxel centres inside the mask, the truth sampled there."""
    if not bool(mask.any()):
        return {"epe_mean": np.nan, "epe_p95": np.nan}
    index = torch.nonzero(mask).flip(-1).to(torch.float64)  # fixed voxels inside the mask, (n, 3): x, y, z
    centres = _map(index, transform.index_to_world(fixed))
    displacement = _map(points[mask].to(torch.float64), transform.normalised_to_world(moving)) - centres
    error = torch.linalg.vector_norm(displacement - sample_at(truth, truth_grid, centres), dim=1)
    return {"epe_mean": float(error.mean()), "epe_p95": percentile(error, 95)}


def read_box(grid: Grid, index: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The voxels of `grid` that trilinear samples at continuous indices `index` (n, 3) read with border
    extension: low (inclusive) and high (exclusive) indices, x, y, z; at least two voxels per axis,
    so that sampling the box gives the same values as sampling the grid."""
    size = np.asarray(grid.size)
    low = np.clip(np.floor(index.min(dim=0).values.cpu().numpy()).astype(int), 0, size - 2)
    high = np.clip(np.floor(index.max(dim=0).values.cpu().numpy()).astype(int) + 2, low + 2, size)
    return low, high
