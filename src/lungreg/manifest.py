"""The subjects manifest: which images, masks and landmarks make up the cohort.

A tab-separated file with one row per subject and the columns

    subject  label  inhale  exhale  [inhale_mask  exhale_mask  inhale_landmarks  exhale_landmarks]

`label` is `healthy`, `ILD` or empty (unlabeled); the mask and landmark columns are optional and
may be empty per row. An empty mask means "segment the lungs" (CT only, `lungreg.lungmask`): the
checks then segment the image, averaged down, for the box of its lungs (`grid_shape: auto`).
Paths are relative to the manifest's folder (absolute paths are fine too).

`read_manifest` checks the table itself; `check_subjects` opens every file and checks what the
workflow relies on, raising `InputError` (one line: subject, file, problem) on the first
problem. Landmarks outside a field of view are not an error: the report counts them.

The small `check_*` functions work on images already in memory so that `preprocess` runs the
same checks on what it reads, before it writes anything.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd
import SimpleITK as sitk

from .geometry import Grid, common_grid, covering_shape, mask_box_corners, region_corners
from .io import InputError, read_image, read_landmarks, write_text
from .lungmask import AutoMaskSettings, check_ct, planning_box

log = logging.getLogger(__name__)

PHASES = ("inhale", "exhale")
REQUIRED_COLUMNS = ("subject", "label", "inhale", "exhale")
OPTIONAL_COLUMNS = ("inhale_mask", "exhale_mask", "inhale_landmarks", "exhale_landmarks")  # "" when absent
PATH_COLUMNS = ("inhale", "exhale", *OPTIONAL_COLUMNS)
LABELS = ("healthy", "ILD")
SUBJECT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
CACHE_VERSION = 3  # 2: masks' lung boxes; 3: automatic masks' boxes


# ---------------------------------------------------------------------------- manifest


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """The manifest as strings (empty cells ""), paths made absolute, one row per subject."""
    path = Path(path)
    if not path.is_file():
        raise InputError(None, path, "manifest not found")
    frame = _read_tsv(path)
    _check_columns(frame, path)
    for column in OPTIONAL_COLUMNS:
        if column not in frame.columns:
            frame[column] = ""
    for row_number, row in zip(range(2, len(frame) + 2), frame.to_dict("records")):
        _check_subject_id(row["subject"], row_number, path)
    _check_unique_subjects(frame, path)
    for row in frame.to_dict("records"):
        _check_label(row, path)
        _check_required_paths(row, path)
    folder = path.parent.absolute()
    for column in PATH_COLUMNS:
        frame[column] = [_resolve(cell, folder) for cell in frame[column]]
    return frame.reset_index(drop=True)


def _read_tsv(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "empty"
        raise InputError(None, path, f"not a readable tab-separated table ({reason})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    frame = frame.fillna("").astype(object)
    return frame.map(lambda cell: str(cell).strip())


def _check_columns(frame: pd.DataFrame, path: Path) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(None, path, f"missing required column(s): {', '.join(missing)}")


def _check_subject_id(subject: str, row_number: int, path: Path) -> None:
    if not subject:
        raise InputError(None, path, f"line {row_number}: empty subject id")
    if not SUBJECT_PATTERN.match(subject):
        raise InputError(
            subject,
            path,
            f"subject id {subject!r} must match {SUBJECT_PATTERN.pattern} "
            "(safe for file names and Snakemake wildcards)",
        )


def _check_unique_subjects(frame: pd.DataFrame, path: Path) -> None:
    duplicated = frame["subject"][frame["subject"].duplicated()]
    if len(duplicated):
        subject = duplicated.iloc[0]
        lines = [str(i + 2) for i in np.flatnonzero(frame["subject"] == subject)]
        raise InputError(subject, path, f"duplicate subject id {subject!r} (lines {', '.join(lines)})")


def _check_label(row: Mapping[str, str], path: Path) -> None:
    if row["label"] and row["label"] not in LABELS:
        raise InputError(row["subject"], path, f"unknown label {row['label']!r} (expected healthy, ILD or empty)")


def _check_required_paths(row: Mapping[str, str], path: Path) -> None:
    for column in REQUIRED_COLUMNS[2:]:
        if not row[column]:
            raise InputError(row["subject"], path, f"empty {column!r} column")


def _resolve(cell: str, folder: Path) -> str:
    if not cell:
        return ""
    return os.path.abspath(folder / Path(cell).expanduser())


# ------------------------------------------------------------------ checks on one file


def _check_3d_scalar(subject: str, path: str | os.PathLike, image: sitk.Image) -> None:
    if image.GetDimension() != 3:
        size = " x ".join(str(s) for s in image.GetSize())
        raise InputError(subject, path, f"not a 3D image ({image.GetDimension()}D, {size} voxels)")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            subject, path, f"{image.GetNumberOfComponentsPerPixel()} components per voxel, expected a scalar image"
        )


def _is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith((".nii", ".nii.gz"))


def _nonfinite_in_nifti(path: str | os.PathLike) -> tuple[int, int] | None:
    """(NaN, infinite) voxel counts of a NIfTI file's stored data, None if nibabel cannot tell.

    Needed because SimpleITK's NIfTI reader silently replaces non-finite floats (NaN and +inf
    become 0, -inf an arbitrary finite number), so the image it returns cannot show them.
    """
    try:
        import nibabel  # optional here: whatever fails, the check falls back to what SimpleITK read

        proxy = nibabel.load(str(path)).dataobj
        if not np.issubdtype(proxy.dtype, np.floating):
            return 0, 0
        raw = np.asarray(proxy.get_unscaled())
    except Exception:  # noqa: BLE001 - any failure: fall back to what SimpleITK read
        return None
    return int(np.isnan(raw).sum()), int(np.isinf(raw).sum())


def check_finite(subject: str, path: str | os.PathLike, image: sitk.Image) -> None:
    """No NaN or infinite voxel (read from the file itself for NIfTI, see `_nonfinite_in_nifti`)."""
    counts = _nonfinite_in_nifti(path) if _is_nifti(path) else None
    if counts is None:
        array = sitk.GetArrayViewFromImage(image)
        floating = np.issubdtype(array.dtype, np.floating)
        counts = (int(np.isnan(array).sum()), int(np.isinf(array).sum())) if floating else (0, 0)
    nan, infinite = counts
    if nan or infinite:
        problems = [f"{nan} NaN voxel(s)" if nan else "", f"{infinite} infinite voxel(s)" if infinite else ""]
        raise InputError(subject, path, "image holds " + " and ".join(p for p in problems if p))


def check_image(subject: str, path: str | os.PathLike, image: sitk.Image) -> None:
    """A 3D scalar image without NaN or infinite voxels."""
    _check_3d_scalar(subject, path, image)
    check_finite(subject, path, image)


def check_binary(subject: str, path: str | os.PathLike, mask: sitk.Image) -> None:
    array = sitk.GetArrayViewFromImage(mask)
    bad = (array != 0) & (array != 1)
    if np.any(bad):
        examples = ", ".join(f"{v:g}" for v in np.unique(array[bad])[:5])
        raise InputError(subject, path, f"mask not binary: values other than 0 and 1 (e.g. {examples})")


def check_not_empty(subject: str, path: str | os.PathLike, mask: sitk.Image) -> None:
    if not np.any(sitk.GetArrayViewFromImage(mask)):
        raise InputError(subject, path, "mask is empty (no voxel set)")


def check_mask(subject: str, path: str | os.PathLike, mask: sitk.Image) -> None:
    """A 3D binary (0/1) mask with at least one voxel set."""
    _check_3d_scalar(subject, path, mask)
    check_finite(subject, path, mask)
    check_binary(subject, path, mask)
    check_not_empty(subject, path, mask)


# ------------------------------------------------------------- checks across files


def grid_difference(a: Grid, b: Grid) -> str:
    """What differs between two grids, in words ("" when they match)."""
    if a.matches_grid(b):
        return ""
    for name in ("size", "spacing", "origin", "direction"):
        left, right = getattr(a, name), getattr(b, name)
        if name == "size" and left != right or name != "size" and not np.allclose(left, right, atol=1e-4):
            return f"{name} {_fmt(left)} vs {_fmt(right)}"
    return "grids differ"


def _fmt(values: tuple) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def check_mask_grid(
    subject: str, mask_path: str | os.PathLike, mask_grid: Grid, image_path: str | os.PathLike, image_grid: Grid
) -> None:
    difference = grid_difference(mask_grid, image_grid)
    if difference:
        raise InputError(subject, mask_path, f"mask grid differs from its image {image_path}: {difference}")


def check_landmark_columns(subject: str, inhale: str | None, exhale: str | None) -> None:
    """Landmarks come in pairs: both phases or neither."""
    if bool(inhale) != bool(exhale):
        given, empty = ("inhale", "exhale") if inhale else ("exhale", "inhale")
        raise InputError(
            subject, inhale or exhale, f"{given}_landmarks given but {empty}_landmarks empty (both phases or neither)"
        )


def check_landmark_counts(
    subject: str, paths: Mapping[str, str | os.PathLike], points: Mapping[str, np.ndarray]
) -> None:
    counts = {phase: len(points[phase]) for phase in PHASES}
    if counts["inhale"] != counts["exhale"]:
        raise InputError(
            subject,
            paths["exhale"],
            f"{counts['exhale']} landmarks, but {paths['inhale']} has {counts['inhale']} "
            "(pairs must correspond row by row)",
        )


def landmarks_in_view(points: Mapping[str, np.ndarray], grids: Mapping[str, Grid]) -> np.ndarray:
    """Per pair: the inhale point in the inhale field of view and the exhale point in the exhale one."""
    return grids["inhale"].contains(points["inhale"]) & grids["exhale"].contains(points["exhale"])


# -------------------------------------------------------------------------- report


@dataclass(frozen=True)
class SubjectCheck:
    subject: str
    label: str
    landmarks: int  # pairs in the files
    in_view: int  # pairs with both points in their phase's field of view
    excluded: int  # the others
    grids: dict[str, Grid] = field(default_factory=dict, compare=False)  # by phase
    lung_corners: dict[str, np.ndarray] = field(default_factory=dict, compare=False)  # mask boxes, (8, 3) mm
    auto_masks: tuple[str, ...] = ()  # the phases without a mask: segmented automatically

    def line(self) -> str:
        auto = f"; automatic lung mask: {', '.join(self.auto_masks)}" if self.auto_masks else ""
        if not self.landmarks:
            return f"subject {self.subject}: no landmarks{auto}"
        return (
            f"subject {self.subject}: {self.in_view} of {self.landmarks} landmark pairs in view in "
            f"both phases, {self.excluded} excluded{auto}"
        )


@dataclass(frozen=True)
class CheckReport:
    subjects: tuple[SubjectCheck, ...]
    files_read: int  # files opened in this check
    files_cached: int  # files skipped because the cache knew them unchanged

    def __getitem__(self, subject: str) -> SubjectCheck:
        for check in self.subjects:
            if check.subject == subject:
                return check
        raise KeyError(subject)

    def to_frame(self) -> pd.DataFrame:
        columns = ["subject", "label", "landmarks", "in_view", "excluded"]
        return pd.DataFrame([{c: getattr(s, c) for c in columns} for s in self.subjects], columns=columns)

    def lines(self) -> list[str]:
        return [s.line() for s in self.subjects]


# --------------------------------------------------------------------- file facts


def _grid_to_json(grid: Grid) -> dict:
    return {k: list(v) for k, v in dataclasses.asdict(grid).items()}


def _grid_from_json(data: Mapping) -> Grid:
    return Grid(
        tuple(int(s) for s in data["size"]),
        *(tuple(float(v) for v in data[k]) for k in ("spacing", "origin", "direction")),
    )


def _image_facts(subject: str, path: str) -> dict:
    image = read_image(path, subject)
    check_image(subject, path, image)
    return {"grid": _grid_to_json(Grid.of(image))}


def _mask_facts(subject: str, path: str) -> dict:
    mask = read_image(path, subject)
    check_mask(subject, path, mask)
    return {"grid": _grid_to_json(Grid.of(mask)), "lung_corners": mask_box_corners(mask).tolist()}


def _landmark_facts(subject: str, path: str) -> dict:
    return {"points": read_landmarks(path, subject).tolist()}


def _auto_mask_facts(subject: str, path: str, phase: str, settings: AutoMaskSettings) -> dict:
    """The lung box of an image without a mask, from its automatic mask (`lungmask.planning_box`)."""
    image = read_image(path, subject)
    check_ct(subject, path, image, phase)
    corners = planning_box(image, settings)
    if not len(corners):
        raise InputError(subject, path, f"{phase}: the automatic lung mask found no lung; give {phase}_mask")
    return {"lung_corners": corners.tolist()}


FACT_READERS: dict[str, Callable[[str, str], dict]] = {
    "image": _image_facts,
    "mask": _mask_facts,
    "landmarks": _landmark_facts,
}


def _settings_key(settings: AutoMaskSettings) -> str:
    """A digest of the automatic mask's settings: changing one checks the images again."""
    return hashlib.sha1(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode()).hexdigest()[:12]


def file_signature(subject: str, path: str | os.PathLike) -> list:
    """(size, mtime_ns) of a file; for a folder (DICOM series), a digest of its files' ones."""
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise InputError(subject, path, "file not found") from None
    if not path.is_dir():
        return [stat.st_size, stat.st_mtime_ns]
    listing = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file())
    digest = hashlib.sha1(json.dumps(listing).encode()).hexdigest()
    return [sum(size for _, size, _ in listing), max([m for *_, m in listing], default=stat.st_mtime_ns), digest]


class _FactStore:
    """Facts about each file, from the cache when its (path, size, mtime_ns) is unchanged."""

    def __init__(self, cached: Mapping[str, dict]):
        self.cached, self.fresh = cached, {}
        self.read = self.skipped = 0

    def get(self, kind: str, subject: str, path: str, read: Callable[[str, str], dict] | None = None) -> dict:
        """`kind`'s facts (FACT_READERS) about the file, or `read`'s (then `kind` names them, settings included)."""
        key = f"{kind}:{os.path.abspath(path)}"
        signature = file_signature(subject, path)  # before reading: a later change is noticed
        entry = self.cached.get(key)
        if entry is not None and entry.get("signature") == signature:
            facts = entry["facts"]
            self.skipped += 1
        else:
            facts = (read or FACT_READERS[kind])(subject, path)
            self.read += 1
        self.fresh[key] = {"signature": signature, "facts": facts}
        return facts


def _load_cache(path: str | os.PathLike | None) -> dict:
    if path is None or not Path(path).is_file():
        return {}
    try:
        data = json.loads(Path(path).read_text())
        if data.get("version") == CACHE_VERSION and isinstance(data.get("entries"), dict):
            return data["entries"]
    except (OSError, ValueError, AttributeError):
        pass
    log.warning("ignoring unreadable input-check cache %s; every file is checked again", path)
    return {}


def _save_cache(path: str | os.PathLike, entries: Mapping[str, dict]) -> None:
    write_text(json.dumps({"version": CACHE_VERSION, "entries": entries}, sort_keys=True) + "\n", path)


# ------------------------------------------------------------------- check subjects


def _lung_corners(
    row: Mapping[str, str], phase: str, grid: Grid, facts: _FactStore, auto: AutoMaskSettings
) -> np.ndarray:
    """The box of a phase's lung mask: the given mask's (checked against its image), or the automatic one's."""
    subject, mask_path = row["subject"], row.get(f"{phase}_mask", "")
    if not mask_path:
        read = functools.partial(_auto_mask_facts, phase=phase, settings=auto)
        automatic = facts.get(f"auto_mask.{_settings_key(auto)}", subject, row[phase], read)
        return np.asarray(automatic["lung_corners"], float).reshape(-1, 3)
    mask_facts = facts.get("mask", subject, mask_path)
    check_mask_grid(subject, mask_path, _grid_from_json(mask_facts["grid"]), row[phase], grid)
    return np.asarray(mask_facts["lung_corners"], float).reshape(-1, 3)


def _check_row(row: Mapping[str, str], facts: _FactStore, auto: AutoMaskSettings) -> SubjectCheck:
    subject = row["subject"]
    grids = {phase: _grid_from_json(facts.get("image", subject, row[phase])["grid"]) for phase in PHASES}
    corners = {phase: _lung_corners(row, phase, grids[phase], facts, auto) for phase in PHASES}
    automatic = tuple(phase for phase in PHASES if not row.get(f"{phase}_mask", ""))
    geometry = {"grids": grids, "lung_corners": corners, "auto_masks": automatic}
    paths = {phase: row.get(f"{phase}_landmarks", "") for phase in PHASES}
    check_landmark_columns(subject, paths["inhale"], paths["exhale"])
    if not paths["inhale"]:
        return SubjectCheck(subject, row.get("label", ""), 0, 0, 0, **geometry)
    points = {
        phase: np.asarray(facts.get("landmarks", subject, paths[phase])["points"], float).reshape(-1, 3)
        for phase in PHASES
    }
    check_landmark_counts(subject, paths, points)
    in_view = int(landmarks_in_view(points, grids).sum())
    total = len(points["inhale"])
    return SubjectCheck(subject, row.get("label", ""), total, in_view, total - in_view, **geometry)


def check_subjects(
    frame: pd.DataFrame, cache_path: str | os.PathLike | None = None, auto_mask: AutoMaskSettings | None = None
) -> CheckReport:
    """Open every file of every subject of `frame` (from `read_manifest`) and check it.

    A phase without a mask is segmented (`auto_mask`, CT only) for the box of its lungs. Raises
    `InputError` on the first problem. With `cache_path`, files whose (absolute path, size,
    mtime_ns) are in the JSON cache are not read again (an automatic mask's box: with the same
    settings); the cache is (re)written, atomically, only when every check passed.
    """
    facts = _FactStore(_load_cache(cache_path))
    auto = auto_mask or AutoMaskSettings()
    subjects = tuple(_check_row(row, facts, auto) for row in frame.to_dict("records"))
    if cache_path is not None:
        _save_cache(cache_path, facts.fresh)
    report = CheckReport(subjects, facts.read, facts.skipped)
    for line in report.lines():
        log.info(line)
    return report


def lung_grid_shape(report: CheckReport, reference_phase: str, factor: float, margin_mm: float) -> tuple[int, int, int]:
    """The cohort's grid shape (z, y, x) for `preprocess.grid_shape: auto`: per axis, the largest over
    the subjects of the shape that holds their lung region (the union of both phases' lung-mask boxes
    grown by `margin_mm`, cut to both fields of view: `geometry.region_corners`), along the reference
    phase's axes at its spacing / `factor` (`geometry.covering_shape`). Each subject's grid is then
    centred on its own region (`lungreg.preprocess.subject_grid`)."""
    shapes = []
    for check in report.subjects:
        reference = check.grids[reference_phase]
        lungs = np.concatenate([check.lung_corners[p] for p in PHASES])
        fields_of_view = np.concatenate([check.grids[p].corners() for p in PHASES])
        shapes.append(covering_shape(region_corners(lungs, fields_of_view, reference, margin_mm), reference, factor))
    return tuple(int(v) for v in np.max(shapes, axis=0))


def lungs_outside_grid(
    report: CheckReport, reference_phase: str, factor: float, shape_zyx: tuple[int, int, int]
) -> list[tuple[str, str]]:
    """(subject, phase) of every lung mask whose box reaches outside the subject's grid of a hand-set
    `grid_shape` (centred on both fields of view): known while planning, before any job; the
    preprocess job then measures the share of the mask it crops (and stops above max_mask_crop)."""
    outside = []
    for check in report.subjects:
        grid = common_grid([check.grids[p] for p in PHASES], check.grids[reference_phase], factor, shape_zyx)
        outside += [(check.subject, p) for p in PHASES if not grid.contains(check.lung_corners[p]).all()]
    return outside
