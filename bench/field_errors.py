"""Where a method's end-point error lies: per component, signed, and how much of the z motion it finds.

    python bench/field_errors.py --study RUN/results --methods proposed,proposed_refined,syn

On the inhale -> exhale pairs that every named method saved a field for (a finished synthetic
study), inside the fixed lung mask: the mean end-point error, the mean absolute and the mean
signed error per component (x, y, z, mm), and the least-squares slope of the estimated against
the true z displacement per pair (1: the breathing amplitude found; below 1: underestimated).
The true field is sampled as the tables' end-point error samples it (`metrics.sample_displacement`).
Writes bench/results/NAME.tsv (`--name`, default field_errors; one row per method and pair).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, write_results  # noqa: E402

from lungreg.geometry import Grid  # noqa: E402
from lungreg.metrics import sample_displacement  # noqa: E402
from lungreg.study import Pair, PreprocessedLayout, protocol_pairs  # noqa: E402


def field_path(study: Path, method: str, pair: str) -> Path | None:
    found = sorted(study.glob(f"registration/{method}/inhale_exhale/chunk-*/{pair}/displacement.nii.gz"))
    return found[0] if found else None


def pair_rows(study: Path, methods: list[str], pair: Pair) -> list[dict]:
    paths = {m: field_path(study, m, pair.name) for m in methods}
    if not all(paths.values()):
        return []
    mask_image = sitk.ReadImage(
        str(PreprocessedLayout(study / "preprocessed").mask(pair.fixed_subject, pair.fixed_phase))
    )
    lung = sitk.GetArrayFromImage(mask_image) > 0
    grid = Grid.of(mask_image)
    truth_path = study / f"cohort/synthetic/{pair.fixed_subject}/gt_displacement_fixed-{pair.fixed_phase}.nii.gz"
    truth = sitk.ReadImage(str(truth_path))
    true = sample_displacement(sitk.GetArrayFromImage(truth).astype(float), Grid.of(truth), grid.voxel_centres()[lung])
    rows = []
    for method, path in paths.items():
        error = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[lung] - true
        estimated_z = true[:, 2] + error[:, 2]
        row = {"method": method, "pair": pair.name, "epe_mm": float(np.linalg.norm(error, axis=1).mean())}
        for c, axis in enumerate("xyz"):
            row[f"abs_{axis}_mm"] = float(np.abs(error[:, c]).mean())
            row[f"signed_{axis}_mm"] = float(error[:, c].mean())
        row["z_slope"] = float(np.polyfit(true[:, 2], estimated_z, 1)[0])
        row["true_z_mm"] = float(np.abs(true[:, 2]).mean())
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, required=True, help="a finished synthetic study's results/ folder")
    parser.add_argument("--methods", default="proposed,proposed_refined,syn", type=lambda s: s.split(","))
    parser.add_argument("--name", default="field_errors", help="bench/results/NAME.tsv")
    args = parser.parse_args()
    cohort = pd.read_csv(args.study / "cohort/subjects.tsv", sep="\t")
    pairs = protocol_pairs("inhale_exhale", cohort, "exhale")  # the default study's fixed phase
    rows = [row for pair in pairs for row in pair_rows(args.study, args.methods, pair)]
    if not rows:
        raise SystemExit(f"{args.study}: no inhale -> exhale pair has a saved field of every method {args.methods}")
    table = pd.DataFrame(rows)
    summary = table.groupby("method", sort=False).agg(
        pairs=("pair", "size"),
        **{c: (c, "mean") for c in table.columns if c not in ("method", "pair")},
        z_slope_min=("z_slope", "min"),
        z_slope_max=("z_slope", "max"),
    )
    print(summary.round(2).to_string())
    print(f"wrote {write_results(rows, args.name, {**machine(), 'study': str(args.study)})}")


if __name__ == "__main__":
    main()
