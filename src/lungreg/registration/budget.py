"""The refinement's accuracy against its budget, from the network's prediction and from the identity.

The same refinement (config `refine:`) with fewer steps per stage, on the same pairs, run by the
same registrars (`proposed_refined`, `identity_refined`) and scored by the same code
(`chunk.run_chunk` -> `evaluate.evaluate_pair`): the Pareto front of the learned method against
pure instance optimisation. The budget 0 and the full budget are the tables' own rows (the single
pass and Unregistered; the refined rows), so the curve job computes only the budgets between.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pandas as pd
import SimpleITK as sitk

from .. import io
from ..network.refine import RefineSettings
from ..study import IDENTITY_REFINED, Pair, PreprocessedLayout, refined_method
from .chunk import ChunkOutputs, build_registrar, run_chunk

STARTS = ("network", "identity")  # where the refinement starts: the network's prediction, or the identity
CURVE_COLUMNS = ["start", "method", "budget", "steps"]  # the curve job's columns before each pair's metrics


def start_method(start: str, variant: str) -> str:
    """The refined row of a start: the variant's refined row, or the refinement from the identity."""
    return refined_method(variant) if start == "network" else IDENTITY_REFINED


def budget_name(budget: Sequence[int]) -> str:
    return "+".join(str(int(steps)) for steps in budget)


def run_budget_curve(
    budgets: Sequence[Sequence[int]],
    variant: str,
    model_path: str,
    model: Mapping,
    refine: Mapping,
    inference: Mapping,
    threads: int,
    pair_rows: list[dict],
    preprocessed: str,
    truth: Mapping[str, str],
    metrics: str,
) -> pd.DataFrame:
    """The curve job: every pair refined at every budget from both starts; one metrics row per
    (start, budget, pair), the chunk's columns after `CURVE_COLUMNS`."""
    pairs = [Pair(r["moving_subject"], r["moving_phase"], r["fixed_subject"], r["fixed_phase"]) for r in pair_rows]
    truths = {subject: io.read_intermediate_image(path) for subject, path in truth.items()}
    truth_for: Callable[[Pair], sitk.Image | None] = lambda pair: truths.get(pair.fixed_subject)  # noqa: E731
    frames = []
    with tempfile.TemporaryDirectory() as scratch:  # run_chunk's own files: not outputs of this job
        for start in STARTS:
            method = start_method(start, variant)
            for budget in budgets:
                settings = RefineSettings.from_config(refine).with_steps(budget)
                registrar = build_registrar(method, threads, inference, model_path, None, settings, model)
                folder = Path(scratch) / f"{start}_{budget_name(budget)}"
                outputs = ChunkOutputs(folder, folder / "metrics.tsv", folder / "landmarks.tsv")
                rows = run_chunk(
                    registrar,
                    pairs,
                    PreprocessedLayout(Path(preprocessed)),
                    "inhale_exhale",
                    outputs,
                    "none",
                    truth_for,
                )
                header = dict(zip(CURVE_COLUMNS, (start, method, budget_name(budget), int(sum(budget)))))
                frames.append(rows.assign(**header)[[*CURVE_COLUMNS, *rows.columns]])
    table = pd.concat(frames, ignore_index=True)
    io.write_table(table, metrics)
    return table
