"""Command line: register one pair with a trained model, outside the workflow.

    lungreg register --model results/model/proposed/model.pt fixed.nii.gz moving.nii.gz --out DIR
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REGISTER_HELP = """\
Register MOVING onto FIXED with a trained lungreg network and write, into --out:

  displacement.nii.gz  the whole transform (affine and deformable) as an ITK displacement field:
                       3-vector float32 NIfTI in mm, on the preprocessed fixed grid; at each fixed
                       point x the offset u(x) to the corresponding moving point, T(x) = x + u(x).
                       SimpleITK: sitk.DisplacementFieldTransform(
                                      sitk.ReadImage("displacement.nii.gz", sitk.sitkVectorFloat64))
                       ANTsPy:    ants.apply_transforms(fixed, moving, ["displacement.nii.gz"])
  affine.tfm           the linear part alone as an ITK AffineTransform (fixed mm -> moving mm);
                       informative: the displacement field already contains it, apply one or the other
  warped.nii.gz        the moving image resampled through the field onto the preprocessed fixed grid,
                       intensities clipped and scaled to [0, 1] as the network saw them
  warped_original.nii.gz  the original moving image (original intensities) resampled through the
                       field onto the original fixed image's grid (linear interpolation)
  warped_mask.nii.gz   with --moving-mask: the moving mask carried onto the preprocessed fixed grid

Images: anything SimpleITK reads. They are preprocessed exactly as in the workflow that trained
the model (clip range, resampling factor, grid shape stored in the model file), both onto one grid
centred on the union of their fields of view. Physical space (origin, spacing, direction) is kept
throughout: the outputs overlay the inputs in any viewer.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lungreg", description="Lung registration with a 3D CNN (lungreg).")
    commands = parser.add_subparsers(dest="command", required=True)
    register = commands.add_parser("register", help="register one pair with a trained model",
                                   description=REGISTER_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    register.add_argument("fixed", type=Path, help="fixed (reference) image")
    register.add_argument("moving", type=Path, help="moving (source) image")
    register.add_argument("--model", type=Path, required=True, help="model.pt written by the workflow's train rule")
    register.add_argument("--out", type=Path, required=True, help="output folder (created)")
    register.add_argument("--moving-mask", type=Path, help="optional moving lung mask, carried along")
    register.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    return parser


def register_pair(model_path: Path, fixed_path: Path, moving_path: Path, out: Path,
                  moving_mask_path: Path | None = None, device: str = "auto") -> dict[str, Path]:
    """Preprocess both images as the model's workflow did, register, write the outputs."""
    from . import io
    from .geometry import Grid, resample
    from .preprocess import PreprocessSettings, clip_and_scale, resample_image, resample_mask, subject_grid
    from .registration import NetworkRegistrar, write_pair_files, LoadedPair
    from .evaluate import Phase
    from .study import Pair
    from .transform import displacement_transform

    registrar = NetworkRegistrar("proposed", model_path, device=device, batch_size=1)
    checkpoint = io.load_torch(model_path)
    if "preprocess" not in checkpoint:
        raise SystemExit(f"{model_path}: no preprocessing settings stored; retrain with this version of lungreg")
    settings = PreprocessSettings.from_config(checkpoint["preprocess"], "exhale")
    originals = {"fixed": io.read_image(fixed_path), "moving": io.read_image(moving_path)}
    grid = subject_grid({"exhale": Grid.of(originals["fixed"]), "inhale": Grid.of(originals["moving"])}, settings)
    low, high = settings.intensity_range
    phases = {}
    for role, image in originals.items():
        prepared = resample_image(clip_and_scale(image, low, high), grid)
        phases[role] = Phase(prepared, np.zeros(grid.shape, bool), grid, _no_landmarks())
    if moving_mask_path:
        mask = resample_mask(io.read_image(moving_mask_path), grid, settings.mask_interpolation)
        phases["moving"].mask = sitk.GetArrayFromImage(mask) > 0
    item = LoadedPair(Pair("moving", "moving", "fixed", "fixed"), phases["fixed"], phases["moving"])
    result = registrar.register([item])[0]
    write_pair_files(out, item, result)
    if not moving_mask_path:
        (out / "warped_mask.nii.gz").unlink(missing_ok=True)
    warped_original = resample(sitk.Cast(originals["moving"], sitk.sitkFloat32), Grid.of(originals["fixed"]), "linear",
                               float(np.min(sitk.GetArrayViewFromImage(originals["moving"]))),
                               displacement_transform(result.displacement, grid))
    io.write_image(warped_original, out / "warped_original.nii.gz")
    return {name: out / name for name in ("displacement.nii.gz", "affine.tfm", "warped.nii.gz", "warped_original.nii.gz")}


def _no_landmarks():
    import pandas as pd

    return pd.DataFrame(columns=["landmark", "x", "y", "z", "in_view"])


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if arguments.command == "register":
        written = register_pair(arguments.model, arguments.fixed, arguments.moving, arguments.out,
                                arguments.moving_mask, arguments.device)
        for path in written.values():
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
