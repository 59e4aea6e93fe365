"""One pair outside the workflow: the `lungreg register` command (lungreg.cli) behind its arguments.

Both images are preprocessed as in the workflow that trained the model (`preprocess.onto_common_grid`
with the settings stored in model.pt), registered by the network (`network.NetworkRegistrar`) and
written as the workflow's own pair files (`chunk.write_pair_files`), so that what works on
results/registration/.../<pair>/ works on the command's folder (tests/test_interop.py, test_cli.py).
Bad input raises `io.InputError` (one line) before the network runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
import yaml

from .. import io, manifest, torch_io
from ..evaluate import Phase, warped_masks
from ..geometry import Grid, resample
from ..io import InputError
from ..metrics import map_points
from ..network.refine import RefineSettings
from ..network.transform import displacement_transform
from ..preprocess import PreprocessSettings, onto_common_grid
from ..study import REFINE_WORKFLOW_KEYS, Pair, other_phase
from .base import LoadedPair, RegistrationResult
from .chunk import write_pair_files
from .network import NetworkRegistrar

OUTPUT_NAMES = (
    "displacement.nii.gz",
    "affine.tfm",
    "warped.nii.gz",
    "warped_original.nii.gz",
    "warped_mask.nii.gz",
    "fixed_landmarks_in_moving.csv",
)


@dataclass
class Inputs:
    """The files of one `lungreg register`, read and checked before anything runs."""

    fixed: sitk.Image
    moving: sitk.Image
    moving_mask: sitk.Image | None = None
    fixed_mask: sitk.Image | None = None
    fixed_landmarks: np.ndarray | None = None  # (n, 3) mm, LPS
    landmark_names: list[str] | None = None


def _check_device(device: str) -> None:
    if device == "auto":
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise InputError(None, None, f"--device {device}: expected auto, cpu or cuda[:N]") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise InputError(None, None, f"--device {device}: CUDA is not available on this machine (use auto or cpu)")


def _read_checked(path: Path) -> sitk.Image:
    image = io.read_image(path)
    manifest.check_image(None, path, image)
    return image


def _read_mask(path: Path, image_path: Path, image: sitk.Image) -> sitk.Image:
    mask = io.read_image(path)
    manifest.check_mask(None, path, mask)
    manifest.check_mask_grid(None, path, Grid.of(mask), image_path, Grid.of(image))
    return mask


def _read_inputs(
    fixed_path: Path,
    moving_path: Path,
    moving_mask_path: Path | None,
    fixed_landmarks_path: Path | None,
    fixed_mask_path: Path | None = None,
) -> Inputs:
    """Both images, their masks (each on its image's grid) and the fixed landmarks, checked."""
    inputs = Inputs(_read_checked(fixed_path), _read_checked(moving_path))
    if moving_mask_path:
        inputs.moving_mask = _read_mask(moving_mask_path, moving_path, inputs.moving)
    if fixed_mask_path:
        inputs.fixed_mask = _read_mask(fixed_mask_path, fixed_path, inputs.fixed)
    if fixed_landmarks_path:
        inputs.fixed_landmarks = io.read_landmarks(fixed_landmarks_path)
        inputs.landmark_names = io.read_landmark_names(fixed_landmarks_path)
    return inputs


def _preprocess_settings(model_path: Path) -> PreprocessSettings:
    """The preprocessing of the workflow that trained the model (stored in model.pt)."""
    if not model_path.is_file():
        raise InputError(None, model_path, "model file not found")
    try:
        checkpoint = torch_io.load_torch(model_path)
    except io.CorruptFileError as error:
        raise InputError(None, model_path, f"not a readable lungreg model ({error.reason})") from None
    if not isinstance(checkpoint, dict) or "model_settings" not in checkpoint:
        raise InputError(None, model_path, "not a lungreg model file (no model_settings)")
    if "preprocess" not in checkpoint:
        raise InputError(None, model_path, "no preprocessing settings stored; retrain with this version of lungreg")
    try:
        return PreprocessSettings.from_config(checkpoint["preprocess"], "exhale")
    except ValueError as error:
        raise InputError(None, model_path, f"bad preprocessing settings ({error})") from None


def _check_preprocessed(images: dict[str, sitk.Image], settings: PreprocessSettings) -> None:
    """--preprocessed: both images on the model's grid shape, intensities in [0, 1]."""
    for role, image in images.items():
        shape = image.GetSize()[::-1]
        if settings.shape is not None and tuple(shape) != tuple(settings.shape):
            raise InputError(
                None,
                None,
                f"{role} image: grid {' x '.join(map(str, shape))} (z, y, x) is not the model's "
                f"{' x '.join(map(str, settings.shape))}; drop --preprocessed to preprocess it",
            )
        array = sitk.GetArrayViewFromImage(image)
        if array.min() < 0 or array.max() > 1:
            raise InputError(
                None, None, f"{role} image: intensities outside [0, 1]; drop --preprocessed to preprocess it"
            )


# ------------------------------------------------------------------------------ register


def _loaded_pair(inputs: Inputs, settings: PreprocessSettings, preprocessed: bool) -> LoadedPair:
    """The pair as the network sees it: preprocessed as the workflow did (FIXED plays the reference
    phase, whose direction and spacing define the grid), or taken as it is with --preprocessed."""
    originals = {"fixed": inputs.fixed, "moving": inputs.moving}
    if preprocessed:
        _check_preprocessed(originals, settings)
        images = {role: sitk.Cast(image, sitk.sitkFloat32) for role, image in originals.items()}
        grids = {role: Grid.of(image) for role, image in images.items()}
        moving_mask, fixed_mask = inputs.moving_mask, inputs.fixed_mask
    else:
        fixed_phase = settings.reference_phase
        moving_phase = other_phase(fixed_phase)
        grid, by_phase, masks = onto_common_grid(
            {fixed_phase: inputs.fixed, moving_phase: inputs.moving},
            {fixed_phase: inputs.fixed_mask, moving_phase: inputs.moving_mask},
            settings,
        )
        images = {"fixed": by_phase[fixed_phase], "moving": by_phase[moving_phase]}
        grids = {"fixed": grid, "moving": grid}
        moving_mask, fixed_mask = masks[moving_phase], masks[fixed_phase]
    no_landmarks = pd.DataFrame(columns=["landmark", "x", "y", "z", "in_view"])
    phases = {
        role: Phase(images[role], np.zeros(grids[role].shape, bool), grids[role], no_landmarks)
        for role in ("fixed", "moving")
    }
    for role, mask in (("moving", moving_mask), ("fixed", fixed_mask)):
        if mask is not None:
            phases[role].mask = sitk.GetArrayFromImage(mask) > 0
    return LoadedPair(Pair("moving", "moving", "fixed", "fixed"), phases["fixed"], phases["moving"])


def _write_outputs(
    out: Path, item: LoadedPair, result: RegistrationResult, inputs: Inputs, preprocessed: bool
) -> dict[str, Path]:
    """The workflow's pair files, then what only the command writes (see REGISTER_HELP)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in OUTPUT_NAMES:  # a rerun into the same folder leaves no file of another run
        (out / stale).unlink(missing_ok=True)
    points = result.moving_points(item.fixed.grid, item.moving.grid)[None]
    write_pair_files(out, item, result, warped_masks([item.moving], points)[0].cpu().numpy())
    if inputs.moving_mask is None:
        (out / "warped_mask.nii.gz").unlink(missing_ok=True)
    fixed_grid = item.fixed.grid
    if not preprocessed:
        moving = inputs.moving
        default = float(np.min(sitk.GetArrayViewFromImage(moving)))
        warped_original = resample(
            sitk.Cast(moving, sitk.sitkFloat32),
            Grid.of(inputs.fixed),
            "linear",
            default,
            displacement_transform(result.displacement, fixed_grid),
        )
        io.write_image(warped_original, out / "warped_original.nii.gz")
    if inputs.fixed_landmarks is not None:
        mapped = map_points(result.displacement, fixed_grid, inputs.fixed_landmarks)
        table = pd.DataFrame(
            {
                "landmark": inputs.landmark_names,
                "x": mapped[:, 0],
                "y": mapped[:, 1],
                "z": mapped[:, 2],
                "in_grid": fixed_grid.contains(inputs.fixed_landmarks),
            }
        )
        io.write_text(table.to_csv(index=False, lineterminator="\n"), out / "fixed_landmarks_in_moving.csv")
    return {name: out / name for name in OUTPUT_NAMES if (out / name).is_file()}


def refine_option(option: str | None) -> RefineSettings | None:
    """`lungreg register --refine`: None (single pass), "default" (the workflow's default stages)
    or the `refine:` section of a YAML file (e.g. a study's config file; its workflow keys aside)."""
    if option is None:
        return None
    if option == "default":
        return RefineSettings()
    try:
        section = (yaml.safe_load(Path(option).read_text()) or {}).get("refine", {})
        return RefineSettings.from_config({k: v for k, v in section.items() if k not in REFINE_WORKFLOW_KEYS})
    except (OSError, yaml.YAMLError, ValueError, TypeError, AttributeError) as error:
        raise InputError(None, option, f"--refine: not a readable refine section ({error})") from None


def register_pair(
    model_path: Path,
    fixed_path: Path,
    moving_path: Path,
    out: Path,
    moving_mask_path: Path | None = None,
    device: str = "auto",
    preprocessed: bool = False,
    fixed_landmarks_path: Path | None = None,
    fixed_mask_path: Path | None = None,
    refine: RefineSettings | None = None,
) -> dict[str, Path]:
    """Preprocess both images as the model's workflow did, register, write the outputs.

    With `refine`, the network's outputs are refined for this pair (lungreg.network.refine); its
    similarity is weighted by the fixed lung mask, so `fixed_mask_path` is then required.
    Every input is read and checked before the network runs; problems raise io.InputError.
    Returns {file name: path} of what was written.
    """
    _check_device(device)
    if refine is not None and refine.steps and not fixed_mask_path:
        raise InputError(None, None, "--refine needs --fixed-mask (its similarity is weighted by the fixed lung)")
    inputs = _read_inputs(fixed_path, moving_path, moving_mask_path, fixed_landmarks_path, fixed_mask_path)
    settings = _preprocess_settings(model_path)
    item = _loaded_pair(inputs, settings, preprocessed)
    registrar = NetworkRegistrar("proposed", model_path, device=device, batch_size=1, refine=refine)
    result = registrar.register([item])[0]
    return _write_outputs(out, item, result, inputs, preprocessed)
