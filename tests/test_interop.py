"""The workflow's transforms in other tools: SimpleITK and ANTsPy apply displacement.nii.gz and
affine.tfm exactly as the network did.

Files (results/registration/<method>/<protocol>/chunk-<k>/<pair>/):
  displacement.nii.gz  float32 3-vector NIfTI on the fixed grid, mm, ITK/LPS components; at a fixed
                       point x the offset to the moving point, T(x) = x + u(x) (ITK's resampling
                       direction, which ANTs shares: the file is an ANTs "warp" as is);
  affine.tfm           the network's linear part alone, an ITK AffineTransform, fixed mm -> moving mm;
  warped.nii.gz        the network's own warp of the preprocessed moving image (torch grid_sample).

Tolerances. Inside, every fixed voxel whose mapped point lies within the moving image's voxel
centres ([0, size - 1] on each axis), all three implementations interpolate the same eight voxels
trilinearly: they agree to float32 rounding (1.4e-6 measured, 1e-5 allowed, on [0, 1]
intensities). Near the border they legitimately differ: grid_sample fades to zero over the last
voxel outside, ITK extrapolates up to half a voxel outside and then gives the default value (max
0.011 measured there); the mean over all voxels stays below 1e-3 (2e-4 measured).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

ants = pytest.importorskip("ants", reason="ANTsPy (antspyx) is not installed")

from lungreg import torch_io  # noqa: E402
from lungreg.geometry import Grid  # noqa: E402
from lungreg.network.model import load_model  # noqa: E402
from lungreg.network.transform import affine_grid, displacement_image  # noqa: E402

pytestmark = pytest.mark.workflow  # the tiny study's files (the oblique-grid test needs none)

INTERIOR_MAX = 1e-5  # [0, 1] intensities, voxels mapped inside the moving voxel centres
# Outside the moving image's voxel-centre hull the conventions differ, by design, only within one
# voxel of it: the network interpolates against zeros there (grid_sample, zeros padding), ITK
# returns its default value 0. Farther out both give 0.
AFFINE_MM = 1e-3  # mm; affine.tfm against the network's normalised theta (float32)
ANTS_FLOAT_MM = 1e-4  # mm; ANTsPy reads .tfm parameters in float precision


# ------------------------------------------------------------------------------- helpers


def voxel_centres(image: sitk.Image) -> np.ndarray:
    """(z, y, x, 3) physical LPS points of every voxel centre."""
    grid = Grid.of(image)
    return grid.voxel_centres()


def continuous_index(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    """(..., 3) x, y, z continuous indices of physical points in `image`."""
    matrix = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    return (points - np.asarray(image.GetOrigin())) @ np.linalg.inv(matrix).T


def ants_array(image) -> np.ndarray:
    """An ANTsImage as a numpy (z, y, x) array like SimpleITK's."""
    return np.transpose(image.numpy(), (2, 1, 0))


def describe(name: str, difference: np.ndarray, inside: np.ndarray) -> str:
    return (
        f"{name}: interior max {difference[inside].max():.3g}, all voxels mean {difference.mean():.3g}, "
        f"border max {difference[~inside].max() if (~inside).any() else 0:.3g} "
        f"({inside.mean():.1%} interior)"
    )


@pytest.fixture(scope="module")
def pair(tiny_study) -> dict[str, Path]:
    """The first inhale -> exhale pair the tiny study's network registered, and its images."""
    folders = sorted((tiny_study / "results/registration/proposed/inhale_exhale").glob("chunk-*/*__*"))
    assert folders, "the tiny study wrote no pair folder"
    folder = folders[0]
    (moving_subject, moving_phase), (fixed_subject, fixed_phase) = (p.rsplit("_", 1) for p in folder.name.split("__"))
    pre = tiny_study / "results/preprocessed"
    return {
        "folder": folder,
        "field": folder / "displacement.nii.gz",
        "warped": folder / "warped.nii.gz",
        "warped_mask": folder / "warped_mask.nii.gz",
        "affine": folder / "affine.tfm",
        "fixed": pre / fixed_subject / f"{fixed_phase}_image.nii.gz",
        "moving": pre / moving_subject / f"{moving_phase}_image.nii.gz",
        "moving_mask": pre / moving_subject / f"{moving_phase}_mask.nii.gz",
        "model": tiny_study / "results/model/proposed/model.pt",
    }


@pytest.fixture(scope="module")
def interior(pair) -> np.ndarray:
    """Fixed voxels whose mapped point T(x) lies within the moving image's voxel centres."""
    field = sitk.ReadImage(str(pair["field"]))
    moving = sitk.ReadImage(str(pair["moving"]))
    mapped = voxel_centres(field) + sitk.GetArrayFromImage(field).astype(float)
    index = continuous_index(moving, mapped)
    inside = np.all((index >= -1e-6) & (index <= np.asarray(moving.GetSize()) - 1 + 1e-6), axis=-1)
    assert 0.5 < inside.mean() < 1.0  # a real test of both regions
    return inside


@pytest.fixture(scope="module")
def beyond_the_band(pair, interior) -> np.ndarray:
    """Fixed voxels whose mapped point lies inside the hull or more than one voxel outside it."""
    field = sitk.ReadImage(str(pair["field"]))
    moving = sitk.ReadImage(str(pair["moving"]))
    index = continuous_index(moving, voxel_centres(field) + sitk.GetArrayFromImage(field).astype(float))
    far = np.any((index < -1 - 1e-6) | (index > np.asarray(moving.GetSize()) + 1e-6), axis=-1)
    return interior | far


# ------------------------------------------------------------------------ the field


def test_field_file_is_an_itk_displacement_field_on_the_fixed_grid(pair):
    field = sitk.ReadImage(str(pair["field"]))
    fixed = sitk.ReadImage(str(pair["fixed"]))
    assert field.GetPixelID() == sitk.sitkVectorFloat32 and field.GetNumberOfComponentsPerPixel() == 3
    assert Grid.of(field) == Grid.of(fixed)
    import nibabel

    header = nibabel.load(str(pair["field"])).header
    assert header.get_intent()[0] == "vector"  # 5-D, intent vector: how ITK and ANTs write warps
    assert nibabel.load(str(pair["field"])).shape[3:] == (1, 3)


def test_simpleitk_applies_the_field_as_the_network_did(pair, interior, beyond_the_band):
    fixed, moving = sitk.ReadImage(str(pair["fixed"])), sitk.ReadImage(str(pair["moving"]))
    transform = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(pair["field"])), sitk.sitkVectorFloat64))
    resampled = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0))
    network = sitk.GetArrayFromImage(sitk.ReadImage(str(pair["warped"])))
    difference = np.abs(resampled - network)
    print("\n" + describe("SimpleITK vs network warp", difference, interior))
    assert difference[interior].max() < INTERIOR_MAX
    assert difference[beyond_the_band].max() < INTERIOR_MAX  # differences only in the one-voxel band


def test_antspy_applies_the_field_as_the_network_did(pair, interior, beyond_the_band):
    fixed, moving = ants.image_read(str(pair["fixed"])), ants.image_read(str(pair["moving"]))
    resampled = ants_array(ants.apply_transforms(fixed=fixed, moving=moving, transformlist=[str(pair["field"])]))
    network = sitk.GetArrayFromImage(sitk.ReadImage(str(pair["warped"])))
    difference = np.abs(resampled - network)
    print("\n" + describe("ANTsPy vs network warp", difference, interior))
    assert difference[interior].max() < INTERIOR_MAX
    assert difference[beyond_the_band].max() < INTERIOR_MAX  # differences only in the one-voxel band
    # and ANTs agrees with SimpleITK everywhere (both are ITK underneath: same border handling)
    transform = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(pair["field"])), sitk.sitkVectorFloat64))
    itk = sitk.GetArrayFromImage(
        sitk.Resample(
            sitk.ReadImage(str(pair["moving"])), sitk.ReadImage(str(pair["fixed"])), transform, sitk.sitkLinear, 0.0
        )
    )
    assert np.abs(resampled - itk).max() < 1e-6


def test_antspy_carries_the_mask_like_warped_mask(pair):
    mask = ants.apply_transforms(
        fixed=ants.image_read(str(pair["fixed"])),
        moving=ants.image_read(str(pair["moving_mask"])),
        transformlist=[str(pair["field"])],
        interpolator="linear",
    )
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(pair["warped_mask"]))) > 0
    assert np.array_equal(ants_array(mask) > 0.5, written)


def test_both_tools_read_the_field_in_lps_on_an_oblique_grid(tmp_path):
    """A constant field u on a rotated, shifted grid: both tools read the image x + u, for a
    linear intensity (which trilinear interpolation reproduces exactly). Catches any sign or
    axis flip (NIfTI RAS vs ITK LPS) and any neglect of the direction cosines."""
    rotation = sitk.Euler3DTransform((0, 0, 0), 0.3, -0.2, 0.35).GetMatrix()
    image = sitk.Image([20, 18, 14], sitk.sitkFloat32)
    image.SetSpacing((2.0, 2.5, 3.0))
    image.SetOrigin((-20.0, 10.0, 5.0))
    image.SetDirection(rotation)
    points = voxel_centres(image)
    slope, offset = np.array([0.02, -0.03, 0.05]), 1.5
    moving = sitk.GetImageFromArray((points @ slope + offset).astype(np.float32))
    moving.CopyInformation(image)
    u = np.array([4.0, -3.0, 2.5])
    field = sitk.Cast(displacement_image(np.broadcast_to(u, points.shape), Grid.of(image)), sitk.sitkVectorFloat32)
    paths = {name: tmp_path / f"{name}.nii.gz" for name in ("fixed", "moving", "field")}
    for name, written in (("fixed", image), ("moving", moving), ("field", field)):
        sitk.WriteImage(written, str(paths[name]))
    expected = (points + u) @ slope + offset
    inside = np.all(
        (continuous_index(image, points + u) >= 0)
        & (continuous_index(image, points + u) <= np.asarray(image.GetSize()) - 1),
        axis=-1,
    )
    assert inside.mean() > 0.5

    transform = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(paths["field"])), sitk.sitkVectorFloat64))
    by_sitk = sitk.GetArrayFromImage(
        sitk.Resample(
            sitk.ReadImage(str(paths["moving"])), sitk.ReadImage(str(paths["fixed"])), transform, sitk.sitkLinear, 0.0
        )
    )
    by_ants = ants_array(
        ants.apply_transforms(
            fixed=ants.image_read(str(paths["fixed"])),
            moving=ants.image_read(str(paths["moving"])),
            transformlist=[str(paths["field"])],
        )
    )
    np.testing.assert_allclose(by_sitk[inside], expected[inside], atol=1e-5)
    np.testing.assert_allclose(by_ants[inside], expected[inside], atol=1e-5)


# ------------------------------------------------------------------------ the affine


def test_affine_tfm_reads_the_same_in_simpleitk_and_antspy(pair):
    by_sitk = sitk.ReadTransform(str(pair["affine"]))
    by_ants = ants.read_transform(str(pair["affine"]))
    assert by_sitk.GetName() == "AffineTransform" and by_ants.transform_type == "AffineTransform"
    fixed = sitk.ReadImage(str(pair["fixed"]))
    points = voxel_centres(fixed).reshape(-1, 3)[::37]
    mapped_sitk = np.array([by_sitk.TransformPoint(p.tolist()) for p in points])
    mapped_ants = np.array([ants.apply_ants_transform_to_point(by_ants, p.tolist()) for p in points])
    difference = np.abs(mapped_sitk - mapped_ants).max()
    print(f"\naffine.tfm, SimpleITK vs ANTsPy on {len(points)} points: max {difference:.3g} mm")
    assert np.abs(mapped_sitk - mapped_ants).max() < ANTS_FLOAT_MM
    # the same resampled image from either tool
    resampled_sitk = sitk.GetArrayFromImage(
        sitk.Resample(sitk.ReadImage(str(pair["moving"])), fixed, by_sitk, sitk.sitkLinear, 0.0)
    )
    resampled_ants = ants_array(
        ants.apply_transforms(
            fixed=ants.image_read(str(pair["fixed"])),
            moving=ants.image_read(str(pair["moving"])),
            transformlist=[str(pair["affine"])],
        )
    )
    assert np.abs(resampled_sitk - resampled_ants).max() < 1e-4


def test_affine_tfm_is_the_networks_linear_part(pair):
    """affine.tfm maps each fixed voxel centre where the network's affine grid points: theta in
    normalised coordinates (align_corners=True: -1 and +1 are the first and last voxel centres),
    recomputed here from the model, converted to moving mm by hand."""
    fixed, moving = sitk.ReadImage(str(pair["fixed"])), sitk.ReadImage(str(pair["moving"]))
    model = load_model(torch_io.load_torch(pair["model"]), "cpu").eval()
    tensors = [torch.from_numpy(sitk.GetArrayFromImage(i).astype(np.float32))[None, None] for i in (moving, fixed)]
    with torch.no_grad():
        theta = model(*tensors).theta
    assert theta is not None
    normalised = affine_grid(theta.double(), tuple(sitk.GetArrayViewFromImage(fixed).shape))[0].numpy()
    index = (normalised + 1.0) / 2.0 * (np.asarray(moving.GetSize()) - 1.0)
    matrix = np.asarray(moving.GetDirection()).reshape(3, 3) * np.asarray(moving.GetSpacing())
    expected = index @ matrix.T + np.asarray(moving.GetOrigin())
    affine = sitk.ReadTransform(str(pair["affine"]))
    centres = voxel_centres(fixed).reshape(-1, 3)
    mapped = np.array([affine.TransformPoint(p.tolist()) for p in centres]).reshape(expected.shape)
    error = np.abs(mapped - expected).max()
    print(f"\naffine.tfm vs the network's theta: max {error:.3g} mm")
    assert error < AFFINE_MM
    assert not np.allclose(np.asarray(affine.GetMatrix()), np.eye(3).ravel())  # a trained, non-trivial affine


def test_readme_lines_apply_the_field(pair, interior, monkeypatch):
    """The two lines README.md gives ('Using the transforms outside the workflow'), verbatim."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Using the transforms outside the workflow", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    lines = {tool: [line for line in code.splitlines() if f"{tool}." in line] for tool in ("sitk", "ants")}
    assert all(len(found) == 1 for found in lines.values()), lines
    network = sitk.GetArrayFromImage(sitk.ReadImage(str(pair["warped"])))
    monkeypatch.chdir(pair["folder"])  # the lines name displacement.nii.gz relative to the pair folder
    images = {
        "sitk": (sitk.ReadImage(str(pair["fixed"])), sitk.ReadImage(str(pair["moving"]))),
        "ants": (ants.image_read(str(pair["fixed"])), ants.image_read(str(pair["moving"]))),
    }
    for tool, (fixed, moving) in images.items():
        namespace = {"sitk": sitk, "ants": ants, "fixed": fixed, "moving": moving}
        exec(lines[tool][0], namespace)
        warped = namespace["warped"]
        array = sitk.GetArrayFromImage(warped) if tool == "sitk" else ants_array(warped)
        assert np.abs(array - network)[interior].max() < INTERIOR_MAX, tool
