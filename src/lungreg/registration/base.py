"""The contract every registration method implements, and the simplest method of all.

A method is a `Registrar`: it takes a batch of loaded pairs and returns, for each, a
`RegistrationResult`: the physical displacement field on the fixed grid (ITK convention),
optionally its affine part, its own warped image, the compute time per pair and
method-specific notes (stop condition...). `chunk.run_chunk` does the rest the same way for
every method: files, metrics, landmark rows. This module sits low in the import graph: the
network and the classical baselines import it, it imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import SimpleITK as sitk

from ..evaluate import Phase
from ..network.transform import identity_displacement
from ..study import Pair


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
    """ "Unregistered": voxel p of the fixed array reads voxel p of the moving array."""

    device, batch_size = "cpu", 1

    def __init__(self, name: str = "unregistered", threads: int = 1):
        self.name, self.threads = name, threads

    def register(self, batch: list[LoadedPair]) -> list[RegistrationResult]:
        return [RegistrationResult(identity_displacement(p.fixed.grid, p.moving.grid), 0.0) for p in batch]
