"""Refinement settings on one trained model: accuracy and time per pair, beside the study's SyN.

    python bench/refine_trials.py --study RUN/results                 # every trial below
    python bench/refine_trials.py --study RUN/results --trials default,previous_default

A finished default study gives the model, the preprocessed validation pairs (inhale moving,
exhale fixed), the synthetic cohort's true fields and its SyN rows. Each trial is a `refine:`
section layered over the default (`RefineSettings`), run by the workflow's own registrar
(`NetworkRegistrar`, batches of 4, 1 thread) and scored by `evaluate_pair`, the tables' code. Rows
go to bench/results/refine_trials.tsv (per trial: Dice %, landmark ds, end-point error, min det J,
folding pairs, seconds per pair); the study's SyN row on the same pairs comes first. Run it on a
quiet core: `s_per_pair` is the registrar's timed region (forward pass and refinement).

With `--ild`, every labelled subject's pair is refined, and the ILD signal left in the fields
is measured as the workflow's default classifiers see it: the motion features
(`classify.features.motion_features`, on the fixed lung mask), LDA and logistic regression
(`classify.tabular`) on the study's seeded repeated stratified folds (`classify.folds`, 5 x 5),
the mean over repeats of each repeat's out-of-fold balanced accuracy and AUC. The registration
columns stay those of the validation pairs.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, write_results  # noqa: E402

from lungreg.classify.features import motion_features  # noqa: E402
from lungreg.classify.folds import encode, make_folds, split_fold  # noqa: E402
from lungreg.classify.summary import repeated_metric  # noqa: E402
from lungreg.classify.tabular import fit_predict_sklearn  # noqa: E402
from lungreg.evaluate import evaluate_pair, load_phase  # noqa: E402
from lungreg.network.refine import RefineSettings, RefineStage  # noqa: E402
from lungreg.registration.base import LoadedPair  # noqa: E402
from lungreg.registration.network import NetworkRegistrar  # noqa: E402
from lungreg.study import (  # noqa: E402
    Pair,
    PreprocessedLayout,
    labelled_subjects,
    protocol_pairs,
    validation_pairs,
)


def _stages(coarse_steps: int, coarse: dict, fine_steps: int, fine: dict) -> tuple[RefineStage, ...]:
    """The default's two stages (every 4th voxel on 2x2x2 block centres, then every 2nd at full
    resolution) with other steps and regulariser weights."""
    return (
        RefineStage(steps=coarse_steps, control_stride=4, loss_level=2, learning_rate=0.1, **coarse),
        RefineStage(steps=fine_steps, control_stride=2, loss_level=1, learning_rate=0.05, **fine),
    )


# What each trial changes against RefineSettings() (the workflow's default is "default").
TRIALS = {
    "single_pass": {"stages": ()},
    "default": {},  # diffusion 0.3 on the coarse stage, bending 0.9 on the fine one, 10 + 20 cosine steps
    "bending": {"stages": _stages(10, {"bending": 3.0}, 20, {"bending": 0.9})},  # config/refine_bending.yaml
    # a cosine decay of each stage's learning rate (2026-12-06): stages end settled
    "cosine_40+30": {"stages": _stages(40, {"diffusion": 0.3}, 30, {"bending": 0.9})},
    "cosine_20+20": {"stages": _stages(20, {"diffusion": 0.3}, 20, {"bending": 0.9})},
    "cosine_10+20": {"stages": _stages(10, {"diffusion": 0.3}, 20, {"bending": 0.9})},
}
# The trials of 2026-12-02 to 12-05 (bench/README.md, "Refinement regularisers"), at a constant rate
# per stage (the default then).
_CONSTANT_RATE_TRIALS = {
    "constant_40+30": _stages(40, {"diffusion": 0.3}, 30, {"bending": 0.9}),  # the default of 12-05
    "bending_40+30": _stages(40, {"bending": 3.0}, 30, {"bending": 0.9}),
    "previous_default": _stages(40, {"diffusion": 0.1}, 20, {"diffusion": 0.03}),
    "diffusion_0.03_0.01": _stages(40, {"diffusion": 0.03}, 20, {"diffusion": 0.01}),
    "diffusion_0.1_then_bending": _stages(40, {"diffusion": 0.1}, 30, {"bending": 0.9}),
    "diffusion_0.1_then_bending_0.3": _stages(40, {"diffusion": 0.1}, 30, {"bending": 0.3}),
    "diffusion_0.1_then_bending_3": _stages(40, {"diffusion": 0.1}, 30, {"bending": 3.0}),
    "diffusion_0.1_then_bending_40+40": _stages(40, {"diffusion": 0.1}, 40, {"bending": 0.9}),
    "diffusion_0.1_then_bending_60+30": _stages(60, {"diffusion": 0.1}, 30, {"bending": 0.9}),
    "diffusion_0.1_bending_1_then_bending": _stages(40, {"diffusion": 0.1, "bending": 1.0}, 30, {"bending": 0.9}),
    "bending_then_diffusion": _stages(40, {"bending": 3.0}, 30, {"diffusion": 0.03}),
    "both": _stages(40, {"diffusion": 0.03, "bending": 3.0}, 30, {"diffusion": 0.01, "bending": 0.9}),
    "bending_1_0.3_40+20": _stages(40, {"bending": 1.0}, 20, {"bending": 0.3}),
    "bending_40+20": _stages(40, {"bending": 3.0}, 20, {"bending": 0.9}),
    "bending_40+40": _stages(40, {"bending": 3.0}, 40, {"bending": 0.9}),
    "bending_10_3_40+20": _stages(40, {"bending": 10.0}, 20, {"bending": 3.0}),
    "bending_30_9_40+20": _stages(40, {"bending": 30.0}, 20, {"bending": 9.0}),
}
TRIALS |= {name: {"schedule": "constant", "stages": stages} for name, stages in _CONSTANT_RATE_TRIALS.items()}

SUMMARY = {
    "dice_pct": ("dice", lambda v: 100 * v.mean()),
    "ds_mm": ("ds", "mean"),
    "epe_mm": ("epe_mean", "mean"),
    "jacobian_min": ("jacobian_min", "min"),
    "folding_pairs": ("jacobian_fraction_nonpositive", lambda v: int((v > 0).sum())),
    "s_per_pair": ("seconds", "mean"),
}


FIXED_PHASE = "exhale"  # the default study's (pairs: fixed_phase)


def labelled_pairs(cohort: pd.DataFrame) -> list[Pair]:
    """The inhale -> exhale pairs of the labelled subjects (the fields the classifiers read)."""
    labelled = set(labelled_subjects(cohort)["subject"])
    return [p for p in protocol_pairs("inhale_exhale", cohort, FIXED_PHASE) if p.fixed_subject in labelled]


def run_trial(study: Path, pairs: list[Pair], settings: RefineSettings, features: bool = False) -> pd.DataFrame:
    layout = PreprocessedLayout(study / "preprocessed")
    registrar = NetworkRegistrar("trial", study / "model/proposed/model.pt", device="cpu", refine=settings)
    rows = []
    for start in range(0, len(pairs), registrar.batch_size):
        batch = [
            LoadedPair(
                p,
                load_phase(layout, p.fixed_subject, p.fixed_phase),
                load_phase(layout, p.moving_subject, p.moving_phase),
            )
            for p in pairs[start : start + registrar.batch_size]
        ]
        for item, result in zip(batch, registrar.register(batch)):
            truth = sitk.ReadImage(
                str(study / f"cohort/synthetic/{item.pair.fixed_subject}/gt_displacement_fixed-{FIXED_PHASE}.nii.gz")
            )
            row, _ = evaluate_pair(item.pair, item.fixed, item.moving, result.displacement, truth)
            if features:
                row.update(motion_features(result.displacement, item.fixed.mask, item.fixed.grid))
            rows.append({**row, "seconds": result.seconds})
    return pd.DataFrame(rows)


def ild_signal(rows: pd.DataFrame, cohort: pd.DataFrame, repeats: int = 5, seed: int = 2018) -> dict:
    """Out-of-fold balanced accuracy and AUC of the default classifiers on the rows' motion features."""
    folds = make_folds(cohort, 5, seed, repeats)
    table = rows.set_index("fixed_subject")
    columns = [c for c in rows.columns if c.startswith("motion_")]
    subjects = sorted(folds["subject"].unique())
    y = encode(folds.drop_duplicates("subject").set_index("subject").loc[subjects, "label"])
    scores = {}
    for classifier in ("lda", "logistic"):
        probabilities = np.full((repeats, len(subjects)), np.nan)
        for repeat in range(repeats):
            for fold in range(5):
                train, test = split_fold(folds, fold, repeat)
                probability, _ = fit_predict_sklearn(
                    classifier, None, seed, table.loc[train["subject"], columns].to_numpy(),
                    encode(train["label"]), table.loc[test["subject"], columns].to_numpy(),
                )  # fmt: skip
                probabilities[repeat, [subjects.index(s) for s in test["subject"]]] = probability
        for metric in ("balanced_accuracy", "auc"):
            scores[f"{classifier}_{metric}"] = repeated_metric(metric, y, probabilities)
    return scores


def summary(name: str, rows: pd.DataFrame) -> dict:
    return {
        "trial": name,
        "pairs": len(rows),
        **{k: agg(rows[c]) if callable(agg) else rows[c].agg(agg) for k, (c, agg) in SUMMARY.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, required=True, help="a finished study's results/ folder")
    parser.add_argument("--trials", default=",".join(TRIALS), help="comma-separated names of TRIALS")
    parser.add_argument("--name", default="refine_trials", help="bench/results/NAME.tsv")
    parser.add_argument("--ild", action="store_true", help="refine every labelled subject and measure the ILD signal")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cohort = pd.read_csv(args.study / "cohort/subjects.tsv", sep="\t")
    pairs = validation_pairs(cohort, FIXED_PHASE)
    names = {p.name for p in pairs}
    results = []
    if (args.study / "tables/pairs.tsv").exists():  # a study with tables: its SyN rows on the same pairs
        table = pd.read_csv(args.study / "tables/pairs.tsv", sep="\t")
        syn = table[(table["method"] == "syn") & (table["protocol"] == "inhale_exhale") & table["pair"].isin(names)]
        results += [summary("syn (the study's rows)", syn)] if len(syn) else []
    for k, name in enumerate(args.trials.split(",")):
        settings = replace(RefineSettings(), **TRIALS[name])
        rows = run_trial(args.study, labelled_pairs(cohort) if args.ild else pairs, settings, features=args.ild)
        result = summary(name, rows[rows["pair"].isin(names)])
        results.append({**result, **(ild_signal(rows, cohort) if args.ild else {})})
        print(pd.DataFrame(results[-1:]).to_string(index=False, header=k == 0), flush=True)
    path = write_results(results, args.name, {**machine(), "study": str(args.study)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
