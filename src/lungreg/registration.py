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
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch

from . import io
from .evaluate import LANDMARK_COLUMNS, Phase, evaluate_pair, load_phase, warp_image, warp_mask
from .geometry import Grid
from .model import Acceleration, load_model
from .study import NETWORK_METHODS, Pair, PreprocessedLayout
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


@dataclass
class _InFlight:
    """A batch whose forward pass has been queued (CUDA) or done (CPU), not yet turned into results."""

    batch: list[LoadedPair]
    keep: tuple  # pinned host inputs and device tensors that must live until `done`
    grid: torch.Tensor  # host copies (CUDA: pinned, filled asynchronously until `done`)
    warped: torch.Tensor
    theta: torch.Tensor | None
    seconds: float = 0.0  # CPU: measured; CUDA: from the events once done
    events: tuple | None = None  # CUDA: (start, end, done)


class NetworkRegistrar:
    """The trained network; pairs go through it in batches, timed around the forward pass.

    `acceleration` (bf16, channels_last, cudnn_benchmark, compile) says how the network runs. With
    `prefetch`, `register_stream` overlaps work on CUDA: batch k+1 is read from disk, stacked into
    pinned memory and copied to the GPU on a side stream while batch k computes, and batch k's
    results are scored on the CPU while batch k+1 computes (two batches in GPU memory at once).
    On CPU it is the plain sequential path. Timing: CUDA events around each forward pass (GPU
    time, synchronised), or the wall clock on CPU; per pair, transfers and file I/O excluded.
    With compile or cudnn_benchmark, the first batch of each input shape also runs once
    untimed (compilation, autotuning), and a short last batch is padded to the batch size so
    that a compiled network never sees a second shape.
    """

    # Defaults as class attributes: a registrar built around a bare model (tests) runs plainly.
    acceleration = Acceleration()
    prefetch = False
    batch_size = 1
    _runner = None
    _copy_stream = None

    def __init__(self, name: str, model_path: str | Path, device: str = "auto", batch_size: int = 4,
                 threads: int = 1, bf16: bool = False, acceleration: Acceleration | None = None,
                 prefetch: bool = True):
        self.name, self.batch_size, self.threads = name, batch_size, threads
        self.torch_device = choose_device(device)
        self.device = torch.cuda.get_device_name(self.torch_device) if self.torch_device.type == "cuda" else "cpu"
        self.acceleration = acceleration if acceleration is not None else Acceleration(bf16=bf16)
        checkpoint = io.load_torch(model_path)
        self.model = load_model(checkpoint, "cpu")
        self._runner = self.acceleration.prepare(self.model, self.torch_device)
        self.prefetch = prefetch
        if prefetch and self.torch_device.type == "cuda":
            self._copy_stream = torch.cuda.Stream(self.torch_device)
        self._warm: set[tuple] = set()

    @property
    def cuda(self) -> bool:
        return self.torch_device.type == "cuda"

    def _host(self, phases: list[Phase]) -> torch.Tensor:
        """(N, 1, D, H, W) float32 on the host; pinned on CUDA, so the copy can be asynchronous."""
        if self.acceleration.compile and len(phases) < self.batch_size:
            phases = phases + [phases[-1]] * (self.batch_size - len(phases))
        tensor = torch.from_numpy(np.stack([np.asarray(p.array, dtype=np.float32) for p in phases])[:, None])
        return tensor.pin_memory() if self.cuda else tensor

    def _to_device(self, *host: torch.Tensor) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
        """Host -> device copies: on the side stream with prefetch (an event says when they are
        done), else queued on the current stream; CPU tensors stay where they are."""
        if not self.cuda:
            return list(host), None
        if self._copy_stream is None:
            return [h.to(self.torch_device, non_blocking=True) for h in host], None
        with torch.cuda.stream(self._copy_stream):
            moved = [h.to(self.torch_device, non_blocking=True) for h in host]
            copied = torch.cuda.Event()
            copied.record(self._copy_stream)
        return moved, copied

    def _warm_up(self, moving: torch.Tensor, fixed: torch.Tensor) -> None:
        shape = tuple(moving.shape)
        if self.acceleration.needs_warmup and shape not in self._warm:
            with self.acceleration.autocast(self.torch_device):
                self._runner(moving, fixed)
            self._warm.add(shape)

    @torch.no_grad()
    def _launch(self, batch: list[LoadedPair]) -> _InFlight:
        """Queue (CUDA) or run (CPU) the forward pass of a batch; results come from `_finish`."""
        runner = self._runner or self.model
        host = (self._host([p.moving for p in batch]), self._host([p.fixed for p in batch]))
        (moving, fixed), copied = self._to_device(*host)
        if copied is not None:
            stream = torch.cuda.current_stream(self.torch_device)
            stream.wait_event(copied)
            for tensor in (moving, fixed):  # allocated on the side stream, used on this one
                tensor.record_stream(stream)
        moving, fixed = self.acceleration.inputs(moving, fixed)
        self._warm_up(moving, fixed)
        n = len(batch)
        if not self.cuda:
            started = time.perf_counter()
            with self.acceleration.autocast(self.torch_device):
                out = runner(moving, fixed)
            seconds = (time.perf_counter() - started) / n
            theta = None if out.theta is None else out.theta[:n]
            return _InFlight(batch, (), out.grid[:n], out.warped[:n], theta, seconds)
        start, end, done = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True), torch.cuda.Event())
        start.record()
        with self.acceleration.autocast(self.torch_device):
            out = runner(moving, fixed)
        end.record()
        copies = []
        for tensor in (out.grid[:n], out.warped[:n], None if out.theta is None else out.theta[:n]):
            if tensor is None:
                copies.append(None)
                continue
            pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            pinned.copy_(tensor, non_blocking=True)
            copies.append(pinned)
        done.record()
        return _InFlight(batch, (host, moving, fixed, out), *copies, events=(start, end, done))

    def _finish(self, flight: _InFlight) -> list[RegistrationResult]:
        seconds = flight.seconds
        if flight.events is not None:
            start, end, done = flight.events
            done.synchronize()
            seconds = start.elapsed_time(end) / 1000.0 / len(flight.batch)
        grids = flight.grid.double().numpy()
        warped = flight.warped.float().numpy()
        results = []
        for k, item in enumerate(flight.batch):
            fixed, moving = item.fixed.grid, item.moving.grid
            affine = None if flight.theta is None else affine_to_physical(flight.theta[k].double().numpy(), fixed, moving)
            image = fixed.apply_to(sitk.GetImageFromArray(warped[k, 0]))
            results.append(RegistrationResult(grid_to_displacement(grids[k], fixed, moving), seconds, affine, image))
        return results

    def register(self, batch: list[LoadedPair]) -> list[RegistrationResult]:
        return self._finish(self._launch(batch))

    def register_stream(self, batches: Iterable[list[LoadedPair]]) -> Iterator[tuple[list[LoadedPair], list[RegistrationResult]]]:
        """(batch, results) for every batch, in order; batch k+1 is pulled from `batches` (file
        reads included) and queued before batch k's results are made (see the class notes)."""
        if not (self.prefetch and self.cuda):
            for batch in batches:
                yield batch, self.register(batch)
            return
        pending = None
        for batch in batches:
            launched = (batch, self._launch(batch))
            if pending is not None:
                yield pending[0], self._finish(pending[1])
            pending = launched
        if pending is not None:
            yield pending[0], self._finish(pending[1])


def register_stream(registrar: Registrar, batches: Iterable[list[LoadedPair]]) -> Iterator[tuple[list[LoadedPair], list[RegistrationResult]]]:
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

    def batches() -> Iterator[list[LoadedPair]]:  # read lazily: the registrar may pull one batch ahead
        for start in range(0, len(pairs), registrar.batch_size):
            if len(cache) > 64:  # inter-patient chunks visit many subjects: bound the memory
                cache.clear()
            yield [LoadedPair(p, phase(p.fixed_subject, p.fixed_phase), phase(p.moving_subject, p.moving_phase))
                   for p in pairs[start : start + registrar.batch_size]]

    rows, landmark_tables = [], []
    for batch, results in register_stream(registrar, batches()):
        for item, result in zip(batch, results):
            row, landmarks = evaluate_pair(item.pair, item.fixed, item.moving, result.displacement, truth_for(item.pair))
            rows.append({"method": registrar.name, "protocol": protocol, **row, **result.notes,
                         "seconds": result.seconds, "device": registrar.device, "threads": registrar.threads})
            landmark_tables.append(landmarks.assign(method=registrar.name, protocol=protocol))
            if save_fields == "all" or (save_fields == "intra_patient" and item.pair.intra_patient):
                write_pair_files(outputs.folder / item.pair.name, item, result)
        log.info("%s %s: %d/%d pairs registered", registrar.name, protocol, len(rows), len(pairs))
    metrics = pd.DataFrame(rows)
    scored = [t for t in landmark_tables if len(t)]
    io.write_table(pd.concat(scored, ignore_index=True) if scored else pd.DataFrame(columns=[*LANDMARK_COLUMNS, "method", "protocol"]),
                   outputs.landmarks)
    io.write_table(metrics, outputs.metrics)
    return metrics


def build_registrar(method: str, threads: int, inference: dict | None = None, model_path: str | None = None,
                    baseline_options: dict | None = None) -> Registrar:
    """The registrar of a method name as used in the workflow's paths and tables."""
    inference = inference or {}
    if method == "unregistered":
        return IdentityRegistrar(threads=threads)
    if method in NETWORK_METHODS:
        return NetworkRegistrar(method, model_path, inference.get("device", "auto"), inference.get("batch_size", 4),
                                threads, acceleration=Acceleration.from_config(inference),
                                prefetch=inference.get("prefetch", True))
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
