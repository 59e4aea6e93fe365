"""What the classifiers read: each labelled subject's field (the CNN) and its regional statistics.

No label is read or written here.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
from scipy import ndimage

from .. import io, torch_io
from ..geometry import Grid
from ..metrics import jacobian_determinant, sample_displacement

log = logging.getLogger(__name__)

COMPONENTS = ("x", "y", "z")
MOTION = "motion_"  # the prefix of `motion_features`' names (the other columns: `regional_features`)
FEATURE_SETS = ("motion", "regional", "all")


def feature_columns(columns, feature_set: str) -> list[str]:
    """The columns of a regional feature table that make up `feature_set`."""
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"unknown feature set {feature_set!r}; expected one of {FEATURE_SETS}")
    if feature_set == "all":
        return list(columns)
    return [c for c in columns if c.startswith(MOTION) == (feature_set == "motion")]


REGIONS = ("apical", "middle", "basal", "central", "peripheral")


def read_field(path: str | Path) -> tuple[np.ndarray, Grid]:
    """A displacement field written by the workflow: (z, y, x, 3) float32 (x, y, z in mm), grid."""
    image = io.read_intermediate_image(path)
    if image.GetNumberOfComponentsPerPixel() != 3 or image.GetDimension() != 3:
        raise io.CorruptFileError(path, "not a 3D displacement field with 3 components")
    return sitk.GetArrayFromImage(image).astype(np.float32), Grid.of(image)


def read_mask(path: str | Path, grid: Grid) -> np.ndarray:
    image = io.read_intermediate_image(path)
    if not grid.matches(image):
        raise ValueError(f"{path}: the lung mask is not on the displacement field's grid")
    return sitk.GetArrayFromImage(image) > 0


def field_on_mask_grid(path: str | Path, mask_path: str | Path) -> tuple[np.ndarray, np.ndarray, Grid]:
    """(field, mask, grid) on the lung mask's grid. A field on another grid (the synthetic ground
    truth, on its scanner grid) is sampled at the mask's voxel centres, trilinearly, as the
    end-point error samples it (`metrics.sample_displacement`)."""
    displacement, grid = read_field(path)
    mask_image = io.read_intermediate_image(mask_path)
    mask_grid = Grid.of(mask_image)
    if not grid.matches(mask_image):
        points = mask_grid.voxel_centres().reshape(-1, 3)
        sampled = sample_displacement(displacement.astype(float), grid, points)
        displacement, grid = sampled.reshape(*mask_grid.shape, 3).astype(np.float32), mask_grid
    return displacement, sitk.GetArrayFromImage(mask_image) > 0, grid


def lung_regions(mask: np.ndarray, grid: Grid) -> dict[str, np.ndarray]:
    """Boolean masks of the lung's regions (each a subset of `mask`).

    apical / middle / basal: thirds of the lung's extent along world z (ITK/LPS: z points to the
    head); peripheral: voxels at most the median distance (mm) from the lung boundary; central:
    the rest.
    """
    lung = np.asarray(mask, bool)
    if not lung.any():
        raise ValueError("empty lung mask: no regional statistics")
    index = np.argwhere(lung)  # (n, 3) in z, y, x order
    z = grid.index_to_world(index[:, ::-1])[:, 2]
    height = (z - z.min()) / max(float(z.max() - z.min()), 1e-6)
    depth = ndimage.distance_transform_edt(lung, sampling=grid.spacing[::-1])[lung]
    peripheral = depth <= np.median(depth)
    selections = {
        "apical": height > 2 / 3,
        "middle": (height >= 1 / 3) & (height <= 2 / 3),
        "basal": height < 1 / 3,
        "central": ~peripheral,
        "peripheral": peripheral,
    }
    regions = {}
    for name, chosen in selections.items():
        region = np.zeros_like(lung)
        region[tuple(index[chosen].T)] = True
        regions[name] = region
    return regions


def regional_features(displacement: np.ndarray, mask: np.ndarray, grid: Grid) -> dict[str, float]:
    """Pooled statistics of a field in each lung region (``lung_regions``).

    Per region: mean and standard deviation of each component (``{region}_u{c}_mean``,
    ``{region}_u{c}_std``, mm), the mean displacement magnitude (``{region}_norm_mean``), and the
    mean and standard deviation of the Jacobian determinant (``{region}_jacobian_mean``,
    ``{region}_jacobian_std``, from ``metrics.jacobian_determinant``).  Regions without a voxel
    give NaN.
    """
    displacement = np.asarray(displacement, dtype=float)
    determinant = jacobian_determinant(displacement, grid)
    norm = np.linalg.norm(displacement, axis=-1)
    features: dict[str, float] = {}
    for region, inside in lung_regions(mask, grid).items():
        u = displacement[inside]
        empty = not inside.any()
        for c, name in enumerate(COMPONENTS):
            features[f"{region}_u{name}_mean"] = np.nan if empty else float(u[:, c].mean())
            features[f"{region}_u{name}_std"] = np.nan if empty else float(u[:, c].std())
        features[f"{region}_norm_mean"] = np.nan if empty else float(norm[inside].mean())
        features[f"{region}_jacobian_mean"] = np.nan if empty else float(determinant[inside].mean())
        features[f"{region}_jacobian_std"] = np.nan if empty else float(determinant[inside].std())
    return features


def _polynomial_design(points: np.ndarray, degree: int) -> np.ndarray:
    """Columns 1, x, y, z (degree 1) and their products (degree 2) of standardised positions."""
    x = (points - points.mean(0)) / np.maximum(points.std(0), 1e-9)
    columns = [np.ones(len(x))]
    if degree >= 1:
        columns += [x[:, a] for a in range(3)]
    if degree >= 2:
        columns += [x[:, a] * x[:, b] for a in range(3) for b in range(a, 3)]
    return np.stack(columns, axis=1)


def motion_features(displacement: np.ndarray, mask: np.ndarray, grid: Grid) -> dict[str, float]:
    """Scale-free statistics of how the lung moves, for small cohorts (a few dozen subjects).

    Every name starts with `motion_`. With `scale` the mean displacement magnitude in the lung
    (breathing depth, which both groups share, is divided out):
      scale                                the scale itself (mm)
      {region}_u{c}                        the region's mean component over the scale
      residual{1,2}_rms, residual{1,2}_u{c}  root mean square of the field's residual after a
                                           least-squares affine (1: the affine part removed) or
                                           quadratic (2) function of position in the lung, over
                                           the scale: motion a smooth breathing does not explain
      peripheral_central_uz                (mean u_z peripheral - central) / scale
      basal_apical_jacobian                mean det J basal - apical (regional volume change)
      log_jacobian_std                     spread of log det J in the lung
    """
    lung = np.asarray(mask, bool)
    displacement = np.asarray(displacement, dtype=float)
    points = grid.index_to_world(np.argwhere(lung)[:, ::-1].astype(float))
    u = displacement[lung]
    scale = max(float(np.linalg.norm(u, axis=1).mean()), 1e-6)
    regions = lung_regions(lung, grid)
    determinant = jacobian_determinant(displacement, grid)
    features = {f"{MOTION}scale": scale}
    for region, inside in regions.items():
        for c, name in enumerate(COMPONENTS):
            values = displacement[inside][:, c]
            features[f"{MOTION}{region}_u{name}"] = float(values.mean() / scale) if values.size else np.nan
    for degree in (1, 2):
        design = _polynomial_design(points, degree)
        coefficients, *_ = np.linalg.lstsq(design, u, rcond=None)
        residual = u - design @ coefficients
        features[f"{MOTION}residual{degree}_rms"] = float(np.sqrt((residual**2).sum(1).mean()) / scale)
        for c, name in enumerate(COMPONENTS):
            features[f"{MOTION}residual{degree}_u{name}"] = float(np.sqrt((residual[:, c] ** 2).mean()) / scale)
    features[f"{MOTION}peripheral_central_uz"] = float(
        (displacement[regions["peripheral"]][:, 2].mean() - displacement[regions["central"]][:, 2].mean()) / scale
    )
    features[f"{MOTION}basal_apical_jacobian"] = float(
        determinant[regions["basal"]].mean() - determinant[regions["apical"]].mean()
    )
    features[f"{MOTION}log_jacobian_std"] = float(np.log(np.clip(determinant[lung], 1e-3, None)).std())
    return features


def cnn_input(displacement: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """(3, z, y, x) float32 channels x, y, z of the field, zero outside `mask` when one is given."""
    channels = np.moveaxis(np.asarray(displacement, np.float32), -1, 0)
    return channels * np.asarray(mask, np.float32)[None] if mask is not None else channels.copy()


def center_fields(fields: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Subtract each subject's mean displacement inside its lung (per component).

    A per-subject transform that uses no label and no other subject: it removes the global
    translation (patient repositioning, mean breathing shift) and, for a masked field, turns
    the jump to zero at the lung boundary into the local deviation from the mean.  Voxels that
    were zero outside the mask (masked fields) stay zero.
    """
    fields = np.asarray(fields, np.float32)
    lung = np.asarray(masks, bool)[:, None]
    count = np.maximum(lung.sum(axis=(2, 3, 4), keepdims=True), 1)
    mean = np.where(lung, fields, 0).sum(axis=(2, 3, 4), keepdims=True) / count
    outside_zero = np.all(np.where(lung, 0, fields) == 0, axis=(1, 2, 3, 4), keepdims=True)
    centered = fields - mean
    return np.where(outside_zero & ~lung, 0, centered).astype(np.float32)


def build_features(
    field_paths: Mapping[str, str],
    mask_paths: Mapping[str, str],
    masked: bool,
    fields_out: str | Path,
    table_out: str | Path,
) -> pd.DataFrame:
    """The features job: every subject's CNN input (``fields_out``) and regional statistics.

    `field_paths` / `mask_paths`: subject -> displacement field / fixed lung mask (the field is
    taken on the mask's grid, `field_on_mask_grid`).  The masks define the regions of the
    statistics whatever `masked` says; `masked` only decides whether
    the CNN sees the field outside the lung.  ``fields_out`` holds subjects, fields (n, 3, z, y,
    x) float32 and masks (n, z, y, x) bool.  No label is read or written here.
    """
    began = time.perf_counter()
    subjects = sorted(field_paths)
    rows, arrays, masks, first_grid = [], [], [], None
    for subject in subjects:
        displacement, mask, grid = field_on_mask_grid(field_paths[subject], mask_paths[subject])
        if first_grid is None:
            first_grid = grid
        elif grid.shape != first_grid.shape:
            raise ValueError(
                f"subject {subject}: field shape {grid.shape} differs from {first_grid.shape}; "
                "the classifier needs one common grid"
            )
        mask = read_mask(mask_paths[subject], grid)
        rows.append(
            {
                "subject": subject,
                **regional_features(displacement, mask, grid),
                **motion_features(displacement, mask, grid),
            }
        )
        arrays.append(cnn_input(displacement, mask if masked else None))
        masks.append(mask)
    if not subjects:
        raise ValueError("no subject to gather features of")
    torch_io.save_torch(
        {
            "subjects": subjects,
            "fields": torch.from_numpy(np.stack(arrays)),
            "masks": torch.from_numpy(np.stack(masks)),
            "masked": bool(masked),
            "components": COMPONENTS,
            "spacing": first_grid.spacing,
        },
        fields_out,
    )
    table = pd.DataFrame(rows)
    io.write_table(table, table_out)
    log.info(
        "features of %d subjects (%s, masked=%s) in %.1f s",
        len(subjects),
        "x".join(map(str, first_grid.shape)),
        masked,
        time.perf_counter() - began,
    )
    return table


def read_regional_features(path: str | Path) -> pd.DataFrame:
    table = io.read_table(path)
    if "subject" not in table.columns:
        raise io.CorruptFileError(path, "lacks the subject column")
    return table.astype({"subject": str}).set_index("subject")


def read_fields(path: str | Path) -> dict:
    data = torch_io.load_torch(path)
    if not isinstance(data, dict) or not {"subjects", "fields", "masks"} <= set(data):
        raise io.CorruptFileError(path, "not a fields file of the classify_features rule")
    return data
