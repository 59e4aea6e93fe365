"""Scoring in torch against the reference, on a study's real fields: the same numbers, and the time.

    python bench/scoring.py --study RUN/results                    # bench/results/scoring.tsv, scoring_timing.tsv
    python bench/scoring.py --study RUN/results --max-pairs 6 --repeats 1 --out quick_scoring

Every saved field of the study (results/registration/METHOD/PROTOCOL/chunk-*/PAIR/displacement.nii.gz:
the intra-patient pairs of every method), scored twice on the same field in one process on one
thread: `evaluate.evaluate_pair` (the reference: numpy, scipy, SimpleITK) and `evaluate.score_batch`
(torch). scoring.tsv, one row per pair: each metric's absolute difference, the warped-mask voxels
that differ, and both times (medians of --repeats). scoring_timing.tsv, the first --paper-pairs
pairs again at the paper's grid (64 x 192 x 192 over the same field of view: images and fields
linear, masks nearest; the true field at 96 x 288 x 288 over its own), with the torch path's
parts. One thread; on a shared machine the ratios mean more than the seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402
from _common import load_average, machine, write_results  # noqa: E402

from lungreg import io  # noqa: E402
from lungreg.evaluate import Phase, evaluate_pair, load_phase, moving_points, score_batch, warp_mask  # noqa: E402
from lungreg.geometry import Grid, image_from_array, resample  # noqa: E402
from lungreg.network import scoring, transform  # noqa: E402
from lungreg.study import Pair, PreprocessedLayout  # noqa: E402

PAPER_SHAPE = (64, 192, 192)
METRICS = ("dice", "dx", "dy", "dz", "ds", "jacobian_min", "jacobian_fraction_nonpositive", "log_jacobian_std")
METRICS += ("epe_mean", "epe_p95")


def saved_pairs(results: Path) -> list[tuple[str, Pair, Path]]:
    found = []
    for path in sorted(results.glob("registration/*/*/chunk-*/*/displacement.nii.gz")):
        moving, fixed = path.parent.name.split("__")
        found.append((path.parts[-5], Pair(*moving.rsplit("_", 1), *fixed.rsplit("_", 1)), path))
    return found


def timed(function, repeats: int):
    times, value = [], None
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        value = function()
        times.append(time.perf_counter() - started)
    return value, statistics.median(times)


def on_paper_grid(phase: Phase, grid: Grid) -> Phase:
    """A phase resampled onto `grid` (the image linear, the mask nearest; landmarks as they are)."""
    image = resample(phase.image, grid, "linear")
    mask = resample(phase.grid.apply_to(sitk.GetImageFromArray(phase.mask.astype(np.uint8))), grid, "nearest")
    return Phase(image, sitk.GetArrayFromImage(mask) > 0, grid, phase.landmarks)


def scaled(grid: Grid, shape_zyx: tuple[int, int, int]) -> Grid:
    """`grid` with `shape_zyx` voxels between the same outer voxel centres."""
    size = np.asarray(shape_zyx[::-1])
    spacing = np.asarray(grid.spacing) * (np.asarray(grid.size) - 1) / (size - 1)
    return Grid(tuple(int(n) for n in size), tuple(spacing), grid.origin, grid.direction)


def field_on(field: np.ndarray, grid: Grid, target: Grid) -> np.ndarray:
    image = resample(image_from_array(field, grid, is_vector=True), target, "linear")
    return sitk.GetArrayFromImage(image).astype(np.float64)


def compare(pair: Pair, fixed: Phase, moving: Phase, field: np.ndarray, truth, repeats: int) -> dict:
    (reference, _), reference_s = timed(lambda: evaluate_pair(pair, fixed, moving, field, truth), repeats)

    def torch_path():
        points = moving_points(field, fixed.grid, moving.grid)
        return score_batch([pair], [fixed], [moving], [points], [truth])[0]

    score, torch_s = timed(torch_path, repeats)
    differing = int((warp_mask(moving, fixed.grid, field) != score.warped_mask.numpy()).sum())
    row = {"warped_voxels_differing": differing, "reference_s": reference_s, "torch_s": torch_s}
    for key in METRICS:
        if key in reference:
            a, b = reference[key], score.row[key]
            row[f"{key}_abs_diff"] = 0.0 if (np.isnan(a) and np.isnan(b)) else abs(a - b)
    return {**row, "dice": reference["dice"], "jacobian_min": reference["jacobian_min"]}


def parts(pair: Pair, fixed: Phase, moving: Phase, field: np.ndarray, truth, repeats: int) -> dict:
    """The torch path's parts at one pair, one thread: seconds each."""
    found = {}
    points, found["moving_points_s"] = timed(lambda: moving_points(field, fixed.grid, moving.grid), repeats)
    stacked = points[None]
    masks = torch.as_tensor(moving.mask[None, None], dtype=torch.float64)
    fixed_mask = torch.as_tensor(fixed.mask)
    _, found["warp_and_dice_s"] = timed(
        lambda: scoring.dice(scoring.warp_masks(masks, stacked), fixed_mask[None]), repeats
    )
    _, found["jacobian_s"] = timed(
        lambda: scoring.jacobian_statistics(points, fixed.grid, moving.grid, fixed_mask), repeats
    )
    if truth is not None:
        array, truth_grid = sitk.GetArrayViewFromImage(truth), Grid.of(truth)
        _, found["endpoint_s"] = timed(
            lambda: scoring.endpoint_errors(points, fixed.grid, moving.grid, array, truth_grid, fixed_mask), repeats
        )
    network_grid = points.to(torch.float32)[None]  # what the network hands over
    _, found["physical_displacement_s"] = timed(
        lambda: transform.physical_displacement(network_grid, [fixed.grid], [moving.grid]), repeats
    )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, required=True, help="a finished study's results/ folder")
    parser.add_argument("--max-pairs", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paper-pairs", type=int, default=3, help="pairs timed at 64 x 192 x 192")
    parser.add_argument("--out", default="scoring")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    meta = {**machine(), "threads": 1, "study": str(args.study), "command": " ".join(sys.argv)}
    print(json.dumps(meta), flush=True)
    layout = PreprocessedLayout(args.study / "preprocessed")
    pairs = saved_pairs(args.study)[: args.max_pairs]
    rows, timing = [], []
    for k, (method, pair, path) in enumerate(pairs):
        fixed = load_phase(layout, pair.fixed_subject, pair.fixed_phase)
        moving = load_phase(layout, pair.moving_subject, pair.moving_phase)
        field = sitk.GetArrayFromImage(io.read_intermediate_image(path)).astype(np.float64)
        truth_path = args.study / "cohort" / "synthetic" / pair.fixed_subject / "gt_displacement_fixed-exhale.nii.gz"
        truth = io.read_intermediate_image(truth_path) if truth_path.is_file() else None
        row = {"method": method, "pair": pair.name, "grid": "x".join(map(str, fixed.grid.shape))}
        row.update(compare(pair, fixed, moving, field, truth, args.repeats))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if k < args.paper_pairs:
            target = scaled(fixed.grid, PAPER_SHAPE)
            big = [on_paper_grid(fixed, target), on_paper_grid(moving, target), field_on(field, fixed.grid, target)]
            truth_shape = tuple(3 * n // 2 for n in PAPER_SHAPE)  # the synthetic truth is 1.5x finer, as at paper scale
            big_truth = None if truth is None else resample(truth, scaled(Grid.of(truth), truth_shape), "linear")
            found = {"method": method, "pair": pair.name, "grid": "x".join(map(str, PAPER_SHAPE))}
            found.update(compare(pair, *big, big_truth, args.repeats))
            found.update(parts(pair, *big, big_truth, args.repeats))
            found["load_1m"] = load_average()
            timing.append(found)
            print(json.dumps(found), flush=True)
    write_results(rows, args.out, meta)
    print(f"wrote {write_results(timing, f'{args.out}_timing', meta)}", flush=True)


if __name__ == "__main__":
    main()
