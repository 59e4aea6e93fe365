"""A chunk: scored in torch like the reference, its intra-patient pairs' files written on a background
thread (in order, atomically, a failure raised naming the pair and leaving no tables), and its
time by stage."""

from __future__ import annotations

import threading
import time

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from lungreg import io
from lungreg.evaluate import evaluate_pair, load_phase, warp_mask
from lungreg.geometry import Grid, image_from_array
from lungreg.registration import chunk
from lungreg.registration.base import IdentityRegistrar, LoadedPair, RegistrationResult
from lungreg.registration.chunk import ChunkOutputs, ChunkSeconds, run_chunk
from lungreg.study import Pair, PreprocessedLayout

SHAPE = (10, 20, 20)  # z, y, x
GRID = Grid(SHAPE[::-1], (2.0, 2.0, 3.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
PAIRS = [Pair(m, "inhale", f, "exhale") for m in ("a", "b") for f in ("a", "b")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ellipsoid(centre, radii) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.arange(n, dtype=float) for n in SHAPE), indexing="ij")
    return ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((x - centre[2]) / radii[2]) ** 2 < 1


@pytest.fixture
def layout(tmp_path) -> PreprocessedLayout:
    layout = PreprocessedLayout(tmp_path / "preprocessed")
    for k, subject in enumerate(("a", "b")):
        for phase, mask in (
            ("inhale", ellipsoid((5, 10, 10 + k), (3.5, 6, 6))),
            ("exhale", ellipsoid((5, 9, 10), (3, 6, 7))),
        ):
            layout.image(subject, phase).parent.mkdir(parents=True, exist_ok=True)
            io.write_image(image_from_array(mask.astype(np.float32), GRID), layout.image(subject, phase))
            io.write_image(image_from_array(mask.astype(np.uint8), GRID), layout.mask(subject, phase))
            points = GRID.index_to_world(np.array([[10.0, 10.0, 5.0], [8.0, 12.0, 4.0]]))
            pd.DataFrame(
                {"landmark": ["p1", "p2"], "x": points[:, 0], "y": points[:, 1], "z": points[:, 2], "in_view": True}
            ).to_csv(layout.landmarks(subject, phase), index=False)
    return layout


class Shifting:
    """A registrar whose field is a smooth made-up motion, numpy like a baseline's."""

    name, device, threads, batch_size = "shifting", "cpu", 1, 3

    def register(self, batch):
        centres = GRID.voxel_centres()
        field = np.stack(
            [np.sin(centres[..., 1] / 9), 0.5 * np.cos(centres[..., 0] / 7), 0.2 + 0 * centres[..., 2]], -1
        )
        return [RegistrationResult(field, 0.01, affine=sitk.AffineTransform(3)) for _ in batch]


def outputs(tmp_path, name: str) -> ChunkOutputs:
    return ChunkOutputs(tmp_path / name, tmp_path / f"{name}_metrics.tsv", tmp_path / f"{name}_landmarks.tsv")


@pytest.mark.parametrize("registrar", [Shifting(), IdentityRegistrar()], ids=["field", "identity"])
def test_chunk_rows_equal_the_reference_and_intra_pairs_get_their_files(layout, tmp_path, registrar):
    seconds = ChunkSeconds()
    rows = run_chunk(registrar, PAIRS, layout, "cohort", outputs(tmp_path, "run"), "intra_patient", seconds=seconds)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(p.name for p in PAIRS if p.intra_patient)
    for pair, row in zip(PAIRS, rows.to_dict("records")):
        fixed, moving = (
            load_phase(layout, pair.fixed_subject, "exhale"),
            load_phase(layout, pair.moving_subject, "inhale"),
        )
        field = registrar.register([LoadedPair(pair, fixed, moving)])[0].displacement
        reference, _ = evaluate_pair(pair, fixed, moving, field)
        for key, value in reference.items():
            expected = pytest.approx(value, abs=1e-9, nan_ok=True) if isinstance(value, float) else value
            assert row[key] == expected, key
        if pair.intra_patient:
            folder = tmp_path / "run" / pair.name
            saved = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "displacement.nii.gz")))
            np.testing.assert_allclose(saved, field, atol=1e-5)  # float32
            mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "warped_mask.nii.gz")))
            assert np.array_equal(mask.astype(bool), warp_mask(moving, fixed.grid, field))
    assert all(getattr(seconds, stage) >= 0 for stage in ("load", "register", "score", "write", "writer"))
    assert seconds.load > 0 and seconds.score > 0 and seconds.writer > 0


def test_a_failed_write_fails_the_chunk_naming_the_pair_and_leaves_no_tables(layout, tmp_path, monkeypatch):
    def broken(folder, item, result, warped_mask):
        if item.pair.name == PAIRS[-1].name:
            raise OSError(28, "No space left on device")
        io.write_text("written", folder / "marker.txt")

    monkeypatch.setattr(chunk, "write_pair_files", broken)
    target = outputs(tmp_path, "run")
    with pytest.raises(OSError, match="No space left") as raised:
        run_chunk(Shifting(), PAIRS, layout, "cohort", target, "intra_patient")
    assert any(PAIRS[-1].name in note for note in raised.value.__notes__)
    assert not target.metrics.exists() and not target.landmarks.exists()
    assert (tmp_path / "run" / PAIRS[0].name / "marker.txt").is_file()  # the earlier pair was written


def test_the_background_writer_runs_jobs_in_order_beside_the_caller_and_bounds_the_queue():
    done, running, release = [], threading.Event(), threading.Event()

    def job(k):
        running.set()
        assert release.wait(10)
        time.sleep(0.01)
        done.append(k)

    with io.BackgroundWriter(pending=2) as writer:
        writer.submit("first", job, 0)
        assert running.wait(10) and done == []  # the job runs, blocked, and submit has returned
        writer.submit("second", job, 1)
        release.set()
        for k in range(2, 6):
            writer.submit(f"job {k}", job, k)
            assert len(writer._jobs) <= 2  # waits for the oldest beyond `pending`
        writer.close()
    assert done == [0, 1, 2, 3, 4, 5]
    assert writer.busy_seconds >= 6 * 0.01 and writer.wait_seconds > 0


def test_the_background_writer_raises_a_jobs_error_at_the_next_submit_or_at_close():
    def fail():
        raise ValueError("bad data")

    with pytest.raises(ValueError, match="bad data") as raised, io.BackgroundWriter(pending=1) as writer:
        writer.submit("pair x", fail)
        writer.submit("pair y", lambda: None)  # waits for x: its error comes here
    assert raised.value.__notes__ == ["while writing pair x (in the background)"]
    with pytest.raises(ValueError, match="bad data"), io.BackgroundWriter() as writer:
        writer.submit("pair z", fail)
        writer.close()
