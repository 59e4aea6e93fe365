"""GPU-path options (lungreg.network.model.Acceleration, the registrar's prefetching pipeline) checked on CPU.

No GPU is needed: bf16 autocast, channels_last_3d and torch.compile take the same code path on
CPU; cudnn_benchmark and the CUDA streams of the prefetching pipeline cannot run here (their
ordering logic is tested with the device part stubbed out). The CPU-fast variant's no-folding
property is checked for random weights.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pandas as pd
import pytest
import torch

from lungreg import io, torch_io
from lungreg.geometry import Grid, image_from_array
from lungreg.metrics import dice
from lungreg.network import transform
from lungreg.network.losses import LossSettings
from lungreg.network.model import Acceleration, ModelSettings, RegistrationNet
from lungreg.network.train import PairFiles, TrainSettings, train
from lungreg.registration.chunk import ChunkOutputs, run_chunk
from lungreg.registration.network import NetworkRegistrar
from lungreg.study import Pair, PreprocessedLayout

SHAPE = (12, 24, 24)  # z, y, x
CPU = torch.device("cpu")
PAPER_LOSS = LossSettings(beta=1e-6, mask_weighted=False)  # the paper's loss
# bf16 tolerance: the warped lung mask's Dice may move by at most 1 Dice point, the grid by at
# most 0.25 voxel. Measured on the perturbed networks below (seeds 0-2, Dice 0.64-0.80 against
# 0.84 unregistered): |Dice difference| 0.10-0.16 points, grid difference at most 0.05 voxel.
BF16_DICE_POINTS = 1.0
BF16_GRID_VOXELS = 0.25


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is as fast as two, and immune to the stalls of two OpenMP threads
    on a shared 2-core machine (measured: a 12x24x24 training step 0.1 s on 1 thread, 4-6 s on 2
    under a load of 4)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ellipsoid(centre, radii) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.arange(n, dtype=float) for n in SHAPE), indexing="ij")
    inside = ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + (
        (x - centre[2]) / radii[2]
    ) ** 2 < 1
    return inside.astype(np.float32)


FIXED_MASK = ellipsoid((6, 12, 12), (4, 7.5, 7))
MOVING_MASK = ellipsoid((5.5, 11.5, 12.5), (4.4, 8.2, 7.5))


def image(mask: np.ndarray, seed: int) -> np.ndarray:
    return np.clip(0.6 * mask + 0.2 * np.random.default_rng(seed).random(SHAPE), 0, 1).astype(np.float32)


def volumes(batch: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    moving = torch.from_numpy(np.stack([image(MOVING_MASK, k) for k in range(batch)]))[:, None]
    fixed = torch.from_numpy(np.stack([image(FIXED_MASK, 100 + k) for k in range(batch)]))[:, None]
    return moving, fixed, torch.from_numpy(MOVING_MASK)[None, None].expand(batch, -1, -1, -1, -1)


def perturbed_network(
    seed: int, settings: ModelSettings = ModelSettings(width=0.125), std: float = 0.02
) -> RegistrationNet:
    """A network whose zero-initialised last layers are perturbed: a few voxels of deformation
    and a small affine, like a trained network's (the untrained one is the identity)."""
    torch.manual_seed(seed)
    net = RegistrationNet(settings)
    for parameter in (net.deformable.head.weight, net.deformable.head.bias):
        torch.nn.init.normal_(parameter, std=std)
    if net.linear is not None:
        torch.nn.init.normal_(net.linear.conv.weight, std=0.05)
        torch.nn.init.normal_(net.linear.conv.bias, std=0.05)
    return net.eval()


def warped_mask_dice(net, moving_mask, grid) -> float:
    warped = transform.warp(moving_mask, grid) > 0.5
    return dice(warped[0, 0].numpy(), FIXED_MASK > 0.5)


def grid_voxels(difference: torch.Tensor) -> float:
    """Largest absolute grid difference in voxels (normalised units -> voxels per axis)."""
    half = (torch.tensor(SHAPE[::-1], dtype=torch.float64) - 1) / 2
    return float((difference.abs().double() * half).max())


@pytest.mark.parametrize("seed", range(3))
def test_bf16_autocast_on_cpu_keeps_the_warped_mask_dice_within_one_point(seed):
    net = perturbed_network(seed)
    moving, fixed, moving_mask = volumes()
    with torch.no_grad():
        reference = net(moving, fixed)
        with Acceleration(bf16=True).autocast(CPU):
            low = net(moving, fixed)
    assert warped_mask_dice(net, moving_mask, reference.grid) < 0.99  # the network does deform
    difference = 100 * abs(
        warped_mask_dice(net, moving_mask, low.grid) - warped_mask_dice(net, moving_mask, reference.grid)
    )
    assert difference <= BF16_DICE_POINTS, f"Dice moved by {difference:.2f} points under bf16"
    assert grid_voxels(low.grid - reference.grid) <= BF16_GRID_VOXELS


def test_bf16_keeps_the_head_integration_affine_and_warp_in_float32():
    net = perturbed_network(0)
    moving, fixed, _ = volumes()
    with torch.no_grad(), Acceleration(bf16=True).autocast(CPU):
        features = net.encoder(moving, fixed)
        out = net(moving, fixed)
    assert features.dtype == torch.bfloat16  # the convolutions did run in bf16
    for name in ("warped", "grid", "theta", "gradients"):
        assert getattr(out, name).dtype == torch.float32, name
    assert (out.gradients > 0).all() and (out.gradients < net.settings.maxgrad).all()


def test_channels_last_gives_the_default_output():
    net = perturbed_network(1)
    moving, fixed, _ = volumes(batch=2)
    acceleration = Acceleration(channels_last=True)
    fast = copy.deepcopy(net)
    runner = acceleration.prepare(fast, CPU)
    assert fast.encoder.layers[0][0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        reference = net(moving, fixed)
        out = runner(*acceleration.inputs(moving, fixed))
    for name in ("warped", "grid", "theta", "gradients"):
        torch.testing.assert_close(getattr(out, name), getattr(reference, name), atol=1e-5, rtol=1e-5)


def test_compiled_network_matches_eager(monkeypatch):
    """Acceleration(compile=True) through Dynamo and AOTAutograd: one graph, eager's output.

    The inductor backend itself (C++ code generation) is left out here: it compiled this tiny
    network in 25 to 100 s on the 2-core machine; see the next test."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter, compile_ = CompileCounterWithBackend("aot_eager"), torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: compile_(model, backend=counter, **kwargs))
    torch._dynamo.reset()
    net = perturbed_network(2)
    moving, fixed, _ = volumes()
    compiled_copy = copy.deepcopy(net)
    runner = Acceleration(compile=True).prepare(compiled_copy, CPU)
    assert runner is not compiled_copy
    assert list(compiled_copy.state_dict()) == list(net.state_dict())  # checkpoints keep plain names
    with torch.no_grad():
        reference = net(moving, fixed)
        out = runner(moving, fixed)
    for name in ("warped", "grid", "theta", "gradients"):
        torch.testing.assert_close(getattr(out, name), getattr(reference, name), atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1  # one graph: no graph break


@pytest.mark.skipif(
    not os.environ.get("LUNGREG_SLOW_TESTS"),
    reason="torch.compile's inductor backend takes 25 to 100 s to compile this tiny network on 2 "
    "CPU cores; set LUNGREG_SLOW_TESTS=1 to run it (it passed in 25 s)",
)
def test_inductor_compiled_network_matches_eager():
    torch._dynamo.reset()
    net = perturbed_network(2)
    moving, fixed, _ = volumes()
    runner = Acceleration(compile=True).prepare(copy.deepcopy(net), CPU)
    with torch.no_grad():
        reference, out = net(moving, fixed), runner(moving, fixed)
    for name in ("warped", "grid", "theta", "gradients"):
        torch.testing.assert_close(getattr(out, name), getattr(reference, name), atol=1e-4, rtol=1e-4)


FAST_VARIANTS = [
    ModelSettings(width=0.125, feature_reduction=8, deformable_stride=2),
    ModelSettings(width=0.125, affine=False, deformable_stride=2),
]


def jacobian_determinants(gradients: torch.Tensor, theta: torch.Tensor | None, seed: int) -> np.ndarray:
    """det of the continuous transform's Jacobian (float64, central differences with a tiny step)
    at jittered voxel centres of the first item (as in test_transform)."""
    gradients = gradients[:1].double()
    theta = None if theta is None else theta[:1].double()
    shape = tuple(gradients.shape[2:])
    generator = torch.Generator().manual_seed(seed)
    voxel = 2.0 / (torch.tensor(shape[::-1], dtype=torch.float64) - 1)
    points = transform.identity_grid(shape, dtype=torch.float64).reshape(1, -1, 3)
    points = points + (torch.rand(points.shape, generator=generator, dtype=torch.float64) - 0.5) * 0.5 * voxel
    columns = []
    for axis in range(3):
        step = torch.zeros(3, dtype=torch.float64)
        step[axis] = 1e-6
        plus = transform.map_normalised_points(gradients, theta, points + step)
        minus = transform.map_normalised_points(gradients, theta, points - step)
        columns.append((plus - minus) / 2e-6)
    return torch.linalg.det(torch.stack(columns, dim=-1))[0].numpy()


@pytest.mark.parametrize("settings", FAST_VARIANTS, ids=["reduction+stride", "stride-without-affine"])
@pytest.mark.parametrize("precision", ["float64", "bf16"])
def test_the_coarse_deformable_branch_with_random_weights_never_folds(settings, precision):
    """Upsampled logits, then the positive activation: every gradient is in (0, maxgrad], the
    paper's grid sum(Phi) is strictly increasing along each axis (positive finite differences)
    and the transform's Jacobian determinant is positive everywhere, on odd shapes where the
    coarse grid does not divide the fine one.

    float64 with strongly saturating random logits (gradients down to ~1e-7) checks the
    construction; far beyond that the determinant sinks below the finite differences' rounding.
    In float32 a gradient below ~1e-6 (a logit below about -14) would vanish in the rounding of
    the cumulative sum, so the bf16 case uses logits of a trained network's size (gradients
    >= ~1e-4)."""
    shape = (9, 13, 15)
    for seed in range(2):
        net = perturbed_network(seed, settings, std=0.5 if precision == "float64" else 0.3)
        dtype = torch.float64 if precision == "float64" else torch.float32
        generator = torch.Generator().manual_seed(seed)
        moving, fixed = (torch.rand(1, 1, *shape, generator=generator, dtype=dtype) for _ in range(2))
        with torch.no_grad(), Acceleration(bf16=precision == "bf16").autocast(CPU):
            out = net.to(dtype)(moving, fixed)
        assert out.gradients.shape[2:] == shape
        assert (out.gradients > 0).all() and (out.gradients <= settings.maxgrad).all()
        axial = transform.identity_grid(shape, dtype=dtype) + transform.axial_displacements(out.gradients).permute(
            0, 2, 3, 4, 1
        )
        assert (
            (axial[..., 0].diff(dim=3) > 0).all()
            and (axial[..., 1].diff(dim=2) > 0).all()
            and (axial[..., 2].diff(dim=1) > 0).all()
        ), f"seed {seed}: a grid line folds"
        determinants = jacobian_determinants(out.gradients, out.theta, seed)
        assert (determinants > 0).all(), f"seed {seed}: min det {determinants.min()}"


# ------------------------------------------------------------------------------ training


@pytest.fixture
def pair_files(tmp_path) -> PairFiles:
    grid = Grid(size=SHAPE[::-1], spacing=(2.0, 2.0, 3.0), origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel()))
    paths = {}
    for name, mask, seed in (("moving", MOVING_MASK, 0), ("fixed", FIXED_MASK, 1)):
        paths[name], paths[f"{name}_mask"] = tmp_path / f"{name}.nii.gz", tmp_path / f"{name}_mask.nii.gz"
        io.write_image(image_from_array(image(mask, seed), grid), paths[name])
        io.write_image(image_from_array(mask.astype(np.uint8), grid), paths[f"{name}_mask"])
    return PairFiles(str(paths["moving"]), str(paths["fixed"]), str(paths["moving_mask"]), str(paths["fixed_mask"]))


def test_training_with_bf16_and_channels_last_on_cpu_and_resuming_across_memory_formats(pair_files, tmp_path):
    settings = TrainSettings.from_config(
        {
            "epochs": 1,
            "batch_size": 2,
            "seed": 3,
            "bf16": True,
            "channels_last": True,
            "cudnn_benchmark": True,
            "compile": False,
        }
    )
    model = ModelSettings(width=0.125)
    checkpoint, history = train([pair_files] * 2, [pair_files], model, PAPER_LOSS, settings, tmp_path / "ck.pt")
    assert np.isfinite(history["train_loss"]).all()
    assert list(checkpoint["state_dict"]) == list(RegistrationNet(model).state_dict())
    assert all(v.is_contiguous() for v in checkpoint["state_dict"].values())
    # The memory format is not part of the checkpoint's identity: the run resumes after epoch 1.
    resumed = TrainSettings(**{**settings.__dict__, "epochs": 2, "channels_last": False})
    _, history = train([pair_files] * 2, [pair_files], model, PAPER_LOSS, resumed, tmp_path / "ck.pt")
    assert list(history["epoch"]) == [1, 2]


# ----------------------------------------------------------------------------- inference


@pytest.fixture
def preprocessed(tmp_path) -> PreprocessedLayout:
    """Two subjects with both phases, as the preprocess rule writes them."""
    layout = PreprocessedLayout(tmp_path / "preprocessed")
    grid = Grid(size=SHAPE[::-1], spacing=(2.0, 2.0, 3.0), origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel()))
    for k, subject in enumerate(("a", "b")):
        for phase, mask in (("inhale", MOVING_MASK), ("exhale", FIXED_MASK)):
            layout.image(subject, phase).parent.mkdir(parents=True, exist_ok=True)
            io.write_image(image_from_array(image(mask, 10 * k + len(phase)), grid), layout.image(subject, phase))
            io.write_image(image_from_array(mask.astype(np.uint8), grid), layout.mask(subject, phase))
            points = grid.index_to_world(np.array([[12.0, 12.0, 6.0], [9.0, 14.0, 5.0]]))
            pd.DataFrame(
                {"landmark": ["p1", "p2"], "x": points[:, 0], "y": points[:, 1], "z": points[:, 2], "in_view": True}
            ).to_csv(layout.landmarks(subject, phase), index=False)
    return layout


@pytest.fixture
def model_path(tmp_path) -> str:
    settings = ModelSettings(width=0.125)
    path = tmp_path / "model.pt"
    torch_io.save_torch(
        {"state_dict": perturbed_network(0, settings).state_dict(), "model_settings": settings.as_dict()}, path
    )
    return str(path)


ALL_PAIRS = [Pair(m, "inhale", f, "exhale") for m in ("a", "b") for f in ("a", "b")]


def test_cohort_chunk_with_save_fields_none_and_every_option_writes_rows_only(preprocessed, model_path, tmp_path):
    plain = NetworkRegistrar("proposed", model_path, "cpu", batch_size=3, prefetch=False)
    fast = NetworkRegistrar(
        "proposed",
        model_path,
        "cpu",
        batch_size=3,
        prefetch=True,
        acceleration=Acceleration(channels_last=True, cudnn_benchmark=True),
    )
    rows = {}
    for name, registrar, save in (("plain", plain, "all"), ("fast", fast, "none")):
        outputs = ChunkOutputs(tmp_path / name, tmp_path / f"{name}_metrics.tsv", tmp_path / f"{name}_landmarks.tsv")
        rows[name] = run_chunk(registrar, ALL_PAIRS, preprocessed, "cohort", outputs, save_fields=save)
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == sorted(p.name for p in ALL_PAIRS)
    assert not any((tmp_path / "fast").iterdir())  # save_fields none: no per-pair folder or field
    assert len(rows["fast"]) == len(ALL_PAIRS) and (rows["fast"]["seconds"] > 0).all()
    np.testing.assert_allclose(rows["fast"]["dice"], rows["plain"]["dice"], atol=1e-6)
    np.testing.assert_allclose(rows["fast"]["ds"], rows["plain"]["ds"], atol=1e-4)


def test_prefetching_queues_batch_k_plus_1_before_finishing_batch_k(monkeypatch, model_path):
    """The pipeline's order (the CUDA work itself is stubbed: no GPU here). Every batch is
    finished once, in order, and never before the next batch was queued."""
    registrar = NetworkRegistrar("proposed", model_path, "cpu", batch_size=1, prefetch=True)
    events = []
    monkeypatch.setattr(NetworkRegistrar, "cuda", property(lambda self: True))
    monkeypatch.setattr(registrar, "_launch", lambda batch: events.append(("launch", batch[0])) or batch)
    monkeypatch.setattr(registrar, "_finish", lambda batch: events.append(("finish", batch[0])) or [batch[0]])
    out = list(registrar.register_stream([[k] for k in range(4)]))
    assert out == [([k], [k]) for k in range(4)]
    assert events == [
        ("launch", 0),
        ("launch", 1),
        ("finish", 0),
        ("launch", 2),
        ("finish", 1),
        ("launch", 3),
        ("finish", 2),
        ("finish", 3),
    ]
