"""The contract every registration method implements, and the simplest method of all.

A method is a `Registrar`: it takes a batch of loaded pairs and returns, for each, a
`RegistrationResult`: the physical displacement field on the fixed grid (ITK convention) or, for
a method that has one on its device (the network), its sampling grid there; optionally its affine
part, its own warped image, the compute time per pair and method-specific notes (stop
condition...). `chunk.run_chunk` does the rest the same way for every method: metrics, landmark
rows, files. This module sits low in the import graph: the network and the classical baselines
import it, it imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import SimpleITK as sitk
import torch

from ..evaluate import Phase, moving_points
from ..geometry import Grid
from ..network.transform import identity_grid, physical_displacement
from ..study import Pair


@dataclass
class LoadedPair:
    pair: Pair
    fixed: Phase
    moving: Phase


@dataclass
class SamplingGrid:
    """A transform as the network holds it: where each fixed voxel centre lands, in normalised
    coordinates of the moving grid (`network.transform`'s conventions), on the device that made it."""

    points: torch.Tensor  # (z, y, x, 3), x, y, z last
    fixed: Grid
    moving: Grid

    def displacement(self) -> np.ndarray:
        """The physical field (z, y, x, 3), float64 mm on the fixed grid, on the CPU."""
        return physical_displacement(self.points[None], [self.fixed], [self.moving])[0].cpu().numpy()


class RegistrationResult:
    """One registered pair: the transform, the compute time per pair (file I/O excluded), and
    optionally the linear part alone (fixed mm -> moving mm), the method's own warped moving image
    and extra table columns (stop condition, flags...).

    The transform is given as `displacement` ((z, y, x, 3) mm on the fixed grid: T(x) = x + u(x),
    fixed -> moving) or as `sampling` (a `SamplingGrid` on the registrar's device, which the
    scoring reads where it is); `displacement` is then computed when first read (only the pair's
    files need it)."""

    def __init__(
        self,
        displacement: np.ndarray | None,
        seconds: float,
        affine: sitk.Transform | None = None,
        warped: sitk.Image | None = None,
        notes: dict | None = None,
        sampling: SamplingGrid | None = None,
    ):
        if displacement is None and sampling is None:
            raise ValueError("a registration result needs a displacement field or a sampling grid")
        self._displacement, self.sampling = displacement, sampling
        self.seconds, self.affine, self.warped = seconds, affine, warped
        self.notes = {} if notes is None else notes

    @property
    def displacement(self) -> np.ndarray:
        if self._displacement is None:
            self._displacement = self.sampling.displacement()
        return self._displacement

    def moving_points(self, fixed: Grid, moving: Grid) -> torch.Tensor:
        """Where the fixed voxel centres land in normalised moving coordinates (z, y, x, 3), on the
        registrar's device, as it computed them (what `evaluate.score_batch` scores, in float64)."""
        if self.sampling is not None:
            return self.sampling.points
        return moving_points(self.displacement, fixed, moving)


class Registrar(Protocol):
    name: str
    device: str
    threads: int
    batch_size: int

    def register(self, batch: list[LoadedPair]) -> list[RegistrationResult]: ...


class IdentityRegistrar:
    """ "Unregistered": voxel p of the fixed array reads voxel p of the moving array."""

    device, batch_size = "cpu", 1

    def __init__(self, name: str = "unregistered", threads: int = 1):
        self.name, self.threads = name, threads

    def register(self, batch: list[LoadedPair]) -> list[RegistrationResult]:
        return [RegistrationResult(None, 0.0, sampling=_identity(p.fixed.grid, p.moving.grid)) for p in batch]


def _identity(fixed: Grid, moving: Grid) -> SamplingGrid:
    """Voxel p of the fixed grid reads voxel p of the moving grid (`transform.identity_displacement`)."""
    if fixed.size != moving.size:
        raise ValueError(f"grids differ in size: {fixed.size} vs {moving.size}")
    return SamplingGrid(identity_grid(fixed.shape, dtype=torch.float64)[0], fixed, moving)
