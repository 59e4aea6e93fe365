"""elastix (PyPI `itk-elastix`): our centred initial transform, rigid and affine stages, then a
B-spline with a bending-energy penalty, on the masked crop; the result through transformix.

Its conventions: elastix's transforms map fixed points to moving points (ITK's), its parameter
maps chain by composition (the last map acts first: T = initial o rigid o affine o B-spline), and
transformix's deformation field is T(x) - x in mm on the grid its maps name (Size, Origin,
Spacing, Direction): the project's convention, on whichever grid `elastix_displacement` is asked
for (tests/test_baselines.py checks it against transformix's own warped image).

Its pitfalls, each handled here:

* masks: elastix erodes the fixed mask at every pyramid level by default (`ErodeMask`), which
  leaves no valid sample in a thin lung mask ("No valid voxels (0/...)"): `erode_mask: false`;
  the mask is the lung mask dilated `mask_dilation_mm`, on the crop (as for the other methods);
* initialisation: elastix's own centre initialisation would use the CROPPED fixed image, so ours
  (common.centred_start, on the whole images, overlap-checked) is its initial transform map;
* pyramid: the shrink factors of `common.pyramid_schedule` (a level is kept only while the crop
  keeps enough voxels); the default cohort's small crops get one level;
* its default affine + B-spline parameter maps (Mattes MI, 256 iterations per level) diverged and
  folded on the default cohort (issue 23: min det J -2.1, all 13 validation pairs folding): here
  NCC, 500 iterations, a control-point spacing in mm and a bending-energy penalty;
* reporting: the stop condition, iterations and metric of every stage are read from its log, and
  `common.assess_stage` flags a stage that never ran or got worse;
* threads: the registration's own count and ITK's global default, both set to the job's.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import SimpleITK as sitk

from ...geometry import Grid
from ...network.transform import displacement_transform
from ..base import RegistrationResult
from .common import (
    CommonOptions,
    Prepared,
    RegistrationError,
    assess_stage,
    combine_flags,
    itk_threads,
    overlap_fraction,
    per_level,
    prepare,
    resolve,
)


@dataclass(frozen=True)
class ElastixOptions(CommonOptions):
    """elastix: the linear stages (`linear_stages`), then a B-spline with a bending-energy penalty."""

    metric: str = "ncc"  # every stage: ncc, mattes (mutual information, mattes_bins) or mse
    linear_iterations: int = 250  # per pyramid level
    bspline_iterations: int = 500  # per pyramid level
    grid_spacing_mm: float = 20.0  # final B-spline control-point spacing
    bending_weight: float = 1.0  # weight of the bending-energy penalty (the metric's is 1)
    spatial_samples: int = 2048  # random points per iteration, inside the dilated fixed mask
    erode_mask: bool = False  # elastix's default (true) leaves no sample in a thin lung mask


METRICS = {
    "ncc": "AdvancedNormalizedCorrelation",
    "mattes": "AdvancedMattesMutualInformation",
    "mse": "AdvancedMeanSquares",
}
LINEAR_TRANSFORMS = {"rigid": "EulerTransform", "affine": "AffineTransform"}


def elastix_modules():
    # Imported when used (genuinely optional, as ANTsPy): only this baseline needs ITK's Python
    # wrapping, whose lazy loading takes seconds; touching the classes loads them here, before
    # any registration is timed.
    import itk

    _ = itk.ElastixRegistrationMethod, itk.TransformixFilter, itk.ParameterObject
    return itk


def resolve_elastix(options: Mapping[str, Any] | None) -> dict[str, Any]:
    resolved = resolve(ElastixOptions, "elastix", options)
    if resolved["metric"] not in METRICS:
        raise ValueError(f"baselines.elastix.metric must be one of {', '.join(METRICS)}, got {resolved['metric']!r}")
    for kind in resolved["linear_stages"]:
        if kind not in LINEAR_TRANSFORMS:
            raise ValueError(f"unknown linear stage {kind!r} for elastix: expected rigid or affine")
    return resolved


@contextlib.contextmanager
def elastix_threads(itk, threads: int) -> Iterator[None]:
    """ITK's global default thread count (ITK Python's, elastix's), restored after."""
    previous = itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads()
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(max(1, int(threads)))
    try:
        yield
    finally:
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(previous)


# --------------------------------------------------------------------------- images, maps


def itk_image(itk, image: sitk.Image):
    """A SimpleITK image as an ITK Python image: the same voxels, origin, spacing and direction."""
    converted = itk.GetImageFromArray(np.ascontiguousarray(sitk.GetArrayFromImage(image)))
    converted.SetOrigin(image.GetOrigin())
    converted.SetSpacing(image.GetSpacing())
    converted.SetDirection(itk.matrix_from_array(np.asarray(image.GetDirection(), float).reshape(3, 3)))
    return converted


def _numbers(values) -> list[str]:
    return [repr(float(v)) for v in values]


def grid_parameters(grid: Grid) -> dict[str, list[str]]:
    """The output grid of a transform parameter map (elastix writes Direction column by column)."""
    return {
        "Size": [str(int(v)) for v in grid.size],
        "Index": ["0", "0", "0"],
        "Spacing": _numbers(grid.spacing),
        "Origin": _numbers(grid.origin),
        "Direction": _numbers(grid.direction_matrix.T.ravel()),
        "UseDirectionCosines": ["true"],
    }


def initial_map(transform: sitk.Transform, grid: Grid) -> dict[str, list[str]]:
    """Our centred initial transform (an Euler3D) as an elastix transform parameter map."""
    if not isinstance(transform, sitk.Euler3DTransform):
        raise TypeError(f"the initial transform must be an Euler3DTransform, got {type(transform).__name__}")
    return {
        "Transform": ["EulerTransform"],
        "NumberOfParameters": ["6"],
        "TransformParameters": _numbers(transform.GetParameters()),
        "CenterOfRotationPoint": _numbers(transform.GetCenter()),
        "ComputeZYX": ["false"],
        "InitialTransformParameterFileName": ["NoInitialTransform"],
        "HowToCombineTransforms": ["Compose"],
        "FixedImageDimension": ["3"],
        "MovingImageDimension": ["3"],
        "FixedInternalImagePixelType": ["float"],
        "MovingInternalImagePixelType": ["float"],
        "Resampler": ["DefaultResampler"],
        "ResampleInterpolator": ["FinalLinearInterpolator"],
        "DefaultPixelValue": ["0"],
        **grid_parameters(grid),
    }


def stage_map(kind: str, prepared: Prepared, options: Mapping[str, Any]) -> dict[str, list[str]]:
    """One registration stage: rigid, affine or bspline, on the pyramid of `prepared`."""
    levels = len(prepared.factors)
    schedule = [str(f) for f in prepared.factors for _ in range(3)]
    metric = METRICS[options["metric"]]
    common = {
        "Registration": ["MultiResolutionRegistration"],
        "NumberOfResolutions": [str(levels)],
        "FixedImagePyramid": ["FixedRecursiveImagePyramid"],
        "MovingImagePyramid": ["MovingRecursiveImagePyramid"],
        "FixedImagePyramidSchedule": schedule,
        "MovingImagePyramidSchedule": schedule,
        "Interpolator": ["LinearInterpolator"],
        "ResampleInterpolator": ["FinalLinearInterpolator"],
        "Resampler": ["DefaultResampler"],
        "Optimizer": ["AdaptiveStochasticGradientDescent"],
        "AutomaticParameterEstimation": ["true"],
        "ImageSampler": ["RandomCoordinate"],
        "NumberOfSpatialSamples": [str(int(options["spatial_samples"]))],
        "NewSamplesEveryIteration": ["true"],
        "ErodeMask": ["true" if options["erode_mask"] else "false"],
        "NumberOfHistogramBins": [str(int(options["mattes_bins"]))],
        "RandomSeed": [str(int(options["seed"]))],
        "HowToCombineTransforms": ["Compose"],
        "FixedInternalImagePixelType": ["float"],
        "MovingInternalImagePixelType": ["float"],
        "DefaultPixelValue": ["0"],
        "WriteResultImage": ["false"],
    }
    if kind in LINEAR_TRANSFORMS:
        iterations = per_level(options["linear_iterations"], levels)
        return {
            **common,
            "Transform": [LINEAR_TRANSFORMS[kind]],
            "AutomaticScalesEstimation": ["true"],
            "Metric": [metric],
            "MaximumNumberOfIterations": [str(n) for n in iterations],
        }
    iterations = per_level(options["bspline_iterations"], levels)
    return {
        **common,
        "Registration": ["MultiMetricMultiResolutionRegistration"],
        "Transform": ["BSplineTransform"],
        "FinalGridSpacingInPhysicalUnits": [repr(float(options["grid_spacing_mm"]))],
        "Metric": [metric, "TransformBendingEnergyPenalty"],
        "Metric0Weight": ["1.0"],
        "Metric1Weight": [repr(float(options["bending_weight"]))],
        "MaximumNumberOfIterations": [str(n) for n in iterations],
    }


# --------------------------------------------------------------------------- results


def elastix_displacement(itk, transforms, grid: Grid, moving: sitk.Image) -> tuple[np.ndarray, sitk.Image]:
    """elastix's transform (a transform parameter object) as the project's field on `grid`
    ((z, y, x, 3) mm, T(x) = x + u(x)), and transformix's own warped moving image on `grid`.

    The one conversion from elastix: every map's output grid is set to `grid`, so the same result
    can be scored on any fixed grid (the crop it was registered on, the whole fixed image, the
    original grid of a CT scan or the workflow's)."""
    maps = itk.ParameterObject.New()
    for index in range(transforms.GetNumberOfParameterMaps()):
        parameters = dict(transforms.GetParameterMap(index))
        parameters.update(grid_parameters(grid))
        maps.AddParameterMap(parameters)
    # transformix also writes the field to its output directory (the working directory unless told)
    with tempfile.TemporaryDirectory(prefix="lungreg-transformix-") as folder:
        transformix = itk.TransformixFilter.New(
            itk_image(itk, sitk.Cast(moving, sitk.sitkFloat32)),
            transform_parameter_object=maps,
            log_to_console=False,
            output_directory=folder,
        )
        transformix.SetComputeDeformationField(True)
        transformix.UpdateLargestPossibleRegion()
        field = itk.GetArrayFromImage(transformix.GetOutputDeformationField()).astype(np.float64)
        warped = sitk.GetImageFromArray(itk.GetArrayFromImage(transformix.GetOutput()).astype(np.float32))
    grid.apply_to(warped)
    if field.shape != (*grid.shape, 3):
        raise RegistrationError(f"transformix gave a field of shape {field.shape}, expected {(*grid.shape, 3)}")
    return field, warped


def linear_part(itk, transforms) -> sitk.AffineTransform:
    """The composed linear maps (initial, rigid, affine; fixed mm -> moving mm) as one affine."""
    composed = np.eye(4)
    for index in range(transforms.GetNumberOfParameterMaps()):
        parameters = transforms.GetParameterMap(index)
        kind = parameters["Transform"][0]
        if kind not in ("EulerTransform", "AffineTransform"):
            continue
        values = [float(v) for v in parameters["TransformParameters"]]
        centre = [float(v) for v in parameters["CenterOfRotationPoint"]]
        if kind == "EulerTransform":
            transform = sitk.Euler3DTransform(centre, *values[:3], values[3:6])
        else:
            transform = sitk.AffineTransform(values[:9], values[9:12], centre)
        matrix = np.asarray(transform.GetMatrix()).reshape(3, 3)
        homogeneous = np.eye(4)
        homogeneous[:3, :3] = matrix
        homogeneous[:3, 3] = np.asarray(transform.GetTranslation()) + np.asarray(centre) - matrix @ centre
        composed = composed @ homogeneous  # maps chain by composition: the later map acts first
    return sitk.AffineTransform(composed[:3, :3].ravel().tolist(), composed[:3, 3].tolist())


LEVEL = re.compile(r"^Resolution: (\d+)")
ITERATION = re.compile(r"^(\d+)\t(\S+)")
STOP = re.compile(r"^Stopping condition: (.*)")


def log_stages(log: str) -> list[list[dict]]:
    """Per stage, per pyramid level: the iterations, first and last metric value and stop condition,
    read from elastix's log (a stage starts at its "Resolution: 0")."""
    stages: list[list[dict]] = []
    for line in log.splitlines():
        if match := LEVEL.match(line):
            if match.group(1) == "0":
                stages.append([])
            if stages:
                stages[-1].append({"iterations": 0, "first": np.nan, "last": np.nan, "stop": ""})
        elif stages and stages[-1] and (match := ITERATION.match(line)):
            level = stages[-1][-1]
            level["iterations"] = int(match.group(1)) + 1
            level["last"] = float(match.group(2))
            if int(match.group(1)) == 0:
                level["first"] = float(match.group(2))
        elif stages and stages[-1] and (match := STOP.match(line)):
            stages[-1][-1]["stop"] = match.group(1).strip()
    return stages


def stage_notes(levels: list[dict], changed: bool) -> dict:
    """Notes and flag of one stage: the finest level's first and last metric (same smoothing)."""
    stop = "; ".join(f"level {k}: {level['stop']}" for k, level in enumerate(levels))
    total = sum(level["iterations"] for level in levels)
    last = levels[-1] if levels else {"iterations": 0, "first": np.nan, "last": np.nan}
    return {
        "stop_condition": stop,
        "iterations": total,
        "metric_value": last["last"],
        "initial_metric_value": last["first"],
        "flag": assess_stage(stop, total, last["iterations"], changed, last["first"], last["last"]),
    }


def failure(error: RuntimeError, folder: Path) -> str:
    """Why elastix failed: the exception's description in its log (the exception itself only says
    "see elastix log"), else the exception's own text."""
    log = folder / "elastix.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    described = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Description:")]
    message = " ".join(" ".join(described).split()) or " ".join(str(error).split())
    return message[-400:]


def _changed(parameters) -> bool:
    kind = parameters["Transform"][0]
    values = np.asarray([float(v) for v in parameters["TransformParameters"]])
    identity = np.concatenate([np.eye(3).ravel(), np.zeros(3)]) if kind == "AffineTransform" else 0.0
    return bool(np.any(values != identity))


# --------------------------------------------------------------------------- registration


def register_elastix(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: np.ndarray | sitk.Image,
    options: Mapping[str, Any] | None = None,
    pair: str = "",
    threads: int = 1,
) -> RegistrationResult:
    """elastix on one pair: the fixed crop and dilated mask, the whole moving image, our initial
    transform; the field on the whole fixed grid (`elastix_displacement`). `seconds` is the
    elastix call (all stages), not the conversion."""
    itk = elastix_modules()
    options = resolve_elastix(options)
    kinds = [*options["linear_stages"], "bspline"]
    with itk_threads(threads), elastix_threads(itk, threads), tempfile.TemporaryDirectory(prefix="lungreg-elx-") as log:
        prepared = prepare(fixed, moving, fixed_mask, options, pair)
        grid = Grid.of(prepared.fixed)
        maps = itk.ParameterObject.New()
        for kind in kinds:
            maps.AddParameterMap(stage_map(kind, prepared, options))
        initial = itk.ParameterObject.New()
        initial.AddParameterMap(initial_map(prepared.initial, grid))
        method = itk.ElastixRegistrationMethod.New(
            itk_image(itk, prepared.fixed_crop),
            itk_image(itk, prepared.moving),
            parameter_object=maps,
            fixed_mask=itk_image(itk, sitk.Cast(prepared.mask_crop, sitk.sitkUInt8)),
            log_to_console=False,
            log_to_file=True,
            output_directory=log,
        )
        method.SetInitialTransformParameterObject(initial)
        method.SetNumberOfThreads(max(1, int(threads)))
        started = time.perf_counter()
        try:
            method.UpdateLargestPossibleRegion()
        except RuntimeError as error:
            raise RegistrationError(f"{pair or 'pair'}: elastix failed: {failure(error, Path(log))}") from error
        seconds = time.perf_counter() - started
        levels = log_stages((Path(log) / "elastix.log").read_text(errors="replace"))
        transforms = method.GetTransformParameterObject()
        displacement, warped = elastix_displacement(itk, transforms, grid, prepared.moving)
        affine = linear_part(itk, transforms)
        final_overlap = overlap_fraction(displacement_transform(displacement, grid), prepared.mask, prepared.moving)
    # the result's maps: our initial one first, then one per stage
    changed = [_changed(transforms.GetParameterMap(1 + k)) for k in range(len(kinds))]
    if len(levels) != len(kinds):
        raise RegistrationError(f"{pair or 'pair'}: elastix's log shows {len(levels)} stages, expected {len(kinds)}")
    stages = {kind: stage_notes(stage, change) for kind, stage, change in zip(kinds, levels, changed)}
    deformable = stages.pop("bspline")
    flags = {"linear": combine_flags(**{kind: notes["flag"] for kind, notes in stages.items()})}
    flags["deformable"] = deformable["flag"]
    if final_overlap < float(options["min_overlap"]):
        flags["final"] = "low_overlap"
    notes = {
        "flag": combine_flags(**flags),
        **{key: value for key, value in deformable.items() if key != "flag"},
        **{f"{kind}_{key}": value for kind, notes in stages.items() for key, value in notes.items() if key != "flag"},
        "initial_overlap": prepared.initial_overlap,
        "final_overlap": final_overlap,
        "pyramid": "x".join(map(str, prepared.factors)),
    }
    return RegistrationResult(displacement, seconds, affine, warped, notes)
