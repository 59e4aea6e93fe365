"""Registering a chunk of pairs with any method, scoring each pair, writing the results.

`build_registrar` turns a method name of `study.METHODS` into its `Registrar`; `run_chunk` then
registers, scores (`evaluate.evaluate_pair`) and writes every pair the same way for every method.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import pandas as pd
import SimpleITK as sitk

from .. import io
from ..evaluate import LANDMARK_COLUMNS, Phase, evaluate_pair, load_phase, warp_image, warp_mask
from ..network.model import Acceleration, IdentityPredictor, ModelSettings
from ..network.refine import RefineSettings
from ..network.transform import displacement_image
from ..study import METHOD, Pair, PreprocessedLayout
from .base import IdentityRegistrar, LoadedPair, Registrar, RegistrationResult
from .baselines.registrar import build_baseline
from .network import NetworkRegistrar

log = logging.getLogger(__name__)


def register_stream(
    registrar: Registrar, batches: Iterable[list[LoadedPair]]
) -> Iterator[tuple[list[LoadedPair], list[RegistrationResult]]]:
    """(batch, results) for every batch: the registrar's own pipeline when it has one."""
    if hasattr(registrar, "register_stream"):
        yield from registrar.register_stream(batches)
        return
    for batch in batches:
        yield batch, registrar.register(batch)


# --------------------------------------------------------------------------- the chunk


@dataclass(frozen=True)
class ChunkOutputs:
    folder: Path  # per-pair files: displacement, warped image and mask, affine
    metrics: Path  # one row per pair
    landmarks: Path  # one row per landmark of intra-patient pairs


def write_pair_files(folder: Path, item: LoadedPair, result: RegistrationResult) -> None:
    """The field (float32 vector NIfTI, mm, ITK convention), warped image and mask, affine."""
    fixed_grid = item.fixed.grid
    field_image = sitk.Cast(displacement_image(result.displacement, fixed_grid), sitk.sitkVectorFloat32)
    io.write_image(field_image, folder / "displacement.nii.gz")
    warped = result.warped if result.warped is not None else warp_image(item.moving, fixed_grid, result.displacement)
    io.write_image(sitk.Cast(warped, sitk.sitkFloat32), folder / "warped.nii.gz")
    mask = fixed_grid.apply_to(
        sitk.GetImageFromArray(warp_mask(item.moving, fixed_grid, result.displacement).astype(np.uint8))
    )
    io.write_image(mask, folder / "warped_mask.nii.gz")
    if result.affine is not None:
        with io.atomic_path(folder / "affine.tfm") as tmp:
            sitk.WriteTransform(result.affine, str(tmp))


def run_chunk(
    registrar: Registrar,
    pairs: list[Pair],
    layout: PreprocessedLayout,
    protocol: str,
    outputs: ChunkOutputs,
    save_fields: str = "intra_patient",
    truth_for: Callable[[Pair], sitk.Image | None] = lambda pair: None,
) -> pd.DataFrame:
    """Register, score and write every pair of a chunk; returns the metrics rows.

    save_fields: "intra_patient" (default), "all" or "none": which pairs get their files.
    """
    outputs.folder.mkdir(parents=True, exist_ok=True)
    cache: dict[tuple[str, str], Phase] = {}

    def phase(subject: str, name: str) -> Phase:
        if (subject, name) not in cache:
            cache[(subject, name)] = load_phase(layout, subject, name)
        return cache[(subject, name)]

    def batches() -> Iterator[list[LoadedPair]]:  # read lazily: the registrar may pull one batch ahead
        for start in range(0, len(pairs), registrar.batch_size):
            if len(cache) > 64:  # inter-patient chunks visit many subjects: bound the memory
                cache.clear()
            yield [
                LoadedPair(p, phase(p.fixed_subject, p.fixed_phase), phase(p.moving_subject, p.moving_phase))
                for p in pairs[start : start + registrar.batch_size]
            ]

    rows, landmark_tables = [], []
    for batch, results in register_stream(registrar, batches()):
        for item, result in zip(batch, results):
            row, landmarks = evaluate_pair(
                item.pair, item.fixed, item.moving, result.displacement, truth_for(item.pair)
            )
            rows.append(
                {
                    "method": registrar.name,
                    "protocol": protocol,
                    **row,
                    **result.notes,
                    "seconds": result.seconds,
                    "device": registrar.device,
                    "threads": registrar.threads,
                }
            )
            landmark_tables.append(landmarks.assign(method=registrar.name, protocol=protocol))
            if save_fields == "all" or (save_fields == "intra_patient" and item.pair.intra_patient):
                write_pair_files(outputs.folder / item.pair.name, item, result)
        log.info("%s %s: %d/%d pairs registered", registrar.name, protocol, len(rows), len(pairs))
    metrics = pd.DataFrame(rows)
    scored = [t for t in landmark_tables if len(t)]
    io.write_table(
        pd.concat(scored, ignore_index=True)
        if scored
        else pd.DataFrame(columns=[*LANDMARK_COLUMNS, "method", "protocol"]),
        outputs.landmarks,
    )
    io.write_table(metrics, outputs.metrics)
    return metrics


def _refine_settings(refine: Mapping | RefineSettings) -> RefineSettings:
    return refine if isinstance(refine, RefineSettings) else RefineSettings.from_config(refine)


def build_registrar(
    method: str,
    threads: int,
    inference: Mapping | None = None,
    model_path: str | None = None,
    baseline_options: Mapping | None = None,
    refine: Mapping | RefineSettings | None = None,
    model: Mapping | None = None,
) -> Registrar:
    """The registrar of a method name as used in the workflow's paths and tables (`study.METHODS`).

    `inference`: the workflow's `inference:` section (a network's device, batch size, acceleration);
    `refine`: its `refine:` section, used by the refined rows; `model`: its `model:` section, the
    construction the refinement from the identity optimises under (no trained network).
    """
    kind = METHOD[method].kind if method in METHOD else None
    if kind == "identity":
        return IdentityRegistrar(method, threads)
    if kind in ("network", "instance"):
        predictor = model_path if kind == "network" else IdentityPredictor(ModelSettings.from_config(model))
        return NetworkRegistrar(
            method,
            predictor,
            inference["device"],
            inference["batch_size"],
            threads,
            acceleration=Acceleration.from_config(inference),
            prefetch=inference["prefetch"],
            refine=_refine_settings(refine) if METHOD[method].refined else None,
        )
    return build_baseline(method, baseline_options or {}, threads)  # refuses a method it does not know


def register_chunk_job(
    method: str,
    protocol: str,
    pair_rows: list[dict],
    preprocessed: str,
    truth: dict[str, str],
    options: Mapping,
    threads: int,
    model_path: str | None,
    folder: str,
    metrics: str,
    landmarks: str,
    baseline_options: Mapping | None = None,
    refine: Mapping | None = None,
    model: Mapping | None = None,
) -> pd.DataFrame:
    """One chunk job of the workflow: build the method's registrar and run the chunk.

    `options`: the workflow's `inference:` section (which pairs get their files: `save_fields`).
    """
    registrar = build_registrar(method, threads, options, model_path, baseline_options, refine, model)
    pairs = [Pair(r["moving_subject"], r["moving_phase"], r["fixed_subject"], r["fixed_phase"]) for r in pair_rows]
    truths = {subject: io.read_intermediate_image(path) for subject, path in truth.items()}
    return run_chunk(
        registrar,
        pairs,
        PreprocessedLayout(Path(preprocessed)),
        protocol,
        ChunkOutputs(Path(folder), Path(metrics), Path(landmarks)),
        options["save_fields"],
        lambda pair: truths.get(pair.fixed_subject) if pair.intra_patient else None,
    )
