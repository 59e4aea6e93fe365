"""The subjects manifest: reading, schema, file checks (one line per bad input), the cache."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from lungreg import manifest
from lungreg.geometry import Grid
from lungreg.io import InputError
from lungreg.manifest import check_subjects, read_manifest
from lungreg.preprocess import PreprocessSettings, preprocess_subject

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "config" / "schemas" / "subjects.schema.yaml"
COLUMNS = ["subject", "label", "inhale", "exhale", "inhale_mask", "exhale_mask", "inhale_landmarks", "exhale_landmarks"]

# Two phases on different grids; 4 landmark pairs, the last one outside the inhale field of view.
GRIDS = {
    "inhale": dict(size=(12, 10, 8), spacing=(2.0, 2.0, 3.0), origin=(0.0, 0.0, 0.0)),
    "exhale": dict(size=(14, 11, 9), spacing=(2.0, 2.0, 3.0), origin=(-3.0, 1.0, -2.0)),
}
POINTS = {
    "inhale": [[4.0, 4.0, 6.0], [10.0, 8.0, 9.0], [15.5, 12.0, 12.0], [40.0, 5.0, 5.0]],
    "exhale": [[4.5, 4.0, 5.0], [10.0, 9.0, 9.0], [15.0, 12.5, 12.0], [10.0, 5.0, 5.0]],
}


def write_volume(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return path


def write_points(points, path: Path) -> Path:
    path.write_text("x,y,z\n" + "".join(f"{x},{y},{z}\n" for x, y, z in points))
    return path


def make_subject(folder: Path, subject: str = "s01") -> dict[str, Path]:
    """Small valid files for one subject; returns the manifest row's paths."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for phase, geometry in GRIDS.items():
        shape = geometry["size"][::-1]
        rng = np.random.default_rng(len(phase))
        image = rng.uniform(-1000, 300, shape).astype(np.float32)
        mask = np.zeros(shape, np.uint8)
        mask[2:-2, 2:-2, 2:-2] = 1
        kw = dict(spacing=geometry["spacing"], origin=geometry["origin"])
        files[phase] = write_volume(image, folder / f"{subject}_{phase}.nii.gz", **kw)
        files[f"{phase}_mask"] = write_volume(mask, folder / f"{subject}_{phase}_mask.nii.gz", **kw)
        files[f"{phase}_landmarks"] = write_points(POINTS[phase], folder / f"{subject}_{phase}_landmarks.csv")
    return files


def write_manifest(path: Path, rows: list[dict]) -> Path:
    frame = pd.DataFrame(rows, columns=[c for c in COLUMNS if any(c in r for r in rows)])
    frame.to_csv(path, sep="\t", index=False)
    return path


def row_of(subject: str, files: dict[str, Path], label: str = "", relative_to: Path | None = None) -> dict:
    def cell(p: Path) -> str:
        return os.path.relpath(p, relative_to) if relative_to else str(p)

    return {"subject": subject, "label": label, **{k: cell(v) for k, v in files.items()}}


# ---------------------------------------------------------------------------- manifest


def test_read_manifest_resolves_relative_paths_and_keeps_empty_cells(tmp_path):
    files = make_subject(tmp_path / "data")
    rows = [
        row_of("s01", files, "ILD", relative_to=tmp_path / "meta"),
        {**row_of("s02", files, ""), "inhale_landmarks": "", "exhale_landmarks": ""},
    ]
    (tmp_path / "meta").mkdir()
    frame = read_manifest(write_manifest(tmp_path / "meta" / "subjects.tsv", rows))
    assert list(frame["subject"]) == ["s01", "s02"]
    assert list(frame["label"]) == ["ILD", ""]
    assert frame.loc[0, "inhale"] == str(files["inhale"]) and Path(frame.loc[0, "inhale"]).is_absolute()
    assert frame.loc[1, "exhale_landmarks"] == ""
    assert not frame.isna().any().any()


def test_read_manifest_adds_missing_optional_landmark_columns(tmp_path):
    files = make_subject(tmp_path)
    row = {k: v for k, v in row_of("s01", files).items() if "landmarks" not in k}
    frame = read_manifest(write_manifest(tmp_path / "subjects.tsv", [row]))
    assert list(frame["inhale_landmarks"]) == [""] and list(frame["exhale_landmarks"]) == [""]
    assert check_subjects(frame)["s01"].landmarks == 0


def test_schema_accepts_read_manifest_rows_and_rejects_bad_ones(tmp_path):
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    files = make_subject(tmp_path)
    frame = read_manifest(
        write_manifest(tmp_path / "subjects.tsv", [row_of("s01", files), row_of("s-2.b", files, "healthy")])
    )
    validate(frame, str(SCHEMA))
    for column, value in [("label", "copd"), ("subject", "bad/id"), ("subject", "_x"), ("inhale", "")]:
        bad = frame.copy()
        bad.loc[0, column] = value
        with pytest.raises(WorkflowError):
            validate(bad, str(SCHEMA))
    with pytest.raises(WorkflowError):
        validate(frame.drop(columns=["exhale"]), str(SCHEMA))
    validate(frame.drop(columns=["inhale_mask", "exhale_mask"]), str(SCHEMA))  # CT: masks segmented


def test_missing_manifest_and_missing_column(tmp_path):
    with pytest.raises(InputError, match="manifest not found"):
        read_manifest(tmp_path / "nope.tsv")
    files = make_subject(tmp_path)
    row = {k: v for k, v in row_of("s01", files).items() if k != "exhale"}
    with pytest.raises(InputError, match="missing required column.*exhale"):
        read_manifest(write_manifest(tmp_path / "subjects.tsv", [row]))


def test_duplicate_subject_ids(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    files = make_subject(tmp_path)
    path = write_manifest(tmp_path / "subjects.tsv", [row_of("s01", files), row_of("p7", files), row_of("p7", files)])
    with pytest.raises(InputError) as error:
        read_manifest(path)
    message = str(error.value)
    assert "subject p7" in message and str(path) in message and "duplicate subject id 'p7'" in message
    assert "\n" not in message and not any(out.iterdir())


def test_unknown_label(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    files = make_subject(tmp_path)
    path = write_manifest(tmp_path / "subjects.tsv", [row_of("s01", files, "healthy"), row_of("s02", files, "COPD")])
    with pytest.raises(InputError) as error:
        read_manifest(path)
    message = str(error.value)
    assert "subject s02" in message and str(path) in message and "unknown label 'COPD'" in message
    assert "\n" not in message and not any(out.iterdir())


def test_unsafe_subject_id(tmp_path):
    files = make_subject(tmp_path)
    with pytest.raises(InputError, match="must match"):
        read_manifest(write_manifest(tmp_path / "subjects.tsv", [row_of("a b", files)]))


# ------------------------------------------------------------------------- file checks


def test_check_subjects_counts_landmarks_in_view(tmp_path):
    files = make_subject(tmp_path)
    frame = read_manifest(write_manifest(tmp_path / "subjects.tsv", [row_of("s01", files, "healthy")]))
    report = check_subjects(frame)
    assert report["s01"] == manifest.SubjectCheck("s01", "healthy", 4, 3, 1)
    assert report.to_frame().to_dict("records") == [
        {"subject": "s01", "label": "healthy", "landmarks": 4, "in_view": 3, "excluded": 1}
    ]
    assert "3 of 4 landmark pairs in view" in report.lines()[0]


def _replace_image(array_fn):
    def change(files):
        image = sitk.ReadImage(str(files["target"]))
        array = array_fn(sitk.GetArrayFromImage(image))
        new = sitk.GetImageFromArray(array)
        new.CopyInformation(image)
        sitk.WriteImage(new, str(files["target"]))

    return change


def _set(index, value, dtype=None):
    def fn(array):
        array = array.astype(dtype) if dtype else array
        array[index] = value
        return array

    return fn


def _write_2d(files):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((10, 12), np.float32)), str(files["target"]))


def _other_grid(files):
    image = sitk.ReadImage(str(files["target"]))
    image.SetOrigin((0.0, 0.0, 6.0))
    sitk.WriteImage(image, str(files["target"]))


BAD_INPUTS = {
    # name: (file key, how to spoil it, expected problem text)
    "missing_file": ("exhale_mask", lambda f: f["target"].unlink(), "file not found"),
    "unreadable_image": (
        "inhale",
        lambda f: f["target"].write_bytes(b"\x1f\x8b garbage, not an image" * 20),
        "unreadable image",
    ),
    "not_3d": ("exhale", _write_2d, "not a 3D image (2D"),
    "mask_not_binary": ("inhale_mask", _replace_image(_set((4, 5, 6), 2)), "mask not binary"),
    "mask_empty": ("exhale_mask", _replace_image(lambda a: np.zeros_like(a)), "mask is empty"),
    "mask_other_grid": ("inhale_mask", _other_grid, "mask grid differs from its image"),
    "nan_voxels": ("exhale", _replace_image(_set((1, 2, 3), np.nan)), "1 NaN voxel"),
    "infinite_voxels": ("inhale", _replace_image(_set((1, slice(2, 4), 3), -np.inf)), "2 infinite voxel"),
    "landmark_counts_differ": (
        "exhale_landmarks",
        lambda f: write_points(POINTS["exhale"][:3], f["target"]),
        "3 landmarks, but",
    ),
    "landmark_unparsable_row": (
        "inhale_landmarks",
        lambda f: f["target"].write_text("x,y,z\n1,2,3\n4,five,6\n7,8,9\n10,11,12\n"),
        "line 3: not numeric",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_subject_file_problem_and_writes_nothing(tmp_path, case):
    key, spoil, problem = BAD_INPUTS[case]
    files = make_subject(tmp_path / "data", "p03")
    spoil({**files, "target": files[key]})
    frame = read_manifest(write_manifest(tmp_path / "subjects.tsv", [row_of("p03", files, "ILD")]))
    out = tmp_path / "out"
    out.mkdir()

    with pytest.raises(InputError) as error:
        check_subjects(frame, cache_path=out / "input_check.json")
    settings = PreprocessSettings((-1000, 300), 2 / 3, (6, 8, 10), "nearest", "exhale")
    with pytest.raises(InputError) as error_preprocess:
        preprocess_subject("p03", {k: frame.loc[0, k] for k in files}, settings, out / "p03")

    for message in (str(error.value), str(error_preprocess.value)):
        assert "\n" not in message
        assert "subject p03" in message
        assert str(files[key]) in message
        assert problem in message
    assert not any(out.iterdir())  # neither the cache nor any output


def test_landmarks_in_one_phase_only(tmp_path):
    files = make_subject(tmp_path)
    row = {**row_of("s01", files), "exhale_landmarks": ""}
    frame = read_manifest(write_manifest(tmp_path / "subjects.tsv", [row]))
    with pytest.raises(InputError, match="inhale_landmarks given but exhale_landmarks empty"):
        check_subjects(frame)


# ------------------------------------------------------------------------------ cache


def test_cache_skips_unchanged_files_and_notices_changed_ones(tmp_path, monkeypatch):
    files = make_subject(tmp_path / "data")
    frame = read_manifest(write_manifest(tmp_path / "subjects.tsv", [row_of("s01", files)]))
    cache = tmp_path / "cache" / "input_check.json"
    reads = []

    def counting(function):
        def wrapper(path, subject=None):
            reads.append(Path(path).name)
            return function(path, subject)

        return wrapper

    monkeypatch.setattr(manifest, "read_image", counting(manifest.read_image))
    monkeypatch.setattr(manifest, "read_landmarks", counting(manifest.read_landmarks))

    first = check_subjects(frame, cache_path=cache)
    assert len(reads) == 6 and (first.files_read, first.files_cached) == (6, 0)
    assert cache.is_file() and len(json.loads(cache.read_text())["entries"]) == 6

    reads.clear()
    second = check_subjects(frame, cache_path=cache)
    assert reads == [] and (second.files_read, second.files_cached) == (0, 6)
    assert second == manifest.CheckReport(first.subjects, 0, 6)

    # a changed landmark file is read again, and its new content counts
    write_points(POINTS["inhale"][:3] + [[4.0, 4.0, 4.0]], files["inhale_landmarks"])
    stat = files["inhale_landmarks"].stat()
    os.utime(files["inhale_landmarks"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    reads.clear()
    third = check_subjects(frame, cache_path=cache)
    assert reads == [files["inhale_landmarks"].name]
    assert (third["s01"].in_view, third["s01"].excluded) == (4, 0)

    # a changed mask that is now bad fails, and leaves the cache as it was
    before = cache.read_bytes()
    _replace_image(_set((3, 3, 3), 7))({"target": files["exhale_mask"]})
    with pytest.raises(InputError, match="mask not binary"):
        check_subjects(frame, cache_path=cache)
    assert cache.read_bytes() == before


def test_unreadable_cache_is_ignored(tmp_path, caplog):
    files = make_subject(tmp_path)
    frame = read_manifest(write_manifest(tmp_path / "subjects.tsv", [row_of("s01", files)]))
    cache = tmp_path / "cache.json"
    cache.write_text("{ not json")
    with caplog.at_level(logging.WARNING, logger="lungreg.manifest"):
        report = check_subjects(frame, cache_path=cache)
    assert report.files_read == 6 and "ignoring unreadable input-check cache" in caplog.text
    assert json.loads(cache.read_text())["version"] == manifest.CACHE_VERSION


def test_grid_difference_names_what_differs():
    identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    grid = Grid((4, 5, 6), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), identity)
    assert manifest.grid_difference(grid, Grid((4, 5, 6), (1.0, 1.0, 2.0 + 1e-7), (0.0, 0.0, 1e-6), identity)) == ""
    assert manifest.grid_difference(grid, Grid((4, 5, 7), grid.spacing, grid.origin, identity)).startswith("size")
    assert manifest.grid_difference(grid, Grid(grid.size, (1.0, 1.2, 2.0), grid.origin, identity)).startswith("spacing")
    assert manifest.grid_difference(grid, Grid(grid.size, grid.spacing, (0.0, 3.0, 0.0), identity)).startswith("origin")


def test_nonfinite_voxels_found_in_memory_and_in_nifti_files(tmp_path):
    # SimpleITK's NIfTI reader turns NaN and +inf into 0: the check reads the file itself
    array = np.zeros((3, 4, 5), np.float32)
    array[1, 2, 3], array[2, 0, 0], array[0, 1, 1] = np.nan, np.inf, -np.inf
    image = sitk.GetImageFromArray(array)
    with pytest.raises(InputError, match=r"1 NaN voxel\(s\) and 2 infinite voxel\(s\)"):
        manifest.check_finite("s01", "in-memory.mha", image)
    path = write_volume(array, tmp_path / "x.nii.gz")
    assert not np.isnan(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).any()  # the reason for the check
    with pytest.raises(InputError, match=r"1 NaN voxel\(s\) and 2 infinite voxel\(s\)"):
        manifest.check_finite("s01", path, sitk.ReadImage(str(path)))
    manifest.check_finite("s01", path, sitk.ReadImage(str(write_volume(np.ones((3, 4, 5), np.int16), path))))
