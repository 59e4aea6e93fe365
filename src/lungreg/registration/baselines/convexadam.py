"""ConvexAdam (PyPI `convexadam`, Heinrich et al.; several Learn2Reg lung wins), on the CPU.

What it does: MIND-SSC features of both images, a discrete search of displacements on a coarse
grid made smooth by coupled convex optimisation (forward and backward, then made inverse
consistent), then Adam on a half-resolution displacement with a diffusion regulariser.

Its conventions, read from convexAdam 0.2.0's source and pinned by tests/test_baselines.py
against its own warp (`apply_convex`):

* `convex_adam_pt(fixed, moving)` takes two arrays on ONE grid (a sitk.Image becomes its (z, y, x)
  array) and returns an (z, y, x, 3) array of displacements in VOXELS, component k along array
  axis k: `apply_convex` reads the moving array at index + d (scipy, linear). So the moving image
  is first resampled onto the fixed grid through the centred initial transform I, and the
  project's field is T(x) = I(x + M d(x)), M = direction @ diag(spacing), with the components
  reversed to x, y, z (`convexadam_displacement`).

Its pitfalls, each handled here:

* importing convexAdam runs `warnings.filterwarnings("ignore")` for the whole process (every
  later warning of the job would vanish): the import sits inside `warnings.catch_warnings`;
* `device` defaults to CUDA when present and `dtype` to float16: both are passed (cpu, float32);
* sizes that are not multiples of its grid spacings: its average pooling drops the remainder and
  the upsampling spreads the coarse field over the whole axis again (a slight stretch, which its
  Adam stage mostly corrects), and its masked mode fails on odd sizes: both images are padded
  (edge values) to a multiple of both grid spacings and 2, and the field cropped back;
* grids too small for its coarse grids (fewer than 3 cells of `grid_spacing` along an axis) fail
  inside torch: `check_size` says so first, with the setting to change;
* its masked mode (`masks: true`) reads the masks from NIfTI paths with nibabel, in the array
  order of the file (written here in the images' (z, y, x) order), and replaces everything
  outside the eroded masks by the nearest intensity inside them, which erases the lung boundary:
  on the default cohort's 13 validation pairs Dice 83.7 % and landmarks 8.46 mm with the lung
  masks, 92.1 % and 4.47 mm with masks dilated 20 mm, 93.3 % and 3.20 mm without masks
  (bench/README.md, peers). Off by default.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import nibabel
import numpy as np
import SimpleITK as sitk
import torch

from ...geometry import Grid
from ...network.transform import displacement_transform
from ..base import RegistrationResult
from .common import (
    MethodOptions,
    RegistrationError,
    centred_start,
    dilate_mask,
    mask_image,
    overlap_fraction,
    resolve,
    transform_to_displacement,
)


@dataclass(frozen=True)
class ConvexAdamOptions(MethodOptions):
    """convexadam: `convex_adam_pt`'s arguments (its names in the comments) and the masks."""

    mind_radius: int = 1  # mind_r: MIND-SSC patch radius (voxels)
    mind_dilation: int = 2  # mind_d: MIND-SSC neighbour distance (voxels)
    grid_spacing: int = 6  # grid_sp: voxels per cell of the discrete search
    search_radius: int = 4  # disp_hw: cells searched each way (capture range grid_spacing x this voxels)
    regularisation: float = 1.25  # lambda_weight: diffusion weight of the Adam stage (0: no Adam stage)
    adam_iterations: int = 80  # selected_niter
    adam_grid_spacing: int = 2  # grid_sp_adam: voxels per cell of the Adam stage's displacement
    smoothing: int = 0  # selected_smooth: odd box-filter size applied to the final field, 0: none
    inverse_consistent: bool = True  # ic
    masks: bool = False  # use_mask: its masked mode on both lung masks (see the module's note)
    mask_dilation_mm: float = 0.0  # masks: dilate both lung masks by this first


def convexadam_modules():
    # Imported when used (genuinely optional, as ANTsPy): only this baseline needs it. Importing it
    # runs warnings.filterwarnings("ignore") for the whole process; catch_warnings restores ours.
    with warnings.catch_warnings():
        from convexAdam.apply_convex import apply_convex
        from convexAdam.convex_adam_MIND import convex_adam_pt
    return convex_adam_pt, apply_convex


def resolve_convexadam(options: Mapping[str, Any] | None) -> dict[str, Any]:
    resolved = resolve(ConvexAdamOptions, "convexadam", options)
    for key in ("mind_radius", "mind_dilation", "grid_spacing", "search_radius", "adam_grid_spacing"):
        if int(resolved[key]) < 1:
            raise ValueError(f"baselines.convexadam.{key} must be at least 1, got {resolved[key]!r}")
    smoothing = int(resolved["smoothing"])
    if smoothing < 0 or (smoothing and smoothing % 2 == 0):
        raise ValueError(f"baselines.convexadam.smoothing must be 0 or an odd box size, got {smoothing}")
    return resolved


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads for the block (torch would take every core), restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def padded(array: np.ndarray, multiple: int) -> np.ndarray:
    """`array` (z, y, x) grown at the far end of each axis to a multiple of `multiple` (edge values)."""
    return np.pad(array, [(0, -n % multiple) for n in array.shape], mode="edge")


def check_size(shape: tuple[int, ...], options: Mapping[str, Any], pair: str = "") -> None:
    """Its coarse grids are box-filtered 3 cells wide: fewer than 3 cells along an axis fails
    inside torch ("input image smaller than kernel size"); said here, before any work, with the fix."""
    for key in ("grid_spacing", "adam_grid_spacing"):
        cells = tuple(int(n) // int(options[key]) for n in shape)
        if min(cells) < 3:
            raise RegistrationError(
                f"{pair or 'pair'}: the fixed grid, padded to {tuple(shape)} voxels (z, y, x), has {cells} cells of "
                f"baselines.convexadam.{key} {options[key]} voxels; convexAdam needs at least 3 along every axis: "
                f"set {key} to {max(1, min(shape) // 3)} or less"
            )


def convexadam_displacement(voxels: np.ndarray, grid: Grid, initial: sitk.Transform) -> np.ndarray:
    """ConvexAdam's result on `grid` as the project's field: (z, y, x, 3) mm, T(x) = x + u(x).

    `voxels` (z, y, x, 3): displacement in voxels along the array axes (z, y, x) of the grid
    both images were on, the moving one resampled through `initial`: T(x) = I(x + M d(x)).
    """
    local = np.asarray(voxels, float)[..., ::-1] @ grid.index_to_world_matrix.T
    # SimpleITK applies a composite's transforms last first: T = initial o (x + local)
    return transform_to_displacement(sitk.CompositeTransform([initial, displacement_transform(local, grid)]), grid)


def _mask_file(mask: sitk.Image, radius_mm: float, path: Path, multiple: int) -> str:
    """A mask as the NIfTI convexAdam reads: nibabel's array is the file's (z, y, x), as the images'."""
    array = padded(sitk.GetArrayFromImage(dilate_mask(mask, radius_mm)).astype(np.float32), multiple)
    nibabel.save(nibabel.Nifti1Image(array, np.eye(4)), str(path))
    return str(path)


def register_convexadam(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: np.ndarray | sitk.Image,
    options: Mapping[str, Any] | None = None,
    pair: str = "",
    threads: int = 1,
    moving_mask: np.ndarray | sitk.Image | None = None,
) -> RegistrationResult:
    """ConvexAdam on one pair, on the fixed image's grid, on the CPU with `threads` torch threads.

    The moving image (and, with `masks`, its mask) is resampled onto the fixed grid through the
    centred initial transform; the field comes back in the project's convention on the fixed
    grid, with convexAdam's own warped image (`apply_convex`). `seconds` is the `convex_adam_pt`
    call (features, search, Adam), not the resampling or the conversion.
    """
    convex_adam_pt, apply_convex = convexadam_modules()
    options = resolve_convexadam(options)
    fixed, moving, mask, initial, initial_overlap = centred_start(fixed, moving, fixed_mask, options, pair)
    grid = Grid.of(fixed)
    background = float(np.min(sitk.GetArrayViewFromImage(moving)))
    moving_on_fixed = sitk.Resample(moving, fixed, initial, sitk.sitkLinear, background, sitk.sitkFloat32)
    multiple = math.lcm(int(options["grid_spacing"]), int(options["adam_grid_spacing"]), 2)
    fixed_array = padded(sitk.GetArrayFromImage(fixed), multiple)
    moving_array = padded(sitk.GetArrayFromImage(moving_on_fixed), multiple)
    check_size(fixed_array.shape, options, pair)
    arguments = dict(
        mind_r=int(options["mind_radius"]),
        mind_d=int(options["mind_dilation"]),
        lambda_weight=float(options["regularisation"]),
        grid_sp=int(options["grid_spacing"]),
        disp_hw=int(options["search_radius"]),
        selected_niter=int(options["adam_iterations"]),
        selected_smooth=int(options["smoothing"]),
        grid_sp_adam=int(options["adam_grid_spacing"]),
        ic=bool(options["inverse_consistent"]),
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    with tempfile.TemporaryDirectory(prefix="lungreg-convexadam-") as folder, warnings.catch_warnings():
        # its affine_grid / grid_sample calls rely on torch's align_corners default and say so each call
        warnings.filterwarnings("ignore", message="Default grid_sample and affine_grid behavior", category=UserWarning)
        if options["masks"]:
            if moving_mask is None:
                raise ValueError(f"{pair or 'pair'}: baselines.convexadam.masks needs the moving lung mask")
            moving_mask_on_fixed = sitk.Resample(
                mask_image(moving_mask, moving), fixed, initial, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
            )
            radius = float(options["mask_dilation_mm"])
            arguments.update(
                use_mask=True,
                path_fixed_mask=_mask_file(mask, radius, Path(folder) / "fixed.nii", multiple),
                path_moving_mask=_mask_file(moving_mask_on_fixed, radius, Path(folder) / "moving.nii", multiple),
            )
        with torch_threads(threads):
            started = time.perf_counter()
            voxels = convex_adam_pt(torch.from_numpy(fixed_array), torch.from_numpy(moving_array), **arguments)
            seconds = time.perf_counter() - started
    voxels = np.asarray(voxels, float)[: grid.shape[0], : grid.shape[1], : grid.shape[2]]
    displacement = convexadam_displacement(voxels, grid, initial)
    warped = sitk.GetImageFromArray(
        np.asarray(apply_convex(voxels, sitk.GetArrayFromImage(moving_on_fixed)), np.float32)
    )
    warped.CopyInformation(fixed)
    final_overlap = overlap_fraction(displacement_transform(displacement, grid), mask, moving)
    flags = [] if np.any(voxels != 0) else ["unchanged"]
    if final_overlap < float(options["min_overlap"]):
        flags.append("final:low_overlap")
    notes = {
        "flag": ";".join(flags) or "ok",
        "stop_condition": f"fixed schedule: {int(options['adam_iterations'])} Adam iterations",
        "iterations": int(options["adam_iterations"]),
        "metric_value": np.nan,  # convex_adam_pt returns the field only
        "initial_overlap": initial_overlap,
        "final_overlap": final_overlap,
        "padded_shape": "x".join(map(str, fixed_array.shape)),
    }
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(initial.GetMatrix())
    affine.SetCenter(initial.GetCenter())
    affine.SetTranslation(initial.GetTranslation())
    return RegistrationResult(displacement, seconds, affine, warped, notes)
