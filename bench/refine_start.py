"""Why a refinement ends where it does: from the network's prediction against from the identity.

    python bench/refine_start.py --study RUN/results                      # the study's own model
    python bench/refine_start.py --study RUN/results --model OTHER/model.pt --schedules constant,cosine

On the validation pairs of a finished study (synthetic; or real, then without the end-point
error), per pair: the refinement run by the
workflow's own registrars (`proposed_refined` from the network's prediction, `identity_refined`
from the identity; batches of 4, 1 thread) with the default `refine:` settings at each budget
(steps per stage) and learning-rate schedule, scored by the tables' code (`chunk.run_chunk`):
Dice, landmark ds, end-point error, and the refinement's objective before and after. Writes
bench/results/NAME.tsv (one row per schedule, budget, start and pair) and NAME_summary.tsv (the
means, and on how many pairs the network's start ends at a higher objective than the identity's).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, write_results  # noqa: E402

from lungreg import torch_io  # noqa: E402
from lungreg.network.refine import RefineSettings  # noqa: E402
from lungreg.registration.budget import STARTS, budget_name, start_method  # noqa: E402
from lungreg.registration.chunk import ChunkOutputs, build_registrar, run_chunk  # noqa: E402
from lungreg.study import PreprocessedLayout, validation_pairs  # noqa: E402

FIXED_PHASE = "exhale"  # the default study's (pairs: fixed_phase)


def run(study: Path, model: Path, budget: list[int], schedule: str, start: str) -> pd.DataFrame:
    cohort = pd.read_csv(study / "cohort/subjects.tsv", sep="\t")
    pairs = validation_pairs(cohort, FIXED_PHASE)
    settings = RefineSettings(schedule=schedule).with_steps(budget)
    inference = {"device": "cpu", "batch_size": 4, "prefetch": False}
    construction = torch_io.load_torch(model)["model_settings"]  # the identity start's too: the same construction
    method = start_method(start, "proposed")
    registrar = build_registrar(method, 1, inference, str(model), None, settings, construction)

    def truth(pair):  # the synthetic cohort's exact field; a real cohort has none (landmarks only)
        path = study / f"cohort/synthetic/{pair.fixed_subject}/gt_displacement_fixed-{FIXED_PHASE}.nii.gz"
        return sitk.ReadImage(str(path)) if path.exists() else None

    with tempfile.TemporaryDirectory() as scratch:
        outputs = ChunkOutputs(Path(scratch), Path(scratch) / "m.tsv", Path(scratch) / "l.tsv")
        rows = run_chunk(
            registrar, pairs, PreprocessedLayout(study / "preprocessed"), "inhale_exhale", outputs, "none", truth
        )
    return rows.assign(schedule=schedule, budget=budget_name(budget), start=start)


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    summary = (
        rows.groupby(["schedule", "budget", "start"], sort=False)
        .agg(
            pairs=("pair", "size"),
            dice_pct=("dice", lambda v: 100 * v.mean()),
            ds_mm=("ds", "mean"),
            epe_mm=("epe_mean", "mean") if "epe_mean" in rows else ("ds", lambda v: float("nan")),
            objective_initial=("refine_objective_initial", "mean"),
            objective_final=("refine_objective_final", "mean"),
            s_per_pair=("seconds", "mean"),
        )
        .reset_index()
    )
    final = rows.pivot_table(index=["schedule", "budget", "pair"], columns="start", values="refine_objective_final")
    if set(STARTS) <= set(final.columns):
        higher = (final["network"] > final["identity"]).groupby(level=["schedule", "budget"]).sum()
        summary["network_final_objective_higher_pairs"] = [
            int(higher.get((s, b), 0)) if start == "network" else None
            for s, b, start in zip(summary["schedule"], summary["budget"], summary["start"])
        ]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, required=True, help="a finished synthetic study's results/ folder")
    parser.add_argument("--model", type=Path, help="another model.pt (default: the study's proposed)")
    parser.add_argument("--budgets", default="10+20,40+30", help="steps per stage, comma-separated")
    parser.add_argument("--schedules", default="constant,cosine", help="refine: schedule values")
    parser.add_argument("--name", default="refine_start", help="bench/results/NAME.tsv and NAME_summary.tsv")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    model = arguments.model or arguments.study / "model/proposed/model.pt"
    meta = {**machine(), "study": str(arguments.study), "model": str(model), "default_refine": asdict(RefineSettings())}
    frames = []
    for schedule in arguments.schedules.split(","):
        for budget in arguments.budgets.split(","):
            for start in STARTS:
                frames.append(run(arguments.study, model, [int(n) for n in budget.split("+")], schedule, start))
                print(summarise(pd.concat(frames)).tail(2).to_string(index=False), flush=True)
    rows = pd.concat(frames, ignore_index=True)
    write_results(rows.to_dict("records"), arguments.name, meta)
    print(f"wrote {write_results(summarise(rows).to_dict('records'), f'{arguments.name}_summary', meta)}")


if __name__ == "__main__":
    main()
