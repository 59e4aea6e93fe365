"""ANTsPy SyN: our centred initial transform, rigid and affine stages, then SyN, on the masked crop.

Two ANTsPy traps met on the way (see `register_syn`): antsRegistration's own centre-of-mass
initialisation would use the CROPPED fixed image (so ours, computed on the whole images, is
passed as a transform file), and its metric mask must be an unsigned-char image (a float image's
pointer is silently misread: the registration then runs but barely moves).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import SimpleITK as sitk

from ...geometry import Grid
from ...network.transform import displacement_transform
from ..base import RegistrationResult
from .common import (
    CommonOptions,
    Prepared,
    RegistrationError,
    itk_threads,
    overlap_fraction,
    per_level,
    prepare,
    resolve,
)


@dataclass(frozen=True)
class SynOptions(CommonOptions):
    """syn: ANTs Rigid then Affine stages (`linear_stages`), then SyN."""

    mask_all_stages: bool = True  # the (dilated) lung mask for the affine stage as well as SyN
    affine_metric: str = "mattes"  # mattes, meansquares or gc (global correlation)
    affine_sampling_percentage: float = 1.0  # 1: dense inside the mask; < 1: Regular sampling
    affine_iterations: int = 200  # per pyramid level
    affine_step: float = 0.25
    metric: str = "cc"  # of the SyN stage: cc (neighbourhood), mattes or meansquares
    cc_radius: int = 2  # voxels, for cc
    syn_iterations: list = field(default_factory=lambda: [40, 20, 10])  # coarse to fine; the finest levels used
    grad_step: float = 0.2
    flow_sigma: float = 3.0  # update-field smoothing (voxel units, as in ANTs)
    total_sigma: float = 0.0  # total-field smoothing (voxel units)


def ants_modules():
    # Imported when used (genuinely optional): ANTsPy is heavy, only the syn baseline needs it,
    # and the network's environment (envs/torch.yaml) does not have it.
    import ants
    from ants.internal import get_lib_fn, get_pointer_string, process_arguments

    return ants, get_lib_fn, get_pointer_string, process_arguments


def _ants_metric(name: str, fixed: str, moving: str, options: Mapping[str, Any], affine: bool) -> str:
    if affine:
        percentage = float(options["affine_sampling_percentage"])
        sampling = "None,1" if percentage >= 1 else f"Regular,{percentage}"
        names = {
            "mattes": f"Mattes[{fixed},{moving},1,{int(options['mattes_bins'])},{sampling}]",
            "meansquares": f"MeanSquares[{fixed},{moving},1,0,{sampling}]",
            "gc": f"GC[{fixed},{moving},1,0,{sampling}]",
        }
    else:
        names = {
            "cc": f"CC[{fixed},{moving},1,{int(options['cc_radius'])}]",
            "mattes": f"Mattes[{fixed},{moving},1,{int(options['mattes_bins'])}]",
            "meansquares": f"MeanSquares[{fixed},{moving},1,0]",
        }
    if name not in names:
        raise ValueError(
            f"unknown {'affine_metric' if affine else 'metric'} {name!r} for syn: expected {', '.join(names)}"
        )
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
    affine_iterations = "x".join(str(v) for v in per_level(options["affine_iterations"], len(prepared.factors)))
    syn_iterations = "x".join(str(v) for v in per_level(options["syn_iterations"], len(prepared.factors)))
    linear = []
    for kind in options["linear_stages"]:
        if kind not in ("rigid", "affine"):
            raise ValueError(f"unknown linear stage {kind!r}: expected rigid or affine")
        linear += [
            "--metric",
            _ants_metric(options["affine_metric"], f, m, options, affine=True),
            "--transform",
            f"{kind.capitalize()}[{float(options['affine_step'])}]",
            "--convergence",
            f"[{affine_iterations},1e-6,10]",
            "--smoothing-sigmas",
            sigmas,
            "--shrink-factors",
            factors,
            "--masks",
            mask if options["mask_all_stages"] else "[NA,NA]",
        ]
    args = [
        "--dimensionality",
        "3",
        "--float",
        "1",
        "--random-seed",
        str(int(options["seed"])),
        "--initial-moving-transform",
        pointers["initial"],
        *linear,
        "--metric",
        _ants_metric(options["metric"], f, m, options, affine=False),
        "--transform",
        f"SyN[{float(options['grad_step'])},{float(options['flow_sigma'])},{float(options['total_sigma'])}]",
        "--convergence",
        f"[{syn_iterations},1e-7,8]",
        "--smoothing-sigmas",
        sigmas,
        "--shrink-factors",
        factors,
        "--masks",
        mask,
        "--use-histogram-matching",
        "0",
        "--collapse-output-transforms",
        "1",
        "--output",
        f"[{prefix},{pointers['warped']},{pointers['inverse_warped']}]",
        "--verbose",
        "0",
    ]
    return args


def ants_affine_to_sitk(path: str | Path) -> sitk.AffineTransform:
    """ANTs' GenericAffine.mat (an ITK MatrixOffsetTransform) as a SimpleITK affine."""
    ants, *_ = ants_modules()
    transform = ants.read_transform(str(path))
    parameters = np.asarray(transform.parameters, float)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(np.asarray(transform.fixed_parameters, float).tolist())
    affine.SetMatrix(parameters[:9].tolist())
    affine.SetTranslation(parameters[9:12].tolist())
    return affine


def register_syn(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: np.ndarray | sitk.Image,
    options: Mapping[str, Any] | None = None,
    pair: str = "",
    threads: int = 1,
) -> RegistrationResult:
    """ANTsPy: centred initialisation, affine, SyN; the forward transforms composed into one field.

    The fixed image given to ANTs is cropped to the dilated lung mask's box plus a margin (as for
    SimpleITK), the mask is ANTs' metric mask; the transforms are then composed by
    antsApplyTransforms on the whole fixed grid (the SyN field is zero outside the crop). ANTs
    and ITK share the convention: the composed field maps fixed points to moving points.
    `seconds` is the antsRegistration call (it writes its transforms to a temporary folder).
    """
    ants, get_lib_fn, get_pointer_string, process_arguments = ants_modules()
    options = resolve(SynOptions, "syn", options)
    with itk_threads(threads), tempfile.TemporaryDirectory(prefix="lungreg-syn-") as folder:
        prepared = prepare(fixed, moving, fixed_mask, options, pair)
        fixed_a = ants.from_sitk(prepared.fixed_crop).clone("float")
        moving_a = ants.from_sitk(prepared.moving).clone("float")
        # antsRegistration reinterprets the pointer as its mask type: it must be an unsigned char
        # image (as ANTsPy's own `mask != 0`), a float image would be read as garbage
        mask_a = ants.from_sitk(sitk.Cast(prepared.mask_crop, sitk.sitkFloat32)) != 0
        warped_a, inverse_a = fixed_a.clone(), moving_a.clone()
        pointers = {
            "fixed": get_pointer_string(fixed_a),
            "moving": get_pointer_string(moving_a),
            "mask": get_pointer_string(mask_a),
            "warped": get_pointer_string(warped_a),
            "inverse_warped": get_pointer_string(inverse_a),
        }
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
        composed = ants.apply_transforms(
            whole_fixed, moving_a, transformlist=forward, compose=str(Path(folder) / "fwd_")
        )
        field_image = sitk.ReadImage(composed)
        displacement = sitk.GetArrayFromImage(field_image).astype(np.float64)
        grid = Grid.of(prepared.fixed)
        if displacement.shape != (*grid.shape, 3):
            raise RegistrationError(
                f"{pair or 'pair'}: the composed ANTs field has shape {displacement.shape}, expected {(*grid.shape, 3)}"
            )
        warped = ants.to_sitk(ants.apply_transforms(whole_fixed, moving_a, transformlist=forward))
        warped.CopyInformation(prepared.fixed)
        affine = ants_affine_to_sitk(forward[1])
        final_overlap = overlap_fraction(displacement_transform(displacement, grid), prepared.mask, prepared.moving)
    flag = "ok" if final_overlap >= float(options["min_overlap"]) else "final:low_overlap"
    notes = {
        "flag": flag,
        "stop_condition": "not exposed by ANTsPy",
        "iterations": np.nan,
        "metric_value": np.nan,
        "initial_overlap": prepared.initial_overlap,
        "final_overlap": final_overlap,
        "pyramid": "x".join(map(str, prepared.factors)),
    }
    return RegistrationResult(displacement, seconds, affine, sitk.Cast(warped, sitk.sitkFloat32), notes)
