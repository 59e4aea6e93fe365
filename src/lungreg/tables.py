"""The summary tables of the study (the paper's Table 1 and Table 2, Jacobian, end-point error, QC).

Built from every method's per-pair and per-landmark rows (`evaluate`), over the evaluation
subjects of `study.evaluation_subjects`; methods named and ordered by `study.METHODS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from . import io
from .evaluate import LANDMARK_COLUMNS
from .preprocess import QC_COLUMNS
from .registration.budget import CURVE_COLUMNS, STARTS, budget_name, start_method
from .study import PROTOCOLS, evaluation_subjects, method_label, method_rank, too_small_to_split


def _method_order(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values("method", key=lambda s: s.map(method_rank)).reset_index(drop=True)


def table1_dice(pairs: pd.DataFrame, evaluated_on: str) -> pd.DataFrame:
    """The paper's Table 1: Dice (%) per method and protocol, mean and std, and time per pair."""
    rows = []
    for method, group in pairs.groupby("method", sort=False):
        row = {"method": method, "name": method_label(method)}
        for protocol in PROTOCOLS:
            dice = group.loc[group["protocol"] == protocol, "dice"] * 100
            if protocol == "inhale_exhale" or len(dice):
                row |= {
                    f"{protocol}_dice_mean": dice.mean(),
                    f"{protocol}_dice_std": dice.std(ddof=1),
                    f"{protocol}_pairs": len(dice),
                }
        row |= {
            "evaluated_on": evaluated_on,
            "seconds_per_pair": group["seconds"].mean(),
            "device": ",".join(sorted(group["device"].astype(str).unique())),
            "threads": ",".join(sorted(group["threads"].astype(str).unique())),
        }
        rows.append(row)
    return _method_order(pd.DataFrame(rows))


TABLE2_COLUMNS = [
    "method",
    "name",
    *(f"{a}_{s}" for a in ("dx", "dy", "dz", "ds") for s in ("mean", "std")),
    "pairs",
    "landmarks_scored",
    "landmarks_excluded",
]


def table2_landmarks(landmarks: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 2: |dx|, |dy|, |dz| and ds (mm) over in-view landmarks, mean and std."""
    rows = []
    for method, group in landmarks.groupby("method", sort=False):
        scored = group[group["in_view"].astype(bool)]
        row = {"method": method, "name": method_label(method)}
        for axis in ("dx", "dy", "dz", "ds"):
            row |= {f"{axis}_mean": scored[axis].mean(), f"{axis}_std": scored[axis].std(ddof=1)}
        row |= {
            "pairs": group["pair"].nunique(),
            "landmarks_scored": len(scored),
            "landmarks_excluded": len(group) - len(scored),
        }
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
    table.insert(1, "name", table["method"].map(method_label))
    return _method_order(table)


def endpoint_table(pairs: pd.DataFrame) -> pd.DataFrame:
    """End-point error against the synthetic ground truth (mm, inside the fixed lung)."""
    if "epe_mean" not in pairs or pairs["epe_mean"].isna().all():
        return pd.DataFrame(columns=["method", "name", "pairs", "epe_mean", "epe_mean_std", "epe_p95_mean"])
    known = pairs.dropna(subset=["epe_mean"])
    table = (
        known.groupby("method", sort=False)
        .agg(
            pairs=("epe_mean", "size"),
            epe_mean=("epe_mean", "mean"),
            epe_mean_std=("epe_mean", "std"),
            epe_p95_mean=("epe_p95", "mean"),
        )
        .reset_index()
    )
    table.insert(1, "name", table["method"].map(method_label))
    return _method_order(table)


def summary_tables(pairs: pd.DataFrame, landmarks: pd.DataFrame, cohort: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """All summary tables from the per-pair and per-landmark rows of every method and protocol.

    Summaries use the evaluation subjects (validation, or all when the cohort was too small to
    split); the per-pair tables keep every pair with its split.
    """
    evaluation = set(evaluation_subjects(cohort))
    evaluated_on = (
        "all subjects, also used for training (cohort too small to split)"
        if too_small_to_split(cohort)
        else "validation subjects"
    )
    scored = pairs[pairs["moving_subject"].isin(evaluation) & pairs["fixed_subject"].isin(evaluation)]
    scored_landmarks = landmarks[
        landmarks["pair"].isin(scored.loc[scored["protocol"] == "inhale_exhale", "pair"])
        & (landmarks["protocol"] == "inhale_exhale")
    ]
    return {
        "table1_dice": table1_dice(scored, evaluated_on),
        "table2_landmarks": table2_landmarks(scored_landmarks),
        "jacobian": jacobian_table(scored),
        "endpoint_error": endpoint_table(scored[scored["protocol"] == "inhale_exhale"]),
    }


def pair_checks(pairs: pd.DataFrame) -> pd.DataFrame:
    """The problems of registered pairs, one row each (`QC_COLUMNS`): a Dice below the Unregistered
    one of the same pair, folding (det J <= 0 somewhere in the fixed lung), a baseline's flag."""
    rows = []

    def add(frame: pd.DataFrame, check: str, value, limit, message) -> None:
        for (_, pair), v, lim, text in zip(frame.iterrows(), value, limit, message):
            rows.append(
                dict(
                    zip(
                        QC_COLUMNS,
                        (pair["fixed_subject"], pair["fixed_phase"], pair["method"], pair["protocol"], pair["pair"])
                        + (check, v, lim, True, text),
                    )
                )
            )

    unregistered = pairs.loc[pairs["method"] == "unregistered", ["protocol", "pair", "dice"]]
    merged = pairs[pairs["method"] != "unregistered"].merge(
        unregistered.rename(columns={"dice": "unregistered_dice"}), on=["protocol", "pair"], how="left"
    )
    worse = merged[merged["dice"] < merged["unregistered_dice"]]
    add(
        worse,
        "dice_below_unregistered",
        worse["dice"],
        worse["unregistered_dice"],
        [f"Dice {d:.3f} below Unregistered's {u:.3f}" for d, u in zip(worse["dice"], worse["unregistered_dice"])],
    )
    folded = pairs[pairs["jacobian_fraction_nonpositive"] > 0]
    add(
        folded,
        "folding",
        folded["jacobian_fraction_nonpositive"],
        [0.0] * len(folded),
        [
            f"det J <= 0 in {100 * f:.3g}% of the fixed lung (min det J {j:.3g})"
            for f, j in zip(folded["jacobian_fraction_nonpositive"], folded["jacobian_min"])
        ],
    )
    if "flag" in pairs:
        flags = pairs["flag"].fillna("").astype(str)
        flagged = pairs[~flags.isin(["", "ok"])]
        stops = flagged["stop_condition"] if "stop_condition" in flagged else [""] * len(flagged)
        add(  # value stays numeric (NaN): the flag is in the message
            flagged,
            "baseline_flag",
            [float("nan")] * len(flagged),
            [float("nan")] * len(flagged),
            [f"flag {f} (stop condition: {s})" for f, s in zip(flagged["flag"], stops)],
        )
    frame = pd.DataFrame(rows, columns=QC_COLUMNS)
    order = frame["method"].map(method_rank)
    return frame.assign(_rank=order).sort_values(["_rank", "protocol", "pair", "check"]).drop(columns="_rank")


def qc_table(subject_checks: list[pd.DataFrame], pairs: pd.DataFrame) -> pd.DataFrame:
    """results/tables/qc.tsv: every subject's checks (lungreg.preprocess: crop, clipping, landmarks
    in view and excluded; `problem` says which are problems), then one row per problem of a
    registered pair and method (`pair_checks`)."""
    subjects = [frame for frame in subject_checks if len(frame)]
    parts = [*subjects, pair_checks(pairs)]
    frame = pd.concat([p.astype(object) for p in parts], ignore_index=True)
    return frame[QC_COLUMNS]


def refine_budget_table(
    pairs: pd.DataFrame, curve: pd.DataFrame, evaluated: Sequence[str], variant: str, refine: Mapping
) -> pd.DataFrame:
    """results/tables/refine_budget.tsv: per start (the network's prediction, the identity) and
    budget (steps per stage), over the evaluated subjects' inhale-exhale pairs: Dice (%), landmark ds,
    end-point error (mm) and seconds per pair. Budget 0 (the single pass; Unregistered) and the
    full budget (the refined rows) come from `pairs`, the others from the curve job (`curve`)."""
    full = [int(stage["steps"]) for stage in refine["stages"]]
    zero = [0] * len(full)
    ends = []
    for start in STARTS:
        first = variant if start == "network" else "unregistered"
        for method, budget in ((first, zero), (start_method(start, variant), full)):
            rows = pairs[(pairs["method"] == method) & (pairs["protocol"] == "inhale_exhale")]
            header = dict(zip(CURVE_COLUMNS, (start, method, budget_name(budget), int(sum(budget)))))
            ends.append(rows.assign(**header))
    every = pd.concat([*ends, curve], ignore_index=True)
    every = every[every["fixed_subject"].isin(list(evaluated))]
    rows = []
    for (start, budget), group in every.groupby(["start", "budget"], sort=False):
        rows.append(
            {
                "start": start,
                "method": group["method"].iloc[0],
                "budget": budget,
                "steps": int(group["steps"].iloc[0]),
                "pairs": len(group),
                "dice_mean": 100 * group["dice"].mean(),
                "ds_mean": group["ds"].mean(),
                "epe_mean": group["epe_mean"].mean() if "epe_mean" in group else float("nan"),
                "seconds_per_pair": group["seconds"].mean(),
            }
        )
    table = pd.DataFrame(rows)
    order = table["start"].map(STARTS.index) * 10**6 + table["steps"]
    return table.iloc[order.argsort(kind="stable")].reset_index(drop=True)


def write_tables(tables: dict[str, pd.DataFrame], folder: str | Path) -> None:
    for name, frame in tables.items():
        io.write_table(frame, Path(folder) / f"{name}.tsv")


def build_tables(
    cohort_path: str | Path,
    metrics_paths: list[str],
    landmark_paths: list[str],
    outputs: dict[str, str],
    qc_paths: list[str] = (),
    budget_curve: str | None = None,
    variant: str | None = None,
    refine: dict | None = None,
) -> dict[str, pd.DataFrame]:
    """The tables job: concatenate the chunks' rows (and the subjects' checks, `qc_paths`) and
    write every table of `outputs`; with `budget_curve` (the curve job's rows, of `variant`'s
    refined row and `refine:`'s stages) also refine_budget."""
    cohort = io.read_table(cohort_path)
    pairs = pd.concat([io.read_table(p) for p in metrics_paths], ignore_index=True)
    landmark_frames = [frame for frame in (io.read_table(p) for p in landmark_paths) if len(frame)]
    landmarks = (
        pd.concat(landmark_frames, ignore_index=True) if landmark_frames else pd.DataFrame(columns=LANDMARK_COLUMNS)
    )
    split = cohort.set_index("subject")["split"]
    pairs.insert(pairs.columns.get_loc("fixed_phase") + 1, "fixed_split", pairs["fixed_subject"].map(split))
    tables = {"pairs": pairs, "landmarks": landmarks, **summary_tables(pairs, landmarks, cohort)}
    tables["qc"] = qc_table([io.read_table(p) for p in qc_paths], pairs)
    if budget_curve:
        evaluated = evaluation_subjects(cohort)
        tables["refine_budget"] = refine_budget_table(pairs, io.read_table(budget_curve), evaluated, variant, refine)
    for name, path in outputs.items():
        io.write_table(tables[name], path)
    return tables
