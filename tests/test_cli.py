"""`lungreg register`: one pair outside the workflow, the workflow's own files and numbers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from lungreg.geometry import Grid

WARPED_MAX = 1e-4  # [0, 1] intensities: same network, same inputs; batch of 1 here, of 2 in the workflow
FIELD_MAX_MM = 1e-3  # measured ~5e-5 mm (float32 arithmetic in a different batch)
LANDMARK_MM = 1e-3


def lungreg(*arguments: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The installed console script (pip install -e .), else the module."""
    script = Path(sys.executable).parent / "lungreg"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "lungreg.cli"]
    return subprocess.run([*command, *map(str, arguments)], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("lungreg register: error: "), lines[0]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def same_grid(a: Grid, b: Grid) -> bool:
    return a.size == b.size and all(
        np.allclose(getattr(a, k), getattr(b, k), atol=1e-5) for k in ("spacing", "origin", "direction")
    )


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# ------------------------------------------------------------------------------- help


def test_help_explains_the_outputs_and_how_to_apply_them():
    result = lungreg("register", "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for needed in (
        "displacement.nii.gz",
        "affine.tfm",
        "warped.nii.gz",
        "warped_original.nii.gz",
        "warped_mask.nii.gz",
        "fixed_landmarks_in_moving.csv",
        "T(x) = x + u(x)",
        "LPS",
        "mm",
        "fixed grid",
        "sitk.DisplacementFieldTransform",
        "sitk.Resample",
        "ants.apply_transforms",
        "antsApplyTransforms",
        "--model",
        "--out",
        "--moving-mask",
        "--fixed-landmarks",
        "--preprocessed",
    ):
        assert needed in text, needed
    top = lungreg("--help")
    assert top.returncode == 0 and "register" in top.stdout


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def images(tmp_path) -> dict[str, Path]:
    """Small valid and invalid images (no model needed: images are checked before the model)."""
    volume = sitk.GetImageFromArray(np.random.default_rng(0).uniform(0, 1000, (8, 10, 12)).astype(np.float32))
    volume.SetSpacing((3.0, 3.0, 4.0))
    flat = sitk.GetImageFromArray(np.zeros((10, 12), np.float32))
    vector = sitk.GetImageFromArray(np.zeros((8, 10, 12, 3), np.float32), isVector=True)
    nan = sitk.GetImageFromArray(np.full((8, 10, 12), np.nan, np.float32))
    paths = {}
    for name, image in (("volume", volume), ("flat", flat), ("vector", vector), ("nan", nan)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(image, str(paths[name]))
    paths["text"] = tmp_path / "model.pt"
    paths["text"].write_text("not a model\n")
    paths["missing"] = tmp_path / "missing.nii.gz"
    return paths


def in_process(capsys, *arguments) -> subprocess.CompletedProcess:
    """main() in this process (fast); an exception escaping it fails the test, like a traceback."""
    from lungreg.cli import main

    code = main([str(a) for a in arguments])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(arguments, code, captured.out, captured.err)


@pytest.mark.parametrize(
    "fixed, moving, model, expected",
    [
        ("missing", "volume", "text", ("missing.nii.gz", "file not found")),
        ("volume", "missing", "text", ("missing.nii.gz", "file not found")),
        ("flat", "volume", "text", ("flat.nii.gz", "not a 3D image (2D, 12 x 10 voxels)")),
        ("volume", "vector", "text", ("vector.nii.gz", "3 components per voxel")),
        ("volume", "nan", "text", ("nan.nii.gz", "NaN")),
        ("volume", "volume", "missing", ("missing.nii.gz", "model file not found")),
        ("volume", "volume", "text", ("model.pt", "not a readable lungreg model")),
    ],
)
def test_bad_input_gives_one_line_and_exit_code_1(images, tmp_path, capsys, fixed, moving, model, expected):
    result = in_process(
        capsys, "register", "--model", images[model], images[fixed], images[moving], "--out", tmp_path / "out"
    )
    assert_one_line_error(result, *expected)
    assert not (tmp_path / "out").exists()  # nothing written


def test_bad_mask_landmarks_and_device_give_one_line(images, tmp_path, capsys):
    common = ["register", "--model", images["text"], images["volume"], images["volume"], "--out", tmp_path / "out"]
    assert_one_line_error(in_process(capsys, *common, "--moving-mask", images["volume"]), "mask not binary")
    assert_one_line_error(in_process(capsys, *common, "--device", "gpu"), "--device gpu")
    assert_one_line_error(in_process(capsys, *common, "--fixed-landmarks", images["missing"]), "file not found")


def test_the_installed_command_reports_bad_input_without_traceback(images, tmp_path):
    result = lungreg("register", "--model", images["text"], images["flat"], images["volume"], "--out", tmp_path / "out")
    assert_one_line_error(result, "flat.nii.gz", "not a 3D image")


# ------------------------------------------------------------------- the tiny study's model


@pytest.fixture(scope="module")
def study_pair(tiny_study) -> dict:
    """The first inhale -> exhale pair the tiny study's network registered."""
    folder = sorted((tiny_study / "results/registration/proposed/inhale_exhale").glob("chunk-*/*__*"))[0]
    (moving_subject, moving_phase), (fixed_subject, fixed_phase) = (p.rsplit("_", 1) for p in folder.name.split("__"))
    assert moving_subject == fixed_subject
    raw = tiny_study / "results/cohort/synthetic" / fixed_subject
    pre = tiny_study / "results/preprocessed" / fixed_subject
    return {
        "folder": folder,
        "chunk_landmarks": folder.parent.with_name(f"{folder.parent.name}_landmarks.tsv"),
        "model": tiny_study / "results/model/proposed/model.pt",
        "raw": raw,
        "pre": pre,
        "fixed_phase": fixed_phase,
        "moving_phase": moving_phase,
    }


@pytest.mark.workflow
def test_register_raw_images_reproduces_the_workflow(study_pair, tmp_path):
    """Raw synthetic images in: the CLI preprocesses them as the workflow did, and writes the
    workflow's files, on the preprocessed fixed grid, with the workflow's numbers."""
    raw, pre, f, m = study_pair["raw"], study_pair["pre"], study_pair["fixed_phase"], study_pair["moving_phase"]
    out = tmp_path / "out"
    result = lungreg(
        "register",
        "--model",
        study_pair["model"],
        raw / f"{f}.nii.gz",
        raw / f"{m}.nii.gz",
        "--out",
        out,
        "--moving-mask",
        raw / f"{m}_mask.nii.gz",
        "--fixed-landmarks",
        raw / f"{f}_landmarks.csv",
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    names = [
        "displacement.nii.gz",
        "affine.tfm",
        "warped.nii.gz",
        "warped_original.nii.gz",
        "warped_mask.nii.gz",
        "fixed_landmarks_in_moving.csv",
    ]
    assert result.stdout.split() == [str(out / n) for n in names]

    fixed_grid = Grid.of(sitk.ReadImage(str(pre / f"{f}_image.nii.gz")))
    for name in ("displacement.nii.gz", "warped.nii.gz", "warped_mask.nii.gz"):
        written = sitk.ReadImage(str(out / name))
        assert same_grid(Grid.of(written), fixed_grid), name
        workflow = sitk.ReadImage(str(study_pair["folder"] / name))
        assert written.GetPixelID() == workflow.GetPixelID(), name
    warped_difference = np.abs(read(out / "warped.nii.gz") - read(study_pair["folder"] / "warped.nii.gz"))
    field_difference = np.abs(read(out / "displacement.nii.gz") - read(study_pair["folder"] / "displacement.nii.gz"))
    print(f"\nCLI vs workflow: warped max {warped_difference.max():.3g}, field max {field_difference.max():.3g} mm")
    assert warped_difference.max() < WARPED_MAX
    assert field_difference.max() < FIELD_MAX_MM
    assert np.mean(read(out / "warped_mask.nii.gz") != read(study_pair["folder"] / "warped_mask.nii.gz")) < 1e-3
    ours, theirs = (sitk.ReadTransform(str(p / "affine.tfm")) for p in (out, study_pair["folder"]))
    np.testing.assert_allclose(ours.GetParameters(), theirs.GetParameters(), atol=1e-4)

    # the original moving image on the original fixed grid, original intensities
    original = sitk.ReadImage(str(out / "warped_original.nii.gz"))
    assert same_grid(Grid.of(original), Grid.of(sitk.ReadImage(str(raw / f"{f}.nii.gz"))))
    assert read(out / "warped_original.nii.gz").max() > 10  # not the [0, 1] preprocessed scale

    # fixed landmarks carried into the moving image: the workflow's landmark errors again
    mapped = pd.read_csv(out / "fixed_landmarks_in_moving.csv")
    moving_points = pd.read_csv(raw / f"{m}_landmarks.csv")
    errors = pd.read_csv(study_pair["chunk_landmarks"], sep="\t")
    errors = errors[(errors["pair"] == study_pair["folder"].name) & errors["in_view"]].set_index("landmark")
    assert len(errors) > 0 and mapped["in_grid"].all()
    residual = (mapped[["x", "y", "z"]] - moving_points[["x", "y", "z"]]).abs().set_axis(["dx", "dy", "dz"], axis=1)
    residual.index = mapped["landmark"]
    np.testing.assert_allclose(
        residual.loc[errors.index].to_numpy(), errors[["dx", "dy", "dz"]].to_numpy(), atol=LANDMARK_MM
    )


@pytest.mark.workflow
def test_register_preprocessed_images_reproduces_the_workflow(study_pair, tmp_path):
    pre, f, m = study_pair["pre"], study_pair["fixed_phase"], study_pair["moving_phase"]
    out = tmp_path / "out"
    result = lungreg(
        "register",
        "--model",
        study_pair["model"],
        pre / f"{f}_image.nii.gz",
        pre / f"{m}_image.nii.gz",
        "--out",
        out,
        "--moving-mask",
        pre / f"{m}_mask.nii.gz",
        "--preprocessed",
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "affine.tfm",
        "displacement.nii.gz",
        "warped.nii.gz",
        "warped_mask.nii.gz",
    ]
    assert np.abs(read(out / "warped.nii.gz") - read(study_pair["folder"] / "warped.nii.gz")).max() < WARPED_MAX
    assert np.array_equal(read(out / "warped_mask.nii.gz"), read(study_pair["folder"] / "warped_mask.nii.gz"))


@pytest.mark.workflow
def test_preprocessed_flag_refuses_raw_images(study_pair, tmp_path):
    raw, f, m = study_pair["raw"], study_pair["fixed_phase"], study_pair["moving_phase"]
    result = lungreg(
        "register",
        "--model",
        study_pair["model"],
        raw / f"{f}.nii.gz",
        raw / f"{m}.nii.gz",
        "--out",
        tmp_path / "out",
        "--preprocessed",
    )
    assert_one_line_error(result, "is not the model's", "drop --preprocessed")
