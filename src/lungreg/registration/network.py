"""The trained network as a `Registrar`: batched, timed around the forward pass, optionally pipelined on CUDA."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import SimpleITK as sitk
import torch

from .. import torch_io
from ..evaluate import Phase
from ..network.device import choose_device
from ..network.model import Acceleration, Predictor, RegistrationOutput, load_model
from ..network.refine import RefineReport, RefineSettings, refine
from ..network.transform import affine_to_physical, float64_grid
from .base import LoadedPair, RegistrationResult, SamplingGrid


@dataclass
class _InFlight:
    """A batch whose forward pass has been queued (CUDA) or done (CPU), not yet turned into results."""

    batch: list[LoadedPair]
    keep: tuple  # pinned host inputs and device tensors that must live until `done`
    grid: torch.Tensor  # on the device: the results' sampling grids, scored there
    warped: torch.Tensor  # host copies (CUDA: pinned, filled asynchronously until `done`)
    theta: torch.Tensor | None
    seconds: float = 0.0  # CPU: measured; CUDA: from the events once done
    events: tuple | None = None  # CUDA: (start, end, done)
    report: RefineReport | None = None  # the refinement's, per pair


class NetworkRegistrar:
    """The trained network (or another `Predictor`); pairs go through it in batches, timed around
    the forward pass.

    `acceleration` (bf16, channels_last, cudnn_benchmark, compile) says how the network runs. With
    `prefetch`, `register_stream` overlaps work on CUDA: batch k+1 is read from disk, stacked into
    pinned memory and copied to the GPU on a side stream while batch k computes, and batch k's
    results are handed on while batch k+1 computes (two batches in GPU memory at once). The
    results keep their sampling grids on the device, where `evaluate.score_batch` scores them.
    On CPU it is the plain sequential path. Timing: CUDA events around each forward pass (GPU
    time, synchronised), or the wall clock on CPU; per pair, transfers and file I/O excluded.
    With compile or cudnn_benchmark, the first batch of each input shape also runs once
    untimed (compilation, autotuning), and a short last batch is padded to the batch size so
    that a compiled network never sees a second shape.

    With `refine` (lungreg.network.refine; a method's refined row), each batch's outputs are
    refined on the same device after the forward pass, inside the timed region, and the
    refinement's report becomes table columns (refine_steps, refine_objective_initial/_final).
    """

    # Defaults as class attributes: a registrar built around a bare model (tests) runs plainly.
    acceleration = Acceleration()
    prefetch = False
    batch_size = 1
    _runner = None
    _copy_stream = None
    refine = None

    def __init__(
        self,
        name: str,
        model: str | Path | Predictor,
        device: str = "auto",
        batch_size: int = 4,
        threads: int = 1,
        bf16: bool = False,
        acceleration: Acceleration | None = None,
        prefetch: bool = True,
        refine: RefineSettings | None = None,
    ):
        self.name, self.batch_size, self.threads = name, batch_size, threads
        self.torch_device = choose_device(device)
        self.device = torch.cuda.get_device_name(self.torch_device) if self.torch_device.type == "cuda" else "cpu"
        self.acceleration = acceleration if acceleration is not None else Acceleration(bf16=bf16)
        # A trained network's file, or a predictor itself (IdentityPredictor: refinement without a network)
        self.model = model.eval() if isinstance(model, Predictor) else load_model(torch_io.load_torch(model), "cpu")
        self._runner = self.acceleration.prepare(self.model, self.torch_device)
        self.prefetch = prefetch
        self.refine = refine if refine is not None and refine.steps > 0 else None
        if prefetch and self.torch_device.type == "cuda":
            self._copy_stream = torch.cuda.Stream(self.torch_device)
        self._warm: set[tuple] = set()

    @property
    def cuda(self) -> bool:
        return self.torch_device.type == "cuda"

    def _host(self, phases: list[Phase], volume=lambda phase: phase.array) -> torch.Tensor:
        """(N, 1, D, H, W) float32 on the host; pinned on CUDA, so the copy can be asynchronous."""
        if self.acceleration.compile and len(phases) < self.batch_size:
            phases = phases + [phases[-1]] * (self.batch_size - len(phases))
        tensor = torch.from_numpy(np.stack([np.asarray(volume(p), dtype=np.float32) for p in phases])[:, None])
        return tensor.pin_memory() if self.cuda else tensor

    def _predict(self, runner, moving, fixed, fixed_mask, spacing) -> tuple[RegistrationOutput, RefineReport | None]:
        """The forward pass, and the refinement of its outputs when this registrar refines."""
        with self.acceleration.autocast(self.torch_device):
            if self.refine is None:
                return runner(moving, fixed), None
            outputs = self.model.outputs(moving, fixed)
        return refine(self.model, outputs, moving.float(), fixed.float(), fixed_mask, spacing, self.refine)

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
        fixed_phases = [p.fixed for p in batch]
        host = [self._host([p.moving for p in batch]), self._host(fixed_phases)]
        if self.refine is not None:
            host.append(self._host(fixed_phases, lambda phase: phase.mask))
        (moving, fixed, *mask), copied = self._to_device(*host)
        if copied is not None:
            stream = torch.cuda.current_stream(self.torch_device)
            stream.wait_event(copied)
            for tensor in (moving, fixed, *mask):  # allocated on the side stream, used on this one
                tensor.record_stream(stream)
        fixed_mask = mask[0] if mask else None
        # On the host: refine() moves it when it refines. A pageable host -> device copy here would
        # wait for the stream, i.e. for the previous batch's forward pass, and undo the prefetching.
        spacing = torch.tensor([phase.grid.spacing for phase in fixed_phases])
        if len(spacing) < len(fixed):  # padded for a compiled network
            spacing = torch.cat([spacing, spacing[-1:].expand(len(fixed) - len(spacing), 3)])
        moving, fixed = self.acceleration.inputs(moving, fixed)
        self._warm_up(moving, fixed)
        n = len(batch)
        if not self.cuda:
            started = time.perf_counter()
            out, report = self._predict(runner, moving, fixed, fixed_mask, spacing)
            seconds = (time.perf_counter() - started) / n
            theta = None if out.theta is None else out.theta[:n]
            return _InFlight(batch, (), out.grid[:n], out.warped[:n], theta, seconds, report=report)
        start, end, done = (
            torch.cuda.Event(enable_timing=True),
            torch.cuda.Event(enable_timing=True),
            torch.cuda.Event(),
        )
        start.record()
        out, report = self._predict(runner, moving, fixed, fixed_mask, spacing)
        end.record()
        copies = [out.grid[:n]]
        for tensor in (out.warped[:n], None if out.theta is None else out.theta[:n]):
            if tensor is None:
                copies.append(None)
                continue
            pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            pinned.copy_(tensor, non_blocking=True)
            copies.append(pinned)
        done.record()
        return _InFlight(batch, (host, moving, fixed, out), *copies, events=(start, end, done), report=report)

    def _finish(self, flight: _InFlight) -> list[RegistrationResult]:
        seconds = flight.seconds
        if flight.events is not None:
            start, end, done = flight.events
            done.synchronize()
            seconds = start.elapsed_time(end) / 1000.0 / len(flight.batch)
        grids = float64_grid(flight.grid)  # the float32 grid's offset kept exact
        warped = flight.warped.float().numpy()
        results = []
        for k, item in enumerate(flight.batch):
            fixed, moving = item.fixed.grid, item.moving.grid
            affine = (
                None if flight.theta is None else affine_to_physical(flight.theta[k].double().numpy(), fixed, moving)
            )
            image = fixed.apply_to(sitk.GetImageFromArray(warped[k, 0]))
            notes = {} if flight.report is None else flight.report.notes(k)
            sampling = SamplingGrid(grids[k], fixed, moving)
            results.append(RegistrationResult(None, seconds, affine, image, notes, sampling=sampling))
        return results

    def register(self, batch: list[LoadedPair]) -> list[RegistrationResult]:
        return self._finish(self._launch(batch))

    def register_stream(
        self, batches: Iterable[list[LoadedPair]]
    ) -> Iterator[tuple[list[LoadedPair], list[RegistrationResult]]]:
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
