"""A classical method as a `Registrar`: its name to its options and function (CPU, one pair at a time)."""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np

from ...network.transform import identity_displacement
from ..base import LoadedPair, RegistrationResult
from .ants import SynOptions, ants_modules, register_syn
from .common import RegistrationError, itk_threads, resolve
from .convexadam import ConvexAdamOptions, convexadam_modules, register_convexadam, resolve_convexadam
from .elastix import ElastixOptions, elastix_modules, register_elastix, resolve_elastix
from .sitk import BsplineOptions, DemonsOptions, register_sitk

log = logging.getLogger(__name__)

# Every baseline of study.METHODS (tests/test_architecture.py checks that the two agree).
OPTIONS = {
    "syn": SynOptions,
    "sitk_bspline": BsplineOptions,
    "sitk_demons": DemonsOptions,
    "convexadam": ConvexAdamOptions,
    "elastix": ElastixOptions,
}
# the methods with checks of their own beyond `common.resolve`
RESOLVERS = {"convexadam": resolve_convexadam, "elastix": resolve_elastix}
# the optional packages a method imports when used: loaded when its registrar is built
MODULES = {"syn": ants_modules, "convexadam": convexadam_modules, "elastix": elastix_modules}


def resolve_options(method: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The method's defaults updated with `options`; unknown keys or methods are an error."""
    if method not in OPTIONS:
        raise ValueError(f"unknown baseline method {method!r}: expected one of {', '.join(OPTIONS)}")
    if method in RESOLVERS:
        return RESOLVERS[method](options)
    return resolve(OPTIONS[method], method, options)


class BaselineRegistrar:
    """A classical method as a `registration.base.Registrar` (CPU, one pair at a time)."""

    device = "cpu"
    batch_size = 1

    def __init__(self, method: str, options: Mapping[str, Any] | None = None, threads: int = 1):
        self.name = method
        self.threads = max(1, int(threads))
        self.options = resolve_options(method, options)
        if method in MODULES:
            with itk_threads(self.threads):  # fail early if the package is missing; threads are set per call
                MODULES[method]()

    def register_pair(self, fixed, moving, fixed_mask, pair: str = "", moving_mask=None) -> RegistrationResult:
        """One pair; `moving_mask` is read by convexadam's masked mode only."""
        if self.name == "syn":
            return register_syn(fixed, moving, fixed_mask, self.options, pair, self.threads)
        if self.name == "convexadam":
            return register_convexadam(fixed, moving, fixed_mask, self.options, pair, self.threads, moving_mask)
        if self.name == "elastix":
            return register_elastix(fixed, moving, fixed_mask, self.options, pair, self.threads)
        return register_sitk(self.name, fixed, moving, fixed_mask, self.options, pair, self.threads)

    def register(self, batch: list[LoadedPair]) -> list[RegistrationResult]:
        results = []
        for item in batch:
            try:
                result = self.register_pair(
                    item.fixed.image, item.moving.image, item.fixed.mask, item.pair.name, item.moving.mask
                )
            except RegistrationError as error:
                if self.options["on_error"] == "raise":
                    raise
                log.error("%s: %s; reporting the identity, flagged", self.name, error)
                result = RegistrationResult(
                    identity_displacement(item.fixed.grid, item.moving.grid),
                    float("nan"),
                    None,
                    None,
                    {"flag": "failed", "stop_condition": str(error), "iterations": 0, "metric_value": np.nan},
                )
            log.info(
                "%s %s: %.2f s, flag %s, %s",
                self.name,
                item.pair.name,
                result.seconds,
                result.notes.get("flag"),
                result.notes.get("stop_condition"),
            )
            results.append(result)
        return results


def build_baseline(method: str, options: Mapping[str, Any] | None, threads: int) -> BaselineRegistrar:
    """The registrar of a classical method (a name of `OPTIONS`)."""
    return BaselineRegistrar(method, options, threads)
