"""The SimpleITK methods: a centred initialiser, rigid and affine stages, then a B-spline FFD or demons."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import SimpleITK as sitk

from ...geometry import Grid
from ..base import RegistrationResult
from .common import (
    CommonOptions,
    IterationCounter,
    Prepared,
    RegistrationError,
    apply_pyramid,
    assess_stage,
    combine_flags,
    configure_metric,
    configure_sampling,
    execute_stage,
    itk_threads,
    metric_now,
    overlap_fraction,
    per_level,
    prepare,
    resolve,
    stage_notes,
    transform_to_displacement,
)


@dataclass(frozen=True)
class SitkLinearOptions(CommonOptions):
    """The SimpleITK linear stages (both SimpleITK methods)."""

    linear_metric: str = "mse"  # mse, correlation or mattes (MI was unstable on 24 x 48 x 48 lungs)
    sampling_percentage: float = 1.0  # 1: every voxel of the dilated mask; < 1: REGULAR, seeded
    linear_optimizer: str = "conjugate_gradient"  # or line_search, gradient_descent (scales from physical shift)
    linear_iterations: int = 200  # per pyramid level (one number: SimpleITK has no per-level count)
    max_step_mm: float = 2.0  # gradient descent: the first step moves no point further than this
    convergence_minimum: float = 1.0e-6  # gradient descent: stop when the metric's slope over the
    convergence_window: int = 10  # last `convergence_window` iterations is below this


@dataclass(frozen=True)
class BsplineOptions(SitkLinearOptions):
    """sitk_bspline: the linear stages, then a B-spline free-form deformation."""

    metric: str = "mse"  # of the B-spline stage: mse, correlation or mattes
    grid_spacing_mm: float = 40.0  # B-spline control-point spacing
    bspline_optimizer: str = "lbfgsb"  # lbfgsb, or gradient_descent (scales from physical shift)
    bspline_iterations: int = 100  # per pyramid level
    lbfgsb_gradient_tolerance: float = 1.0e-5  # L-BFGS-B stops when the projected gradient is below this
    lbfgsb_cost_factor: float = 1.0e7  # ... or when the relative cost reduction is below this x 2.2e-16


@dataclass(frozen=True)
class DemonsOptions(SitkLinearOptions):
    """sitk_demons: the linear stages, then demons on the crop."""

    demons_filter: str = "fast_symmetric"  # fast_symmetric, diffeomorphic or demons (intensity SSD)
    demons_iterations: list = field(default_factory=lambda: [50, 50, 50])  # coarse to fine; the finest levels used
    demons_smoothing_mm: float = 12.0  # Gaussian sigma of the displacement-field regularisation
    demons_update_smoothing_mm: float = 0.0  # sigma of the update field (0: off)
    demons_max_rms_error: float = 0.01  # stop a level when the RMS change falls below this (mm)


OPTIONS = {"sitk_bspline": BsplineOptions, "sitk_demons": DemonsOptions}


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


def configure_optimizer(
    method: sitk.ImageRegistrationMethod, kind: str, iterations: int, options: Mapping[str, Any]
) -> None:
    """Pitfall "optimiser": a gradient optimiser with scales from physical shift.

    The learning rate is estimated so that the first step moves no point by more than
    max_step_mm. Plain gradient descent keeps that rate, which diverged on the thorax CT (a 20
    degree rotation: small gradient at the start, overshoot later); the line-search variants
    (default: conjugate gradient) search along each direction and cannot increase the metric.
    """
    common = dict(
        learningRate=1.0,
        numberOfIterations=int(iterations),
        convergenceMinimumValue=float(options["convergence_minimum"]),
        convergenceWindowSize=int(options["convergence_window"]),
        estimateLearningRate=method.Once,
        maximumStepSizeInPhysicalUnits=float(options["max_step_mm"]),
    )
    if kind == "conjugate_gradient":
        method.SetOptimizerAsConjugateGradientLineSearch(lineSearchUpperLimit=5.0, **common)
    elif kind == "line_search":
        method.SetOptimizerAsGradientDescentLineSearch(lineSearchUpperLimit=5.0, **common)
    elif kind == "gradient_descent":
        method.SetOptimizerAsGradientDescent(**common)
    else:
        raise ValueError(f"unknown optimizer {kind!r}: expected one of {', '.join(LINEAR_OPTIMIZERS)}")
    method.SetOptimizerScalesFromPhysicalShift()


def _linear_stage(
    prepared: Prepared, kind: str, start: sitk.Transform, options: Mapping[str, Any], threads: int
) -> tuple[sitk.Transform, dict]:
    transform = _linear_transform(kind, start)
    before = np.asarray(transform.GetParameters())
    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(threads)
    configure_metric(method, options["linear_metric"], options["mattes_bins"])
    configure_sampling(method, prepared.mask_crop, float(options["sampling_percentage"]), int(options["seed"]))
    method.SetInterpolator(sitk.sitkLinear)
    iterations = per_level(options["linear_iterations"], len(prepared.factors))
    configure_optimizer(method, options["linear_optimizer"], max(iterations), options)
    apply_pyramid(method, prepared.factors, prepared.sigmas_mm)
    method.SetInitialTransform(transform, inPlace=True)
    counter = IterationCounter(method)
    initial_metric = metric_now(method, prepared)
    execute_stage(method, prepared.fixed_crop, prepared.moving, prepared.pair, kind)
    return transform, stage_notes(
        method,
        counter,
        prepared,
        initial_metric,
        not np.allclose(before, transform.GetParameters(), rtol=0, atol=1e-12),
    )


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


def sitk_affine(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: np.ndarray | sitk.Image,
    options: Mapping[str, Any] | None = None,
    pair: str = "",
    threads: int = 1,
) -> tuple[sitk.AffineTransform, dict]:
    """The SimpleITK linear stage alone: centred initialisation, overlap check, rigid then affine.

    Returns the affine transform (fixed mm -> moving mm, ITK's resampling direction) and notes
    (initial overlap, stop condition / iterations / metric value of each stage, `linear_flag`).
    `options`: any of the sitk_bspline options (defaults otherwise).
    """
    options = resolve(BsplineOptions, "sitk_bspline", options)
    with itk_threads(threads):
        prepared = prepare(fixed, moving, fixed_mask, options, pair)
        return _run_linear(prepared, options, threads)


def bspline_mesh_size(image: sitk.Image, spacing_mm: float) -> list[int]:
    """Mesh cells per axis so that control points are about `spacing_mm` apart over the image."""
    extent = np.asarray(image.GetSize()) * np.asarray(image.GetSpacing())
    return [max(1, int(round(e / float(spacing_mm)))) for e in extent]


def _bspline_stage(
    prepared: Prepared, affine: sitk.AffineTransform, options: Mapping[str, Any], threads: int
) -> tuple[sitk.Transform, dict]:
    bspline = sitk.BSplineTransformInitializer(
        prepared.fixed_crop, bspline_mesh_size(prepared.fixed_crop, options["grid_spacing_mm"]), 3
    )
    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(threads)
    configure_metric(method, options["metric"], options["mattes_bins"])
    configure_sampling(method, prepared.mask_crop, float(options["sampling_percentage"]), int(options["seed"]))
    method.SetInterpolator(sitk.sitkLinear)
    iterations = max(per_level(options["bspline_iterations"], len(prepared.factors)))
    if options["bspline_optimizer"] == "lbfgsb":
        # L-BFGS-B scales its own steps (ITK's LBFGSB ignores parameter scales); B-spline
        # coefficients are all displacements in mm, so they are commensurate anyway.
        method.SetOptimizerAsLBFGSB(
            gradientConvergenceTolerance=float(options["lbfgsb_gradient_tolerance"]),
            numberOfIterations=iterations,
            maximumNumberOfCorrections=5,
            maximumNumberOfFunctionEvaluations=4 * iterations,
            costFunctionConvergenceFactor=float(options["lbfgsb_cost_factor"]),
        )
    elif options["bspline_optimizer"] == "gradient_descent":
        configure_optimizer(method, "gradient_descent", iterations, options)
    else:
        raise ValueError(
            f"unknown bspline_optimizer {options['bspline_optimizer']!r}: expected lbfgsb or gradient_descent"
        )
    apply_pyramid(method, prepared.factors, prepared.sigmas_mm)
    method.SetMovingInitialTransform(affine)
    method.SetInitialTransform(bspline, inPlace=True)
    counter = IterationCounter(method)
    initial_metric = metric_now(method, prepared)
    execute_stage(method, prepared.fixed_crop, prepared.moving, prepared.pair, "B-spline")
    notes = stage_notes(
        method, counter, prepared, initial_metric, bool(np.any(np.asarray(bspline.GetParameters()) != 0))
    )
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


def _demons_stage(
    prepared: Prepared, affine: sitk.AffineTransform, options: Mapping[str, Any], threads: int
) -> tuple[sitk.Transform, dict]:
    """Demons between the cropped fixed image and the moving image resampled through the affine.

    Dense on the crop (no sampling at all); multi-resolution by the same schedule; smoothing given
    in mm and converted to voxels per axis. The field d lives on the crop; T(x) = A(x + d(x)).
    """
    if options["demons_filter"] not in DEMONS_FILTERS:
        raise ValueError(f"unknown demons_filter {options['demons_filter']!r}: expected {', '.join(DEMONS_FILTERS)}")
    crop = prepared.fixed_crop
    moved = sitk.Resample(prepared.moving, crop, affine, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    fixed_local, moving_local = _strip_geometry(crop), _strip_geometry(moved)
    iterations = per_level(options["demons_iterations"], len(prepared.factors))
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
            initial = sitk.Resample(
                field_image, level_fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64
            )
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
            raise RegistrationError(
                f"{prepared.pair or 'pair'}: the demons stage failed in ITK: {message[-400:]}"
            ) from error
        last = int(demons.GetElapsedIterations())
        total += last
        stops.append(
            f"level {level}: maximum iterations ({n})"
            if last >= n
            else f"level {level}: RMS change {demons.GetRMSChange():.3g} below {options['demons_max_rms_error']}"
        )
    field_image = sitk.Resample(
        field_image, fixed_local, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64
    )
    local = sitk.GetArrayFromImage(field_image)
    changed = bool(np.any(local != 0))
    warped_local = sitk.Resample(
        moving_local,
        fixed_local,
        sitk.DisplacementFieldTransform(sitk.Image(field_image)),
        sitk.sitkLinear,
        0.0,
        sitk.sitkFloat32,
    )
    fixed_array = sitk.GetArrayViewFromImage(fixed_local)
    initial_metric = float(np.mean((fixed_array - sitk.GetArrayViewFromImage(moving_local)) ** 2))
    metric = float(np.mean((fixed_array - sitk.GetArrayViewFromImage(warped_local)) ** 2))
    # components along the crop's axes -> physical (x, y, z): multiply by the direction matrix
    physical = local @ np.asarray(crop.GetDirection()).reshape(3, 3).T
    field_crop = sitk.GetImageFromArray(physical, isVector=True)
    field_crop.CopyInformation(crop)
    stop = "; ".join(stops)
    notes = {
        "stop_condition": stop,
        "iterations": total,
        "metric_value": metric,
        "initial_metric_value": initial_metric,
        "flag": assess_stage(stop, total, last, changed, initial_metric, metric),
    }
    # DisplacementFieldTransform gives zero displacement outside the crop: T = A o (x + d)
    return sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(field_crop)]), notes


def register_sitk(
    method: str,
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: np.ndarray | sitk.Image,
    options: Mapping[str, Any] | None = None,
    pair: str = "",
    threads: int = 1,
) -> RegistrationResult:
    """sitk_bspline or sitk_demons on one pair; `seconds` covers the registration only."""
    options = resolve(OPTIONS[method], method, options)
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
    notes = {
        "flag": combine_flags(**flags),
        "stop_condition": deformable["stop_condition"],
        "iterations": deformable["iterations"],
        "metric_value": deformable["metric_value"],
        "initial_metric_value": deformable["initial_metric_value"],
        **notes,
        "final_overlap": final_overlap,
        "pyramid": "x".join(map(str, prepared.factors)),
    }
    return RegistrationResult(displacement, seconds, affine, warped, notes)
