"""What every classical method shares: its common options, and the registration pitfalls.

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
* optimiser -- `sitk.configure_optimizer`: scales from physical shift on every gradient stage (a
  line-search optimiser by default: plain gradient descent with a learning rate estimated once
  diverged on the thorax CT's 20 degree rotation); the stop condition, iteration count and
  metric value before / after of every stage are recorded per pair, and `assess_stage` flags
  zero-iteration / zero-gradient / unchanged / metric-worse runs (column `flag`) instead of
  reporting them as good results.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np
import SimpleITK as sitk

from ...config import settings_from
from ...geometry import Grid

ITK_THREADS_ENV = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"


class RegistrationError(ValueError):
    """A registration that cannot give a meaningful result (no overlap, empty mask, ITK failure)."""


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class MethodOptions:
    """Options of every method (config `baselines.<method>`, less the workflow keys enabled /
    protocols / chunks / subjects); the same defaults as the schema's."""

    initializer: str = "geometry"  # geometry (image centres), moments (centres of mass) or none
    min_overlap: float = 0.5  # fraction of fixed-mask points inside the moving image, checked first
    on_error: str = "raise"  # raise, or identity: a flagged identity result for a failed pair


@dataclass(frozen=True)
class CommonOptions(MethodOptions):
    """Options of the ITK-family methods (syn, sitk_*, elastix): masks, crop, pyramid, linear stages."""

    mask_dilation_mm: float = 10.0  # dilate the fixed lung mask so its boundary counts in the metric
    crop_margin_mm: float = 20.0  # the fixed image is cropped to the dilated mask's box + this margin
    pyramid_levels: int = 3  # at most this many levels (shrink 4, 2, 1)
    pyramid_min_size: int = 12  # voxels per axis of the cropped image at the coarsest level
    pyramid_min_mask_voxels: int = 1000  # mask voxels at the coarsest level
    seed: int = 2018
    linear_stages: list = field(default_factory=lambda: ["rigid", "affine"])  # in order, each from the last
    mattes_bins: int = 32


def resolve(cls: type[MethodOptions], method: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The options of `method` (an options class) as a dict; unknown keys and bad choices are errors."""
    resolved = dataclasses.asdict(settings_from(cls, options, f"baselines.{method}"))
    if resolved["initializer"] not in ("geometry", "moments", "none"):
        raise ValueError(
            f"baselines.{method}.initializer must be geometry, moments or none, got {resolved['initializer']!r}"
        )
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
        raise ValueError(
            f"mask shape {array.shape} does not match the image (z, y, x) {tuple(reference.GetSize())[::-1]}"
        )
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


def centred_initial_transform(
    fixed: sitk.Image,
    moving: sitk.Image,
    kind: str,
    fixed_mask: sitk.Image | None = None,
    transform: sitk.Transform | None = None,
) -> sitk.Transform:
    """Pitfall "initialisation": `CenteredTransformInitializer` (geometry or moments), or identity.

    Run on the whole fixed image (not the crop: the crop's centre is not the image centre). The
    centre of rotation is then moved to the fixed mask's centroid, which leaves the map unchanged
    (the matrix is still the identity) and conditions the optimisation of the rotation.
    """
    transform = transform if transform is not None else sitk.Euler3DTransform()
    if kind == "none":
        initial = transform
    else:
        mode = {
            "geometry": sitk.CenteredTransformInitializerFilter.GEOMETRY,
            "moments": sitk.CenteredTransformInitializerFilter.MOMENTS,
        }[kind]
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


def check_overlap(
    transform: sitk.Transform,
    fixed_mask: sitk.Image,
    moving: sitk.Image,
    minimum: float,
    pair: str = "",
    stage: str = "initialisation",
) -> float:
    """Pitfall "initialisation": refuse to optimise when the images barely overlap."""
    overlap = overlap_fraction(transform, fixed_mask, moving)
    if overlap < minimum:
        raise RegistrationError(
            f"{pair or 'pair'}: only {overlap:.1%} of the fixed lung-mask points map inside the moving image after "
            f"{stage} (minimum {minimum:.0%}); the images do not overlap enough to register (check the headers' "
            f"origin / direction, or the initializer), so the optimiser was not started"
        )
    return overlap


# --------------------------------------------------------------------------- pyramid


def pyramid_schedule(
    size: tuple[int, ...],
    spacing: tuple[float, ...],
    mask_voxels: int,
    levels: int = 3,
    min_size: int = 12,
    min_mask_voxels: int = 1000,
) -> tuple[list[int], list[float]]:
    """Pitfall "pyramid": shrink factors (coarse to fine) and smoothing sigmas in mm.

    A factor f (a power of two, at most 2 ** (levels - 1)) is kept only if the shrunk image keeps at
    least `min_size` voxels along every axis and `mask_voxels / f**3 >= min_mask_voxels`, so the
    coarsest level never runs out of samples (the "joint PDF summed to zero" trap). The finest level
    (f = 1) is always there. Sigma = f / 2 voxels of the smallest spacing, 0 at full resolution.
    """
    factors = [1]
    for k in range(1, max(1, int(levels))):
        f = 2**k
        if min(size) // f >= min_size and mask_voxels / f**3 >= min_mask_voxels:
            factors.insert(0, f)
        else:
            break
    sigmas = [0.5 * f * min(spacing) if f > 1 else 0.0 for f in factors]
    return factors, sigmas


def per_level(values: Any, n_levels: int) -> list[int]:
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


def assess_stage(
    stop_condition: str,
    iterations: int,
    last_level_iterations: int,
    changed: bool,
    initial_metric: float = float("nan"),
    final_metric: float = float("nan"),
) -> str:
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


def metric_now(method: sitk.ImageRegistrationMethod, prepared: "Prepared") -> float:
    """The metric at the current transforms, on every mask voxel at full resolution."""
    try:
        return float(method.MetricEvaluate(prepared.fixed_crop, prepared.moving))
    except RuntimeError:  # e.g. no valid points: reported by Execute with the pair's name
        return float("nan")


def stage_notes(
    method: sitk.ImageRegistrationMethod,
    counter: "IterationCounter",
    prepared: "Prepared",
    initial_metric: float,
    changed: bool,
) -> dict:
    """Stop condition, iterations, metric before / after and the stage's flag."""
    stop = method.GetOptimizerStopConditionDescription()
    counter.finish()
    final_metric = metric_now(method, prepared)
    return {
        "stop_condition": stop,
        "iterations": counter.total,
        "metric_value": final_metric,
        "initial_metric_value": initial_metric,
        "flag": assess_stage(stop, counter.total, counter.last, changed, initial_metric, final_metric),
    }


def execute_stage(
    method: sitk.ImageRegistrationMethod, fixed: sitk.Image, moving: sitk.Image, pair: str, stage: str
) -> sitk.Transform:
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


def centred_start(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: np.ndarray | sitk.Image,
    options: Mapping[str, Any],
    pair: str = "",
) -> tuple[sitk.Image, sitk.Image, sitk.Image, sitk.Transform, float]:
    """Every method's start: float32 images, the fixed mask as an image, the centred initial
    transform and its overlap, checked (`MethodOptions`: initializer, min_overlap)."""
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    mask = mask_image(fixed_mask, fixed)
    if not (sitk.GetArrayViewFromImage(mask) > 0).any():
        raise RegistrationError(f"{pair or 'pair'}: the fixed lung mask is empty")
    initial = centred_initial_transform(fixed, moving, options["initializer"], mask)
    overlap = check_overlap(initial, mask, moving, float(options["min_overlap"]), pair)
    return fixed, moving, mask, initial, overlap


def prepare(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: np.ndarray | sitk.Image,
    options: Mapping[str, Any],
    pair: str = "",
) -> Prepared:
    fixed, moving, mask, initial, overlap = centred_start(fixed, moving, fixed_mask, options, pair)
    dilated = dilate_mask(mask, float(options["mask_dilation_mm"]))
    fixed_crop, mask_crop = crop_to_mask(fixed, dilated, float(options["crop_margin_mm"]))
    mask_voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask_crop)))
    factors, sigmas = pyramid_schedule(
        fixed_crop.GetSize(),
        fixed_crop.GetSpacing(),
        mask_voxels,
        options["pyramid_levels"],
        options["pyramid_min_size"],
        options["pyramid_min_mask_voxels"],
    )
    return Prepared(fixed, moving, mask, fixed_crop, mask_crop, factors, sigmas, initial, overlap, pair)


def transform_to_displacement(transform: sitk.Transform, grid: Grid) -> np.ndarray:
    """Any ITK transform (fixed mm -> moving mm) as the (z, y, x, 3) displacement on `grid`."""
    field_image = sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, list(grid.size), list(grid.origin), list(grid.spacing), list(grid.direction)
    )
    return sitk.GetArrayFromImage(field_image)
