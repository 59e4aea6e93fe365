"""Per-pair refinement of the network's outputs: its guarantees, pinned.

No steps is the single pass exactly; a refined pair's objective is never above the prediction's;
gradients stay positive and det A > 0; the finite-difference Jacobian (the tables') never turns
non-positive in the lung, even where an unguarded optimisation would fold; a pair's result does
not depend on the batch it is refined in.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from test_performance_options import ALL_PAIRS, model_path, preprocessed  # noqa: F401 (fixtures)

from lungreg.network import losses, transform
from lungreg.network.model import IdentityPredictor, ModelSettings, NetworkOutputs, RegistrationNet
from lungreg.network.refine import RefineSettings, RefineStage, learning_rate_factor, refine, refine_batch
from lungreg.registration.base import IdentityRegistrar
from lungreg.registration.chunk import ChunkOutputs, build_registrar, run_chunk
from lungreg.registration.network import NetworkRegistrar

SHAPE = (12, 24, 24)  # z, y, x
SPACING = torch.tensor([[8.0, 8.0, 12.0]])  # x, y, z mm
COARSE_TO_FINE = RefineSettings(
    stages=(
        RefineStage(steps=15, control_stride=4, loss_level=2, learning_rate=0.1, diffusion=0.03),
        RefineStage(steps=10, control_stride=2, loss_level=1, learning_rate=0.05, diffusion=0.01),
    )
)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ellipsoid(centre, radii) -> torch.Tensor:
    z, y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in SHAPE), indexing="ij")
    inside = ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((x - centre[2]) / radii[2]) ** 2
    return (inside <= 1).float()


def pair(shift: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(moving, fixed, fixed_mask), each (1, 1, D, H, W): a textured 'lung' the moving image has
    lower by `shift` voxels in z and squeezed, as in an exhale."""
    generator = torch.Generator().manual_seed(seed)
    texture = torch.nn.functional.avg_pool3d(torch.rand((1, 1, *SHAPE), generator=generator), 3, 1, 1)[0, 0]
    fixed_lung = ellipsoid((6, 12, 12), (4, 8, 8))
    moving_lung = ellipsoid((6 - shift, 12, 12), (3.5, 8.5, 8))
    fixed = 0.8 - 0.6 * fixed_lung + 0.2 * texture
    moving = 0.8 - 0.6 * moving_lung + 0.2 * texture.roll(-int(shift), 0)
    return moving[None, None], fixed[None, None], fixed_lung[None, None]


def batch(n: int = 3):
    tensors = [pair(1 + k % 2, seed=k) for k in range(n)]
    return [torch.cat(t) for t in zip(*tensors)]


def trained_like_network(seed: int = 3) -> RegistrationNet:
    """An untrained network with small random last layers: a non-trivial, fold-free start."""
    torch.manual_seed(seed)
    net = RegistrationNet(ModelSettings(width=0.125))
    with torch.no_grad():
        net.deformable.head.weight.normal_(0, 0.02)
        net.linear.conv.weight.normal_(0, 0.002)
    return net.eval()


def test_no_steps_is_exactly_the_single_pass():
    net = trained_like_network()
    moving, fixed, mask = batch()
    single = net(moving, fixed)
    for settings in (RefineSettings(stages=()), RefineSettings(stages=(RefineStage(steps=0),))):
        out, report = refine_batch(net, moving, fixed, mask, SPACING.expand(3, 3), settings)
        assert report is None
        for a, b in zip(out, single):
            assert torch.equal(a, b)
    with torch.no_grad():
        outputs = net.outputs(moving, fixed)
    out, report = refine(
        net, outputs, moving, fixed, mask, SPACING.expand(3, 3), RefineSettings(stages=(RefineStage(0),))
    )
    assert torch.equal(out.grid, single.grid) and report.steps == 0


def test_refinement_lowers_the_objective_keeps_the_construction_and_improves_the_overlap():
    net = trained_like_network()
    moving, fixed, mask = batch()
    out, report = refine_batch(net, moving, fixed, mask, SPACING.expand(3, 3), COARSE_TO_FINE)
    assert report.steps > 0
    assert all(final <= initial for final, initial in zip(report.final_loss, report.initial_loss))
    assert np.mean(np.array(report.final_loss) / np.array(report.initial_loss)) < 0.8  # it really optimises
    assert (out.gradients > 0).all()
    assert (torch.linalg.det(out.theta[:, :, :3]) > 0).all()
    # The overlap of the warped 'lung' with the fixed one improves.
    single = net(moving, fixed)
    moving_lung = (moving < 0.5).float()

    def dice(grid):
        warped = transform.warp(moving_lung, grid) > 0.5
        return (2 * (warped & (mask > 0.5)).sum() / (warped.sum() + (mask > 0.5).sum())).item()

    assert dice(out.grid) > dice(single.grid) + 0.02


def test_a_stage_bending_weight_smooths_the_refined_field():
    """The default's regulariser is per stage: a strong bending weight leaves a field of less
    curvature than none at the same steps, and both runs keep the objective's guarantee."""
    net = trained_like_network()
    moving, fixed, mask = batch()
    spacing = SPACING.expand(3, 3)
    energies = {}
    for weight in (0.0, 30.0):
        stage = RefineStage(steps=15, control_stride=2, loss_level=1, learning_rate=0.1, bending=weight)
        out, report = refine_batch(net, moving, fixed, mask, spacing, RefineSettings(stages=(stage,)))
        assert all(final <= initial for final, initial in zip(report.final_loss, report.initial_loss))
        points = transform.block_centres(SHAPE, 1, 3, fixed.device, fixed.dtype)
        displacement = transform.grid_displacement_mm(out.grid, points, SHAPE, spacing)
        energies[weight] = float(losses.bending(displacement, spacing))
    assert energies[30.0] < 0.8 * energies[0.0], energies


def test_a_stage_that_would_fold_at_voxel_resolution_is_not_kept():
    net = trained_like_network()
    moving, fixed, mask = batch()
    reckless = RefineSettings(
        stages=(RefineStage(steps=30, control_stride=1, learning_rate=2.0, diffusion=0.0),), beta=0.0
    )
    with torch.no_grad():
        outputs = net.outputs(moving, fixed)
    # Unguarded, this stage folds: run it and look at the stage's end itself.
    from lungreg.network import refine as refine_module

    theta_of = lambda raw: refine_module.affine_from_output(raw, net.settings.affine_map)  # noqa: E731
    logits, raw, _ = refine_module._run_stage(
        reckless.stages[0], reckless, net, moving, fixed, mask, SPACING.expand(3, 3),
        outputs.logits, outputs.affine_output, theta_of,
    )  # fmt: skip
    assert refine_module._folds(net, logits, theta_of(raw), mask).any()
    out, report = refine(net, outputs, moving, fixed, mask, SPACING.expand(3, 3), reckless)
    determinant = transform.jacobian_determinant_fd(out.grid.double())
    assert not ((determinant <= 0) & (mask[:, 0] > 0.5)).any()
    assert not all(report.stages_kept[0])  # the folding pairs kept the network's prediction


def test_a_pair_refines_the_same_alone_or_in_a_batch():
    net = trained_like_network()
    moving, fixed, mask = batch()
    together, _ = refine_batch(net, moving, fixed, mask, SPACING.expand(3, 3), COARSE_TO_FINE)
    alone, _ = refine_batch(net, moving[1:2], fixed[1:2], mask[1:2], SPACING, COARSE_TO_FINE)
    # Equal up to rounding: batched convolutions differ in the last bits (measured 3e-6 in the
    # logits), which Adam's normalised steps carry to a few thousandths of a voxel.
    voxels = (together.grid[1:2] - alone.grid) * torch.tensor([(n - 1) / 2 for n in SHAPE[::-1]])
    assert voxels.abs().max() < 0.02


def test_settings_refuse_a_correction_finer_than_its_loss_points():
    with pytest.raises(ValueError, match="control_stride must be >= loss_level"):
        RefineStage(steps=5, control_stride=1, loss_level=2)
    with pytest.raises(ValueError, match="unknown key"):
        RefineSettings.from_config({"stages": [{"steps": 3, "stride": 2}]})
    with pytest.raises(ValueError, match="unknown schedule"):
        RefineSettings(schedule="step")
    with pytest.raises(ValueError, match="one step count per stage"):
        RefineSettings().with_steps([5])
    assert [s.steps for s in RefineSettings().with_steps([3, 4]).stages] == [3, 4]


def test_the_cosine_schedule_ramps_up_then_decays_to_zero_at_the_last_step():
    factors = [learning_rate_factor(step, 20, 5, "cosine") for step in range(20)]
    assert factors[:5] == pytest.approx([0.2 * (k + 1) * f for k, f in enumerate(
        [0.5 * (1 + math.cos(math.pi * k / 19)) for k in range(5)])])  # fmt: skip
    assert factors[-1] == pytest.approx(0.0, abs=1e-12) and max(factors) < 1.0
    assert [learning_rate_factor(step, 20, 5, "constant") for step in range(6)] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]


def test_the_refined_rows_come_from_the_same_chunk_code_with_their_columns(preprocessed, model_path, tmp_path):  # noqa: F811
    """The registrar refines inside the timed region and adds the refinement's columns; with no
    steps it is the single pass, row for row."""
    single = NetworkRegistrar("proposed", model_path, "cpu", batch_size=2, prefetch=False)
    refined = NetworkRegistrar("proposed_refined", model_path, "cpu", batch_size=2, refine=COARSE_TO_FINE)
    unrefined = NetworkRegistrar("proposed", model_path, "cpu", batch_size=2, refine=RefineSettings(stages=()))
    rows = {}
    for name, registrar in (("single", single), ("refined", refined), ("unrefined", unrefined)):
        outputs = ChunkOutputs(tmp_path / name, tmp_path / f"{name}_metrics.tsv", tmp_path / f"{name}_landmarks.tsv")
        rows[name] = run_chunk(registrar, ALL_PAIRS, preprocessed, "cohort", outputs, save_fields="none")
    refined_rows = rows["refined"]
    assert (refined_rows["refine_steps"] > 0).all()
    assert (refined_rows["refine_objective_final"] <= refined_rows["refine_objective_initial"]).all()
    assert (refined_rows["jacobian_fraction_nonpositive"] == 0).all()
    assert refined_rows["seconds"].mean() > rows["single"]["seconds"].mean()  # the refinement is timed
    assert "refine_steps" not in rows["unrefined"]
    pd.testing.assert_frame_equal(
        rows["unrefined"].drop(columns=["seconds"]), rows["single"].drop(columns=["seconds"]), check_exact=True
    )


def test_the_cli_refine_option_reads_a_study_config_file(tmp_path):
    """`lungreg register --refine FILE` takes a study's config file as it is: its refine: section,
    the workflow's keys (protocols) aside; anything else unreadable stops naming the file."""
    from lungreg.io import InputError
    from lungreg.registration.pair import refine_option

    assert refine_option(None) is None and refine_option("default") == RefineSettings()
    study_config = tmp_path / "study.yaml"
    study_config.write_text(
        "train: {epochs: 3}\n"
        "refine:\n  protocols: [inhale_exhale]\n  stages: [{steps: 7, control_stride: 2, bending: 0.5}]\n"
    )
    assert refine_option(str(study_config)).stages == (RefineStage(steps=7, control_stride=2, bending=0.5),)
    broken = tmp_path / "broken.yaml"
    broken.write_text("refine: {stages: [{steps: 3, stride: 2}]}\n")
    with pytest.raises(InputError, match="broken.yaml.*--refine: not a readable refine section.*unknown key"):
        refine_option(str(broken))


def test_the_identity_predictor_is_exactly_the_identity_transform():
    """Logits 0 give gradients 1 and a raw affine 0 the identity matrix, bit for bit, so the
    refinement from the identity starts where Unregistered is."""
    moving, fixed, _ = batch()
    predictor = IdentityPredictor(ModelSettings(width=0.125))
    out = predictor(moving, fixed)
    assert torch.equal(out.gradients, torch.ones_like(out.gradients))
    assert torch.equal(out.theta, torch.eye(3, 4).expand(3, 3, 4))
    assert torch.equal(out.grid, transform.identity_grid(SHAPE, 3))
    assert torch.allclose(out.warped, moving, atol=1e-5)  # grid_sample's index arithmetic rounds


def test_the_refinement_from_the_identity_is_the_refinement_of_zeroed_network_outputs():
    """identity_refined runs the same refinement as the refined rows: only the start differs."""
    net = trained_like_network()
    moving, fixed, mask = batch()
    with torch.no_grad():
        outputs = net.outputs(moving, fixed)
    zeroed = NetworkOutputs(torch.zeros_like(outputs.logits), torch.zeros_like(outputs.affine_output))
    predictor = IdentityPredictor(net.settings)
    spacing = SPACING.expand(3, 3)
    from_network, _ = refine(net, zeroed, moving, fixed, mask, spacing, COARSE_TO_FINE)
    from_identity, report = refine(
        predictor, predictor.outputs(moving, fixed), moving, fixed, mask, spacing, COARSE_TO_FINE
    )
    assert report.steps > 0 and torch.equal(from_identity.grid, from_network.grid)


def test_the_identity_refined_row_with_no_steps_is_unregistered_exactly(preprocessed, model_path, tmp_path):  # noqa: F811
    """The refinement from the identity with no steps, through the workflow's registrar and chunk
    code, gives Unregistered's rows exactly (intra- and inter-subject pairs)."""
    no_steps = {"stages": [{"steps": 0}, {"steps": 0, "control_stride": 2}]}
    inference = {"device": "cpu", "batch_size": 2, "prefetch": False}
    registrars = {
        "identity_refined": build_registrar("identity_refined", 1, inference, None, None, no_steps, {"width": 0.125}),
        "unregistered": IdentityRegistrar(),
    }
    rows = {}
    for name, registrar in registrars.items():
        outputs = ChunkOutputs(tmp_path / name, tmp_path / f"{name}_metrics.tsv", tmp_path / f"{name}_landmarks.tsv")
        rows[name] = run_chunk(registrar, ALL_PAIRS, preprocessed, "cohort", outputs, save_fields="none")
    varying = ["method", "seconds", "device", "threads"]
    pd.testing.assert_frame_equal(
        rows["identity_refined"].drop(columns=varying), rows["unregistered"].drop(columns=varying), check_exact=True
    )
