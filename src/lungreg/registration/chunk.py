"""Registering a chunk of pairs with any method, scoring each pair, writing the results.

`build_registrar` turns a method name of `study.METHODS` into its `Registrar`; `run_chunk` then
registers, scores (`evaluate.score_batch`, on the registrar's device) and writes every pair the
same way for every method, the pairs' files on a background thread.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import pandas as pd
import SimpleITK as sitk

from .. import io
from ..evaluate import LANDMARK_COLUMNS, Phase, load_phase, score_batch, warp_image
from ..geometry import image_from_array
from ..network.model import Acceleration, IdentityPredictor, ModelSettings
from ..network.refine import RefineSettings
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


@dataclass
class ChunkSeconds:
    """Wall seconds of a chunk by stage, on the chunk's thread (they add up to its wall time, less
    the bookkeeping). On CUDA the registrar returns before its GPU work ends: scoring waits for it."""

    load: float = 0.0  # reading phases and true fields (the registrar pulls batches as it goes)
    register: float = 0.0  # the registrar
    score: float = 0.0  # evaluate.score_batch and the rows
    write: float = 0.0  # the pairs' fields for the writer, waiting for it (full queue, the end), tables
    writer: float = 0.0  # the writer thread's own time, beside the others

    @contextlib.contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, stage, getattr(self, stage) + time.perf_counter() - started)

    def per_pair(self, pairs: int) -> str:
        stages = ", ".join(f"{k} {v / max(pairs, 1):.3f}" for k, v in asdict(self).items() if k != "writer")
        return f"seconds per pair: {stages} (writer thread {self.writer / max(pairs, 1):.3f})"


def write_pair_files(folder: Path, item: LoadedPair, result: RegistrationResult, warped_mask: np.ndarray) -> None:
    """The field (float32 vector NIfTI, mm, ITK convention), warped image and mask (z, y, x), affine."""
    fixed_grid, displacement = item.fixed.grid, result.displacement
    io.write_image(
        image_from_array(displacement.astype(np.float32), fixed_grid, is_vector=True), folder / "displacement.nii.gz"
    )
    warped = result.warped if result.warped is not None else warp_image(item.moving, fixed_grid, displacement)
    io.write_image(sitk.Cast(warped, sitk.sitkFloat32), folder / "warped.nii.gz")
    io.write_image(image_from_array(warped_mask.astype(np.uint8), fixed_grid), folder / "warped_mask.nii.gz")
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
    seconds: ChunkSeconds | None = None,
) -> pd.DataFrame:
    """Register, score and write every pair of a chunk; returns the metrics rows.

    save_fields: "intra_patient" (default), "all" or "none": which pairs get their files, written
    on a background thread (`io.BackgroundWriter`) while the next pairs register and score.
    `seconds`, when given, is filled with the chunk's time by stage (it is logged either way).
    """
    outputs.folder.mkdir(parents=True, exist_ok=True)
    seconds = seconds if seconds is not None else ChunkSeconds()
    rows, landmark_tables = [], []
    with io.BackgroundWriter() as writer:
        batches = _batches(pairs, registrar.batch_size, layout, seconds)
        for batch, results in _timed_stream(register_stream(registrar, batches), seconds):
            with seconds.timing("load"):
                truths = [truth_for(item.pair) for item in batch]
            with seconds.timing("score"):
                points = [
                    result.moving_points(item.fixed.grid, item.moving.grid) for item, result in zip(batch, results)
                ]
                pairs_fixed_moving = [[i.pair for i in batch], [i.fixed for i in batch], [i.moving for i in batch]]
                scores = score_batch(*pairs_fixed_moving, points, truths)
                for result, score in zip(results, scores):
                    rows.append(_table_row(registrar, protocol, score.row, result))
                    if len(score.landmarks):
                        landmark_tables.append(score.landmarks.assign(method=registrar.name, protocol=protocol))
            with seconds.timing("write"):
                for item, result, score in zip(batch, results, scores):
                    if save_fields == "all" or (save_fields == "intra_patient" and item.pair.intra_patient):
                        result.displacement  # made here, where torch has the job's threads, not on the writer's
                        files = (outputs.folder / item.pair.name, item, result, score.warped_mask.cpu().numpy())
                        writer.submit(item.pair.name, write_pair_files, *files)
            log.info("%s %s: %d/%d pairs registered", registrar.name, protocol, len(rows), len(pairs))
        with seconds.timing("write"):
            writer.close()
        seconds.writer = writer.busy_seconds
    with seconds.timing("write"):
        metrics = pd.DataFrame(rows)
        columns = [*LANDMARK_COLUMNS, "method", "protocol"]
        io.write_table(
            pd.concat(landmark_tables, ignore_index=True) if landmark_tables else pd.DataFrame(columns=columns),
            outputs.landmarks,
        )
        io.write_table(metrics, outputs.metrics)
    log.info("%s %s: %d pairs, %s", registrar.name, protocol, len(pairs), seconds.per_pair(len(pairs)))
    return metrics


def _batches(
    pairs: list[Pair], size: int, layout: PreprocessedLayout, seconds: ChunkSeconds
) -> Iterator[list[LoadedPair]]:
    """The chunk's pairs in batches, their phases read lazily (the registrar may pull one batch ahead)
    and kept while the chunk needs them."""
    cache: dict[tuple[str, str], Phase] = {}

    def phase(subject: str, name: str) -> Phase:
        if (subject, name) not in cache:
            with seconds.timing("load"):
                cache[(subject, name)] = load_phase(layout, subject, name)
        return cache[(subject, name)]

    for start in range(0, len(pairs), size):
        if len(cache) > 64:  # inter-patient chunks visit many subjects: bound the memory
            cache.clear()
        yield [
            LoadedPair(p, phase(p.fixed_subject, p.fixed_phase), phase(p.moving_subject, p.moving_phase))
            for p in pairs[start : start + size]
        ]


def _table_row(registrar: Registrar, protocol: str, row: dict, result: RegistrationResult) -> dict:
    """A pair's row of the per-pair table: method and protocol, its scores, its notes, its timing."""
    return {
        "method": registrar.name,
        "protocol": protocol,
        **row,
        **result.notes,
        "seconds": result.seconds,
        "device": registrar.device,
        "threads": registrar.threads,
    }


def _timed_stream(
    stream: Iterator[tuple[list[LoadedPair], list[RegistrationResult]]], seconds: ChunkSeconds
) -> Iterator[tuple[list[LoadedPair], list[RegistrationResult]]]:
    """The stream's items, its time spent (less the phases it read meanwhile) added to `seconds.register`."""
    while True:
        started, loaded = time.perf_counter(), seconds.load
        try:
            item = next(stream)
        except StopIteration:
            return
        seconds.register += time.perf_counter() - started - (seconds.load - loaded)
        yield item


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
    return run_chunk(
        registrar,
        pairs,
        PreprocessedLayout(Path(preprocessed)),
        protocol,
        ChunkOutputs(Path(folder), Path(metrics), Path(landmarks)),
        options["save_fields"],
        lambda pair: (
            io.read_intermediate_image(truth[pair.fixed_subject])  # each is read once, when needed
            if pair.intra_patient and pair.fixed_subject in truth
            else None
        ),
    )
