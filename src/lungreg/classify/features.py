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
from ..metrics import jacobian_determinant

log = logging.getLogger(__name__)

COMPONENTS = ("x", "y", "z")
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

    `field_paths` / `mask_paths`: subject -> displacement field / fixed lung mask.  The masks
    define the regions of the statistics whatever `masked` says; `masked` only decides whether
    the CNN sees the field outside the lung.  ``fields_out`` holds subjects, fields (n, 3, z, y,
    x) float32 and masks (n, z, y, x) bool.  No label is read or written here.
    """
    began = time.perf_counter()
    subjects = sorted(field_paths)
    rows, arrays, masks, first_grid = [], [], [], None
    for subject in subjects:
        displacement, grid = read_field(field_paths[subject])
        if first_grid is None:
            first_grid = grid
        elif grid.shape != first_grid.shape:
            raise ValueError(
                f"subject {subject}: field shape {grid.shape} differs from {first_grid.shape}; "
                "the classifier needs one common grid"
            )
        mask = read_mask(mask_paths[subject], grid)
        rows.append({"subject": subject, **regional_features(displacement, mask, grid)})
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
