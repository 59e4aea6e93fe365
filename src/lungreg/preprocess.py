"""Preprocessing of one subject: both phases onto one common grid, intensities in [0, 1].

As in the paper: intensities clipped to a range and scaled to [0, 1], volumes resampled with
cubic B-spline interpolation by a factor (2/3: voxels 1.5 times larger) onto a fixed shape.
Here the grid is a physical one, common to both phases of a subject: direction and spacing of
the reference phase (its spacing / factor), and one shape for the whole cohort (batching needs
it), so that phases with different sizes and origins are fine. Where it lies:

- `grid_shape: [z, y, x]`: centred on the union of both phases' fields of view
  (`geometry.common_grid`);
- `grid_shape: auto`: centred on the region of the lungs: the box of both phases' lung masks
  grown by `grid_margin_mm`, cut to the box of both fields of view (`geometry.region_corners`);
  with the shape the workflow chose for the cohort (`cohort_grid_shape`, see
  `lungreg.manifest.lung_grid_shape`): per axis, the largest over the cohort's subjects of
  ceil(region extent / (reference spacing / factor)).

Nothing is cropped silently: a grid that leaves more than `max_mask_crop` of a phase's lung mask
outside it, or a window that clips more than `max_clipped_lung` of a phase's lung voxels to one
end (e.g. the MRI range on Hounsfield units), stops the subject before anything is written, in
one line naming subject, phase, the share and the setting to change. What is measured (crop,
clipping, landmarks in view) is written to the subject's `qc.tsv` (`QC_COLUMNS`).

Landmarks stay in physical coordinates (only the grid changes); each pair is flagged `in_view`
when both points lie in their own image's original field of view and in the common grid.
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

from . import geometry, lungmask, manifest
from .config import settings_from
from .geometry import Grid, common_grid, grid_around, mask_box_corners, region_corners, resample
from .io import InputError, read_image, read_landmark_names, read_landmarks, write_image, write_table, write_text

log = logging.getLogger(__name__)

PHASES = manifest.PHASES
MASK_INTERPOLATIONS = ("nearest", "linear")
REFERENCE_PHASES = ("exhale", "inhale")


AUTO = "auto"


@dataclass(frozen=True)
class PreprocessSettings:
    intensity_range: tuple[float, float]  # clip to [low, high], then scale to [0, 1]
    factor: float  # resampling factor: new spacing = reference spacing / factor
    grid_shape: tuple[int, int, int] | str  # z, y, x; or "auto": from the lung masks (module docstring)
    mask_interpolation: str = "nearest"  # or "linear" (then > 0.5)
    reference_phase: str = "exhale"  # the fixed phase: its direction and spacing define the grid
    grid_margin_mm: float = 15.0  # auto: around the union of the lung-mask boxes
    max_mask_crop: float = 0.01  # a grid that crops more of a lung mask stops the subject
    max_clipped_lung: float = 0.5  # a window that clips more lung voxels to one end stops the subject
    warn_clipped_lung: float = 0.05  # more than this is a warning (qc.tsv)
    cohort_grid_shape: tuple[int, int, int] | None = None  # auto: the cohort's shape (set by the workflow)

    def __post_init__(self) -> None:
        try:
            low, high = (float(v) for v in self.intensity_range)
        except (TypeError, ValueError):
            raise ValueError("preprocess.intensity_range must be [low, high]") from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(
                f"preprocess.intensity_range must be [low, high] with low < high, got {self.intensity_range}"
            )
        if not (math.isfinite(float(self.factor)) and float(self.factor) > 0):
            raise ValueError(f"preprocess.factor must be a positive number, got {self.factor}")
        shape = self.grid_shape if self.grid_shape == AUTO else _shape(self.grid_shape, "grid_shape")
        cohort = None if self.cohort_grid_shape is None else _shape(self.cohort_grid_shape, "cohort_grid_shape")
        for name in ("grid_margin_mm", "max_mask_crop", "max_clipped_lung", "warn_clipped_lung"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value >= 0) or (name != "grid_margin_mm" and value > 1):
                raise ValueError(f"preprocess.{name} must be a number >= 0 (a share: <= 1), got {getattr(self, name)}")
            object.__setattr__(self, name, value)
        if self.mask_interpolation not in MASK_INTERPOLATIONS:
            raise ValueError(
                f"preprocess.mask_interpolation must be one of {MASK_INTERPOLATIONS}, got {self.mask_interpolation!r}"
            )
        if self.reference_phase not in REFERENCE_PHASES:
            raise ValueError(f"reference phase must be one of {REFERENCE_PHASES}, got {self.reference_phase!r}")
        object.__setattr__(self, "intensity_range", (low, high))
        object.__setattr__(self, "factor", float(self.factor))
        object.__setattr__(self, "grid_shape", shape)
        object.__setattr__(self, "cohort_grid_shape", cohort)

    @classmethod
    def from_config(cls, preprocess_section: Mapping, reference_phase: str) -> "PreprocessSettings":
        return settings_from(cls, preprocess_section, "preprocess", reference_phase=reference_phase)

    @property
    def auto(self) -> bool:
        return self.grid_shape == AUTO

    @property
    def shape(self) -> tuple[int, int, int] | None:
        """The grid shape (z, y, x): the configured one, or the cohort's for auto (None if not known)."""
        return self.cohort_grid_shape if self.auto else self.grid_shape


def _shape(value, name: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in value)
        exact = list(shape) == [float(v) for v in value]
    except (TypeError, ValueError):
        shape, exact = (), False
    if len(shape) != 3 or min(shape) < 1 or not exact:
        raise ValueError(f"preprocess.{name} must be three positive integers (z, y, x) or auto, got {value}")
    return shape


@dataclass(frozen=True)
class PreprocessSummary:
    subject: str
    grid: Grid
    landmarks: int
    in_view: int
    excluded: int
    mask_fraction_lost: dict[str, float] = field(default_factory=dict)
    lung_clipped: dict[str, tuple[float, float]] = field(default_factory=dict)  # phase: (below, above)

    def line(self) -> str:
        shape = " x ".join(str(s) for s in self.grid.shape)
        spacing = " x ".join(f"{s:.4g}" for s in self.grid.spacing)
        return (
            f"subject {self.subject}: common grid {shape} (z, y, x) voxels of {spacing} mm; "
            f"{self.in_view} of {self.landmarks} landmark pairs in view, {self.excluded} excluded"
        )


# One row per check of a subject (and, in results/tables/qc.tsv, per flagged pair and method):
# `value` the measurement, `limit` the setting it is held against, `problem` whether it is one.
QC_COLUMNS = ["subject", "phase", "method", "protocol", "pair", "check", "value", "limit", "problem", "message"]


def qc_row(subject: str, phase: str, check: str, value: float, limit: float, problem: bool, message: str) -> dict:
    """A subject's check as a row of qc.tsv (the message only where it is a problem)."""
    values = (subject, phase, "", "", "", check, value, limit, problem, message if problem else "")
    return dict(zip(QC_COLUMNS, values))


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


def lung_points(masks: Mapping[str, sitk.Image | None]) -> np.ndarray:
    """The corners of every phase's lung-mask box, (n, 3) physical mm (the region `auto` covers)."""
    return np.concatenate([mask_box_corners(m) for m in masks.values() if m is not None] or [np.zeros((0, 3))])


def subject_grid(
    grids: Mapping[str, Grid], settings: PreprocessSettings, masks: Mapping[str, sitk.Image | None] | None = None
) -> Grid:
    """The grid both phases are resampled onto (module docstring).

    auto: centred on both lung masks' boxes when both masks are given, else on both fields of view
    (`lungreg register` without masks); the cohort's shape, or without one this subject's own.
    """
    reference = grids[settings.reference_phase]
    if not settings.auto:
        return common_grid([grids[p] for p in PHASES], reference, settings.factor, settings.grid_shape)
    masks = masks or {}
    points = np.concatenate([grids[p].corners() for p in PHASES])
    if all(masks.get(p) is not None for p in PHASES):
        points = region_corners(lung_points(masks), points, reference, settings.grid_margin_mm)
    shape = settings.cohort_grid_shape or geometry.covering_shape(points, reference, settings.factor)
    return grid_around(points, reference, settings.factor, shape)


def covering_shape(grids: list[Grid], reference: Grid, factor: float) -> tuple[int, int, int]:
    """The smallest grid shape (z, y, x) whose common grid holds every field of view in `grids`."""
    return geometry.covering_shape(np.concatenate([g.corners() for g in grids]), reference, factor)


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
    grid = subject_grid({p: Grid.of(images[p]) for p in PHASES}, settings, masks)
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


def lung_clipping(image: sitk.Image, mask: sitk.Image, low: float, high: float) -> tuple[float, float, float]:
    """(share below `low`, share above `high`, median) of the image's voxels inside its lung mask."""
    values = sitk.GetArrayViewFromImage(image)[sitk.GetArrayViewFromImage(mask) != 0]
    if not len(values):
        return 0.0, 0.0, float("nan")
    return float((values < low).mean()), float((values > high).mean()), float(np.median(values))


def _pct(share: float) -> str:
    return f"{100 * share:.1f}%"


def _checks(
    subject: str,
    inputs: Mapping,
    phases: Mapping[str, _Phase],
    grid: Grid,
    settings: PreprocessSettings,
    landmarks: tuple[int, int, int],
) -> tuple[list[dict], list[tuple[str, str, int]], dict[str, float], dict[str, tuple[float, float]]]:
    """QC rows of one subject, the problems that stop it (file, problem, its row), crop and clip shares."""
    rows, stops, lost, clipped = [], [], {}, {}

    def row(phase: str, check: str, value: float, limit: float, problem: bool, message: str = "") -> None:
        rows.append(qc_row(subject, phase, check, value, limit, problem, message))

    shape = " x ".join(map(str, grid.shape))
    spacing = " x ".join(f"{s:.3g}" for s in grid.spacing)
    low, high = settings.intensity_range
    for phase in PHASES:
        lost[phase] = mask_fraction_outside(phases[phase].mask, grid)
        crop = (
            f"{phase}: the common grid ({shape} voxels of {spacing} mm) crops {_pct(lost[phase])} of the "
            f"{phase} lung mask (preprocess.max_mask_crop: {_pct(settings.max_mask_crop)}); "
            "set preprocess.grid_shape: auto, or a larger grid_shape or smaller factor"
        )
        row(phase, "mask_cropped", lost[phase], settings.max_mask_crop, lost[phase] > 0, crop)
        if lost[phase] > settings.max_mask_crop:
            stops.append((str(inputs[f"{phase}_mask"]), crop, len(rows) - 1))
        below, above, median = lung_clipping(phases[phase].image, phases[phase].mask, low, high)
        clipped[phase] = (below, above)
        for end, share in (("below", below), ("above", above)):
            hint = (  # the automatic mask's test for CT; a window starting above -500 is not a CT one
                " these look like CT Hounsfield units: use --configfile config/ct.yaml (a CT window)"
                if lungmask.looks_like_ct(phases[phase].image) and low > -500
                else " set preprocess.intensity_range to the images' window"
            )
            message = (
                f"{phase}: {_pct(share)} of the lung voxels lie {end} the intensity window "
                f"preprocess.intensity_range [{low:g}, {high:g}] (lung median {median:.4g});{hint}"
            )
            check = f"lung_clipped_{'low' if end == 'below' else 'high'}"
            row(phase, check, share, settings.warn_clipped_lung, share > settings.warn_clipped_lung, message)
            if share > settings.max_clipped_lung:
                limit = f" (preprocess.max_clipped_lung: {_pct(settings.max_clipped_lung)})"
                stops.append((str(inputs[phase]), message.replace(";", limit + ";", 1), len(rows) - 1))
    total, in_view, by_grid = landmarks
    row("", "landmarks_in_view", in_view, total, False)
    excluded = (
        f"{total - in_view} of {total} landmark pairs excluded: {by_grid} of them lie in both original images "
        "but outside the common grid (set preprocess.grid_shape: auto or enlarge it)"
    )
    row("", "landmarks_excluded", total - in_view, total, by_grid > 0, excluded)
    return rows, stops, lost, clipped


def preprocess_subject(
    subject: str, inputs: Mapping[str, str | os.PathLike], settings: PreprocessSettings, out_dir: str | os.PathLike
) -> PreprocessSummary:
    """Both phases of one subject onto one common grid; writes images, masks, landmarks and QC.

    `inputs`: paths `inhale`, `exhale`, `inhale_mask`, `exhale_mask` and optionally
    `inhale_landmarks`, `exhale_landmarks`. Writes `{phase}_image.nii.gz` (float32 in [0, 1]),
    `{phase}_mask.nii.gz` (uint8), `{phase}_landmarks.csv` (landmark, x, y, z, in_view) and
    `qc.tsv` (`QC_COLUMNS`) into `out_dir`, each atomically, and only after every input was read
    and checked: a grid that crops too much of a lung mask, or a window that clips too many lung
    voxels, raises `InputError` (every such problem logged, one line each) and writes nothing.
    """
    phases = load_subject(subject, inputs)
    grid, images, masks = onto_common_grid(
        {p: phases[p].image for p in PHASES}, {p: phases[p].mask for p in PHASES}, settings
    )
    points = {p: phases[p].points for p in PHASES}
    in_original = manifest.landmarks_in_view(points, {p: Grid.of(phases[p].image) for p in PHASES})
    in_view = in_original & grid.contains(points["inhale"]) & grid.contains(points["exhale"])
    counts = (len(in_view), int(in_view.sum()), int((in_original & ~in_view).sum()))
    rows, stops, lost, clipped = _checks(subject, inputs, phases, grid, settings, counts)
    for path, problem, _ in stops:
        log.error("%s", InputError(subject, path, problem))
    stopping = {index for *_, index in stops}
    for index, row in enumerate(rows):  # the other problems as warnings (also in qc.tsv)
        if row["problem"] and index not in stopping:
            log.warning("subject %s, %s", subject, row["message"])
    if stops:
        more = f" (and {len(stops) - 1} more problem(s), see the log)" if len(stops) > 1 else ""
        raise InputError(subject, stops[0][0], stops[0][1] + more)
    tables = {p: _landmark_table(phases[p], in_view) for p in PHASES}

    out_dir = Path(out_dir)
    for phase in PHASES:
        write_image(images[phase], out_dir / f"{phase}_image.nii.gz")
        write_image(masks[phase], out_dir / f"{phase}_mask.nii.gz")
        write_text(tables[phase], out_dir / f"{phase}_landmarks.csv")
    write_table(pd.DataFrame(rows, columns=QC_COLUMNS), out_dir / "qc.tsv")
    total = len(in_view)
    summary = PreprocessSummary(subject, grid, total, int(in_view.sum()), total - int(in_view.sum()), lost, clipped)
    log.info(summary.line())
    return summary


# ------------------------------------------------------------------- automatic lung mask


def auto_mask_checks(
    subject: str, phase: str, result: lungmask.LungMask, settings: lungmask.AutoMaskSettings, path: str | os.PathLike
) -> list[dict]:
    """The QC rows of an automatic lung mask: its volume (ml) against both limits, and the lungs found."""
    fix, volume = f"check {path}, or give {phase}_mask a lung mask", result.volume_ml
    rows = []
    for end, key, limit, problem in (
        ("low", "min_volume_ml", settings.min_volume_ml, volume < settings.min_volume_ml),
        ("high", "max_volume_ml", settings.max_volume_ml, volume > settings.max_volume_ml),
    ):
        relation = "below" if end == "low" else "above"
        setting = f"preprocess.auto_mask.{key} ({limit:g} ml)"
        message = f"{phase}: the automatic lung mask holds {volume:.0f} ml, {relation} {setting}; {fix}"
        rows.append(qc_row(subject, phase, f"auto_mask_volume_{end}", volume, limit, problem, message))
    message = (
        f"{phase}: the automatic lung mask found {result.lungs} lung(s), not two (one lung outside the field of "
        f"view, or the lungs joined deeper than preprocess.auto_mask.junction_mm); {fix}"
    )
    rows.append(qc_row(subject, phase, "auto_mask_lungs", result.lungs, 2, result.lungs < 2, message))
    return rows


def auto_lung_mask(
    subject: str,
    phase: str,
    image_path: str | os.PathLike,
    settings: lungmask.AutoMaskSettings,
    mask_out: str | os.PathLike,
    qc_out: str | os.PathLike,
) -> lungmask.LungMask:
    """The automatic lung mask of a phase without a mask (`lungreg.lungmask`): written on the image's
    own grid to `mask_out` (then preprocessed like a given mask), its checks to `qc_out` (qc.tsv).
    Refuses an image that is not CT in Hounsfield units, or where no lung is found (InputError)."""
    image = read_image(image_path, subject)
    manifest.check_image(subject, image_path, image)
    lungmask.check_ct(subject, image_path, image, phase)
    result = lungmask.segment_lungs(image, settings)
    if not result.volume_ml:
        raise InputError(subject, image_path, f"{phase}: the automatic lung mask found no lung; give {phase}_mask")
    rows = auto_mask_checks(subject, phase, result, settings, mask_out)
    for row in rows:
        if row["problem"]:
            log.warning("subject %s, %s", subject, row["message"])
    write_image(result.mask, mask_out)
    write_table(pd.DataFrame(rows, columns=QC_COLUMNS), qc_out)
    log.info(
        "subject %s, %s: automatic lung mask %.0f ml, %d lung(s), %.0f ml of main airways removed",
        subject, phase, result.volume_ml, result.lungs, result.airway_ml,
    )  # fmt: skip
    return result
