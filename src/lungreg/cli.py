"""Command line: register one pair with a trained model, outside the workflow.

    lungreg register --model results/model/proposed/model.pt fixed.nii.gz moving.nii.gz --out DIR

The outputs are the workflow's own pair files (`registration.chunk.write_pair_files`), so that what
works on results/registration/.../<pair>/ works on DIR (tests/test_interop.py, tests/test_cli.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

REGISTER_HELP = """\
Register MOVING onto FIXED with a trained lungreg network. Both images are first preprocessed
exactly as in the workflow that trained the model (clip range, resampling factor and grid shape
are stored in model.pt): clipped and scaled to [0, 1], resampled (cubic B-spline) onto one grid
with FIXED's direction, centred on the union of both fields of view. FIXED plays the workflow's
fixed phase (exhale by default). With --preprocessed the images are taken as they are (files of
results/preprocessed/, already on the model's grid shape).

Outputs, in --out (the same files as the workflow's results/registration/<method>/<protocol>/
chunk-<k>/<pair>/):

  displacement.nii.gz  the whole transform, affine and deformable: an ITK displacement field, a
                       float32 3-vector NIfTI on the preprocessed fixed grid; components in mm along
                       ITK/LPS world axes (as ITK and ANTs write warps: not RAS). At each fixed
                       point x, u(x) is the offset to the corresponding moving point: T(x) = x + u(x)
                       maps fixed to moving (the resampling, "pull" direction). Outside its grid the
                       field is zero. Apply it with
                         SimpleITK: t = sitk.DisplacementFieldTransform(sitk.Cast(
                                        sitk.ReadImage("displacement.nii.gz"), sitk.sitkVectorFloat64))
                                    warped = sitk.Resample(moving, fixed, t, sitk.sitkLinear)
                         ANTsPy:    warped = ants.apply_transforms(fixed=fixed, moving=moving,
                                        transformlist=["displacement.nii.gz"])
                         ANTs:      antsApplyTransforms -d 3 -i moving -r fixed -t displacement.nii.gz -o out
                       Points go the other way: a fixed landmark x lies at x + u(x) in the moving image.
  affine.tfm           the network's linear part alone, an ITK AffineTransform (text), fixed mm ->
                       moving mm; sitk.ReadTransform / ants.read_transform / antsApplyTransforms -t.
                       For information: displacement.nii.gz already contains it (apply one or the
                       other, never both). Absent for a model trained without the affine part.
  warped.nii.gz        the network's own warp of the preprocessed moving image onto the preprocessed
                       fixed grid, intensities in [0, 1] as the network saw them.
  warped_original.nii.gz  the original moving image, original intensities, resampled through the
                       field onto the original fixed image's grid (linear; identity outside the
                       field's grid). Not written with --preprocessed.
  warped_mask.nii.gz   with --moving-mask: the moving mask carried onto the preprocessed fixed grid
                       (linear interpolation, then > 0.5; uint8 0/1).
  fixed_landmarks_in_moving.csv  with --fixed-landmarks: landmark, x, y, z (mm, LPS) of each fixed
                       landmark carried into the moving image by T (trilinear in the field, as the
                       workflow's landmark errors), and in_grid (False: outside the field's grid,
                       where the field's border value was used).

Bad input (missing or unreadable file, not a 3-D scalar image, NaN voxels, a mask not on its
image's grid, a model file without preprocessing settings) stops with one line and exit code 1.
"""

OUTPUT_NAMES = ("displacement.nii.gz", "affine.tfm", "warped.nii.gz", "warped_original.nii.gz", "warped_mask.nii.gz",
                "fixed_landmarks_in_moving.csv")


class CommandError(Exception):
    """A bad argument or input file, reported in one line."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lungreg", description="Lung registration with a 3D CNN (lungreg).")
    commands = parser.add_subparsers(dest="command", required=True)
    register = commands.add_parser("register", help="register one pair with a trained model",
                                   description=REGISTER_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    register.add_argument("fixed", type=Path, help="fixed (reference) image: anything SimpleITK reads")
    register.add_argument("moving", type=Path, help="moving (source) image")
    register.add_argument("--model", type=Path, required=True, help="model.pt written by the workflow's train rule")
    register.add_argument("--out", type=Path, required=True, help="output folder (created)")
    register.add_argument("--moving-mask", type=Path, help="moving lung mask (0/1, on MOVING's grid), carried along")
    register.add_argument("--fixed-landmarks", type=Path,
                          help="CSV with x, y, z columns (mm, LPS) or elastix points: mapped into MOVING")
    register.add_argument("--preprocessed", action="store_true",
                          help="the images are already preprocessed (results/preprocessed/*/*_image.nii.gz)")
    register.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    return parser


# ----------------------------------------------------------------------------- inputs


def _load_model_file(path: Path) -> dict:
    from . import io, torch_io

    if not path.is_file():
        raise CommandError(f"{path}: model file not found")
    try:
        checkpoint = torch_io.load_torch(path)
    except io.CorruptFileError as error:
        raise CommandError(f"{path}: not a readable lungreg model ({error.reason})") from None
    if not isinstance(checkpoint, dict) or "model_settings" not in checkpoint:
        raise CommandError(f"{path}: not a lungreg model file (no model_settings)")
    if "preprocess" not in checkpoint:
        raise CommandError(f"{path}: no preprocessing settings stored; retrain with this version of lungreg")
    return checkpoint


def _read_checked(path: Path):
    from . import io, manifest

    image = io.read_image(path)
    manifest.check_image(None, path, image)
    return image


def _check_device(device: str) -> None:
    import torch

    if device == "auto":
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise CommandError(f"--device {device}: expected auto, cpu or cuda[:N]") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: CUDA is not available on this machine (use auto or cpu)")


def _preprocessed(images: dict, settings) -> None:
    """--preprocessed: both images on the model's grid shape, intensities in [0, 1]."""
    for role, image in images.items():
        shape = image.GetSize()[::-1]
        if tuple(shape) != tuple(settings.grid_shape):
            raise CommandError(f"{role} image: grid {' x '.join(map(str, shape))} (z, y, x) is not the model's "
                               f"{' x '.join(map(str, settings.grid_shape))}; drop --preprocessed to preprocess it")
        import SimpleITK as sitk

        array = sitk.GetArrayViewFromImage(image)
        if array.min() < 0 or array.max() > 1:
            raise CommandError(f"{role} image: intensities outside [0, 1]; drop --preprocessed to preprocess it")


# ------------------------------------------------------------------------------ register


def register_pair(model_path: Path, fixed_path: Path, moving_path: Path, out: Path,
                  moving_mask_path: Path | None = None, device: str = "auto", preprocessed: bool = False,
                  fixed_landmarks_path: Path | None = None) -> dict[str, Path]:
    """Preprocess both images as the model's workflow did, register, write the outputs.

    Every input is read and checked before the network runs; problems raise CommandError (or
    io.InputError). Returns {file name: path} of what was written.
    """
    import SimpleITK as sitk

    from . import io, manifest
    from .geometry import Grid, resample
    from .metrics import map_points
    from .preprocess import PreprocessSettings, clip_and_scale, resample_image, resample_mask, subject_grid

    _check_device(device)
    originals = {"fixed": _read_checked(fixed_path), "moving": _read_checked(moving_path)}
    mask = None
    if moving_mask_path:
        mask = io.read_image(moving_mask_path)
        manifest.check_mask(None, moving_mask_path, mask)
        manifest.check_mask_grid(None, moving_mask_path, Grid.of(mask), moving_path, Grid.of(originals["moving"]))
    landmarks = names = None
    if fixed_landmarks_path:
        landmarks = io.read_landmarks(fixed_landmarks_path)
        names = io.read_landmark_names(fixed_landmarks_path)
    checkpoint = _load_model_file(model_path)
    try:
        settings = PreprocessSettings.from_config(checkpoint["preprocess"], "exhale")
    except ValueError as error:
        raise CommandError(f"{model_path}: bad preprocessing settings ({error})") from None

    if preprocessed:
        _preprocessed(originals, settings)
        prepared = {role: sitk.Cast(image, sitk.sitkFloat32) for role, image in originals.items()}
        grids = {role: Grid.of(image) for role, image in prepared.items()}
        masks = {"moving": mask}
    else:
        # the fixed image is the workflow's reference phase (its direction and spacing define the grid)
        grid = subject_grid({"exhale": Grid.of(originals["fixed"]), "inhale": Grid.of(originals["moving"])}, settings)
        low, high = settings.intensity_range
        prepared = {role: resample_image(clip_and_scale(image, low, high), grid) for role, image in originals.items()}
        grids = {"fixed": grid, "moving": grid}
        masks = {"moving": None if mask is None else resample_mask(mask, grid, settings.mask_interpolation)}

    from .evaluate import Phase  # torch and scikit-learn: imported after the checks
    from .network.transform import displacement_transform
    from .registration.base import LoadedPair
    from .registration.chunk import write_pair_files
    from .registration.network import NetworkRegistrar
    from .study import Pair

    no_landmarks = _no_landmarks()
    phases = {role: Phase(prepared[role], np.zeros(grids[role].shape, bool), grids[role], no_landmarks)
              for role in ("fixed", "moving")}
    if masks["moving"] is not None:
        phases["moving"].mask = sitk.GetArrayFromImage(masks["moving"]) > 0

    registrar = NetworkRegistrar("proposed", model_path, device=device, batch_size=1)
    item = LoadedPair(Pair("moving", "moving", "fixed", "fixed"), phases["fixed"], phases["moving"])
    result = registrar.register([item])[0]
    out.mkdir(parents=True, exist_ok=True)
    for stale in OUTPUT_NAMES:  # a rerun into the same folder leaves no file of another run
        (out / stale).unlink(missing_ok=True)
    write_pair_files(out, item, result)
    if mask is None:
        (out / "warped_mask.nii.gz").unlink(missing_ok=True)
    if not preprocessed:
        moving = originals["moving"]
        default = float(np.min(sitk.GetArrayViewFromImage(moving)))
        warped_original = resample(sitk.Cast(moving, sitk.sitkFloat32), Grid.of(originals["fixed"]), "linear", default,
                                   displacement_transform(result.displacement, grids["fixed"]))
        io.write_image(warped_original, out / "warped_original.nii.gz")
    if landmarks is not None:
        import pandas as pd

        mapped = map_points(result.displacement, grids["fixed"], landmarks)
        table = pd.DataFrame({"landmark": names, "x": mapped[:, 0], "y": mapped[:, 1], "z": mapped[:, 2],
                              "in_grid": grids["fixed"].contains(landmarks)})
        io.write_text(table.to_csv(index=False, lineterminator="\n"), out / "fixed_landmarks_in_moving.csv")
    return {name: out / name for name in OUTPUT_NAMES if (out / name).is_file()}


def _no_landmarks():
    import pandas as pd

    return pd.DataFrame(columns=["landmark", "x", "y", "z", "in_view"])


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from .io import CorruptFileError, InputError

    if arguments.command == "register":
        try:
            written = register_pair(arguments.model, arguments.fixed, arguments.moving, arguments.out,
                                    arguments.moving_mask, arguments.device, arguments.preprocessed,
                                    arguments.fixed_landmarks)
        except (CommandError, InputError, CorruptFileError) as error:
            print(f"lungreg register: error: {error}", file=sys.stderr)
            return 1
        except OSError as error:  # e.g. --out not writable
            print(f"lungreg register: error: {error}", file=sys.stderr)
            return 1
        for path in written.values():
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
