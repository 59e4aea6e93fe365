"""Classical registration baselines: ANTsPy SyN, SimpleITK affine + B-spline, SimpleITK affine + demons.

Every method here is a `registration.Registrar`: it receives the preprocessed fixed and moving
phases (physical geometry in the `sitk.Image` headers) and returns, per pair, the displacement
field on the fixed grid in the project's convention -- (z, y, x, 3) mm, components physical
(x, y, z), T(x) = x + u(x) maps a fixed point to its moving point (ITK's resampling direction) --
plus the affine part, the library's own warped image and notes that become table columns.
Scoring is left to `registration.run_chunk`, the same for every method.

The classical-registration pitfalls of the ITK / SimpleITK forum threads (paper.md, "Classical-
registration pitfalls") are each handled by one small function:

* masks -- `dilate_mask`, `crop_to_mask`, `configure_sampling`: the metric is evaluated on the
  fixed image cropped to the bounding box of the (dilated) lung mask plus a margin, on ALL voxels
  of that mask (sampling strategy NONE: deterministic, nothing drawn by rejection over the whole
  image), so the result does not depend on the image's extent;
* initialisation -- `centred_initial_transform`, `overlap_fraction`, `check_overlap`: a centred
  transform initialiser, then the fraction of fixed-mask points that map inside the moving image
  is checked BEFORE optimising; too small raises `RegistrationError` naming the pair (instead of
  ITK's "joint PDF summed to zero" half-way through);
* pyramid -- `pyramid_schedule`: shrink factors chosen from the size of the cropped image and the
  number of mask voxels so the coarsest level keeps enough of both; smoothing in mm;
* optimiser -- `configure_optimizer`: scales from physical shift on every gradient stage (a
  line-search optimiser by default: plain gradient descent with a learning rate estimated once
  diverged on the thorax CT's 20 degree rotation); the stop condition, iteration count and
  metric value before / after of every stage are recorded per pair, and `assess_stage` flags
  zero-iteration / zero-gradient / unchanged / metric-worse runs (column `flag`) instead of
  reporting them as good results.

Two ANTsPy traps met on the way (see `register_syn`): antsRegistration's own centre-of-mass
initialisation would use the CROPPED fixed image (so ours, computed on the whole images, is
passed as a transform file), and its metric mask must be an unsigned-char image (a float image's
pointer is silently misread: the registration then runs but barely moves).

Timing (`seconds`): the registration itself, from the in-memory images to the final transform;
not the conversion to a field, the warped image or any file I/O (for ANTs, the antsRegistration
call, which writes its transforms to a temporary folder internally).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import SimpleITK as sitk

from .geometry import Grid
from .transform import displacement_transform, identity_displacement

log = logging.getLogger(__name__)

METHODS = ("syn", "sitk_bspline", "sitk_demons")
ITK_THREADS_ENV = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"


class RegistrationError(ValueError):
    """A registration that cannot give a meaningful result (no overlap, empty mask, ITK failure)."""


# --------------------------------------------------------------------------- options

# Options shared by every method (the workflow keys enabled / protocols / chunks never get here).
COMMON_DEFAULTS: dict[str, Any] = {
    "initializer": "geometry",        # geometry (image centres), moments (centres of mass) or none
    "mask_dilation_mm": 10.0,         # dilate the fixed lung mask so its boundary counts in the metric
    "crop_margin_mm": 20.0,           # the fixed image is cropped to the dilated mask's box + this margin
    "min_overlap": 0.5,               # fraction of fixed-mask points inside the moving image, checked first
    "pyramid_levels": 3,              # at most this many levels (shrink 4, 2, 1)
    "pyramid_min_size": 12,           # voxels per axis of the cropped image at the coarsest level
    "pyramid_min_mask_voxels": 1000,  # mask voxels at the coarsest level
    "seed": 2018,
    "on_error": "raise",              # raise, or identity: a flagged identity result for a failed pair
}

SITK_LINEAR_DEFAULTS: dict[str, Any] = {
    "linear_stages": ["rigid", "affine"],  # run in order; each starts from the previous one
    "linear_metric": "mse",           # mse, correlation or mattes (MI was unstable on 24 x 48 x 48 lungs)
    "mattes_bins": 32,
    "sampling_percentage": 1.0,       # 1: every voxel of the dilated mask; < 1: REGULAR, seeded
    "linear_optimizer": "conjugate_gradient",  # or line_search, gradient_descent (all: scales from physical shift)
    "linear_iterations": 200,         # per pyramid level (one number: SimpleITK has no per-level count)
    "max_step_mm": 2.0,               # gradient descent: the first step moves no point further than this
    "convergence_minimum": 1.0e-6,    # gradient descent: stop when the metric's slope over the
    "convergence_window": 10,         # last `convergence_window` iterations is below this
}

DEFAULTS: dict[str, dict[str, Any]] = {
    "sitk_bspline": {
        **COMMON_DEFAULTS,
        **SITK_LINEAR_DEFAULTS,
        "metric": "mse",              # of the B-spline stage: mse, correlation or mattes
        "grid_spacing_mm": 40.0,      # B-spline control-point spacing
        "bspline_optimizer": "lbfgsb",  # lbfgsb, or gradient_descent (scales from physical shift)
        "bspline_iterations": 100,    # per pyramid level
        "lbfgsb_gradient_tolerance": 1.0e-5,  # L-BFGS-B stops when the projected gradient is below this
        "lbfgsb_cost_factor": 1.0e7,  # ... or when the relative cost reduction is below this x 2.2e-16
    },
    "sitk_demons": {
        **COMMON_DEFAULTS,
        **SITK_LINEAR_DEFAULTS,
        "demons_filter": "fast_symmetric",  # fast_symmetric, diffeomorphic or demons (intensity SSD)
        "demons_iterations": [50, 50, 50],  # coarse to fine; the finest levels the pyramid allows
        "demons_smoothing_mm": 12.0,  # Gaussian sigma of the displacement-field regularisation
        "demons_update_smoothing_mm": 0.0,  # sigma of the update field (0: off)
        "demons_max_rms_error": 0.01,  # stop a level when the RMS change falls below this (mm)
    },
    "syn": {
        **COMMON_DEFAULTS,
        "mask_all_stages": True,      # the (dilated) lung mask for the affine stage as well as SyN
        "linear_stages": ["rigid", "affine"],  # ANTs Rigid then Affine stages before SyN
        "affine_metric": "mattes",    # mattes, meansquares or gc (global correlation)
        "mattes_bins": 32,
        "affine_sampling_percentage": 1.0,  # 1: dense inside the mask; < 1: Regular sampling
        "affine_iterations": 200,     # per pyramid level
        "affine_step": 0.25,
        "metric": "cc",               # of the SyN stage: cc (neighbourhood), mattes or meansquares
        "cc_radius": 2,               # voxels, for cc
        "syn_iterations": [40, 20, 10],  # coarse to fine; the finest levels the pyramid allows
        "grad_step": 0.2,
        "flow_sigma": 3.0,            # update-field smoothing (voxel units, as in ANTs)
        "total_sigma": 0.0,           # total-field smoothing (voxel units)
    },
}


def resolve_options(method: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The method's defaults updated with `options`; unknown keys or methods are an error."""
    if method not in DEFAULTS:
        raise ValueError(f"unknown baseline method {method!r}: expected one of {', '.join(METHODS)}")
    options = dict(options or {})
    unknown = set(options) - set(DEFAULTS[method])
    if unknown:
        raise ValueError(f"baselines.{method}: unknown option(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(sorted(DEFAULTS[method]))}")
    resolved = {**DEFAULTS[method], **options}
    if resolved["initializer"] not in ("geometry", "moments", "none"):
        raise ValueError(f"baselines.{method}.initializer must be geometry, moments or none, got {resolved['initializer']!r}")
    if resolved["on_error"] not in ("raise", "identity"):
        raise ValueError(f"baselines.{method}.on_error must be raise or identity, got {resolved['on_error']!r}")
    return resolved


# --------------------------------------------------------------------------- threads


@contextmanager
def itk_threads(threads: int) -> Iterator[None]:
    """ITK threads for SimpleITK (global default) and ANTsPy (environment variable), restored after."""
    threads = max(1, int(threads))
    previous_env = os.environ.get(ITK_THREADS_ENV)
    previous_sitk = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    os.environ[ITK_THREADS_ENV] = str(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous_sitk)
        if previous_env is None:
            os.environ.pop(ITK_THREADS_ENV, None)
        else:
            os.environ[ITK_THREADS_ENV] = previous_env


# --------------------------------------------------------------------------- masks


def mask_image(mask: np.ndarray | sitk.Image, reference: sitk.Image) -> sitk.Image:
    """A uint8 0/1 mask image on `reference`'s grid from a (z, y, x) bool array or an image."""
    if isinstance(mask, sitk.Image):
        array = sitk.GetArrayViewFromImage(mask) > 0
    else:
        array = np.asarray(mask, bool)
    if array.shape != tuple(reference.GetSize())[::-1]:
        raise ValueError(f"mask shape {array.shape} does not match the image (z, y, x) {tuple(reference.GetSize())[::-1]}")
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(reference)
    return image


def dilate_mask(mask: sitk.Image, radius_mm: float) -> sitk.Image:
    """Binary dilation by a ball of `radius_mm` (per-axis radius in voxels from the spacing)."""
    radius = [int(round(radius_mm / s)) for s in mask.GetSpacing()]
    if max(radius) <= 0:
        return mask
    return sitk.BinaryDilate(mask, radius, sitk.sitkBall, 0, 1)


def mask_bounding_box(mask: sitk.Image, margin_mm: float = 0.0) -> tuple[list[int], list[int]]:
    """Index (x, y, z) and size of the mask's bounding box grown by `margin_mm`, clipped to the image."""
    array = sitk.GetArrayViewFromImage(mask) > 0
    if not array.any():
        raise RegistrationError("the fixed mask is empty")
    voxels = np.argwhere(array)[:, ::-1]  # x, y, z
    margin = np.ceil(margin_mm / np.asarray(mask.GetSpacing())).astype(int)
    lo = np.maximum(voxels.min(0) - margin, 0)
    hi = np.minimum(voxels.max(0) + margin, np.asarray(mask.GetSize()) - 1)
    return lo.tolist(), (hi - lo + 1).tolist()


def crop_to_mask(image: sitk.Image, mask: sitk.Image, margin_mm: float) -> tuple[sitk.Image, sitk.Image]:
    """Pitfall "masks": the image and mask cropped to the mask's bounding box plus a margin.

    Cropping keeps the physical geometry, and makes everything downstream (metric samples,
    pyramid, B-spline mesh) a function of the mask's neighbourhood only, not of the image extent.
    """
    index, size = mask_bounding_box(mask, margin_mm)
    return sitk.RegionOfInterest(image, size, index), sitk.RegionOfInterest(mask, size, index)


def configure_sampling(method: sitk.ImageRegistrationMethod, mask: sitk.Image, percentage: float, seed: int) -> None:
    """Pitfall "masks": metric points inside the mask, never by rejection over the whole image.

    With percentage >= 1 every voxel of the (cropped) fixed image is visited and those inside the
    mask are used (strategy NONE: deterministic, all mask voxels). Below 1, a REGULAR (seeded) grid
    over the cropped box, where the mask fills a fixed, extent-independent fraction.
    """
    method.SetMetricFixedMask(mask)
    if percentage >= 1.0:
        method.SetMetricSamplingStrategy(method.NONE)
    else:
        method.SetMetricSamplingStrategy(method.REGULAR)
        method.SetMetricSamplingPercentage(float(percentage), int(seed))


# --------------------------------------------------------------------------- initialisation


def _centre_of_mask(mask: sitk.Image) -> np.ndarray:
    index = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1].mean(0)
    return np.asarray(mask.TransformContinuousIndexToPhysicalPoint(index.tolist()))


def centred_initial_transform(fixed: sitk.Image, moving: sitk.Image, kind: str, fixed_mask: sitk.Image | None = None,
                              transform: sitk.Transform | None = None) -> sitk.Transform:
    """Pitfall "initialisation": `CenteredTransformInitializer` (geometry or moments), or identity.

    Run on the whole fixed image (not the crop: the crop's centre is not the image centre). The
    centre of rotation is then moved to the fixed mask's centroid, which leaves the map unchanged
    (the matrix is still the identity) and conditions the optimisation of the rotation.
    """
    transform = transform if transform is not None else sitk.Euler3DTransform()
    if kind == "none":
        initial = transform
    else:
        mode = {"geometry": sitk.CenteredTransformInitializerFilter.GEOMETRY,
                "moments": sitk.CenteredTransformInitializerFilter.MOMENTS}[kind]
        initial = sitk.CenteredTransformInitializer(fixed, moving, transform, mode)
    initial = type(transform)(initial) if not isinstance(initial, type(transform)) else initial
    if fixed_mask is not None and hasattr(initial, "SetCenter"):
        matrix = np.asarray(initial.GetMatrix()).reshape(3, 3)
        old_centre, translation = np.asarray(initial.GetCenter()), np.asarray(initial.GetTranslation())
        new_centre = _centre_of_mask(fixed_mask)
        # T(x) = M (x - c) + c + t; keeping T while moving c to c' needs t' = t + (M - I)(c' - c)
        initial.SetCenter(new_centre.tolist())
        initial.SetTranslation((translation + (matrix - np.eye(3)) @ (new_centre - old_centre)).tolist())
    return initial


def overlap_fraction(transform: sitk.Transform, fixed_mask: sitk.Image, moving: sitk.Image) -> float:
    """Fraction of the fixed-mask voxel centres that `transform` maps inside the moving image.

    Computed by resampling an all-ones image of the moving grid (linear, 0 outside) onto the fixed
    grid, so "inside" means exactly what ITK's interpolators consider inside.
    """
    ones = sitk.Image(moving.GetSize(), sitk.sitkFloat32) + 1.0
    ones.CopyInformation(moving)
    inside = sitk.Resample(ones, fixed_mask, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    in_mask = sitk.GetArrayViewFromImage(fixed_mask) > 0
    if not in_mask.any():
        return 0.0
    return float(np.mean(sitk.GetArrayViewFromImage(inside)[in_mask] > 0.5))


def check_overlap(transform: sitk.Transform, fixed_mask: sitk.Image, moving: sitk.Image, minimum: float,
                  pair: str = "", stage: str = "initialisation") -> float:
    """Pitfall "initialisation": refuse to optimise when the images barely overlap."""
    overlap = overlap_fraction(transform, fixed_mask, moving)
    if overlap < minimum:
        raise RegistrationError(
            f"{pair or 'pair'}: only {overlap:.1%} of the fixed lung-mask points map inside the moving image after "
            f"{stage} (minimum {minimum:.0%}); the images do not overlap enough to register (check the headers' "
            f"origin / direction, or the initializer), so the optimiser was not started")
    return overlap


# --------------------------------------------------------------------------- pyramid


def pyramid_schedule(size: tuple[int, ...], spacing: tuple[float, ...], mask_voxels: int, levels: int = 3,
                     min_size: int = 12, min_mask_voxels: int = 1000) -> tuple[list[int], list[float]]:
    """Pitfall "pyramid": shrink factors (coarse to fine) and smoothing sigmas in mm.

    A factor f (a power of two, at most 2 ** (levels - 1)) is kept only if the shrunk image keeps at
    least `min_size` voxels along every axis and `mask_voxels / f**3 >= min_mask_voxels`, so the
    coarsest level never runs out of samples (the "joint PDF summed to zero" trap). The finest level
    (f = 1) is always there. Sigma = f / 2 voxels of the smallest spacing, 0 at full resolution.
    """
    factors = [1]
    for k in range(1, max(1, int(levels))):
        f = 2 ** k
        if min(size) // f >= min_size and mask_voxels / f ** 3 >= min_mask_voxels:
            factors.insert(0, f)
        else:
            break
    sigmas = [0.5 * f * min(spacing) if f > 1 else 0.0 for f in factors]
    return factors, sigmas


def _per_level(values: Any, n_levels: int) -> list[int]:
    """Iterations per level: a number for every level, or a list (coarse to fine) of which the
    finest `n_levels` entries are used."""
    if isinstance(values, (int, float)):
        return [int(values)] * n_levels
    values = [int(v) for v in values]
    if not values:
        raise ValueError("an iteration list must not be empty")
    return ([values[0]] * max(0, n_levels - len(values)) + values)[-n_levels:]


def apply_pyramid(method: sitk.ImageRegistrationMethod, factors: list[int], sigmas_mm: list[float]) -> None:
    method.SetShrinkFactorsPerLevel(factors)
    method.SetSmoothingSigmasPerLevel(sigmas_mm)
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()


# --------------------------------------------------------------------------- metric, stop, flags


def configure_metric(method: sitk.ImageRegistrationMethod, metric: str, bins: int = 32) -> None:
    if metric == "mse":
        method.SetMetricAsMeanSquares()
    elif metric == "correlation":
        method.SetMetricAsCorrelation()
    elif metric == "mattes":
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(bins))
    else:
        raise ValueError(f"unknown metric {metric!r}: expected mse, correlation or mattes")


class IterationCounter:
    """Optimiser iterations per pyramid level (ITK reports only the last level's).

    Reads the optimiser's own iteration number at every iteration event (L-BFGS-B fires events
    per function evaluation, so counting events would overstate its iterations); `finish` takes
    the final level's count after Execute.
    """

    def __init__(self, method: sitk.ImageRegistrationMethod):
        self.method = method
        self.per_level: list[int] = []
        method.AddCommand(sitk.sitkMultiResolutionIterationEvent, self._next_level)
        method.AddCommand(sitk.sitkIterationEvent, self._tick)

    def _next_level(self) -> None:
        if self.per_level:  # the previous level's optimiser still holds its final count
            self.per_level[-1] = max(self.per_level[-1], int(self.method.GetOptimizerIteration()))
        self.per_level.append(0)

    def _tick(self) -> None:
        if not self.per_level:
            self.per_level.append(0)
        self.per_level[-1] = max(self.per_level[-1], int(self.method.GetOptimizerIteration()))

    def finish(self) -> "IterationCounter":
        if not self.per_level:
            self.per_level.append(0)
        self.per_level[-1] = max(self.per_level[-1], int(self.method.GetOptimizerIteration()))
        return self

    @property
    def total(self) -> int:
        return int(sum(self.per_level))

    @property
    def last(self) -> int:
        return self.per_level[-1] if self.per_level else 0


def assess_stage(stop_condition: str, iterations: int, last_level_iterations: int, changed: bool,
                 initial_metric: float = float("nan"), final_metric: float = float("nan")) -> str:
    """Pitfall "optimiser": "ok", or why this stage's result must not be trusted.

    zero_iterations: the optimiser stopped before its first step (at the finest level);
    zero_gradient: it stopped at once on a vanishing gradient (transform / method mismatch or
    scales off by orders of magnitude, seed thread 000); unchanged: the parameters never moved;
    metric_worse: the metric (always minimised in ITK) ended above where it started.
    """
    flags = []
    text = stop_condition.split(":", 1)[-1].lower()  # without the optimiser's class name
    if iterations == 0 or last_level_iterations == 0:
        flags.append("zero_iterations")
    if iterations <= 1 and "gradient" in text:
        flags.append("zero_gradient")
    if not changed:
        flags.append("unchanged")
    if np.isfinite(initial_metric) and final_metric > initial_metric + max(1e-3 * abs(initial_metric), 1e-9):
        flags.append("metric_worse")
    return ";".join(flags) if flags else "ok"


def combine_flags(**flags: str) -> str:
    """One flag column over all stages: "ok" or "stage:reason;...".

    A stage's flag may itself list several reasons ("a;b") or be already prefixed (the linear
    stages' combined flag is passed as `linear`, its parts keep their own stage names).
    """
    bad = []
    for stage, flag in flags.items():
        if not flag or flag == "ok":
            continue
        for reason in flag.split(";"):
            bad.append(reason if stage == "linear" else f"{stage}:{reason}")
    return ";".join(bad) if bad else "ok"


def _metric_now(method: sitk.ImageRegistrationMethod, prepared: "Prepared") -> float:
    """The metric at the current transforms, on every mask voxel at full resolution."""
    try:
        return float(method.MetricEvaluate(prepared.fixed_crop, prepared.moving))
    except RuntimeError:  # e.g. no valid points: reported by Execute with the pair's name
        return float("nan")


def _stage_notes(method: sitk.ImageRegistrationMethod, counter: "IterationCounter", prepared: "Prepared",
                 initial_metric: float, changed: bool) -> dict:
    """Stop condition, iterations, metric before / after and the stage's flag."""
    stop = method.GetOptimizerStopConditionDescription()
    counter.finish()
    final_metric = _metric_now(method, prepared)
    return {"stop_condition": stop, "iterations": counter.total, "metric_value": final_metric,
            "initial_metric_value": initial_metric,
            "flag": assess_stage(stop, counter.total, counter.last, changed, initial_metric, final_metric)}


def _execute(method: sitk.ImageRegistrationMethod, fixed: sitk.Image, moving: sitk.Image, pair: str,
             stage: str) -> sitk.Transform:
    """Execute, turning ITK's exceptions into a RegistrationError that names the pair and stage."""
    try:
        return method.Execute(fixed, moving)
    except RuntimeError as error:
        message = " ".join(str(error).split())
        raise RegistrationError(f"{pair or 'pair'}: the {stage} stage failed in ITK: {message[-400:]}") from error


# --------------------------------------------------------------------------- inputs


@dataclass
class Prepared:
    """The inputs of a registration after the mask and initialisation pitfalls are dealt with."""

    fixed: sitk.Image  # the whole fixed image, float32
    moving: sitk.Image  # the whole moving image, float32
    mask: sitk.Image  # the fixed lung mask (uint8) on the whole fixed grid
    fixed_crop: sitk.Image  # fixed image cropped to the dilated mask's box + margin
    mask_crop: sitk.Image  # the dilated mask on the crop
    factors: list[int]
    sigmas_mm: list[float]
    initial: sitk.Transform  # centred initial transform (Euler3D), fixed mm -> moving mm
    initial_overlap: float
    pair: str = ""


def prepare(fixed: sitk.Image, moving: sitk.Image, fixed_mask: np.ndarray | sitk.Image, options: Mapping[str, Any],
            pair: str = "") -> Prepared:
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    mask = mask_image(fixed_mask, fixed)
    if not (sitk.GetArrayViewFromImage(mask) > 0).any():
        raise RegistrationError(f"{pair or 'pair'}: the fixed lung mask is empty")
    dilated = dilate_mask(mask, float(options["mask_dilation_mm"]))
    fixed_crop, mask_crop = crop_to_mask(fixed, dilated, float(options["crop_margin_mm"]))
    mask_voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask_crop)))
    factors, sigmas = pyramid_schedule(fixed_crop.GetSize(), fixed_crop.GetSpacing(), mask_voxels,
                                       options["pyramid_levels"], options["pyramid_min_size"],
                                       options["pyramid_min_mask_voxels"])
    initial = centred_initial_transform(fixed, moving, options["initializer"], mask)
    overlap = check_overlap(initial, mask, moving, float(options["min_overlap"]), pair)
    return Prepared(fixed, moving, mask, fixed_crop, mask_crop, factors, sigmas, initial, overlap, pair)


# --------------------------------------------------------------------------- SimpleITK stages


def _linear_transform(kind: str, previous: sitk.Transform) -> sitk.Transform:
    """A `kind` transform (rigid or affine) that starts as `previous` (an Euler3D or affine)."""
    matrix, centre = previous.GetMatrix(), previous.GetCenter()
    translation = previous.GetTranslation()
    if kind == "rigid":
        if not isinstance(previous, sitk.Euler3DTransform):
            raise ValueError("a rigid stage cannot follow an affine one")
        return sitk.Euler3DTransform(previous)
    if kind == "affine":
        affine = sitk.AffineTransform(3)
        affine.SetCenter(centre)
        affine.SetMatrix(matrix)
        affine.SetTranslation(translation)
        return affine
    raise ValueError(f"unknown linear stage {kind!r}: expected rigid or affine")


LINEAR_OPTIMIZERS = ("conjugate_gradient", "line_search", "gradient_descent")


def configure_optimizer(method: sitk.ImageRegistrationMethod, kind: str, iterations: int,
                        options: Mapping[str, Any]) -> None:
    """Pitfall "optimiser": a gradient optimiser with scales from physical shift.

    The learning rate is estimated so that the first step moves no point by more than
    max_step_mm. Plain gradient descent keeps that rate, which diverged on the thorax CT (a 20
    degree rotation: small gradient at the start, overshoot later); the line-search variants
    (default: conjugate gradient) search along each direction and cannot increase the metric.
    """
    common = dict(learningRate=1.0, numberOfIterations=int(iterations),
                  convergenceMinimumValue=float(options["convergence_minimum"]),
                  convergenceWindowSize=int(options["convergence_window"]),
                  estimateLearningRate=method.Once, maximumStepSizeInPhysicalUnits=float(options["max_step_mm"]))
    if kind == "conjugate_gradient":
        method.SetOptimizerAsConjugateGradientLineSearch(lineSearchUpperLimit=5.0, **common)
    elif kind == "line_search":
        method.SetOptimizerAsGradientDescentLineSearch(lineSearchUpperLimit=5.0, **common)
    elif kind == "gradient_descent":
        method.SetOptimizerAsGradientDescent(**common)
    else:
        raise ValueError(f"unknown optimizer {kind!r}: expected one of {', '.join(LINEAR_OPTIMIZERS)}")
    method.SetOptimizerScalesFromPhysicalShift()


def _linear_stage(prepared: Prepared, kind: str, start: sitk.Transform, options: Mapping[str, Any],
                  threads: int) -> tuple[sitk.Transform, dict]:
    transform = _linear_transform(kind, start)
    before = np.asarray(transform.GetParameters())
    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(threads)
    configure_metric(method, options["linear_metric"], options["mattes_bins"])
    configure_sampling(method, prepared.mask_crop, float(options["sampling_percentage"]), int(options["seed"]))
    method.SetInterpolator(sitk.sitkLinear)
    iterations = _per_level(options["linear_iterations"], len(prepared.factors))
    configure_optimizer(method, options["linear_optimizer"], max(iterations), options)
    apply_pyramid(method, prepared.factors, prepared.sigmas_mm)
    method.SetInitialTransform(transform, inPlace=True)
    counter = IterationCounter(method)
    initial_metric = _metric_now(method, prepared)
    _execute(method, prepared.fixed_crop, prepared.moving, prepared.pair, kind)
    return transform, _stage_notes(method, counter, prepared, initial_metric,
                                   not np.allclose(before, transform.GetParameters(), rtol=0, atol=1e-12))


def _run_linear(prepared: Prepared, options: Mapping[str, Any], threads: int) -> tuple[sitk.AffineTransform, dict]:
    stages = list(options["linear_stages"])
    if not stages:
        raise ValueError("linear_stages must name at least one stage (rigid and/or affine)")
    transform: sitk.Transform = prepared.initial
    notes: dict[str, Any] = {"initial_overlap": prepared.initial_overlap}
    flags = {}
    for kind in stages:
        transform, stage_notes = _linear_stage(prepared, kind, transform, options, threads)
        notes.update({f"{kind}_{key}": value for key, value in stage_notes.items() if key != "flag"})
        flags[kind] = stage_notes["flag"]
    affine = _linear_transform("affine", transform)
    notes["affine_overlap"] = overlap_fraction(affine, prepared.mask, prepared.moving)
    if notes["affine_overlap"] < float(options["min_overlap"]):
        flags["overlap"] = "low_overlap"
    notes["linear_flag"] = combine_flags(**flags)
    return affine, notes


def sitk_affine(fixed: sitk.Image, moving: sitk.Image, fixed_mask: np.ndarray | sitk.Image,
                options: Mapping[str, Any] | None = None, pair: str = "", threads: int = 1
                ) -> tuple[sitk.AffineTransform, dict]:
    """The SimpleITK linear stage alone: centred initialisation, overlap check, rigid then affine.

    Returns the affine transform (fixed mm -> moving mm, ITK's resampling direction) and notes
    (initial overlap, stop condition / iterations / metric value of each stage, `linear_flag`).
    `options`: any of the sitk_bspline options (defaults otherwise).
    """
    options = resolve_options("sitk_bspline", options)
    with itk_threads(threads):
        prepared = prepare(fixed, moving, fixed_mask, options, pair)
        return _run_linear(prepared, options, threads)


def bspline_mesh_size(image: sitk.Image, spacing_mm: float) -> list[int]:
    """Mesh cells per axis so that control points are about `spacing_mm` apart over the image."""
    extent = np.asarray(image.GetSize()) * np.asarray(image.GetSpacing())
    return [max(1, int(round(e / float(spacing_mm)))) for e in extent]


def _bspline_stage(prepared: Prepared, affine: sitk.AffineTransform, options: Mapping[str, Any],
                   threads: int) -> tuple[sitk.Transform, dict]:
    bspline = sitk.BSplineTransformInitializer(prepared.fixed_crop, bspline_mesh_size(prepared.fixed_crop,
                                                                                       options["grid_spacing_mm"]), 3)
    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(threads)
    configure_metric(method, options["metric"], options["mattes_bins"])
    configure_sampling(method, prepared.mask_crop, float(options["sampling_percentage"]), int(options["seed"]))
    method.SetInterpolator(sitk.sitkLinear)
    iterations = max(_per_level(options["bspline_iterations"], len(prepared.factors)))
    if options["bspline_optimizer"] == "lbfgsb":
        # L-BFGS-B scales its own steps (ITK's LBFGSB ignores parameter scales); B-spline
        # coefficients are all displacements in mm, so they are commensurate anyway.
        method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=float(options["lbfgsb_gradient_tolerance"]),
                                    numberOfIterations=iterations, maximumNumberOfCorrections=5,
                                    maximumNumberOfFunctionEvaluations=4 * iterations,
                                    costFunctionConvergenceFactor=float(options["lbfgsb_cost_factor"]))
    elif options["bspline_optimizer"] == "gradient_descent":
        configure_optimizer(method, "gradient_descent", iterations, options)
    else:
        raise ValueError(f"unknown bspline_optimizer {options['bspline_optimizer']!r}: expected lbfgsb or gradient_descent")
    apply_pyramid(method, prepared.factors, prepared.sigmas_mm)
    method.SetMovingInitialTransform(affine)
    method.SetInitialTransform(bspline, inPlace=True)
    counter = IterationCounter(method)
    initial_metric = _metric_now(method, prepared)
    _execute(method, prepared.fixed_crop, prepared.moving, prepared.pair, "B-spline")
    notes = _stage_notes(method, counter, prepared, initial_metric, bool(np.any(np.asarray(bspline.GetParameters()) != 0)))
    # ITK v4: the optimised transform acts first, then the moving initial one: T = A o B
    composite = sitk.CompositeTransform([affine, bspline])
    return composite, notes


DEMONS_FILTERS = {
    "fast_symmetric": sitk.FastSymmetricForcesDemonsRegistrationFilter,
    "diffeomorphic": sitk.DiffeomorphicDemonsRegistrationFilter,
    "demons": sitk.DemonsRegistrationFilter,
}


def _strip_geometry(image: sitk.Image) -> sitk.Image:
    """Same voxels and spacing, identity direction, zero origin: the demons filters then work in
    the image's own axes and return components along them."""
    image = sitk.Image(image)
    image.SetDirection(np.eye(3).ravel().tolist())
    image.SetOrigin((0.0, 0.0, 0.0))
    return image


def _demons_stage(prepared: Prepared, affine: sitk.AffineTransform, options: Mapping[str, Any],
                  threads: int) -> tuple[sitk.Transform, dict]:
    """Demons between the cropped fixed image and the moving image resampled through the affine.

    Dense on the crop (no sampling at all); multi-resolution by the same schedule; smoothing given
    in mm and converted to voxels per axis. The field d lives on the crop; T(x) = A(x + d(x)).
    """
    if options["demons_filter"] not in DEMONS_FILTERS:
        raise ValueError(f"unknown demons_filter {options['demons_filter']!r}: expected {', '.join(DEMONS_FILTERS)}")
    crop = prepared.fixed_crop
    moved = sitk.Resample(prepared.moving, crop, affine, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    fixed_local, moving_local = _strip_geometry(crop), _strip_geometry(moved)
    iterations = _per_level(options["demons_iterations"], len(prepared.factors))
    field_image = None
    total, last, stops = 0, 0, []
    for level, (factor, sigma, n) in enumerate(zip(prepared.factors, prepared.sigmas_mm, iterations)):
        if factor > 1:
            smooth_f = sitk.SmoothingRecursiveGaussian(fixed_local, sigma)
            smooth_m = sitk.SmoothingRecursiveGaussian(moving_local, sigma)
            level_fixed, level_moving = sitk.Shrink(smooth_f, [factor] * 3), sitk.Shrink(smooth_m, [factor] * 3)
        else:
            level_fixed, level_moving = fixed_local, moving_local
        if field_image is None:
            initial = sitk.Image(level_fixed.GetSize(), sitk.sitkVectorFloat64, 3)
            initial.CopyInformation(level_fixed)
        else:
            initial = sitk.Resample(field_image, level_fixed, sitk.Transform(), sitk.sitkLinear, 0.0,
                                    sitk.sitkVectorFloat64)
        demons = DEMONS_FILTERS[options["demons_filter"]]()
        demons.SetNumberOfThreads(threads)
        demons.SetNumberOfIterations(int(n))
        demons.SetMaximumRMSError(float(options["demons_max_rms_error"]))
        spacing = np.asarray(level_fixed.GetSpacing())
        demons.SetSmoothDisplacementField(options["demons_smoothing_mm"] > 0)
        if options["demons_smoothing_mm"] > 0:
            demons.SetStandardDeviations((float(options["demons_smoothing_mm"]) / spacing).tolist())
        demons.SetSmoothUpdateField(options["demons_update_smoothing_mm"] > 0)
        if options["demons_update_smoothing_mm"] > 0:
            demons.SetUpdateFieldStandardDeviations((float(options["demons_update_smoothing_mm"]) / spacing).tolist())
        try:
            field_image = demons.Execute(level_fixed, level_moving, initial)
        except RuntimeError as error:
            message = " ".join(str(error).split())
            raise RegistrationError(f"{prepared.pair or 'pair'}: the demons stage failed in ITK: {message[-400:]}") from error
        last = int(demons.GetElapsedIterations())
        total += last
        stops.append(f"level {level}: maximum iterations ({n})" if last >= n
                     else f"level {level}: RMS change {demons.GetRMSChange():.3g} below {options['demons_max_rms_error']}")
    field_image = sitk.Resample(field_image, fixed_local, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    local = sitk.GetArrayFromImage(field_image)
    changed = bool(np.any(local != 0))
    warped_local = sitk.Resample(moving_local, fixed_local, sitk.DisplacementFieldTransform(sitk.Image(field_image)),
                                 sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    fixed_array = sitk.GetArrayViewFromImage(fixed_local)
    initial_metric = float(np.mean((fixed_array - sitk.GetArrayViewFromImage(moving_local)) ** 2))
    metric = float(np.mean((fixed_array - sitk.GetArrayViewFromImage(warped_local)) ** 2))
    # components along the crop's axes -> physical (x, y, z): multiply by the direction matrix
    physical = local @ np.asarray(crop.GetDirection()).reshape(3, 3).T
    field_crop = sitk.GetImageFromArray(physical, isVector=True)
    field_crop.CopyInformation(crop)
    stop = "; ".join(stops)
    notes = {"stop_condition": stop, "iterations": total, "metric_value": metric, "initial_metric_value": initial_metric,
             "flag": assess_stage(stop, total, last, changed, initial_metric, metric)}
    # DisplacementFieldTransform gives zero displacement outside the crop: T = A o (x + d)
    return sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(field_crop)]), notes


def transform_to_displacement(transform: sitk.Transform, grid: Grid) -> np.ndarray:
    """Any ITK transform (fixed mm -> moving mm) as the (z, y, x, 3) displacement on `grid`."""
    field_image = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, list(grid.size),
                                                    list(grid.origin), list(grid.spacing), list(grid.direction))
    return sitk.GetArrayFromImage(field_image)


@dataclass
class Outcome:
    """One registered pair before it becomes a `RegistrationResult`."""

    displacement: np.ndarray
    seconds: float
    affine: sitk.Transform | None
    warped: sitk.Image | None
    notes: dict = field(default_factory=dict)


def register_sitk(method: str, fixed: sitk.Image, moving: sitk.Image, fixed_mask: np.ndarray | sitk.Image,
                  options: Mapping[str, Any] | None = None, pair: str = "", threads: int = 1) -> Outcome:
    """sitk_bspline or sitk_demons on one pair; `seconds` covers the registration only."""
    options = resolve_options(method, options)
    with itk_threads(threads):
        started = time.perf_counter()
        prepared = prepare(fixed, moving, fixed_mask, options, pair)
        affine, notes = _run_linear(prepared, options, threads)
        stage = _bspline_stage if method == "sitk_bspline" else _demons_stage
        transform, deformable = stage(prepared, affine, options, threads)
        seconds = time.perf_counter() - started
        grid = Grid.of(prepared.fixed)
        displacement = transform_to_displacement(transform, grid)
        warped = sitk.Resample(prepared.moving, prepared.fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        final_overlap = overlap_fraction(transform, prepared.mask, prepared.moving)
    flags = {"linear": notes.pop("linear_flag"), "deformable": deformable["flag"]}
    if final_overlap < float(options["min_overlap"]):
        flags["final"] = "low_overlap"
    notes = {"flag": combine_flags(**flags), "stop_condition": deformable["stop_condition"],
             "iterations": deformable["iterations"], "metric_value": deformable["metric_value"],
             "initial_metric_value": deformable["initial_metric_value"], **notes,
             "final_overlap": final_overlap, "pyramid": "x".join(map(str, prepared.factors))}
    return Outcome(displacement, seconds, affine, warped, notes)


# --------------------------------------------------------------------------- ANTsPy SyN


def _ants():
    import ants  # imported lazily: ANTsPy is heavy and only the syn baseline needs it
    from ants.internal import get_lib_fn, get_pointer_string, process_arguments

    return ants, get_lib_fn, get_pointer_string, process_arguments


def _ants_metric(name: str, fixed: str, moving: str, options: Mapping[str, Any], affine: bool) -> str:
    if affine:
        percentage = float(options["affine_sampling_percentage"])
        sampling = "None,1" if percentage >= 1 else f"Regular,{percentage}"
        names = {"mattes": f"Mattes[{fixed},{moving},1,{int(options['mattes_bins'])},{sampling}]",
                 "meansquares": f"MeanSquares[{fixed},{moving},1,0,{sampling}]",
                 "gc": f"GC[{fixed},{moving},1,0,{sampling}]"}
    else:
        names = {"cc": f"CC[{fixed},{moving},1,{int(options['cc_radius'])}]",
                 "mattes": f"Mattes[{fixed},{moving},1,{int(options['mattes_bins'])}]",
                 "meansquares": f"MeanSquares[{fixed},{moving},1,0]"}
    if name not in names:
        raise ValueError(f"unknown {'affine_metric' if affine else 'metric'} {name!r} for syn: expected {', '.join(names)}")
    return names[name]


def syn_arguments(prepared: Prepared, pointers: Mapping[str, str], prefix: str, options: Mapping[str, Any]) -> list:
    """antsRegistration arguments: our centred initial transform, an explicit affine stage, then SyN.

    The initial transform is `prepared.initial` written to a file (pointers["initial"]), the
    overlap-checked one, computed on the WHOLE images: ANTs' own [fixed,moving,1] would take the
    centre of mass of the cropped fixed image against the whole moving image.

    Spelled out rather than ANTsPy's type_of_transform="SyN" preset, whose affine stage has fixed
    shrink factors (4x2x2x1) and random sampling: here the pyramid comes from `pyramid_schedule`
    (smoothing in mm), the lung mask is sampled densely, and every stage sees the mask.
    """
    f, m = pointers["fixed"], pointers["moving"]
    mask = f"[{pointers['mask']},NA]"
    factors = "x".join(str(v) for v in prepared.factors)
    sigmas = "x".join(f"{s:g}" for s in prepared.sigmas_mm) + "mm"
    affine_iterations = "x".join(str(v) for v in _per_level(options["affine_iterations"], len(prepared.factors)))
    syn_iterations = "x".join(str(v) for v in _per_level(options["syn_iterations"], len(prepared.factors)))
    linear = []
    for kind in options["linear_stages"]:
        if kind not in ("rigid", "affine"):
            raise ValueError(f"unknown linear stage {kind!r}: expected rigid or affine")
        linear += ["--metric", _ants_metric(options["affine_metric"], f, m, options, affine=True),
                   "--transform", f"{kind.capitalize()}[{float(options['affine_step'])}]",
                   "--convergence", f"[{affine_iterations},1e-6,10]",
                   "--smoothing-sigmas", sigmas, "--shrink-factors", factors,
                   "--masks", mask if options["mask_all_stages"] else "[NA,NA]"]
    args = ["--dimensionality", "3", "--float", "1", "--random-seed", str(int(options["seed"])),
            "--initial-moving-transform", pointers["initial"],
            *linear,
            "--metric", _ants_metric(options["metric"], f, m, options, affine=False),
            "--transform", f"SyN[{float(options['grad_step'])},{float(options['flow_sigma'])},{float(options['total_sigma'])}]",
            "--convergence", f"[{syn_iterations},1e-7,8]",
            "--smoothing-sigmas", sigmas, "--shrink-factors", factors,
            "--masks", mask,
            "--use-histogram-matching", "0", "--collapse-output-transforms", "1",
            "--output", f"[{prefix},{pointers['warped']},{pointers['inverse_warped']}]",
            "--verbose", "0"]
    return args


def ants_affine_to_sitk(path: str | Path) -> sitk.AffineTransform:
    """ANTs' GenericAffine.mat (an ITK MatrixOffsetTransform) as a SimpleITK affine."""
    ants, *_ = _ants()
    transform = ants.read_transform(str(path))
    parameters = np.asarray(transform.parameters, float)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(np.asarray(transform.fixed_parameters, float).tolist())
    affine.SetMatrix(parameters[:9].tolist())
    affine.SetTranslation(parameters[9:12].tolist())
    return affine


def register_syn(fixed: sitk.Image, moving: sitk.Image, fixed_mask: np.ndarray | sitk.Image,
                 options: Mapping[str, Any] | None = None, pair: str = "", threads: int = 1) -> Outcome:
    """ANTsPy: centred initialisation, affine, SyN; the forward transforms composed into one field.

    The fixed image given to ANTs is cropped to the dilated lung mask's box plus a margin (as for
    SimpleITK), the mask is ANTs' metric mask; the transforms are then composed by
    antsApplyTransforms on the whole fixed grid (the SyN field is zero outside the crop). ANTs
    and ITK share the convention: the composed field maps fixed points to moving points.
    `seconds` is the antsRegistration call (it writes its transforms to a temporary folder).
    """
    ants, get_lib_fn, get_pointer_string, process_arguments = _ants()
    options = resolve_options("syn", options)
    with itk_threads(threads), tempfile.TemporaryDirectory(prefix="lungreg-syn-") as folder:
        prepared = prepare(fixed, moving, fixed_mask, options, pair)
        fixed_a = ants.from_sitk(prepared.fixed_crop).clone("float")
        moving_a = ants.from_sitk(prepared.moving).clone("float")
        # antsRegistration reinterprets the pointer as its mask type: it must be an unsigned char
        # image (as ANTsPy's own `mask != 0`), a float image would be read as garbage
        mask_a = ants.from_sitk(sitk.Cast(prepared.mask_crop, sitk.sitkFloat32)) != 0
        warped_a, inverse_a = fixed_a.clone(), moving_a.clone()
        pointers = {"fixed": get_pointer_string(fixed_a), "moving": get_pointer_string(moving_a),
                    "mask": get_pointer_string(mask_a), "warped": get_pointer_string(warped_a),
                    "inverse_warped": get_pointer_string(inverse_a)}
        prefix = str(Path(folder) / "syn_")
        pointers["initial"] = str(Path(folder) / "initial.mat")
        sitk.WriteTransform(prepared.initial, pointers["initial"])
        args = syn_arguments(prepared, pointers, prefix, options)
        started = time.perf_counter()
        code = get_lib_fn("antsRegistration")(process_arguments(args))
        seconds = time.perf_counter() - started
        if code != 0:
            raise RegistrationError(f"{pair or 'pair'}: antsRegistration failed with exit code {code}")
        forward = [f"{prefix}1Warp.nii.gz", f"{prefix}0GenericAffine.mat"]
        missing = [p for p in forward if not Path(p).exists()]
        if missing:
            raise RegistrationError(f"{pair or 'pair'}: antsRegistration wrote no {', '.join(missing)}")
        whole_fixed = ants.from_sitk(prepared.fixed)
        composed = ants.apply_transforms(whole_fixed, moving_a, transformlist=forward, compose=str(Path(folder) / "fwd_"))
        field_image = sitk.ReadImage(composed)
        displacement = sitk.GetArrayFromImage(field_image).astype(np.float64)
        grid = Grid.of(prepared.fixed)
        if displacement.shape != (*grid.shape, 3):
            raise RegistrationError(f"{pair or 'pair'}: the composed ANTs field has shape {displacement.shape}, "
                                    f"expected {(*grid.shape, 3)}")
        warped = ants.to_sitk(ants.apply_transforms(whole_fixed, moving_a, transformlist=forward))
        warped.CopyInformation(prepared.fixed)
        affine = ants_affine_to_sitk(forward[1])
        final_overlap = overlap_fraction(displacement_transform(displacement, grid), prepared.mask, prepared.moving)
    flag = "ok" if final_overlap >= float(options["min_overlap"]) else "final:low_overlap"
    notes = {"flag": flag, "stop_condition": "not exposed by ANTsPy", "iterations": np.nan, "metric_value": np.nan,
             "initial_overlap": prepared.initial_overlap, "final_overlap": final_overlap,
             "pyramid": "x".join(map(str, prepared.factors))}
    return Outcome(displacement, seconds, affine, sitk.Cast(warped, sitk.sitkFloat32), notes)


# --------------------------------------------------------------------------- registrars


class BaselineRegistrar:
    """A classical method as a `registration.Registrar` (CPU, one pair at a time)."""

    device = "cpu"
    batch_size = 1

    def __init__(self, method: str, options: Mapping[str, Any] | None = None, threads: int = 1):
        self.name = method
        self.threads = max(1, int(threads))
        self.options = resolve_options(method, options)
        if method == "syn":
            with itk_threads(self.threads):  # fail early if ANTsPy is missing; threads are set per call
                _ants()

    def register_pair(self, fixed, moving, fixed_mask, pair: str = "") -> Outcome:
        if self.name == "syn":
            return register_syn(fixed, moving, fixed_mask, self.options, pair, self.threads)
        return register_sitk(self.name, fixed, moving, fixed_mask, self.options, pair, self.threads)

    def register(self, batch: list) -> list:
        from .registration import RegistrationResult

        results = []
        for item in batch:
            try:
                outcome = self.register_pair(item.fixed.image, item.moving.image, item.fixed.mask, item.pair.name)
            except RegistrationError as error:
                if self.options["on_error"] == "raise":
                    raise
                log.error("%s: %s; reporting the identity, flagged", self.name, error)
                outcome = Outcome(identity_displacement(item.fixed.grid, item.moving.grid), float("nan"), None, None,
                                  {"flag": "failed", "stop_condition": str(error), "iterations": 0,
                                   "metric_value": np.nan})
            log.info("%s %s: %.2f s, flag %s, %s", self.name, item.pair.name, outcome.seconds,
                     outcome.notes.get("flag"), outcome.notes.get("stop_condition"))
            results.append(RegistrationResult(outcome.displacement, outcome.seconds, outcome.affine, outcome.warped,
                                              outcome.notes))
        return results


def build_baseline(method: str, options: Mapping[str, Any] | None, threads: int) -> BaselineRegistrar:
    """The registrar of a classical method: syn, sitk_bspline or sitk_demons."""
    return BaselineRegistrar(method, options, threads)
