"""Every method on the same pairs, 1 thread each, one after another in one process: the learned
method against the peers a lung-registration user would otherwise run (ConvexAdam, elastix).

    python bench/peers.py --study RUN/results                          # (a) the default cohort
    python bench/peers.py --study RUN/results --ct-study CT_RUN/results  # (a) and (b) the real CT pair
    python bench/peers.py --ct-study CT_RUN/results                      # (b) alone
    python bench/peers.py --ct-only                                      # (b), the peers on the original grids
    python bench/peers.py --study RUN/results --pairs 2 --name peers_check  # a quick check

(a) A finished default study (`snakemake` with config/config.yaml) gives its trained model, the
preprocessed validation pairs (inhale moving, exhale fixed) and the synthetic cohort's true
fields. Every method is built by the workflow's own `registration.chunk.build_registrar` with
the settings the workflow would give it (config/config.yaml and the schema's defaults; every
baseline runs, enabled or not) and scored by `evaluate.evaluate_pair`, the tables' code: Dice %,
landmark ds mm, end-point error mm, min det J, folding pairs, seconds per pair (the registrar's
timed region: `RegistrationResult.seconds`, as in the tables).

(b) The real CT pair of ../shared/data/elastix_lung_pair (51 landmark pairs in both fields of
view; fixed: the follow-up scan, moving: the baseline, as README's ct.tsv). ConvexAdam and
elastix on the ORIGINAL grids (the fixed image's native 1.37 x 1.37 x 2.5 mm grid, HU clipped to
[-1024, 300] and scaled to [0, 1] by preprocess.clip_and_scale), with config/ct.yaml's options,
scored by the landmarks (metrics.landmark_errors on the field they hand back, on the original
fixed grid) and the Jacobian inside the original fixed lung mask. With --ct-study (a CT study's
results folder, config/ct.yaml), every method also on that study's preprocessed pair, with its
model, scored by evaluate_pair as its tables are.

Rows: bench/results/NAME.tsv (the default cohort; per pair NAME_pairs.tsv), NAME_ct.tsv (the CT
pair; the CT study's rows per pair NAME_ct_pairs.tsv); NAME*.json the machine and command. Timing
is only meaningful on a quiet machine: the load average at each method's start is in its row.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, load_average, machine, workflow_config, write_results  # noqa: E402

from lungreg import io, metrics  # noqa: E402
from lungreg.evaluate import evaluate_pair, load_phase  # noqa: E402
from lungreg.geometry import Grid  # noqa: E402
from lungreg.manifest import landmarks_in_view  # noqa: E402
from lungreg.preprocess import clip_and_scale  # noqa: E402
from lungreg.registration.base import LoadedPair  # noqa: E402
from lungreg.registration.baselines.registrar import build_baseline  # noqa: E402
from lungreg.registration.chunk import build_registrar  # noqa: E402
from lungreg.study import (  # noqa: E402
    METHOD,
    REFINE_WORKFLOW_KEYS,
    Pair,
    PreprocessedLayout,
    protocol_pairs,
    validation_pairs,
)

METHODS = ("unregistered", "proposed", "proposed_refined", "syn", "sitk_bspline", "convexadam", "elastix")
PEERS = ("convexadam", "elastix")  # also run on the CT pair's original grids
WORKFLOW_KEYS = ("enabled", "protocols", "chunks", "subjects")  # rules/common.smk BASELINE_KEYS
FIXED_PHASE = "exhale"  # the default study's and the CT preset's (pairs: fixed_phase)
# as the tests find it (tests/conftest.py): LUNGREG_SHARED_DATA, else ../shared/data beside the repository
CT_DATA = Path(os.environ.get("LUNGREG_SHARED_DATA", REPO.parent / "shared" / "data")) / "elastix_lung_pair"
CT_WINDOW = (-1024.0, 300.0)  # config/ct.yaml's preprocess.intensity_range
CT_FIXED, CT_MOVING = "followup", "baseline"  # README's ct.tsv: exhale (fixed) = follow-up, inhale = baseline


def registrar(method: str, study: Path, config: dict):
    """The workflow's registrar of `method`, 1 thread, the configuration's settings."""
    baseline = {k: v for k, v in config["baselines"].get(method, {}).items() if k not in WORKFLOW_KEYS}
    model = study / "model" / METHOD[method].model / "model.pt" if METHOD[method].kind == "network" else None
    inference = {**config["inference"], "device": "cpu"}
    refine = {k: v for k, v in config["refine"].items() if k not in REFINE_WORKFLOW_KEYS}
    return build_registrar(method, 1, inference, model and str(model), baseline, refine)


def loaded(layout: PreprocessedLayout, pair: Pair) -> LoadedPair:
    fixed = load_phase(layout, pair.fixed_subject, pair.fixed_phase)
    return LoadedPair(pair, fixed, load_phase(layout, pair.moving_subject, pair.moving_phase))


def run_method(method: str, study: Path, config: dict, pairs: list[Pair], truth: bool) -> list[dict]:
    """Register and score `pairs` with one method; one row per pair."""
    layout = PreprocessedLayout(study / "preprocessed")
    runner = registrar(method, study, config)
    load = load_average()
    rows = []
    for start in range(0, len(pairs), runner.batch_size):
        batch = [loaded(layout, p) for p in pairs[start : start + runner.batch_size]]
        for item, result in zip(batch, runner.register(batch)):
            path = study / f"cohort/synthetic/{item.pair.fixed_subject}/gt_displacement_fixed-{FIXED_PHASE}.nii.gz"
            exact = sitk.ReadImage(str(path)) if truth else None
            row, landmarks = evaluate_pair(item.pair, item.fixed, item.moving, result.displacement, exact)
            rows.append(
                {
                    "method": method,
                    **row,
                    "ds_landmarks": landmarks.loc[landmarks["in_view"].astype(bool), "ds"].tolist(),
                    "seconds": result.seconds,
                    "flag": result.notes.get("flag", ""),
                    "stop_condition": result.notes.get("stop_condition", ""),
                    "load_1m": load,
                }
            )
    return rows


def per_pair(rows: list[dict]) -> list[dict]:
    """The pair rows as written: without the landmark errors they carry for the summary."""
    return [{k: v for k, v in row.items() if k != "ds_landmarks"} for row in rows]


def summary(method: str, rows: pd.DataFrame, grid: str) -> dict:
    folding = rows["jacobian_fraction_nonpositive"] > 0
    return {
        "method": method,
        "grid": grid,
        "pairs": len(rows),
        "dice_pct": 100 * rows["dice"].mean() if "dice" in rows else np.nan,
        "ds_mm": rows["ds"].mean(),
        "ds_std_mm": np.std(np.concatenate(rows["ds_landmarks"].to_list()), ddof=1),  # over the landmarks
        "epe_mm": rows["epe_mean"].mean() if "epe_mean" in rows else np.nan,
        "jacobian_min": rows["jacobian_min"].min(),
        "folding_pairs": int(folding.sum()),
        "s_per_pair": rows["seconds"].mean(),
        "flags": ";".join(sorted({f for f in rows["flag"].fillna("") if f and f != "ok"})),
        "load_1m": rows["load_1m"].iloc[0],
    }


# ------------------------------------------------------------------- the CT pair's original grids


def ct_original(data: Path) -> dict:
    """The real pair on its original grids: images in the CT window, the fixed mask, the landmarks
    in both fields of view."""
    images = {n: io.read_image(data / f"{n}.mha") for n in (CT_FIXED, CT_MOVING)}
    points = {n: io.read_landmarks(data / f"{n}_landmarks.txt") for n in (CT_FIXED, CT_MOVING)}
    phases = {FIXED_PHASE: CT_FIXED, "inhale": CT_MOVING}
    in_view = landmarks_in_view(
        {phase: points[n] for phase, n in phases.items()}, {phase: Grid.of(images[n]) for phase, n in phases.items()}
    )
    return {
        "fixed": clip_and_scale(images[CT_FIXED], *CT_WINDOW),
        "moving": clip_and_scale(images[CT_MOVING], *CT_WINDOW),
        "mask": sitk.GetArrayFromImage(io.read_image(data / f"{CT_FIXED}_mask.mha")) > 0,
        "moving_mask": sitk.GetArrayFromImage(io.read_image(data / f"{CT_MOVING}_mask.mha")) > 0,
        "fixed_points": points[CT_FIXED][in_view],
        "moving_points": points[CT_MOVING][in_view],
    }


def ct_original_row(method: str, pair: dict, config: dict) -> dict:
    """A peer on the original grids, scored on the field it hands back (the original fixed grid)."""
    options = {k: v for k, v in config["baselines"][method].items() if k not in WORKFLOW_KEYS}
    runner = build_baseline(method, options, 1)
    load = load_average()
    result = runner.register_pair(pair["fixed"], pair["moving"], pair["mask"], "elastix_lung_pair", pair["moving_mask"])
    grid = Grid.of(pair["fixed"])
    errors = metrics.landmark_errors(result.displacement, grid, pair["fixed_points"], pair["moving_points"])
    jacobian = metrics.jacobian_statistics(metrics.jacobian_determinant(result.displacement, grid), pair["mask"])
    return {
        "method": method,
        "grid": "original ({})".format(" x ".join(f"{s:.2f}" for s in grid.spacing)),
        "pairs": 1,
        "landmarks": len(errors),
        "ds_mm": float(errors[:, 3].mean()),
        "ds_std_mm": float(errors[:, 3].std(ddof=1)),
        "jacobian_min": jacobian["jacobian_min"],
        "folding_pairs": int(jacobian["jacobian_fraction_nonpositive"] > 0),
        "s_per_pair": result.seconds,
        "flags": result.notes.get("flag", ""),
        "load_1m": load,
    }


def ct_unregistered_row(pair: dict) -> dict:
    errors = np.linalg.norm(pair["moving_points"] - pair["fixed_points"], axis=1)
    return {
        "method": "unregistered",
        "grid": "original",
        "pairs": 1,
        "landmarks": len(errors),
        "ds_mm": errors.mean(),
        "ds_std_mm": errors.std(ddof=1),
    }


# ------------------------------------------------------------------- main


def parse_override(text: str) -> tuple[list[str], object]:
    """'baselines.elastix.bspline_iterations=100' -> (['baselines', 'elastix', 'bspline_iterations'], 100)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--set {text!r}: expected SECTION.KEY=VALUE")
    return key.split("."), yaml.safe_load(value)


def with_overrides(config: dict, overrides: list[tuple[list[str], object]]) -> dict:
    """`config` with each override set; every key on the way must exist (a typo is an error)."""
    for keys, value in overrides:
        section = config
        for depth, key in enumerate(keys):
            if key not in section:
                raise SystemExit(f"--set {'.'.join(keys)}: no key {'.'.join(keys[: depth + 1])} in the configuration")
            if depth == len(keys) - 1:
                section[key] = value
            else:
                section = section[key]
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, help="a finished default study's results/ folder")
    parser.add_argument("--ct-study", type=Path, help="a CT study's results/ folder (config/ct.yaml, the elastix pair)")
    parser.add_argument("--ct-only", action="store_true", help="the CT pair's original grids, without a CT study")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of: " + ", ".join(METHODS))
    parser.add_argument("--pairs", type=int, default=0, help="the first N validation pairs only (0: all 13)")
    parser.add_argument("--ct-data", type=Path, default=CT_DATA)
    parser.add_argument(
        "--ct-grids",
        default="original,study",
        help="the CT pair: original (the peers on the original grids), study (every method on --ct-study's grid)",
    )
    parser.add_argument("--name", default="peers", help="bench/results/NAME*.tsv")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a setting of both configurations (YAML value), e.g. baselines.elastix.bspline_iterations=100",
    )
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        parser.error(f"unknown methods {unknown}: expected some of {', '.join(METHODS)}")
    if args.study is None and args.ct_study is None and not args.ct_only:
        parser.error("nothing to do: give --study (the default cohort), --ct-study and/or --ct-only (the CT pair)")
    torch.set_num_threads(1)
    meta = {**machine(), "command": " ".join(sys.argv), "threads": 1}
    overrides = [parse_override(text) for text in args.set]
    meta["settings"] = args.set
    if args.study is not None:
        default_cohort(args, methods, with_overrides(workflow_config(), overrides), meta)
    if args.ct_only or args.ct_study:
        ct_pair(args, methods, with_overrides(workflow_config(REPO / "config" / "ct.yaml"), overrides), meta)


def default_cohort(args: argparse.Namespace, methods: list[str], config: dict, meta: dict) -> None:
    """(a): NAME.tsv (a row per method) and NAME_pairs.tsv, rewritten after every method (an
    interrupted run keeps what it measured)."""
    cohort = pd.read_csv(args.study / "cohort/subjects.tsv", sep="\t")
    pairs = validation_pairs(cohort, FIXED_PHASE)[: args.pairs or None]
    meta = {**meta, "study": str(args.study)}
    rows, pair_rows = [], []
    for method in methods:
        done = run_method(method, args.study, config, pairs, truth=True)
        pair_rows += done
        rows.append({**summary(method, pd.DataFrame(done), "the study's"), "settings": " ".join(args.set)})
        print(pd.DataFrame(rows[-1:]).to_string(index=False, header=len(rows) == 1), flush=True)
        written = write_results(rows, args.name, meta)
        write_results(per_pair(pair_rows), f"{args.name}_pairs", meta)
    print(f"wrote {written}")


def ct_pair(args: argparse.Namespace, methods: list[str], config: dict, meta: dict) -> None:
    """(b): NAME_ct.tsv (a row per method and grid) and NAME_ct_pairs.tsv (the CT study's rows)."""
    meta = {**meta, "ct_data": str(args.ct_data), "ct_study": str(args.ct_study or "")}
    pair = ct_original(args.ct_data)
    rows, pair_rows = [ct_unregistered_row(pair)], []

    def save() -> Path:
        written = write_results([{**row, "settings": " ".join(args.set)} for row in rows], f"{args.name}_ct", meta)
        if pair_rows:
            write_results(per_pair(pair_rows), f"{args.name}_ct_pairs", meta)
        print(pd.DataFrame(rows[-1:]).to_string(index=False), flush=True)
        return written

    for method in [m for m in methods if m in PEERS and "original" in args.ct_grids]:
        rows.append(ct_original_row(method, pair, config))
        written = save()
    if args.ct_study and "study" in args.ct_grids:
        cohort = pd.read_csv(args.ct_study / "cohort/subjects.tsv", sep="\t")
        pairs = protocol_pairs("inhale_exhale", cohort, FIXED_PHASE)
        layout = PreprocessedLayout(args.ct_study / "preprocessed")
        grid = Grid.of(load_phase(layout, pairs[0].fixed_subject, FIXED_PHASE).image)
        grid_name = "the CT study's ({})".format(" x ".join(f"{s:.2f}" for s in grid.spacing))
        for method in methods:
            done = run_method(method, args.ct_study, config, pairs, truth=False)
            pair_rows += done
            landmarks = int(done[0]["landmarks_scored"])
            rows.append({**summary(method, pd.DataFrame(done), grid_name), "landmarks": landmarks})
            written = save()
    print(f"wrote {written if len(rows) > 1 else save()}")


if __name__ == "__main__":
    main()
