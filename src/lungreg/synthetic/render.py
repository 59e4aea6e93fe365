"""Rendering one synthetic subject: images, masks, landmarks and exact fields, written to files."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from ..geometry import Grid, image_from_array
from ..io import write_image, write_text
from .anatomy import F32, LANDMARK_NAMES, SubjectModel, build_model, skinny_matmul
from .settings import SyntheticCohortSettings

log = logging.getLogger(__name__)

OUTPUT_FILES = (
    "inhale.nii.gz",
    "exhale.nii.gz",
    "inhale_mask.nii.gz",
    "exhale_mask.nii.gz",
    "inhale_landmarks.csv",
    "exhale_landmarks.csv",
    "gt_displacement_fixed-exhale.nii.gz",
    "gt_displacement_fixed-inhale.nii.gz",
    "parameters.json",
)
_CHUNK = 1 << 19  # voxels per vectorised block: bounds the temporaries' memory


# ---------------------------------------------------------------------------- rendering


def _world_points(grid: Grid, start: int, stop: int) -> np.ndarray:
    """Physical points (float32) of voxels start..stop in flat (z, y, x) order."""
    nz, ny, nx = grid.shape
    flat = np.arange(start, stop)
    index = np.stack([flat % nx, (flat // nx) % ny, flat // (nx * ny)], axis=1).astype(F32)
    return skinny_matmul(index, grid.index_to_world_matrix.T) + np.asarray(grid.origin, dtype=F32)


def _chunks(total: int) -> Iterable[tuple[int, int]]:
    for start in range(0, total, _CHUNK):
        yield start, min(total, start + _CHUNK)


def _bias_field(grid: Grid, params: dict, strength: float, points: np.ndarray) -> np.ndarray:
    """Smooth multiplicative bias in scanner coordinates (the coil does not move with the patient)."""
    half = np.asarray(grid.size) * np.asarray(grid.spacing) / 2
    u = points / half.astype(points.dtype)
    basis = [
        u[:, 0],
        u[:, 1],
        u[:, 2],
        u[:, 0] ** 2 - 1 / 3,
        u[:, 1] ** 2 - 1 / 3,
        u[:, 2] ** 2 - 1 / 3,
        u[:, 0] * u[:, 1],
        u[:, 0] * u[:, 2],
        u[:, 1] * u[:, 2],
    ]
    log_bias = sum(a * b for a, b in zip(params["bias_coefficients"], basis)) / 3.0
    return params["gain"] * np.exp(strength * log_bias)


def _add_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Rician noise: the magnitude of the image plus complex Gaussian noise."""
    if sigma <= 0:
        return image
    real = image + sigma * rng.standard_normal(image.shape, dtype=F32)
    imag = sigma * rng.standard_normal(image.shape, dtype=F32)
    return np.sqrt(real * real + imag * imag)


def _render_inhale(model: SubjectModel, grid: Grid) -> dict[str, np.ndarray]:
    """Inhale image, lung mask, and the inverse map u_i (inhale point -> exhale point)."""
    n = int(np.prod(grid.shape))
    image, mask = np.empty(n, F32), np.empty(n, np.uint8)
    field_i, residual = np.empty((n, 3), F32), np.empty(n, F32)
    for start, stop in _chunks(n):
        y = _world_points(grid, start, stop)
        c = model.pose_inhale.invert(y)
        lung = model.lung_sd(c)
        in_lung = lung[0] < 0
        image[start:stop] = model.render(c, lung) * _bias_field(grid, model.p, model.settings.bias_field_strength, y)
        mask[start:stop] = in_lung
        x = model.pose_exhale.apply(model.unbreathe(c, in_lung))
        field_i[start:stop] = x - y
        residual[start:stop] = np.linalg.norm(model.phi(x)[0] - y, axis=1)
    return {"image": image, "mask": mask, "field": field_i, "residual": residual}


def exhale_field(model: SubjectModel, grid: Grid, render: bool = True) -> dict[str, np.ndarray]:
    """Exhale image, mask and u_e (exhale point -> inhale point); render=False skips the image."""
    n = int(np.prod(grid.shape))
    image, mask, field_e = (np.empty(n, F32) if render else None), np.empty(n, np.uint8), np.empty((n, 3), F32)
    for start, stop in _chunks(n):
        x = _world_points(grid, start, stop)
        c, in_lung = model.breathe(model.pose_exhale.invert(x))
        mask[start:stop] = in_lung
        field_e[start:stop] = model.pose_inhale.apply(c) - x
        if render:
            image[start:stop] = model.render(c) * _bias_field(grid, model.p, model.settings.bias_field_strength, x)
    return {"image": image, "mask": mask, "field": field_e}


# ------------------------------------------------------------------------------ public


def synthesize_subject(settings: SyntheticCohortSettings, subject: str, out_dir: str | Path) -> None:
    """Write one subject's images, masks, landmarks, exact displacement fields and parameters.

    Files (all on `settings.grid`, each written atomically): see OUTPUT_FILES.  Displacement
    fields follow the ITK convention (for each fixed point, the offset in mm to the moving
    point) as float32 vector images with (x, y, z) components: cast them to float64 before
    building a sitk.DisplacementFieldTransform.
    """
    began = time.perf_counter()
    grid = settings.grid
    model, (noise_inhale, noise_exhale) = build_model(settings, subject)
    inhale = _render_inhale(model, grid)
    exhale = exhale_field(model, grid)
    marks = dict(zip(("inhale", "exhale"), model.landmarks()))
    half_fov = np.asarray(grid.size) * np.asarray(grid.spacing) / 2
    for phase, points in marks.items():
        if not np.all(np.abs(points) < half_fov - 10.0):
            raise RuntimeError(f"subject {subject}: {phase} landmarks not well inside the field of view")
    inhale["image"] = _add_noise(inhale["image"], settings.noise_std, noise_inhale)
    exhale["image"] = _add_noise(exhale["image"], settings.noise_std, noise_exhale)
    residual = _residual_summary(inhale)
    record = {
        **model.p,
        "effect_size": settings.effect_size,
        "seed": settings.seed,
        "inverse_residual_mm": residual,
        "landmarks": list(LANDMARK_NAMES),
    }
    _write_outputs(Path(out_dir), grid, {"inhale": inhale, "exhale": exhale}, marks, record)
    log.info(
        "synthesized %s (%s, excursion %.1f mm) in %.1f s; inverse residual in lung mean %.2g max %.2g mm",
        subject,
        model.p["label"],
        model.p["diaphragm_excursion_mm"],
        time.perf_counter() - began,
        residual["lung_mean"],
        residual["lung_max"],
    )


def _write_outputs(out_dir: Path, grid: Grid, phases: dict, marks: dict, record: dict) -> None:
    """The files of OUTPUT_FILES; the field of each phase is the one whose fixed image it is."""
    shape = grid.shape
    for phase, data in phases.items():
        write_image(image_from_array(data["image"].reshape(shape).astype(F32), grid), out_dir / f"{phase}.nii.gz")
        write_image(image_from_array(data["mask"].reshape(shape), grid), out_dir / f"{phase}_mask.nii.gz")
        write_image(
            image_from_array(data["field"].reshape(*shape, 3), grid, is_vector=True),
            out_dir / f"gt_displacement_fixed-{phase}.nii.gz",
        )
        points = marks[phase]
        table = pd.DataFrame({"landmark": LANDMARK_NAMES, "x": points[:, 0], "y": points[:, 1], "z": points[:, 2]})
        write_text(
            table.to_csv(index=False, float_format="%.6f", lineterminator="\n"), out_dir / f"{phase}_landmarks.csv"
        )
    write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", out_dir / "parameters.json")


def _residual_summary(inhale: dict) -> dict[str, float]:
    lung = inhale["mask"].astype(bool)
    r = inhale["residual"]
    return {
        "lung_mean": float(r[lung].mean()) if lung.any() else 0.0,
        "lung_max": float(r[lung].max()) if lung.any() else 0.0,
        "all_mean": float(r.mean()),
        "all_max": float(r.max()),
        "all_fraction_above_0.1mm": float((r > 0.1).mean()),
    }
