"""Scoring one registered pair, the same way for every method, and the summary tables.

A method hands over its transform as a physical displacement field on the fixed grid (ITK
convention); everything here is computed from that field, so the network, the identity and the
classical baselines are measured by one piece of code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from . import io, metrics
from .geometry import Grid, resample
from .study import Pair, PreprocessedLayout
from .transform import displacement_transform

TIMING_COLUMNS = ("seconds", "seconds_per_pair", "device", "threads")  # vary run to run; everything else is reproducible


@dataclass
class Phase:
    """A preprocessed phase of one subject."""

    image: sitk.Image
    mask: np.ndarray  # (z, y, x) bool
    grid: Grid
    landmarks: pd.DataFrame  # landmark, x, y, z, in_view

    @property
    def array(self) -> np.ndarray:
        return sitk.GetArrayViewFromImage(self.image)


def load_phase(layout: PreprocessedLayout, subject: str, phase: str) -> Phase:
    image = io.read_intermediate_image(layout.image(subject, phase))
    mask = sitk.GetArrayFromImage(io.read_intermediate_image(layout.mask(subject, phase))) > 0
    landmarks_path = layout.landmarks(subject, phase)
    try:
        landmarks = pd.read_csv(landmarks_path, dtype={"landmark": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise io.CorruptFileError(landmarks_path, str(error)) from None
    return Phase(image, mask, Grid.of(image), landmarks)


def warp_mask(moving: Phase, fixed_grid: Grid, displacement: np.ndarray) -> np.ndarray:
    """The moving mask carried onto the fixed grid: linear interpolation, then > 0.5."""
    mask = moving.grid.apply_to(sitk.GetImageFromArray(moving.mask.astype(np.float32)))
    warped = resample(mask, fixed_grid, "linear", 0.0, displacement_transform(displacement, fixed_grid))
    return sitk.GetArrayFromImage(warped) > 0.5


def warp_image(moving: Phase, fixed_grid: Grid, displacement: np.ndarray) -> sitk.Image:
    return resample(moving.image, fixed_grid, "linear", 0.0, displacement_transform(displacement, fixed_grid))


LANDMARK_COLUMNS = ["pair", "landmark", "in_view", "dx", "dy", "dz", "ds"]


def landmark_rows(pair: Pair, fixed: Phase, moving: Phase, displacement: np.ndarray) -> pd.DataFrame:
    """One row per landmark of an intra-patient pair; out-of-view ones kept, flagged, not scored."""
    if not pair.intra_patient or fixed.landmarks.empty:
        return pd.DataFrame(columns=LANDMARK_COLUMNS)
    in_view = fixed.landmarks["in_view"].astype(bool).to_numpy() & moving.landmarks["in_view"].astype(bool).to_numpy()
    errors = np.full((len(in_view), 4), np.nan)
    if in_view.any():
        errors[in_view] = metrics.landmark_errors(
            displacement, fixed.grid, fixed.landmarks.loc[in_view, ["x", "y", "z"]].to_numpy(),
            moving.landmarks.loc[in_view, ["x", "y", "z"]].to_numpy())
    rows = pd.DataFrame(errors, columns=["dx", "dy", "dz", "ds"])
    rows.insert(0, "in_view", in_view)
    rows.insert(0, "landmark", fixed.landmarks["landmark"].astype(str).to_numpy())
    rows.insert(0, "pair", pair.name)
    return rows


def evaluate_pair(pair: Pair, fixed: Phase, moving: Phase, displacement: np.ndarray,
                  truth: sitk.Image | None = None) -> tuple[dict, pd.DataFrame]:
    """Metrics of one pair (a table row) and its landmark rows."""
    landmarks = landmark_rows(pair, fixed, moving, displacement)
    scored = landmarks[landmarks["in_view"].astype(bool)] if len(landmarks) else landmarks
    row = {
        **pair.as_row(),
        "intra_patient": pair.intra_patient,
        "dice": metrics.dice(warp_mask(moving, fixed.grid, displacement), fixed.mask),
        "landmarks_scored": len(scored),
        "landmarks_excluded": len(landmarks) - len(scored),
        **{axis: float(scored[axis].mean()) if len(scored) else np.nan for axis in ("dx", "dy", "dz", "ds")},
        **metrics.jacobian_statistics(metrics.jacobian_determinant(displacement, fixed.grid), fixed.mask),
    }
    if truth is not None:
        row.update(metrics.endpoint_errors(displacement, fixed.grid, truth, fixed.mask))
    return row, landmarks


# ------------------------------------------------------------------------------ tables

METHOD_NAMES = {
    "unregistered": "Unregistered",
    "proposed": "Proposed",
    "proposed_without_affine": "Proposed w/o affine",
    "syn": "SyN (ANTsPy)",
    "sitk_bspline": "SimpleITK affine + B-spline",
    "sitk_demons": "SimpleITK affine + demons",
}
METHOD_ORDER = list(METHOD_NAMES)


def _method_order(frame: pd.DataFrame) -> pd.DataFrame:
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return frame.sort_values("method", key=lambda s: s.map(lambda m: rank.get(m, len(rank)))).reset_index(drop=True)


def table1_dice(pairs: pd.DataFrame, evaluated_on: str) -> pd.DataFrame:
    """The paper's Table 1: Dice (%) per method and protocol, mean and std, and time per pair."""
    rows = []
    for method, group in pairs.groupby("method", sort=False):
        row = {"method": method, "name": METHOD_NAMES.get(method, method)}
        for protocol in ("inhale_exhale", "all_combinations", "cohort"):
            dice = group.loc[group["protocol"] == protocol, "dice"] * 100
            if protocol == "inhale_exhale" or len(dice):
                row |= {f"{protocol}_dice_mean": dice.mean(), f"{protocol}_dice_std": dice.std(ddof=1),
                        f"{protocol}_pairs": len(dice)}
        row |= {"evaluated_on": evaluated_on, "seconds_per_pair": group["seconds"].mean(),
                "device": ",".join(sorted(group["device"].astype(str).unique())),
                "threads": ",".join(sorted(group["threads"].astype(str).unique()))}
        rows.append(row)
    return _method_order(pd.DataFrame(rows))


TABLE2_COLUMNS = ["method", "name", *(f"{a}_{s}" for a in ("dx", "dy", "dz", "ds") for s in ("mean", "std")),
                  "pairs", "landmarks_scored", "landmarks_excluded"]


def table2_landmarks(landmarks: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 2: |dx|, |dy|, |dz| and ds (mm) over in-view landmarks, mean and std."""
    rows = []
    for method, group in landmarks.groupby("method", sort=False):
        scored = group[group["in_view"].astype(bool)]
        row = {"method": method, "name": METHOD_NAMES.get(method, method)}
        for axis in ("dx", "dy", "dz", "ds"):
            row |= {f"{axis}_mean": scored[axis].mean(), f"{axis}_std": scored[axis].std(ddof=1)}
        row |= {"pairs": group["pair"].nunique(), "landmarks_scored": len(scored),
                "landmarks_excluded": len(group) - len(scored)}
        rows.append(row)
    return _method_order(pd.DataFrame(rows, columns=TABLE2_COLUMNS))


def jacobian_table(pairs: pd.DataFrame) -> pd.DataFrame:
    """Jacobian determinant statistics inside the fixed lung mask, per method and protocol."""
    grouped = pairs.groupby(["method", "protocol"], sort=False)
    table = grouped.agg(
        pairs=("dice", "size"),
        jacobian_min=("jacobian_min", "min"),
        pairs_with_folding=("jacobian_fraction_nonpositive", lambda f: int((f > 0).sum())),
        fraction_nonpositive_mean=("jacobian_fraction_nonpositive", "mean"),
        log_jacobian_std_mean=("log_jacobian_std", "mean"),
        log_jacobian_std_std=("log_jacobian_std", "std"),
    ).reset_index()
    table.insert(1, "name", table["method"].map(lambda m: METHOD_NAMES.get(m, m)))
    return _method_order(table)


def endpoint_table(pairs: pd.DataFrame) -> pd.DataFrame:
    """End-point error against the synthetic ground truth (mm, inside the fixed lung)."""
    if "epe_mean" not in pairs or pairs["epe_mean"].isna().all():
        return pd.DataFrame(columns=["method", "name", "pairs", "epe_mean", "epe_mean_std", "epe_p95_mean"])
    known = pairs.dropna(subset=["epe_mean"])
    table = known.groupby("method", sort=False).agg(
        pairs=("epe_mean", "size"), epe_mean=("epe_mean", "mean"), epe_mean_std=("epe_mean", "std"),
        epe_p95_mean=("epe_p95", "mean")).reset_index()
    table.insert(1, "name", table["method"].map(lambda m: METHOD_NAMES.get(m, m)))
    return _method_order(table)


def summary_tables(pairs: pd.DataFrame, landmarks: pd.DataFrame, cohort: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """All summary tables from the per-pair and per-landmark rows of every method and protocol.

    Summaries use the evaluation subjects (validation, or all when the cohort was too small to
    split); the per-pair tables keep every pair with its split.
    """
    evaluation = set(cohort.loc[cohort["split"] != "train", "subject"])
    too_small = (cohort["split"] == "train_and_validation").any()
    evaluated_on = "all subjects, also used for training (cohort too small to split)" if too_small else "validation subjects"
    scored = pairs[pairs["moving_subject"].isin(evaluation) & pairs["fixed_subject"].isin(evaluation)]
    scored_landmarks = landmarks[landmarks["pair"].isin(scored.loc[scored["protocol"] == "inhale_exhale", "pair"])
                                 & (landmarks["protocol"] == "inhale_exhale")]
    return {
        "table1_dice": table1_dice(scored, evaluated_on),
        "table2_landmarks": table2_landmarks(scored_landmarks),
        "jacobian": jacobian_table(scored),
        "endpoint_error": endpoint_table(scored[scored["protocol"] == "inhale_exhale"]),
    }


def write_tables(tables: dict[str, pd.DataFrame], folder: str | Path) -> None:
    for name, frame in tables.items():
        io.write_table(frame, Path(folder) / f"{name}.tsv")


def build_tables(cohort_path: str | Path, metrics_paths: list[str], landmark_paths: list[str],
                 outputs: dict[str, str]) -> dict[str, pd.DataFrame]:
    """The tables job: concatenate the chunks' rows and write every table."""
    cohort = io.read_table(cohort_path)
    pairs = pd.concat([io.read_table(p) for p in metrics_paths], ignore_index=True)
    landmark_frames = [frame for frame in (io.read_table(p) for p in landmark_paths) if len(frame)]
    landmarks = pd.concat(landmark_frames, ignore_index=True) if landmark_frames else pd.DataFrame(columns=LANDMARK_COLUMNS)
    split = cohort.set_index("subject")["split"]
    pairs.insert(pairs.columns.get_loc("fixed_phase") + 1, "fixed_split", pairs["fixed_subject"].map(split))
    tables = {"pairs": pairs, "landmarks": landmarks, **summary_tables(pairs, landmarks, cohort)}
    for name, path in outputs.items():
        io.write_table(tables[name], path)
    return tables

