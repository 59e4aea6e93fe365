"""Accuracy per minute of training: validation Dice of the network over training time, by recipe.

    python bench/training_recipes.py --study results        # a finished (or preprocessed) study
    python bench/training_recipes.py --study results --recipes paper_loss,default

Each recipe is a config layered over config/config.yaml and trained by the workflow itself
(`snakemake results/model/proposed/model.pt`) in its own folder, on the study's synthetic cohort
and preprocessed volumes (copied, so nothing upstream runs again). The training log's per-epoch
validation Dice and elapsed seconds become bench/results/training_recipes.tsv: one row per
(recipe, epoch), plus bench/results/training_recipes_summary.tsv (Dice at 2, 4, 6, ... minutes
and at the end). Run it on quiet cores: `seconds` is each epoch's wall time in the training job,
`elapsed_s` their running sum.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, machine, write_results  # noqa: E402

# What each recipe changes against config/config.yaml (the current default is "default").
RECIPES = {
    # the previous default: paper-like width 0.25 network, L1 gradient penalty only, full resolution
    "previous_default": {
        "model": {"feature_reduction": None, "deformable_stride": 1},
        "loss": {"alpha": 1.0e-6, "beta": 1.0e-2, "diffusion": 0.0},
        "train": {"epochs": 40, "coarse_epochs": 0},
    },
    # the CPU-fast variant with the diffusion regulariser, all epochs at full resolution
    "fast_full_resolution": {"train": {"epochs": 40, "coarse_epochs": 0}},
    # the default: coarse to fine (config/config.yaml)
    "default": {},
    # the default with the refinement's similarity (local NCC, 9-voxel windows) in training
    "ncc": {"loss": {"similarity": "ncc"}},
    # the default plus distillation: each training pair's refinement from the identity as a target
    "distill_1e-3": {"loss": {"distillation": 1.0e-3}},
    "distill_1e-4": {"loss": {"distillation": 1.0e-4}},
    "distill_1e-3_stride1": {"loss": {"distillation": 1.0e-3}, "model": {"deformable_stride": 1}},
    # the distilled default (config.yaml) with a cosine learning-rate decay within each phase
    "distill_cosine": {"train": {"schedule": "cosine"}},
    # the distilled default with targets made at a constant refinement rate (the rows' is cosine)
    "distill_constant_targets": {"train": {"distillation_schedule": "constant"}},
}


def prepare(study: Path, folder: Path) -> None:
    """A study folder holding `study`'s cohort and preprocessed volumes (the training's inputs)."""
    for part in ("cohort", "preprocessed"):
        shutil.copytree(study / part, folder / "results" / part, dirs_exist_ok=True)


def train(recipe: str, folder: Path, cores: int) -> pd.DataFrame:
    """Train `recipe` in `folder` through the workflow; its training log."""
    extra = folder / "recipe.yaml"
    threads = {"gpu_jobs": cores, "baselines": 1}  # the training job's threads = the cores given
    extra.write_text(yaml.safe_dump({**RECIPES[recipe], "threads": threads}))
    target = "results/model/proposed/training_log.tsv"
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(folder)]
    command += ["--cores", str(cores), "--resources", "gpu=1", "--configfile", str(extra), "--", target]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return pd.read_csv(folder / target, sep="\t")


def at_minutes(log: pd.DataFrame, recipe: str) -> list[dict]:
    """Validation Dice of the last epoch finished by each whole minute, and at the end."""
    elapsed = log["seconds"].cumsum()  # the log's seconds are each epoch's
    rows = []
    for minutes in range(2, int(elapsed.max() // 60) + 1, 2):
        done = log[elapsed <= 60 * minutes]
        if len(done):
            rows.append({"recipe": recipe, "minutes": minutes, "val_dice": done["val_dice"].iloc[-1]})
    rows.append({"recipe": recipe, "minutes": round(elapsed.iloc[-1] / 60, 1), "val_dice": log["val_dice"].iloc[-1]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, required=True, help="a study's results/ folder (synthetic cohort)")
    parser.add_argument("--recipes", default=",".join(RECIPES), type=lambda s: s.split(","))
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "work" / "training_recipes")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--name", default="training_recipes", help="bench/results/NAME.tsv and NAME_summary.tsv")
    arguments = parser.parse_args()
    meta = machine()
    logs, summary = [], []
    for recipe in arguments.recipes:
        folder = arguments.workdir / recipe
        shutil.rmtree(folder, ignore_errors=True)
        prepare(arguments.study.resolve(), folder)
        log = train(recipe, folder, arguments.cores)
        log = log.assign(recipe=recipe, elapsed_s=log["seconds"].cumsum())
        logs.append(log[["recipe", "epoch", "resolution", "seconds", "elapsed_s", "val_dice"]])
        summary += at_minutes(log, recipe)
        print(pd.DataFrame(summary[-1:]).to_string(index=False, header=False), flush=True)
        meta["recipes"] = {name: RECIPES[name] for name in arguments.recipes[: len(logs)]}
        write_results(pd.concat(logs).to_dict("records"), arguments.name, meta)  # after each recipe
        write_results(summary, f"{arguments.name}_summary", meta)


if __name__ == "__main__":
    main()
