"""Training: gradients, learning a known shift, checkpoint resume, NaN handling."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from lungreg import io, torch_io
from lungreg.geometry import Grid, image_from_array
from lungreg.network import losses, transform
from lungreg.network.losses import LossSettings
from lungreg.network.model import ModelSettings, RegistrationNet
from lungreg.network.refine import RefineSettings, RefineStage
from lungreg.network.train import PairFiles, TrainSettings, train

SHAPE = (12, 20, 20)  # z, y, x
GRID = Grid(size=SHAPE[::-1], spacing=(2.0, 2.0, 3.0), origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel()))
SHIFT_VOXELS = 2.0  # along x


def blobs(shift_x: float = 0.0) -> np.ndarray:
    """A few smooth blobs, optionally moved along x (voxel units)."""
    z, y, x = np.meshgrid(*(np.arange(n, dtype=float) for n in SHAPE), indexing="ij")
    image = np.zeros(SHAPE)
    for cz, cy, cx, r in [(6, 8, 7, 3.0), (5, 13, 12, 2.5), (7, 6, 13, 2.0), (4, 12, 6, 2.0)]:
        image += np.exp(-(((z - cz) / r) ** 2 + ((y - cy) / r) ** 2 + ((x - cx - shift_x) / r) ** 2))
    return np.clip(image, 0, 1).astype(np.float32)


@pytest.fixture
def shifted_pair(tmp_path) -> PairFiles:
    """Moving = fixed content moved by SHIFT_VOXELS along x; masks are the bright regions."""
    paths = {}
    for name, array in {"moving": blobs(SHIFT_VOXELS), "fixed": blobs()}.items():
        paths[name] = tmp_path / f"{name}.nii.gz"
        paths[f"{name}_mask"] = tmp_path / f"{name}_mask.nii.gz"
        io.write_image(image_from_array(array, GRID), paths[name])
        io.write_image(image_from_array((array > 0.3).astype(np.uint8), GRID), paths[f"{name}_mask"])
    return PairFiles(str(paths["moving"]), str(paths["fixed"]), str(paths["moving_mask"]), str(paths["fixed_mask"]))


SMALL = ModelSettings(width=0.125)
PAPER_LOSS = LossSettings(beta=1e-6, mask_weighted=False)  # the paper's loss (no mask needed)
FAST = TrainSettings(epochs=3, batch_size=1, learning_rate=1e-3, seed=7)


def test_gradients_reach_both_branches_and_the_encoder():
    torch.manual_seed(0)
    net = RegistrationNet(SMALL)
    moving, fixed = torch.from_numpy(blobs(SHIFT_VOXELS))[None, None], torch.from_numpy(blobs())[None, None]
    out = net(moving, fixed)
    losses.registration_loss(PAPER_LOSS, fixed, out.warped, out.theta, out.gradients)["loss"].backward()
    assert net.deformable.head.weight.grad.abs().sum() > 0
    assert net.linear.conv.weight.grad.abs().sum() > 0
    # The last layers start at zero, so deeper layers see gradients from the second step on.
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    net.zero_grad()
    out = net(moving, fixed)
    losses.registration_loss(PAPER_LOSS, fixed, out.warped, out.theta, out.gradients)["loss"].backward()
    assert net.encoder.layers[0][0].weight.grad.abs().sum() > 0
    assert net.deformable.convs[0][0].weight.grad.abs().sum() > 0


def test_short_training_recovers_a_known_shift(shifted_pair):
    checkpoint, history = train(
        [shifted_pair] * 4,
        [shifted_pair],
        SMALL,
        PAPER_LOSS,
        TrainSettings(epochs=25, batch_size=2, learning_rate=3e-3, seed=1),
    )
    assert history["train_loss"].iloc[-1] < 0.5 * history["train_loss"].iloc[0]
    net = RegistrationNet(SMALL)
    net.load_state_dict(checkpoint["state_dict"])
    with torch.no_grad():
        out = net.eval()(torch.from_numpy(blobs(SHIFT_VOXELS))[None, None], torch.from_numpy(blobs())[None, None])
    displacement_x = (out.grid[0, ..., 0] + 1) / 2 * (SHAPE[2] - 1) - torch.arange(SHAPE[2])  # voxels
    inside = torch.from_numpy(blobs() > 0.3)
    error_registered = (displacement_x[inside] - SHIFT_VOXELS).abs().mean()
    assert error_registered < 0.5 * SHIFT_VOXELS, (
        f"mean x error {error_registered:.2f} voxels (identity: {SHIFT_VOXELS})"
    )
    assert history["val_dice"].iloc[-1] > history["val_dice_unregistered"].iloc[-1]


def test_resumed_training_ends_with_the_weights_of_an_uninterrupted_run(shifted_pair, tmp_path):
    pairs = [shifted_pair] * 3
    whole, whole_history = train(pairs, [shifted_pair], SMALL, PAPER_LOSS, FAST, tmp_path / "a.pt")
    train(pairs, [shifted_pair], SMALL, PAPER_LOSS, TrainSettings(**{**FAST.__dict__, "epochs": 1}), tmp_path / "b.pt")
    resumed, resumed_history = train(pairs, [shifted_pair], SMALL, PAPER_LOSS, FAST, tmp_path / "b.pt")
    assert list(resumed_history["epoch"]) == [1, 2, 3]
    for name, tensor in whole["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name
    columns = [c for c in whole_history.columns if c != "seconds"]
    assert whole_history[columns].equals(resumed_history[columns])


def test_a_checkpoint_from_other_settings_is_not_resumed(shifted_pair, tmp_path):
    train([shifted_pair], [shifted_pair], SMALL, PAPER_LOSS, TrainSettings(epochs=1, seed=1), tmp_path / "c.pt")
    _, history = train(
        [shifted_pair], [shifted_pair], SMALL, PAPER_LOSS, TrainSettings(epochs=1, seed=2), tmp_path / "c.pt"
    )
    assert list(history["epoch"]) == [1]  # started over: the seed differs


def test_garbage_checkpoint_names_the_file_and_the_remedy(shifted_pair, tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(io.CorruptFileError, match="broken.pt.*delete it"):
        train([shifted_pair], [shifted_pair], SMALL, PAPER_LOSS, FAST, path)


def test_nan_loss_stops_with_the_epoch_named(shifted_pair, tmp_path):
    broken = tmp_path / "nan.mha"  # NIfTI reading in SimpleITK turns NaN into 0
    array = blobs()
    array[3, 3, 3] = np.nan
    sitk.WriteImage(image_from_array(array, GRID), str(broken))
    pair = PairFiles(shifted_pair.moving_image, str(broken), shifted_pair.moving_mask, shifted_pair.fixed_mask)
    with pytest.raises(FloatingPointError, match="epoch 1, batch 1"):
        train([pair], [pair], SMALL, PAPER_LOSS, FAST)


def test_the_distillation_term_is_the_weighted_squared_distance_to_the_target_in_mm():
    """0 at the target; a target 3 mm away along x everywhere in the (dilated) lung costs weight x 9."""
    torch.manual_seed(0)
    net = RegistrationNet(SMALL)
    moving, fixed = torch.from_numpy(blobs(SHIFT_VOXELS))[None, None], torch.from_numpy(blobs())[None, None]
    mask = torch.from_numpy(blobs() > 0.3).float()[None, None]
    spacing = torch.tensor([GRID.spacing])
    with torch.no_grad():
        out = net(moving, fixed)
    points = transform.identity_grid(SHAPE)
    displacement = transform.grid_displacement_mm(out.grid, points, SHAPE, spacing)
    settings = LossSettings(beta=1e-6, mask_weighted=False, distillation=0.5)

    def term(target):
        loss = losses.registration_loss(
            settings, fixed, out.warped, out.theta, out.gradients, mask, out.grid, spacing, target
        )
        return float(loss["distillation"])

    assert term(displacement) == 0.0
    assert term(displacement + torch.tensor([3.0, 0.0, 0.0]).view(1, 3, 1, 1, 1)) == pytest.approx(0.5 * 9.0)
    no_target = losses.registration_loss(settings, fixed, out.warped, out.theta, out.gradients, mask, out.grid, spacing)
    assert float(no_target["distillation"]) == 0.0  # validation pairs: the unsupervised loss alone


def test_distillation_trains_towards_the_refinement_from_the_identity(shifted_pair):
    """The targets are the pairs' refinement from the identity; training lowers the distance to
    them, and distillation without refinement steps is refused before any work."""
    settings = LossSettings(beta=1e-6, mask_weighted=True, distillation=1e-2)
    short = RefineSettings(stages=(RefineStage(steps=10, control_stride=2, learning_rate=0.1),))
    with pytest.raises(ValueError, match="distillation needs refinement steps"):
        train([shifted_pair], [shifted_pair], SMALL, settings, FAST)
    checkpoint, history = train(
        [shifted_pair] * 2, [shifted_pair], SMALL, settings,
        TrainSettings(epochs=6, batch_size=2, seed=1, distillation_steps=None), refine_settings=short,
    )  # fmt: skip
    assert history["train_distillation"].iloc[-1] < 0.7 * history["train_distillation"].iloc[0]
    # The distilled network keeps the construction: positive gradients, det A > 0, on any input.
    net = RegistrationNet(SMALL)
    net.load_state_dict(checkpoint["state_dict"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = net.eval()(*torch.rand((2, 3, 1, *SHAPE), generator=generator))
    assert (out.gradients > 0).all() and (torch.linalg.det(out.theta[:, :, :3]) > 0).all()


def test_the_cosine_schedule_decays_within_each_phase_and_restarts_at_full_resolution():
    settings = TrainSettings(epochs=10, coarse_epochs=4, learning_rate=1e-3, schedule="cosine")
    rates = [settings.cosine_rate(epoch) for epoch in range(1, 11)]
    assert rates[0] == rates[4] == pytest.approx(1e-3)  # each phase starts at the full rate
    assert all(a > b for a, b in zip(rates[:3], rates[1:4])) and all(a > b for a, b in zip(rates[4:9], rates[5:]))
    assert 0 < rates[-1] < 0.1e-3 and 0 < rates[3] < 0.2e-3  # and ends small, never at 0
    with pytest.raises(ValueError, match="unknown schedule"):
        TrainSettings(epochs=1, schedule="step")


def test_local_ncc_equals_the_direct_box_mean_formula():
    """The separable box filter gives exactly the 3-D clipped-window means."""
    generator = torch.Generator().manual_seed(0)
    fixed = torch.rand(2, 1, 9, 14, 11, generator=generator, dtype=torch.float64)
    warped = torch.rand(2, 1, 9, 14, 11, generator=generator, dtype=torch.float64)

    def box(x):
        return torch.nn.functional.avg_pool3d(x, 5, stride=1, padding=2, count_include_pad=False)

    mean_f, mean_w = box(fixed), box(warped)
    cov = box(fixed * warped) - mean_f * mean_w
    var_f = (box(fixed * fixed) - mean_f**2).clamp_min(0)
    var_w = (box(warped * warped) - mean_w**2).clamp_min(0)
    expected = 1.0 - (cov * cov / (var_f * var_w + 1e-5)).mean()
    assert torch.allclose(losses.local_ncc(fixed, warped, window=5), expected, rtol=0, atol=1e-12)
    assert losses.local_ncc(fixed, fixed, window=5) < 0.01  # identical images: correlation 1 (less eps)
    thin = fixed[:, :, :3]  # an axis shorter than the window: every window clipped on it
    assert torch.isfinite(losses.local_ncc(thin, warped[:, :, :3], window=9))


def _field(function, shape=(6, 7, 8), spacing_xyz=(1.5, 2.0, 3.0)):
    """(1, 3, D, H, W) displacement in mm from function(x, y, z) -> (ux, uy, uz), voxel centres in mm."""
    z, y, x = (torch.arange(n, dtype=torch.float64) * s for n, s in zip(shape, spacing_xyz[::-1]))
    z, y, x = torch.meshgrid(z, y, x, indexing="ij")
    return torch.stack(function(x, y, z))[None], torch.tensor([spacing_xyz], dtype=torch.float64)


def test_diffusion_of_a_linear_field_is_its_squared_gradient_and_bending_is_zero():
    gradient = torch.tensor([[0.1, -0.2, 0.05], [0.0, 0.3, 0.1], [-0.15, 0.02, 0.25]], dtype=torch.float64)
    u, spacing = _field(
        lambda x, y, z: tuple(gradient[c, 0] * x + gradient[c, 1] * y + gradient[c, 2] * z for c in range(3))
    )
    assert float(losses.diffusion(u, spacing)) == pytest.approx(float((gradient**2).sum()), rel=1e-12)
    assert float(losses.bending(u, spacing)) == pytest.approx(0.0, abs=1e-20)  # a uniform strain costs nothing


@pytest.mark.parametrize("spacing_xyz", [(1.5, 2.0, 3.0), (0.75, 1.0, 1.5)])
def test_bending_of_a_quadratic_field_is_its_second_derivative_at_any_resolution(spacing_xyz):
    # u_z = c z^2 + b x^2: d2u_z/dz^2 = 2c, d2u_z/dx^2 = 2b, so the energy is L^2 (4c^2 + 4b^2)
    c, b, length = 0.01, -0.004, losses.BENDING_LENGTH_MM
    shape = tuple(round(n * 1.5 / spacing_xyz[0]) for n in (6, 7, 8))
    u, spacing = _field(lambda x, y, z: (0 * x, 0 * y, c * z**2 + b * x**2), shape, spacing_xyz)
    expected = length**2 * (4 * c**2 + 4 * b**2)
    assert float(losses.bending(u, spacing)) == pytest.approx(expected, rel=1e-9)
    # on every other point (a coarse loss level) the same field has the same energy
    assert float(losses.bending(u[..., ::2, ::2, ::2], spacing, points_spacing=2)) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_any_garbage_in_a_torch_file_is_a_corrupt_file_error(tmp_path, seed):
    """Random bytes through torch's legacy unpickler raise whatever they spell (MemoryError was seen in CI)."""
    generator = np.random.default_rng(seed)
    path = tmp_path / "model.pt"
    torch_io.save_torch({"weights": torch.arange(1000.0)}, path)
    archive = path.read_bytes()
    blobs = [generator.bytes(n) for n in (1, 17, 4096)]
    blobs += [b"\x80\x02" + generator.bytes(4096) for _ in range(50)]  # a pickle protocol header, then noise
    blobs += [archive[: len(archive) // 2], archive[:-30], archive[:200] + generator.bytes(len(archive) - 200)]
    blobs.append(archive[:100] + generator.bytes(len(archive) - 300) + archive[-200:])  # a zip directory, noise inside
    for blob in blobs:
        path.write_bytes(blob)
        with pytest.raises(io.CorruptFileError, match="model.pt: cannot be read"):
            torch_io.load_torch(path)
