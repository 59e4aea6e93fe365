"""The spatial transformer: conventions against SimpleITK, physical export, no folding."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from lungreg import metrics
from lungreg.geometry import Grid, image_from_array
from lungreg.network import transform
from lungreg.network.model import ModelSettings, RegistrationNet, affine_from_output


def rotation_direction(degrees: float, axis: str = "z") -> tuple[float, ...]:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    matrices = {"z": [[c, -s, 0], [s, c, 0], [0, 0, 1]], "x": [[1, 0, 0], [0, c, -s], [0, s, c]]}
    return tuple(np.array(matrices[axis], float).ravel())


FIXED = Grid(size=(20, 16, 12), spacing=(1.5, 2.0, 3.0), origin=(-10.0, 5.0, 30.0), direction=rotation_direction(15))
MOVING = Grid(
    size=(20, 16, 12), spacing=(1.4, 2.2, 2.8), origin=(-12.0, 3.0, 28.0), direction=rotation_direction(-8, "x")
)


def smooth_volume(grid: Grid, seed: int = 0) -> np.ndarray:
    """A smooth function of physical position, so that interpolation differences stay tiny."""
    rng = np.random.default_rng(seed)
    points = grid.voxel_centres()
    centre = points.reshape(-1, 3).mean(0)
    freq = rng.uniform(0.05, 0.12, size=3)
    return (
        np.sin(freq[0] * (points[..., 0] - centre[0])) * np.cos(freq[1] * (points[..., 1] - centre[1]))
        + 0.5 * np.sin(freq[2] * (points[..., 2] - centre[2]))
    ).astype(np.float32)


def affine_network(raw_output: np.ndarray) -> RegistrationNet:
    """An untrained network whose linear branch outputs `raw_output` (3 x 4) for any input."""
    net = RegistrationNet(ModelSettings(width=0.125))
    with torch.no_grad():
        net.linear.conv.bias.copy_(torch.tensor(raw_output, dtype=torch.float32).ravel())
    return net.eval()


def inside_moving(moving: Grid, points: np.ndarray) -> np.ndarray:
    index = moving.world_to_index(points)
    return np.all((index >= 0) & (index <= np.asarray(moving.size) - 1), axis=-1)


def test_untrained_network_is_the_identity():
    net = RegistrationNet(ModelSettings(width=0.125)).eval()
    moving = torch.rand(1, 1, 12, 16, 20)
    with torch.no_grad():
        out = net(moving, torch.rand(1, 1, 12, 16, 20))
    assert torch.allclose(out.warped, moving, atol=1e-5)
    assert torch.allclose(out.gradients, torch.ones_like(out.gradients))
    assert torch.allclose(out.theta, torch.eye(3, 4)[None])


@pytest.mark.parametrize("affine_map", ["exponential", "additive"])
def test_known_affine_matches_simpleitk_resampling_in_physical_space(affine_map):
    raw = np.array([[0.05, -0.08, 0.02, 0.10], [0.06, -0.04, 0.03, -0.15], [-0.02, 0.05, 0.07, 0.08]])
    net = affine_network(raw)
    net.linear.affine_map = affine_map
    moving_array = smooth_volume(MOVING)
    with torch.no_grad():
        out = net(torch.from_numpy(moving_array)[None, None], torch.zeros(1, 1, *FIXED.shape))
    physical = transform.affine_to_physical(out.theta[0].numpy(), FIXED, MOVING)
    reference = sitk.GetArrayFromImage(
        sitk.Resample(
            image_from_array(moving_array, MOVING),
            FIXED.reference_image(),
            physical,
            sitk.sitkLinear,
            0.0,
            sitk.sitkFloat32,
        )
    )
    mapped = np.stack([physical.TransformPoint(p.tolist()) for p in FIXED.voxel_centres().reshape(-1, 3)])
    inside = inside_moving(MOVING, mapped).reshape(FIXED.shape)
    assert inside.mean() > 0.5  # the comparison covers most of the volume
    np.testing.assert_allclose(out.warped[0, 0].numpy()[inside], reference[inside], atol=2e-4)


def test_exported_field_reproduces_the_network_warp_with_simpleitk():
    torch.manual_seed(3)
    net = affine_network(np.array([[0.03, 0.0, 0.01, 0.05], [0.0, -0.04, 0.0, 0.1], [0.02, 0.0, 0.05, -0.05]]))
    torch.nn.init.normal_(net.deformable.head.weight, std=0.02)  # a smooth, non-trivial deformation
    moving_array = smooth_volume(MOVING, seed=1)
    with torch.no_grad():
        out = net(torch.from_numpy(moving_array)[None, None], torch.from_numpy(smooth_volume(FIXED, 2))[None, None])
    assert (out.gradients - 1).abs().max() > 0.05
    field = transform.grid_to_displacement(out.grid[0].double().numpy(), FIXED, MOVING)
    resampled = sitk.GetArrayFromImage(
        sitk.Resample(
            image_from_array(moving_array, MOVING),
            FIXED.reference_image(),
            transform.displacement_transform(field, FIXED),
            sitk.sitkLinear,
            0.0,
            sitk.sitkFloat32,
        )
    )
    inside = inside_moving(MOVING, FIXED.voxel_centres() + field)
    np.testing.assert_allclose(out.warped[0, 0].numpy()[inside], resampled[inside], atol=2e-4)


def test_identity_displacement_is_zero_on_one_grid_and_maps_index_to_index_across_grids():
    assert np.abs(transform.identity_displacement(FIXED, FIXED)).max() < 1e-9
    field = transform.identity_displacement(FIXED, MOVING)
    index = np.array([3, 7, 5])
    moved = FIXED.index_to_world(index) + field[index[2], index[1], index[0]]
    np.testing.assert_allclose(MOVING.world_to_index(moved), index, atol=1e-9)


def random_network(seed: int, settings: ModelSettings) -> RegistrationNet:
    """Random weights everywhere, the last layers too (which normally start at zero)."""
    torch.manual_seed(seed)
    net = RegistrationNet(settings).double()
    torch.nn.init.normal_(net.deformable.head.weight, std=0.3)
    torch.nn.init.normal_(net.deformable.head.bias, std=0.3)
    if net.linear is not None:
        torch.nn.init.normal_(net.linear.conv.weight, std=0.1)
        torch.nn.init.normal_(net.linear.conv.bias, std=0.5)
    return net.eval()


def exact_jacobian_determinants(net: RegistrationNet, shape, seed: int) -> np.ndarray:
    """det of the continuous transform's Jacobian at every voxel centre (jittered off the kinks
    of trilinear interpolation), by central differences with a step far below a voxel."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = net(
            torch.rand(1, 1, *shape, generator=generator, dtype=torch.float64),
            torch.rand(1, 1, *shape, generator=generator, dtype=torch.float64),
        )
        voxel = 2.0 / (torch.tensor(shape[::-1], dtype=torch.float64) - 1)
        points = transform.identity_grid(shape, dtype=torch.float64).reshape(1, -1, 3)
        points = points + (torch.rand(points.shape, generator=generator, dtype=torch.float64) - 0.5) * 0.5 * voxel
        step = 1e-6
        columns = []
        for axis in range(3):
            offset = torch.zeros(3, dtype=torch.float64)
            offset[axis] = step
            plus = transform.map_normalised_points(out.gradients, out.theta, points + offset, net.settings.integration)
            minus = transform.map_normalised_points(out.gradients, out.theta, points - offset, net.settings.integration)
            columns.append((plus - minus) / (2 * step))
    return torch.linalg.det(torch.stack(columns, dim=-1))[0].numpy()


@pytest.mark.parametrize("seed", range(4))
def test_random_networks_never_fold(seed):
    """Property: for random weights and inputs the transform's Jacobian determinant is positive
    at every voxel (sequential integration, exponential affine: the defaults)."""
    net = random_network(seed, ModelSettings(width=0.125))
    determinants = exact_jacobian_determinants(net, (10, 12, 14), seed)
    assert np.all(determinants > 0), f"min det {determinants.min()}"


def test_the_papers_simultaneous_integration_can_fold():
    """Why the default integrates sequentially: read all at once, the same positive gradients
    give a grid whose Jacobian turns negative (shear accumulates along the cumulative sums)."""
    net = random_network(0, ModelSettings(width=0.125, affine=False, integration="paper"))
    assert (exact_jacobian_determinants(net, (10, 12, 14), 0) <= 0).mean() > 0.05


def test_the_additive_affine_can_mirror_while_the_exponential_one_cannot():
    raw = torch.tensor([[[-2.5, 0.0, 0.0, 0.0], [0.0, 0.3, 0.0, 0.0], [0.0, 0.0, -0.2, 0.0]]])
    assert torch.det(affine_from_output(raw, "additive")[0, :, :3]) < 0
    assert torch.det(affine_from_output(raw, "exponential")[0, :, :3]) > 0


def test_grid_lines_are_monotonic_along_their_own_axis():
    net = random_network(1, ModelSettings(width=0.125, affine=False))
    with torch.no_grad():
        gradients = net(
            torch.rand(1, 1, 8, 10, 12, dtype=torch.float64), torch.rand(1, 1, 8, 10, 12, dtype=torch.float64)
        ).gradients
    grid = transform.identity_grid((8, 10, 12), dtype=torch.float64) + transform.axial_displacements(gradients).permute(
        0, 2, 3, 4, 1
    )
    assert (
        (grid[..., 0].diff(dim=3) > 0).all()
        and (grid[..., 1].diff(dim=2) > 0).all()
        and (grid[..., 2].diff(dim=1) > 0).all()
    )


def test_fd_jacobian_of_a_smooth_trained_like_field_is_positive_and_matches_sitk():
    """The evaluation's Jacobian (physical, finite differences) against SimpleITK's filter."""
    grid = Grid(size=(16, 14, 12), spacing=(1.5, 2.0, 3.0), origin=(0, 0, 0), direction=tuple(np.eye(3).ravel()))
    points = grid.voxel_centres()
    field = np.stack(
        [2 * np.sin(points[..., 1] / 9), 1.5 * np.cos(points[..., 0] / 7), np.sin(points[..., 2] / 11)], -1
    )
    ours = metrics.jacobian_determinant(field, grid)
    theirs = sitk.GetArrayFromImage(
        sitk.DisplacementFieldJacobianDeterminant(transform.displacement_image(field, grid), True)
    )
    np.testing.assert_allclose(ours[1:-1, 1:-1, 1:-1], theirs[1:-1, 1:-1, 1:-1], rtol=1e-6, atol=1e-6)
    assert ours.min() > 0
