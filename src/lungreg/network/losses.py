"""Similarity terms and the paper's regularisers. They know nothing of data or transforms.

Every similarity takes (fixed, warped, weight) tensors of shape (N, 1, D, H, W) and returns a
scalar to minimise. `weight` (e.g. the fixed lung mask) restricts the similarity by weighting
every voxel, never by sampling and rejecting voxels (see the pitfalls in ../shared/paper.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from ..config import settings_from
from . import transform


def _weighted_mean(values: torch.Tensor, weight: torch.Tensor | None, per_pair: bool = False) -> torch.Tensor:
    """The (weighted) mean over everything, or with `per_pair` over each pair's voxels, (N,)."""
    dims = tuple(range(1, values.dim())) if per_pair else tuple(range(values.dim()))
    if weight is None:
        return values.mean(dims)
    weight = weight.expand_as(values)
    return (values * weight).sum(dims) / weight.sum(dims).clamp_min(1e-6)


def mse(
    fixed: torch.Tensor, warped: torch.Tensor, weight: torch.Tensor | None = None, per_pair: bool = False
) -> torch.Tensor:
    """||R - W(S, G)||^2, averaged over (weighted) voxels: the paper's similarity."""
    return _weighted_mean((fixed - warped) ** 2, weight, per_pair)


def _clipped_window_mean(x: torch.Tensor, axis: int, radius: int) -> torch.Tensor:
    """Mean of x[i - radius : i + radius + 1] along `axis`, the window clipped at the borders."""
    n = x.shape[axis]
    total = torch.cat([torch.zeros_like(x.narrow(axis, 0, 1)), x.cumsum(axis)], dim=axis)
    index = torch.arange(n, device=x.device)
    high, low = (index + radius + 1).clamp(max=n), (index - radius).clamp(min=0)
    sums = total.index_select(axis, high) - total.index_select(axis, low)
    shape = [1] * x.dim()
    shape[axis] = n
    return sums / (high - low).to(x.dtype).reshape(shape)


def local_ncc(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    weight: torch.Tensor | None = None,
    per_pair: bool = False,
    window: int = 9,
    eps: float = 1e-5,
) -> torch.Tensor:
    """1 - mean local normalised cross-correlation over cubic windows of `window` voxels."""

    def box(x: torch.Tensor) -> torch.Tensor:
        # Separable: the mean over a window clipped at the border is the product of the three
        # axes' clipped means, so three 1-D passes give the 3-D box mean (window**3 / (3 * window)
        # times fewer operations), for any image size.
        for axis in (2, 3, 4):
            x = _clipped_window_mean(x, axis, window // 2)
        return x

    mean_f, mean_w = box(fixed), box(warped)
    cov = box(fixed * warped) - mean_f * mean_w
    var_f = (box(fixed * fixed) - mean_f**2).clamp_min(0)
    var_w = (box(warped * warped) - mean_w**2).clamp_min(0)
    ncc = cov * cov / (var_f * var_w + eps)
    return 1.0 - _weighted_mean(ncc, weight, per_pair)


def mutual_information(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    weight: torch.Tensor | None = None,
    per_pair: bool = False,
    bins: int = 32,
    sigma: float | None = None,
) -> torch.Tensor:
    """Negative mutual information from a Parzen (Gaussian) joint histogram of [0, 1] intensities.

    Differentiable in the warped image. Each sample's histogram vote is multiplied by its
    weight, so a mask restricts the estimate without rejection sampling.
    """
    sigma = sigma or 0.5 / bins
    centres = torch.linspace(0, 1, bins, device=fixed.device, dtype=fixed.dtype)
    batch = fixed.shape[0]
    f = fixed.reshape(batch, -1, 1).clamp(0, 1)
    w = warped.reshape(batch, -1, 1).clamp(0, 1)
    vote_f = torch.exp(-0.5 * ((f - centres) / sigma) ** 2)
    vote_w = torch.exp(-0.5 * ((w - centres) / sigma) ** 2)
    if weight is not None:
        vote_f = vote_f * weight.expand_as(fixed).reshape(batch, -1, 1)
    vote_f = vote_f / vote_f.sum(-1, keepdim=True).clamp_min(1e-12) * (vote_f.sum(-1, keepdim=True) > 0)
    vote_w = vote_w / vote_w.sum(-1, keepdim=True).clamp_min(1e-12)
    joint = torch.bmm(vote_f.transpose(1, 2), vote_w)
    joint = joint / joint.sum(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    p_f, p_w = joint.sum(2, keepdim=True), joint.sum(1, keepdim=True)
    mi = (joint * (torch.log(joint + 1e-10) - torch.log(p_f * p_w + 1e-10))).sum(dim=(1, 2))
    return -mi if per_pair else -mi.mean()


SIMILARITIES: dict[str, Callable[..., torch.Tensor]] = {
    "mse": mse,
    "ncc": local_ncc,
    "mi": mutual_information,
}


def affine_penalty(theta: torch.Tensor | None) -> torch.Tensor:
    """||A - A_I||_1 per pair (sum over the 12 entries, mean over the batch)."""
    if theta is None:
        return torch.zeros(())
    identity = torch.eye(3, 4, device=theta.device, dtype=theta.dtype)
    return (theta - identity).abs().sum(dim=(1, 2)).mean()


def gradient_penalty(gradients: torch.Tensor, reduction: str = "mean", per_pair: bool = False) -> torch.Tensor:
    """||Phi - Phi_I||_1 with Phi_I = 1: summed over voxels ("sum", Keras's activity-regulariser
    convention) or averaged ("mean"), then averaged over the batch (or per pair, (N,))."""
    deviation = (gradients - 1.0).abs().flatten(1)
    values = deviation.sum(1) if reduction == "sum" else deviation.mean(1)
    return values if per_pair else values.mean()


def _axis_differences(displacement_mm: torch.Tensor, spacing_xyz: torch.Tensor, points_spacing: float, order: int):
    """Per axis a (x along W, y along H, z along D) long enough: the `order`-th forward difference of
    every component along a, and the physical step along a ((N, 1, 1, 1, 1), mm)."""
    spacing = spacing_xyz.to(displacement_mm).reshape(-1, 3) * points_spacing
    for component_axis, dim in ((0, 4), (1, 3), (2, 2)):
        if displacement_mm.shape[dim] > order:
            yield torch.diff(displacement_mm, n=order, dim=dim), spacing[:, component_axis].reshape(-1, 1, 1, 1, 1)


def _voxel_mean(values: torch.Tensor, per_pair: bool) -> torch.Tensor:
    """The mean over voxels of a (N, D, H, W) term: over the batch too, or per pair (N,)."""
    return values.flatten(1).mean(1) if per_pair else values.mean()


def diffusion(
    displacement_mm: torch.Tensor, spacing_xyz: torch.Tensor, points_spacing: float = 1.0, per_pair: bool = False
) -> torch.Tensor:
    """Diffusion (membrane) energy: the mean over voxels of sum_a sum_c (du_c / dx_a)^2.

    `displacement_mm`: (N, 3, D, H, W) in mm (`transform.grid_displacement_mm`); forward
    differences divided by the physical step, `spacing_xyz` ((N, 3) or (3,), mm) times
    `points_spacing` (the voxels between neighbouring points: 2 at a coarse loss level), so the
    energy is dimensionless and the same weight means the same smoothness at any resolution.
    Unlike ||Phi - 1||_1, whose constant pull towards 1 at every voxel makes a field piecewise
    rigid, it costs rough fields most and carries the boundary's motion into the lung's interior.
    """
    differences = _axis_differences(displacement_mm, spacing_xyz, points_spacing, order=1)
    terms = (_voxel_mean(((d / step) ** 2).sum(1), per_pair) for d, step in differences)
    return sum(terms, displacement_mm.new_zeros((len(displacement_mm),) if per_pair else ()))


BENDING_LENGTH_MM = 10.0  # the bending energy's length scale: makes it dimensionless


def bending(
    displacement_mm: torch.Tensor, spacing_xyz: torch.Tensor, points_spacing: float = 1.0, per_pair: bool = False
) -> torch.Tensor:
    """Second-order smoothness: the mean over voxels of sum_a sum_c (L d2u_c / dx_a^2)^2.

    The pure second derivatives of the bending energy (central second differences over the
    physical step, as in `diffusion`), times L = BENDING_LENGTH_MM, so the energy is
    dimensionless and independent of the voxel size. Unlike the diffusion energy it costs
    nothing for a linear field: a lung's nearly uniform breathing strain is not pulled towards
    a translation (measured: the diffusion-regularised refinement underestimated the z motion,
    u_z/t_z 0.64-0.94), only its curvature is.
    """
    differences = _axis_differences(displacement_mm, spacing_xyz, points_spacing, order=2)
    terms = (_voxel_mean(((d * (BENDING_LENGTH_MM / step**2)) ** 2).sum(1), per_pair) for d, step in differences)
    return sum(terms, displacement_mm.new_zeros((len(displacement_mm),) if per_pair else ()))


def squared_distance(
    displacement_mm: torch.Tensor, target_mm: torch.Tensor, weight: torch.Tensor | None
) -> torch.Tensor:
    """Mean squared end-point distance (mm^2) between two displacements (N, 3, D, H, W), over the
    (weighted) voxels: the distillation term, in the units of the end-point error it lowers."""
    return _weighted_mean(((displacement_mm - target_mm) ** 2).sum(1, keepdim=True), weight)


@dataclass(frozen=True)
class LossSettings:
    """The loss (config ``loss:``). `beta` and `mask_weighted` have no default: the paper's values
    (1e-6, false) and the CPU-scale study's (config/config.yaml) differ, so the caller says which."""

    beta: float  # weight of ||Phi - Phi_I||_1
    mask_weighted: bool  # weight the similarity by the fixed lung mask
    similarity: str = "mse"
    alpha: float = 1e-6  # weight of ||A - A_I||_1
    regularizer_reduction: str = "mean"
    mask_margin_voxels: int = 2  # dilate the mask so the lung boundary is inside the weight
    diffusion: float = 0.0  # weight of the diffusion energy of the displacement (physical units)
    # weight of the squared distance (mm^2, over the dilated fixed lung) to the refinement from the
    # identity of each training pair (lungreg.network.refine.identity_refined_displacement)
    distillation: float = 0.0

    @classmethod
    def from_config(cls, section: Mapping) -> "LossSettings":
        return settings_from(cls, section, "loss")


def mask_weight(mask: torch.Tensor, margin: int) -> torch.Tensor:
    """The fixed mask dilated by `margin` voxels (max pooling), as a 0/1 float weight."""
    if margin <= 0:
        return mask.float()
    return F.max_pool3d(mask.float(), 2 * margin + 1, stride=1, padding=margin)


def registration_loss(
    settings: LossSettings, fixed, warped, theta, gradients, fixed_mask=None, grid=None, spacing=None, target=None
) -> dict[str, torch.Tensor]:
    """The paper's loss, similarity + alpha ||A - A_I||_1 + beta ||Phi - Phi_I||_1, plus the
    diffusion energy of the displacement (`diffusion`) and the squared distance to a `target`
    displacement (`distillation`; (N, 3, D, H, W) mm, over the dilated fixed mask) when their
    weights are positive: they need the sampling `grid` and the fixed voxel `spacing` (x, y, z mm;
    (N, 3) or (3,)). Without a target (validation pairs) the distillation term is 0."""
    if settings.similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {settings.similarity!r}; choose from {sorted(SIMILARITIES)}")
    weight = None
    if settings.mask_weighted or (settings.distillation and target is not None):
        if fixed_mask is None:
            raise ValueError("a mask-weighted similarity and the distillation need the fixed mask")
        weight = mask_weight(fixed_mask, settings.mask_margin_voxels)
    similarity = SIMILARITIES[settings.similarity](fixed, warped, weight if settings.mask_weighted else None)
    regularizer = settings.alpha * affine_penalty(theta).to(similarity) + settings.beta * gradient_penalty(
        gradients, settings.regularizer_reduction
    )
    distillation = similarity.new_zeros(())
    if settings.diffusion or (settings.distillation and target is not None):
        if grid is None or spacing is None:
            raise ValueError("the diffusion and distillation terms need the sampling grid and the voxel spacing")
        shape = tuple(grid.shape[1:4])
        points = transform.identity_grid(shape, grid.shape[0], grid.device, grid.dtype)
        displacement = transform.grid_displacement_mm(grid, points, shape, spacing)
        if settings.diffusion:
            regularizer = regularizer + settings.diffusion * diffusion(displacement, spacing)
        if settings.distillation and target is not None:
            distillation = settings.distillation * squared_distance(displacement, target.to(displacement), weight)
    return {
        "loss": similarity + regularizer + distillation,
        "similarity": similarity,
        "regularizer": regularizer,
        "distillation": distillation,
    }
