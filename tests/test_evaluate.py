"""Evaluation: metrics against hand-computed cases, the identity, the mapping direction."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
import torch

from lungreg import metrics
from lungreg.evaluate import Phase, evaluate_pair
from lungreg.geometry import Grid, image_from_array
from lungreg.network.model import ModelSettings, RegistrationNet
from lungreg.registration.base import IdentityRegistrar, LoadedPair
from lungreg.registration.network import NetworkRegistrar
from lungreg.study import Pair
from lungreg.tables import pair_checks, qc_table, summary_tables
from lungreg.workflow import run_problems

ANISOTROPIC = Grid(
    size=(10, 8, 6), spacing=(1.0, 2.0, 4.0), origin=(5.0, -3.0, 10.0), direction=tuple(np.eye(3).ravel())
)


def test_dice_by_hand():
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    a[:2] = True  # 32 voxels
    b[1:3] = True  # 32 voxels, 16 shared
    assert metrics.dice(a, b) == pytest.approx(2 * 16 / 64)
    assert metrics.dice(a, a) == 1.0
    assert metrics.dice(a, ~a) == 0.0
    assert np.isnan(metrics.dice(np.zeros_like(a), np.zeros_like(a)))


def test_landmark_errors_by_hand_with_anisotropic_spacing():
    field = np.zeros(ANISOTROPIC.shape + (3,))
    field[..., 0], field[..., 2] = 3.0, -4.0  # a translation of (3, 0, -4) mm
    fixed = ANISOTROPIC.index_to_world(np.array([[2, 3, 1], [5, 1, 4]]))
    moving = fixed + [3.0, 0.0, -4.0]
    moving[1] += [0.0, 1.0, 0.0]  # the second landmark is off by 1 mm in y
    errors = metrics.landmark_errors(field, ANISOTROPIC, fixed, moving)
    np.testing.assert_allclose(errors, [[0, 0, 0, 0], [0, 1, 0, 1]], atol=1e-9)


def test_landmark_mapping_direction_on_a_known_translation():
    """The fixed landmark is carried into the moving image: zero error in the right direction,
    twice the shift if the field were applied the wrong way round."""
    shift = np.array([4.0, -2.0, 6.0])
    field = np.broadcast_to(shift, ANISOTROPIC.shape + (3,)).copy()  # T(x) = x + shift: fixed -> moving
    fixed = ANISOTROPIC.index_to_world(np.array([[4, 4, 2], [6, 2, 3]], float))
    moving = fixed + shift
    right = metrics.landmark_errors(field, ANISOTROPIC, fixed, moving)
    wrong = metrics.landmark_errors(-field, ANISOTROPIC, fixed, moving)
    np.testing.assert_allclose(right[:, 3], 0, atol=1e-9)
    np.testing.assert_allclose(wrong[:, 3], 2 * np.linalg.norm(shift))


def test_jacobian_by_hand_with_anisotropic_spacing():
    """u = (0.1 x, -0.2 y, 0.3 z) in mm gives det = 1.1 * 0.8 * 1.3 everywhere, whatever the spacing."""
    points = ANISOTROPIC.voxel_centres()
    field = points * np.array([0.1, -0.2, 0.3])
    determinant = metrics.jacobian_determinant(field, ANISOTROPIC)
    np.testing.assert_allclose(determinant, 1.1 * 0.8 * 1.3)
    folded = -2.5 * points  # det (1 - 2.5)^3 < 0
    mask = np.zeros(ANISOTROPIC.shape, bool)
    mask[1:3, 2:5, 3:7] = True
    stats = metrics.jacobian_statistics(metrics.jacobian_determinant(folded, ANISOTROPIC), mask)
    assert stats["jacobian_fraction_nonpositive"] == 1.0 and np.isnan(stats["log_jacobian_std"])
    stats = metrics.jacobian_statistics(determinant, mask)
    assert stats["jacobian_min"] == pytest.approx(1.144) and stats["log_jacobian_std"] == pytest.approx(0, abs=1e-12)


def test_jacobian_follows_the_direction_matrix():
    """A rotated grid: the same physical field gives the same determinant."""
    c, s = np.cos(0.4), np.sin(0.4)
    rotated = Grid(ANISOTROPIC.size, ANISOTROPIC.spacing, ANISOTROPIC.origin, (c, -s, 0, s, c, 0, 0, 0, 1))
    points = rotated.voxel_centres()
    field = np.stack([0.05 * points[..., 1], 0.1 * points[..., 0], np.zeros(points.shape[:-1])], -1)
    np.testing.assert_allclose(metrics.jacobian_determinant(field, rotated), 1 - 0.005)


def test_empty_mask_gives_nans_not_errors():
    empty = np.zeros(ANISOTROPIC.shape, bool)
    stats = metrics.jacobian_statistics(np.ones(ANISOTROPIC.shape), empty)
    assert all(np.isnan(v) for v in stats.values())
    truth = image_from_array(np.zeros(ANISOTROPIC.shape + (3,)), ANISOTROPIC, is_vector=True)
    epe = metrics.endpoint_errors(np.zeros(ANISOTROPIC.shape + (3,)), ANISOTROPIC, truth, empty)
    assert np.isnan(epe["epe_mean"])


def make_phase(array: np.ndarray, grid: Grid, landmarks: np.ndarray) -> Phase:
    frame = pd.DataFrame(landmarks, columns=["x", "y", "z"])
    frame.insert(0, "landmark", [f"l{i}" for i in range(len(frame))])
    frame["in_view"] = True
    return Phase(image_from_array(array.astype(np.float32), grid), array > 0.5, grid, frame)


def blob(grid: Grid, centre_index) -> np.ndarray:
    k, j, i = np.meshgrid(*(np.arange(n) for n in grid.shape), indexing="ij")
    return (
        ((i - centre_index[0]) / 3) ** 2 + ((j - centre_index[1]) / 2.5) ** 2 + ((k - centre_index[2]) / 2) ** 2 < 1
    ).astype(float)


def test_all_outside_mask_gives_zero_dice():
    grid = Grid((16, 12, 10), (2.0, 2.0, 3.0), (0, 0, 0), tuple(np.eye(3).ravel()))
    fixed = make_phase(blob(grid, (4, 4, 4)), grid, np.zeros((0, 3)))
    moving = make_phase(blob(grid, (12, 8, 6)), grid, np.zeros((0, 3)))
    row, _ = evaluate_pair(Pair("a", "inhale", "a", "exhale"), fixed, moving, np.zeros(grid.shape + (3,)))
    assert row["dice"] == 0.0 and row["landmarks_scored"] == 0


def test_identity_transform_reproduces_the_unregistered_row_exactly():
    """An untrained network is the identity; scored by the same code it equals Unregistered."""
    fixed_grid = Grid((16, 12, 10), (2.0, 2.0, 3.0), (0, 0, 0), tuple(np.eye(3).ravel()))
    moving_grid = Grid((16, 12, 10), (2.1, 1.9, 3.0), (3, -2, 1), tuple(np.eye(3).ravel()))
    points = fixed_grid.index_to_world(np.array([[5.0, 5.0, 4.0], [8.0, 6.0, 5.0]]))
    fixed = make_phase(blob(fixed_grid, (6, 5, 4)), fixed_grid, points)
    moving = make_phase(blob(moving_grid, (8, 6, 5)), moving_grid, points + 2.0)
    item = LoadedPair(Pair("a", "inhale", "b", "exhale"), fixed, moving)
    identity = IdentityRegistrar().register([item])[0]
    torch.manual_seed(0)
    network = NetworkRegistrar.__new__(NetworkRegistrar)  # the registrar around an untrained network
    network.model, network.torch_device, network.bf16 = (
        RegistrationNet(ModelSettings(width=0.125)).eval(),
        torch.device("cpu"),
        False,
    )
    learned = network.register([item])[0]
    np.testing.assert_allclose(learned.displacement, identity.displacement, atol=1e-4)
    row_identity, _ = evaluate_pair(item.pair, fixed, moving, identity.displacement)
    row_network, _ = evaluate_pair(item.pair, fixed, moving, learned.displacement)
    for key in ("dice", "jacobian_min", "jacobian_fraction_nonpositive"):
        assert row_network[key] == pytest.approx(row_identity[key], abs=1e-4), key


def test_summary_tables_use_the_validation_subjects_only():
    cohort = pd.DataFrame(
        {"subject": ["a", "b", "c"], "label": ["ILD", "healthy", "ILD"], "split": ["train", "validation", "validation"]}
    )
    rows = []
    for method, offset in (("unregistered", 0.0), ("proposed", 0.1)):
        for s, d in zip("abc", (0.1, 0.7, 0.8)):
            rows.append(
                {
                    "method": method,
                    "protocol": "inhale_exhale",
                    "pair": f"{s}_inhale__{s}_exhale",
                    "moving_subject": s,
                    "fixed_subject": s,
                    "dice": d + offset,
                    "seconds": 1.0,
                    "device": "cpu",
                    "threads": 1,
                    "jacobian_min": 0.5,
                    "jacobian_fraction_nonpositive": 0.0,
                    "log_jacobian_std": 0.1,
                    "epe_mean": 1.0,
                    "epe_p95": 2.0,
                }
            )
    tables = summary_tables(
        pd.DataFrame(rows),
        pd.DataFrame(columns=["method", "protocol", "pair", "landmark", "in_view", "dx", "dy", "dz", "ds"]),
        cohort,
    )
    table1 = tables["table1_dice"].set_index("method")
    assert list(table1.index) == ["unregistered", "proposed"]
    assert table1.loc["proposed", "inhale_exhale_dice_mean"] == pytest.approx(85.0)
    assert table1.loc["proposed", "inhale_exhale_pairs"] == 2
    assert table1.loc["unregistered", "evaluated_on"] == "validation subjects"


def registered(method, subject, dice, folded=0.0, **extra):
    return {
        "method": method,
        "protocol": "inhale_exhale",
        "pair": f"{subject}_inhale__{subject}_exhale",
        "fixed_subject": subject,
        "fixed_phase": "exhale",
        "dice": dice,
        "jacobian_min": -0.2 if folded else 0.6,
        "jacobian_fraction_nonpositive": folded,
        **extra,
    }


def test_qc_flags_dice_below_unregistered_folding_and_baseline_flags_and_nothing_else(tmp_path):
    pairs = pd.DataFrame(
        [
            registered("unregistered", "a", 0.80),
            registered("unregistered", "b", 0.70),
            registered("proposed", "a", 0.75),  # worse than unregistered
            registered("proposed", "b", 0.90, folded=0.01),  # better, but folds
            registered("sitk_bspline", "a", 0.85, flag="affine:zero_iterations", stop_condition="Already minimized"),
            registered("sitk_bspline", "b", 0.86, flag="ok", stop_condition="converged"),
        ]
    )
    checks = pair_checks(pairs)
    found = {(r["method"], r["pair"].split("_")[0], r["check"]) for r in checks.to_dict("records")}
    assert found == {
        ("proposed", "a", "dice_below_unregistered"),
        ("proposed", "b", "folding"),
        ("sitk_bspline", "a", "baseline_flag"),
    }
    messages = checks.set_index("check")["message"]
    assert messages["dice_below_unregistered"] == "Dice 0.750 below Unregistered's 0.800"
    assert messages["folding"] == "det J <= 0 in 1% of the fixed lung (min det J -0.2)"
    assert "affine:zero_iterations" in messages["baseline_flag"] and "Already minimized" in messages["baseline_flag"]
    subject = pd.DataFrame(
        [["a", "inhale", "", "", "", "mask_cropped", 0.004, 0.01, True, "inhale: the common grid ... crops 0.4%"]],
        columns=checks.columns,
    )
    table = qc_table([subject], pairs)
    assert len(table) == 4 and table["problem"].all()
    # the run's last lines: one per problem row, in the words the jobs logged
    path = tmp_path / "qc.tsv"
    table.to_csv(path, sep="\t", index=False)
    lines = run_problems(tmp_path / "no_logs", since=0.0, qc_table=path)
    assert len(lines) == 4
    assert lines[0] == f"subject a, inhale: the common grid ... crops 0.4% [{path}]"
    assert any(line.startswith("proposed inhale_exhale a_inhale__a_exhale: Dice 0.750") for line in lines)


def test_run_problems_reads_this_runs_warnings_and_errors_once(tmp_path):
    since = time.time() - 60  # the run started a minute ago

    def at(seconds: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S,000", time.localtime(since + seconds))

    log = tmp_path / "logs" / "preprocess" / "s1.log"
    log.parent.mkdir(parents=True)
    log.write_text(
        f"{at(-3600)} WARNING lungreg.preprocess: an old warning of an earlier run\n"
        f"{at(1)} INFO lungreg.preprocess: fine\n"
        f"{at(1)} WARNING lungreg.preprocess: subject s1, a warning\n"
        f"{at(2)} WARNING lungreg.preprocess: subject s1, a warning\n"
        f"{at(3)} ERROR lungreg: job failed\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\n'
        "ValueError: something unexpected\n"
    )
    assert run_problems(tmp_path / "logs", since) == [
        f"subject s1, a warning [{log}]",
        f"job failed: something unexpected [{log}]",
    ]
