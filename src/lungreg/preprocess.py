"""Preprocessing of one subject: both phases onto one common grid, intensities in [0, 1].

As in the paper: intensities clipped to a range and scaled to [0, 1], volumes resampled with
cubic B-spline interpolation by a factor (2/3: voxels 1.5 times larger) onto a fixed shape.
Here the grid is a physical one, common to both phases of a subject (`geometry.common_grid`:
direction and spacing of the reference phase, centred on the union of both fields of view),
so that phases with different sizes and origins are fine. Landmarks stay in physical
coordinates (only the grid changes); each pair is flagged `in_view` when both points lie in
their own image's original field of view and in the common grid.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import SimpleITK as sitk

from . import manifest
from .config import settings_from
from .geometry import Grid, common_grid, resample
from .io import read_image, read_landmark_names, read_landmarks, write_image, write_text

log = logging.getLogger(__name__)

PHASES = manifest.PHASES
MASK_INTERPOLATIONS = ("nearest", "linear")
REFERENCE_PHASES = ("exhale", "inhale")


@dataclass(frozen=True)
class PreprocessSettings:
    intensity_range: tuple[float, float]  # clip to [low, high], then scale to [0, 1]
    factor: float  # resampling factor: new spacing = reference spacing / factor
    grid_shape: tuple[int, int, int]  # z, y, x
    mask_interpolation: str = "nearest"  # or "linear" (then > 0.5)
    reference_phase: str = "exhale"  # the fixed phase: its direction and spacing define the grid

    def __post_init__(self) -> None:
        try:
            low, high = (float(v) for v in self.intensity_range)
            shape = tuple(int(v) for v in self.grid_shape)
        except (TypeError, ValueError):
            raise ValueError("preprocess.intensity_range must be [low, high] and grid_shape [z, y, x]") from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(
                f"preprocess.intensity_range must be [low, high] with low < high, got {self.intensity_range}"
            )
        if not (math.isfinite(float(self.factor)) and float(self.factor) > 0):
            raise ValueError(f"preprocess.factor must be a positive number, got {self.factor}")
        if len(shape) != 3 or min(shape) < 1 or list(shape) != [float(v) for v in self.grid_shape]:
            raise ValueError(f"preprocess.grid_shape must be three positive integers (z, y, x), got {self.grid_shape}")
        if self.mask_interpolation not in MASK_INTERPOLATIONS:
            raise ValueError(
                f"preprocess.mask_interpolation must be one of {MASK_INTERPOLATIONS}, got {self.mask_interpolation!r}"
            )
        if self.reference_phase not in REFERENCE_PHASES:
            raise ValueError(f"reference phase must be one of {REFERENCE_PHASES}, got {self.reference_phase!r}")
        object.__setattr__(self, "intensity_range", (low, high))
        object.__setattr__(self, "factor", float(self.factor))
        object.__setattr__(self, "grid_shape", shape)

    @classmethod
    def from_config(cls, preprocess_section: Mapping, reference_phase: str) -> "PreprocessSettings":
        return settings_from(cls, preprocess_section, "preprocess", reference_phase=reference_phase)


@dataclass(frozen=True)
class PreprocessSummary:
    subject: str
    grid: Grid
    landmarks: int
    in_view: int
    excluded: int
    mask_fraction_lost: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        shape = " x ".join(str(s) for s in self.grid.shape)
        spacing = " x ".join(f"{s:.4g}" for s in self.grid.spacing)
        return (
            f"subject {self.subject}: common grid {shape} (z, y, x) voxels of {spacing} mm; "
            f"{self.in_view} of {self.landmarks} landmark pairs in view, {self.excluded} excluded"
        )


# ------------------------------------------------------------------------ intensities


def clip_and_scale(image: sitk.Image, low: float, high: float) -> sitk.Image:
    """Clip to [low, high] and map linearly onto [0, 1]; float32, same geometry.

    Computed in double precision, slab by slab (bounded memory), then rounded once to float32.
    """
    if not low < high:
        raise ValueError(f"clip range must have low < high, got [{low}, {high}]")
    array = sitk.GetArrayViewFromImage(image)
    out = np.empty(array.shape, np.float32)
    step = max(1, (1 << 22) // max(1, int(np.prod(array.shape[1:]))))
    for start in range(0, array.shape[0], step):
        slab = np.clip(array[start : start + step].astype(np.float64), low, high)
        out[start : start + step] = (slab - low) / (high - low)
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(image)
    return result


# ------------------------------------------------------------------------- resampling


def subject_grid(grids: Mapping[str, Grid], settings: PreprocessSettings) -> Grid:
    """The grid both phases are resampled onto (see `geometry.common_grid`)."""
    return common_grid(
        [grids[p] for p in PHASES], grids[settings.reference_phase], settings.factor, settings.grid_shape
    )


def covering_shape(grids: list[Grid], reference: Grid, factor: float) -> tuple[int, int, int]:
    """The smallest grid shape (z, y, x) whose common grid holds every field of view in `grids`."""
    local = np.concatenate([g.corners() for g in grids]) @ reference.direction_matrix
    extent = local.max(axis=0) - local.min(axis=0)
    size = [math.ceil(e / (s / factor) - 1e-6) for e, s in zip(extent, reference.spacing)]
    return tuple(size[::-1])


def resample_image(image: sitk.Image, grid: Grid) -> sitk.Image:
    """Cubic B-spline onto `grid`, 0 outside the field of view, overshoot clamped to [0, 1]."""
    resampled = resample(sitk.Cast(image, sitk.sitkFloat32), grid, "bspline", default=0.0)
    return sitk.Clamp(resampled, sitk.sitkFloat32, 0.0, 1.0)


def resample_mask(mask: sitk.Image, grid: Grid, interpolation: str = "nearest") -> sitk.Image:
    """Nearest neighbour, or linear then > 0.5; uint8 0/1, 0 outside the field of view."""
    if interpolation == "nearest":
        return resample(sitk.Cast(mask, sitk.sitkUInt8), grid, "nearest", default=0)
    if interpolation == "linear":
        fraction = resample(sitk.Cast(mask, sitk.sitkFloat32), grid, "linear", default=0.0)
        return sitk.Cast(fraction > 0.5, sitk.sitkUInt8)
    raise ValueError(f"mask interpolation must be one of {MASK_INTERPOLATIONS}, got {interpolation!r}")


def onto_common_grid(
    images: Mapping[str, sitk.Image], masks: Mapping[str, sitk.Image | None], settings: PreprocessSettings
) -> tuple[Grid, dict[str, sitk.Image], dict[str, sitk.Image | None]]:
    """Both phases (`images`, `masks` by phase; a mask may be None) clipped and scaled, and resampled
    onto their common grid: the preprocessing of one subject, in memory. Returns the grid, the
    images and the masks."""
    grid = subject_grid({p: Grid.of(images[p]) for p in PHASES}, settings)
    low, high = settings.intensity_range
    resampled = {p: resample_image(clip_and_scale(images[p], low, high), grid) for p in PHASES}
    resampled_masks = {
        p: None if masks[p] is None else resample_mask(masks[p], grid, settings.mask_interpolation) for p in PHASES
    }
    return grid, resampled, resampled_masks


def mask_fraction_outside(mask: sitk.Image, grid: Grid) -> float:
    """Fraction of the mask's voxels (centres) that lie outside `grid`."""
    own = Grid.of(mask)
    array = sitk.GetArrayViewFromImage(mask)
    total = outside = 0
    for k in range(array.shape[0]):  # slice by slice: bounded memory on large masks
        j, i = np.nonzero(array[k])
        if not len(i):
            continue
        points = own.index_to_world(np.stack([i, j, np.full_like(i, k)], axis=-1))
        total += len(i)
        outside += int((~grid.contains(points)).sum())
    return outside / total if total else 0.0


# ---------------------------------------------------------------------- one subject


@dataclass
class _Phase:
    image: sitk.Image
    mask: sitk.Image
    points: np.ndarray  # (n, 3), physical LPS
    names: list[str]


def _path(inputs: Mapping, key: str) -> str:
    value = inputs.get(key)
    return "" if value is None else str(value)


def load_subject(subject: str, inputs: Mapping[str, str | os.PathLike]) -> dict[str, _Phase]:
    """Read and check both phases (the checks of `manifest.check_subjects`); raises InputError."""
    images = {p: read_image(_path(inputs, p), subject) for p in PHASES}
    for phase in PHASES:
        manifest.check_image(subject, inputs[phase], images[phase])
    masks = {}
    for phase in PHASES:
        mask_path = _path(inputs, f"{phase}_mask")
        masks[phase] = read_image(mask_path, subject)
        manifest.check_mask(subject, mask_path, masks[phase])
        manifest.check_mask_grid(subject, mask_path, Grid.of(masks[phase]), inputs[phase], Grid.of(images[phase]))
    paths = {p: _path(inputs, f"{p}_landmarks") for p in PHASES}
    manifest.check_landmark_columns(subject, paths["inhale"], paths["exhale"])
    points = {p: np.zeros((0, 3)) for p in PHASES}
    names: dict[str, list[str]] = {p: [] for p in PHASES}
    if paths["inhale"]:
        points = {p: read_landmarks(paths[p], subject) for p in PHASES}
        manifest.check_landmark_counts(subject, paths, points)
        names = {p: read_landmark_names(paths[p], subject) for p in PHASES}
        if names["inhale"] != names["exhale"]:
            log.warning("subject %s: landmark names differ between phases; pairs are taken row by row", subject)
    return {p: _Phase(images[p], masks[p], points[p], names[p]) for p in PHASES}


def _landmark_table(phase: _Phase, in_view: np.ndarray) -> str:
    frame = pd.DataFrame(
        {
            "landmark": phase.names,
            "x": phase.points[:, 0],
            "y": phase.points[:, 1],
            "z": phase.points[:, 2],
            "in_view": in_view.astype(bool),
        },
        columns=["landmark", "x", "y", "z", "in_view"],
    )
    return frame.to_csv(index=False, lineterminator="\n")  # floats as repr: exact round trip


def _warn_cropped(subject: str, phases: Mapping[str, _Phase], grid: Grid) -> dict[str, float]:
    lost = {p: mask_fraction_outside(phases[p].mask, grid) for p in PHASES}
    for phase, fraction in lost.items():
        if fraction > 0:
            log.warning(
                "subject %s: the common grid crops %.1f%% of the %s lung mask; enlarge preprocess.grid_shape",
                subject,
                100 * fraction,
                phase,
            )
    return lost


def preprocess_subject(
    subject: str, inputs: Mapping[str, str | os.PathLike], settings: PreprocessSettings, out_dir: str | os.PathLike
) -> PreprocessSummary:
    """Both phases of one subject onto one common grid; writes images, masks and landmarks.

    `inputs`: paths `inhale`, `exhale`, `inhale_mask`, `exhale_mask` and optionally
    `inhale_landmarks`, `exhale_landmarks`. Writes `{phase}_image.nii.gz` (float32 in [0, 1]),
    `{phase}_mask.nii.gz` (uint8) and `{phase}_landmarks.csv` (landmark, x, y, z, in_view)
    into `out_dir`, each atomically, and only after every input was read and checked.
    """
    phases = load_subject(subject, inputs)
    grid, images, masks = onto_common_grid(
        {p: phases[p].image for p in PHASES}, {p: phases[p].mask for p in PHASES}, settings
    )
    lost = _warn_cropped(subject, phases, grid)
    points = {p: phases[p].points for p in PHASES}
    in_view = manifest.landmarks_in_view(points, {p: Grid.of(phases[p].image) for p in PHASES})
    in_view &= grid.contains(points["inhale"]) & grid.contains(points["exhale"])
    tables = {p: _landmark_table(phases[p], in_view) for p in PHASES}

    out_dir = Path(out_dir)
    for phase in PHASES:
        write_image(images[phase], out_dir / f"{phase}_image.nii.gz")
        write_image(masks[phase], out_dir / f"{phase}_mask.nii.gz")
        write_text(tables[phase], out_dir / f"{phase}_landmarks.csv")
    total = len(in_view)
    summary = PreprocessSummary(subject, grid, total, int(in_view.sum()), total - int(in_view.sum()), lost)
    log.info(summary.line())
    return summary
