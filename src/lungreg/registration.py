"""Registering a chunk of pairs with any method, scoring each pair, writing the results.

A method is a `Registrar`: it takes a batch of loaded pairs and returns, for each, the physical
displacement field on the fixed grid (ITK convention), optionally its affine part, its own
warped image, the compute time per pair and method-specific notes (stop condition...).
`run_chunk` does the rest the same way for every method: files, metrics, landmark rows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch

from . import io
from .evaluate import LANDMARK_COLUMNS, Phase, evaluate_pair, load_phase, warp_image, warp_mask
from .geometry import Grid
from .model import load_model
from .study import Pair, PreprocessedLayout
from .train import choose_device
from .transform import affine_to_physical, displacement_image, grid_to_displacement, identity_displacement

log = logging.getLogger(__name__)


@dataclass
class LoadedPair:
    pair: Pair
    fixed: Phase
    moving: Phase


@dataclass
class RegistrationResult:
    displacement: np.ndarray  # (z, y, x, 3) mm on the fixed grid: T(x) = x + u(x), fixed -> moving
    seconds: float  # compute time per pair, file I/O excluded
    affine: sitk.Transform | None = None  # the linear part alone, fixed mm -> moving mm
    warped: sitk.Image | None = None  # the method's own warped moving image, if it makes one
    notes: dict = field(default_factory=dict)  # extra table columns (stop condition, flags...)


class Registrar(Protocol):
    name: str
    device: str
    threads: int
    batch_size: int

    def register(self, batch: list[LoadedPair]) -> list[RegistrationResult]: ...


class IdentityRegistrar:
    """"Unregistered": voxel p of the fixed array reads voxel p of the moving array."""

    device, batch_size = "cpu", 1

    def __init__(self, name: str = "unregistered", threads: int = 1):
        self.name, self.threads = name, threads

    def register(self, batch: list[LoadedPair]) -> list[RegistrationResult]:
        return [RegistrationResult(identity_displacement(p.fixed.grid, p.moving.grid), 0.0) for p in batch]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class NetworkRegistrar:
    """The trained network; pairs go through it in batches, timed around the forward pass."""

    def __init__(self, name: str, model_path: str | Path, device: str = "auto", batch_size: int = 4,
                 threads: int = 1, bf16: bool = False):
        self.name, self.batch_size, self.threads = name, batch_size, threads
        self.torch_device = choose_device(device)
        self.device = torch.cuda.get_device_name(self.torch_device) if self.torch_device.type == "cuda" else "cpu"
        checkpoint = io.load_torch(model_path)
        self.model = load_model(checkpoint, self.torch_device)
        self.bf16 = bf16 and self.torch_device.type == "cuda"

    def _stack(self, phases: list[Phase]) -> torch.Tensor:
        arrays = np.stack([np.asarray(p.array, dtype=np.float32) for p in phases])[:, None]
        tensor = torch.from_numpy(arrays)
        if self.torch_device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(self.torch_device, non_blocking=True)

    @torch.no_grad()
    def forward(self, batch: list[LoadedPair]):
        moving = self._stack([p.moving for p in batch])
        fixed = self._stack([p.fixed for p in batch])
        synchronize(self.torch_device)
        started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(moving, fixed)
        synchronize(self.torch_device)
        return out, (time.perf_counter() - started) / len(batch)

    def register(self, batch: list[LoadedPair]) -> list[RegistrationResult]:
        out, seconds = self.forward(batch)
        grids = out.grid.double().cpu().numpy()
        warped = out.warped.float().cpu().numpy()
        results = []
        for k, item in enumerate(batch):
            fixed, moving = item.fixed.grid, item.moving.grid
            affine = None if out.theta is None else affine_to_physical(out.theta[k].double().cpu().numpy(), fixed, moving)
            image = fixed.apply_to(sitk.GetImageFromArray(warped[k, 0]))
            results.append(RegistrationResult(grid_to_displacement(grids[k], fixed, moving), seconds, affine, image))
        return results


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
    mask = fixed_grid.apply_to(sitk.GetImageFromArray(warp_mask(item.moving, fixed_grid, result.displacement).astype(np.uint8)))
    io.write_image(mask, folder / "warped_mask.nii.gz")
    if result.affine is not None:
        with io.atomic_path(folder / "affine.tfm") as tmp:
            sitk.WriteTransform(result.affine, str(tmp))


def run_chunk(registrar: Registrar, pairs: list[Pair], layout: PreprocessedLayout, protocol: str,
              outputs: ChunkOutputs, save_fields: str = "intra_patient",
              truth_for: Callable[[Pair], sitk.Image | None] = lambda pair: None) -> pd.DataFrame:
    """Register, score and write every pair of a chunk; returns the metrics rows.

    save_fields: "intra_patient" (default), "all" or "none": which pairs get their files.
    """
    outputs.folder.mkdir(parents=True, exist_ok=True)
    cache: dict[tuple[str, str], Phase] = {}

    def phase(subject: str, name: str) -> Phase:
        if (subject, name) not in cache:
            cache[(subject, name)] = load_phase(layout, subject, name)
        return cache[(subject, name)]

    rows, landmark_tables = [], []
    for start in range(0, len(pairs), registrar.batch_size):
        batch = [LoadedPair(p, phase(p.fixed_subject, p.fixed_phase), phase(p.moving_subject, p.moving_phase))
                 for p in pairs[start : start + registrar.batch_size]]
        for item, result in zip(batch, registrar.register(batch)):
            row, landmarks = evaluate_pair(item.pair, item.fixed, item.moving, result.displacement, truth_for(item.pair))
            rows.append({"method": registrar.name, "protocol": protocol, **row, **result.notes,
                         "seconds": result.seconds, "device": registrar.device, "threads": registrar.threads})
            landmark_tables.append(landmarks.assign(method=registrar.name, protocol=protocol))
            if save_fields == "all" or (save_fields == "intra_patient" and item.pair.intra_patient):
                write_pair_files(outputs.folder / item.pair.name, item, result)
        log.info("%s %s: %d/%d pairs registered", registrar.name, protocol, min(start + registrar.batch_size, len(pairs)), len(pairs))
        if len(cache) > 64:  # inter-patient chunks visit many subjects: bound the memory
            cache.clear()
    metrics = pd.DataFrame(rows)
    scored = [t for t in landmark_tables if len(t)]
    io.write_table(pd.concat(scored, ignore_index=True) if scored else pd.DataFrame(columns=[*LANDMARK_COLUMNS, "method", "protocol"]),
                   outputs.landmarks)
    io.write_table(metrics, outputs.metrics)
    return metrics


NETWORK_METHODS = ("proposed", "proposed_without_affine")


def build_registrar(method: str, threads: int, inference: dict | None = None, model_path: str | None = None,
                    baseline_options: dict | None = None) -> Registrar:
    """The registrar of a method name as used in the workflow's paths and tables."""
    inference = inference or {}
    if method == "unregistered":
        return IdentityRegistrar(threads=threads)
    if method in NETWORK_METHODS:
        return NetworkRegistrar(method, model_path, inference.get("device", "auto"),
                                inference.get("batch_size", 4), threads, inference.get("bf16", False))
    from .baselines import build_baseline

    return build_baseline(method, baseline_options or {}, threads)


def register_chunk_job(method: str, protocol: str, pair_rows: list[dict], preprocessed: str, truth: dict[str, str],
                       options: dict, threads: int, model_path: str | None, folder: str, metrics: str,
                       landmarks: str, baseline_options: dict | None = None) -> pd.DataFrame:
    """One chunk job of the workflow: build the method's registrar and run the chunk."""
    registrar = build_registrar(method, threads, options, model_path, baseline_options)
    pairs = [Pair(r["moving_subject"], r["moving_phase"], r["fixed_subject"], r["fixed_phase"]) for r in pair_rows]
    truths = {subject: io.read_intermediate_image(path) for subject, path in truth.items()}
    return run_chunk(registrar, pairs, PreprocessedLayout(Path(preprocessed)), protocol,
                     ChunkOutputs(Path(folder), Path(metrics), Path(landmarks)),
                     options.get("save_fields", "intra_patient"),
                     lambda pair: truths.get(pair.fixed_subject) if pair.intra_patient else None)
