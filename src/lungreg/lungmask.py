"""Automatic lung masks of CT images in Hounsfield units (a manifest's empty `*_mask` cell).

The classic steps, in SimpleITK (settings: `AutoMaskSettings`, the schema's `preprocess.auto_mask`):

1. air: every voxel below `air_hu` (lungs, airways, the air around the patient, and the padding
   value outside the scanner's field of view, e.g. -2048);
2. the outside: an air region that lies against the image border over more than
   `max_border_share` of its surface is outside the body and dropped. A share, not "touches the
   border", because a tight field of view cuts the lungs too: the elastix pair's lung lies against
   the border over 2-4 % of its surface, the air around the body over 65-70 %;
3. the lungs: the largest remaining region, and the second largest when it holds at least
   `second_lung_share` of the largest (lungs joined through the airways or at a junction line are
   one region; a stomach bubble stays far below that share);
4. the main airways: the trachea is the air of the top slices (superior, from the image's
   direction) while it is one region of at most `trachea_area_mm2`; it is grown down the airway
   tree by raising the threshold from -1000 HU in 10 HU steps until a step more than doubles the
   volume (a leak into the lungs) or it passes `airway_max_ml`; the airways, grown by
   `airway_margin_mm` (their partial-volume wall), are removed, and step 3 is taken again (the
   lungs now apart);
5. holes filled slice by slice along the axial axis (vessels), then a closing of `closing_mm`.

`lungs` counts the lung-sized parts (at least `second_lung_share` of the largest) that the mask
splits into when it is eroded by up to `junction_mm` (lungs that touch at a thin junction line
count as two). Only CT in Hounsfield units is segmented (`looks_like_ct`): an MRI is refused, not
guessed at. No torch here: the workflow computes a mask's box while it plans (`planning_box`).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, fields
from typing import Mapping

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .config import settings_from
from .geometry import mask_box_corners
from .io import InputError

log = logging.getLogger(__name__)

# CT in Hounsfield units holds air (-1000 HU: around the body and in the lungs); MR intensities are
# not negative. The same test decides the CT window's hint in lungreg.preprocess.
CT_AIR_HU = -500.0
CT_MIN_AIR_SHARE = 0.05
AIRWAY_START_HU = -1000.0  # the first threshold of the airway growth, raised in AIRWAY_STEP_HU steps
AIRWAY_STEP_HU = 10.0
AIRWAY_LEAK_GROWTH = 2.0  # a step that grows the airways by more than this factor leaked into the lungs


@dataclass(frozen=True)
class AutoMaskSettings:
    """How a CT image's lungs are segmented (module docstring); defaults: the schema's."""

    air_hu: float = -400.0  # below: air (lungs, airways, outside)
    max_border_share: float = 0.25  # an air region against the image border over more of its surface: outside
    second_lung_share: float = 0.1  # the second region is a lung when at least this share of the largest
    trachea_area_mm2: float = 700.0  # the top slices' air while one region this small: the trachea
    airway_max_ml: float = 250.0  # the airway growth stops before this volume
    airway_margin_mm: float = 2.0  # the airways grown by this before they are removed
    closing_mm: float = 2.0  # the final closing's radius
    junction_mm: float = 10.0  # lungs split by an erosion up to this deep count as two
    min_volume_ml: float = 500.0  # a mask below this volume is a problem (qc.tsv)
    max_volume_ml: float = 9000.0  # ... and above this one
    planning_spacing_mm: float = 4.0  # while planning: the box from the image averaged to about this spacing

    def __post_init__(self) -> None:
        for f in fields(self):
            value = float(getattr(self, f.name))
            if not math.isfinite(value) or (f.name != "air_hu" and value < 0):
                raise ValueError(f"preprocess.auto_mask.{f.name} must be a finite number >= 0, got {value}")
            object.__setattr__(self, f.name, value)
        if self.max_border_share > 1 or self.second_lung_share > 1:
            raise ValueError("preprocess.auto_mask: max_border_share and second_lung_share are shares (<= 1)")
        if self.min_volume_ml >= self.max_volume_ml:
            raise ValueError("preprocess.auto_mask: min_volume_ml must be below max_volume_ml")

    @classmethod
    def from_config(cls, section: Mapping | None) -> "AutoMaskSettings":
        return settings_from(cls, section, "preprocess.auto_mask")


@dataclass(frozen=True)
class LungMask:
    mask: sitk.Image  # uint8 0/1 on the image's grid
    volume_ml: float
    lungs: int  # lung-sized parts: 2 both lungs, 1 joined beyond junction_mm or one lung in view, 0 none
    airway_ml: float  # removed as the main airways (0: no trachea in the top slices)


# ------------------------------------------------------------------------------ CT or not


def air_share(image: sitk.Image) -> float:
    """The share of the image's voxels below CT_AIR_HU (air in Hounsfield units)."""
    values = sitk.GetArrayViewFromImage(image)
    return float(np.count_nonzero(values < CT_AIR_HU)) / max(values.size, 1)


def looks_like_ct(image: sitk.Image) -> bool:
    """Whether the image is CT in Hounsfield units: at least CT_MIN_AIR_SHARE of its voxels lie below
    CT_AIR_HU (air around the body and in the lungs; an MR image has no such values)."""
    return air_share(image) >= CT_MIN_AIR_SHARE


def check_ct(subject: str, path: str | os.PathLike, image: sitk.Image, phase: str) -> None:
    """Refuse an automatic mask of an image that is not CT in Hounsfield units (InputError)."""
    if not looks_like_ct(image):
        raise InputError(
            subject,
            path,
            f"{phase}: no {phase}_mask given, and the automatic lung mask needs CT in Hounsfield units, but only "
            f"{100 * air_share(image):.1f}% of the voxels lie below {CT_AIR_HU:g} (air; CT: "
            f">= {100 * CT_MIN_AIR_SHARE:g}%); give the {phase}_mask column a lung mask (MRI needs one)",
        )


# ---------------------------------------------------------------------------- segmentation


def _binary(array: np.ndarray, like: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(like)
    return image


def _radius(mm: float, image: sitk.Image) -> list[int]:
    """A structuring element's radius per axis (x, y, z voxels) for `mm`, at least 1."""
    return [max(1, int(round(mm / s))) for s in image.GetSpacing()]


def _regions(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Face-connected regions of a (z, y, x) mask: labels and each label's voxel count (label 0: 0)."""
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), False))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels, sizes


def _box(mask: np.ndarray) -> tuple[slice, ...]:
    """The index box of a mask's set voxels (work on it, not on the whole image)."""
    return tuple(
        slice(int(v[0]), int(v[-1]) + 1) for v in (np.flatnonzero(mask.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    )


def _lungs(labels: np.ndarray, sizes: np.ndarray, candidates: np.ndarray, share: float) -> list[int]:
    """The largest candidate label, and the second when it holds at least `share` of the largest."""
    order = [label for label in np.argsort(-sizes, kind="stable") if candidates[label] and sizes[label]]
    return order[:1] + [label for label in order[1:2] if sizes[label] >= share * sizes[order[0]]]


def _border_shares(labels: np.ndarray) -> np.ndarray:
    """Per label: its voxels on the image's faces / its surface voxels (contour or face)."""
    count = int(labels.max()) + 1
    on_face = np.zeros(labels.shape, bool)
    for axis in range(3):
        on_face[(slice(None),) * axis + (0,)] = True
        on_face[(slice(None),) * axis + (-1,)] = True
    contour = sitk.GetArrayViewFromImage(sitk.LabelContour(sitk.GetImageFromArray(labels.astype(np.uint32)), False))
    contour = contour != 0
    faces = np.bincount(labels[on_face], minlength=count)
    surface = np.bincount(labels[on_face | contour], minlength=count)
    return faces / np.maximum(surface, 1)


def superior_axis(image: sitk.Image) -> tuple[int, bool]:
    """(array axis (z, y, x order) closest to the patient's head-foot axis, whether its high end is superior)."""
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    index_axis = int(np.argmax(np.abs(direction[2])))  # world z (LPS: superior) along each index axis
    return 2 - index_axis, bool(direction[2, index_axis] > 0)


def _trachea_seed(lungs: np.ndarray, axis: int, up: bool, slice_area_mm2: float, max_area_mm2: float) -> np.ndarray:
    """The air of the top slices while it is one region of at most `max_area_mm2`: the trachea."""
    order = range(lungs.shape[axis] - 1, -1, -1) if up else range(lungs.shape[axis])
    seed = np.zeros_like(lungs)
    for k in order:
        plane = np.take(lungs, k, axis=axis)
        if not plane.any():
            if seed.any():
                break
            continue
        if plane.sum() * slice_area_mm2 > max_area_mm2 or ndimage.label(plane)[1] != 1:
            break
        index = [slice(None)] * 3
        index[axis] = k
        seed[tuple(index)] = plane
    return seed


def _airways(hu: np.ndarray, lungs: np.ndarray, seed: np.ndarray, air_hu: float, max_voxels: float) -> np.ndarray:
    """The airway tree grown from `seed` inside `lungs`, explosion-controlled (module docstring)."""
    box = _box(lungs)
    grown, previous = np.zeros_like(lungs[box]), 0
    for threshold in np.arange(AIRWAY_START_HU, air_hu, AIRWAY_STEP_HU):
        labels, _ = _regions(lungs[box] & (hu[box] < threshold))
        reached = np.unique(labels[seed[box] & (labels > 0)])
        candidate = np.isin(labels, reached[reached > 0])
        volume = int(candidate.sum())
        if volume > max_voxels or (previous and volume > AIRWAY_LEAK_GROWTH * previous):
            break
        grown, previous = candidate, volume
    airways = np.zeros_like(lungs)
    airways[box] = grown
    return airways


def _fill_slices(mask: np.ndarray, axis: int) -> np.ndarray:
    """Holes filled in every slice across `axis` (vessels: holes in an axial slice, not in 3D)."""
    moved = np.moveaxis(mask, axis, 0).copy()
    for k in range(moved.shape[0]):
        moved[k] = ndimage.binary_fill_holes(moved[k])
    return np.moveaxis(moved, 0, axis)


def count_lungs(mask: sitk.Image, settings: AutoMaskSettings) -> int:
    """Lung-sized parts of `mask` (>= second_lung_share of the largest), at most 2, eroding up to
    `junction_mm` (a distance map) until two appear."""
    inside = sitk.SignedMaurerDistanceMap(mask, insideIsPositive=True, squaredDistance=False, useImageSpacing=True)
    depth = sitk.GetArrayViewFromImage(inside)
    depth = depth[_box(depth > 0)]
    found = 0
    for mm in np.arange(0.0, settings.junction_mm + 1e-6, min(mask.GetSpacing())):
        labels, sizes = _regions(depth > mm)
        if not sizes.any():
            break
        found = max(found, len(_lungs(labels, sizes, np.ones(len(sizes), bool), settings.second_lung_share)))
        if found == 2:
            break
    return found


def _without_airways(
    hu: np.ndarray, lungs: np.ndarray, image: sitk.Image, settings: AutoMaskSettings
) -> tuple[np.ndarray, float]:
    """The lungs less their main airways (module docstring, step 4), and the airways' volume (ml)."""
    axis, up = superior_axis(image)
    spacing = np.asarray(image.GetSpacing()[::-1])  # z, y, x
    seed = _trachea_seed(lungs, axis, up, float(np.prod(np.delete(spacing, axis))), settings.trachea_area_mm2)
    if not seed.any():
        log.info("automatic lung mask: no trachea in the top slices; no airway removed")
        return lungs, 0.0
    voxel_ml = float(np.prod(spacing)) / 1000
    airways = _airways(hu, lungs, seed, settings.air_hu, settings.airway_max_ml / voxel_ml)
    if not airways.any():
        return lungs, 0.0
    grown = sitk.BinaryDilate(_binary(airways, image), _radius(settings.airway_margin_mm, image), sitk.sitkBall)
    labels, sizes = _regions(lungs & (sitk.GetArrayViewFromImage(grown) == 0))
    kept = np.isin(labels, _lungs(labels, sizes, np.ones(len(sizes), bool), settings.second_lung_share))
    return kept, float(airways.sum()) * voxel_ml


def segment_lungs(image: sitk.Image, settings: AutoMaskSettings) -> LungMask:
    """The lung mask of a CT image in Hounsfield units (module docstring); empty when none is found."""
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    labels, sizes = _regions(hu < settings.air_hu)
    inside = _border_shares(labels) <= settings.max_border_share
    lungs = np.isin(labels, _lungs(labels, sizes, inside, settings.second_lung_share))
    lungs, airway_ml = _without_airways(hu, lungs, image, settings)
    mask = _binary(_fill_slices(lungs, superior_axis(image)[0]), image)
    if settings.closing_mm > 0:
        mask = sitk.BinaryMorphologicalClosing(mask, _radius(settings.closing_mm, image), sitk.sitkBall, 1, True)
    mask = sitk.Cast(mask, sitk.sitkUInt8)
    volume = float(np.count_nonzero(sitk.GetArrayViewFromImage(mask))) * float(np.prod(image.GetSpacing())) / 1000
    return LungMask(mask, volume, count_lungs(mask, settings) if volume else 0, airway_ml)


def planning_box(image: sitk.Image, settings: AutoMaskSettings) -> np.ndarray:
    """The corners (8, 3, mm) of the box of the automatic mask, from the image averaged down to about
    `planning_spacing_mm` (fast enough to plan a cohort; the job segments at full resolution, and
    `grid_margin_mm` holds the difference). Empty (0, 3) when no lung is found."""
    shrink = [max(1, int(settings.planning_spacing_mm // s)) for s in image.GetSpacing()]
    coarse = sitk.BinShrink(sitk.Cast(image, sitk.sitkFloat32), shrink) if max(shrink) > 1 else image
    return mask_box_corners(segment_lungs(coarse, settings).mask)
