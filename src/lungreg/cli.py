"""Command line: register one pair with a trained model, outside the workflow.

    lungreg register --model results/model/proposed/model.pt fixed.nii.gz moving.nii.gz --out DIR

The arguments, the help and the one-line errors; the work is `registration.pair.register_pair`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

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

Refinement (--refine, with --fixed-mask): the network's outputs are then optimised for this pair
(lungreg.network.refine: the masked similarity, |Phi - 1| and a diffusion, then a bending,
energy, coarse to fine), as the workflow's <variant>_refined rows; the outputs keep the same
construction (positive spatial gradients, det A > 0). `--refine` alone uses the workflow's
default stages, `--refine config.yaml` the `refine:` section of that file. It adds about 1.3 s
per pair on 1 or 2 CPU threads at the default study's grid (README, "Measured").

Bad input (missing or unreadable file, not a 3-D scalar image, NaN voxels, a mask not on its
image's grid, a model file without preprocessing settings) stops with one line and exit code 1.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lungreg", description="Lung registration with a 3D CNN (lungreg).")
    commands = parser.add_subparsers(dest="command", required=True)
    register = commands.add_parser(
        "register",
        help="register one pair with a trained model",
        description=REGISTER_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    register.add_argument("fixed", type=Path, help="fixed (reference) image: anything SimpleITK reads")
    register.add_argument("moving", type=Path, help="moving (source) image")
    register.add_argument("--model", type=Path, required=True, help="model.pt written by the workflow's train rule")
    register.add_argument("--out", type=Path, required=True, help="output folder (created)")
    register.add_argument("--moving-mask", type=Path, help="moving lung mask (0/1, on MOVING's grid), carried along")
    register.add_argument(
        "--fixed-landmarks", type=Path, help="CSV with x, y, z columns (mm, LPS) or elastix points: mapped into MOVING"
    )
    register.add_argument(
        "--preprocessed",
        action="store_true",
        help="the images are already preprocessed (results/preprocessed/*/*_image.nii.gz)",
    )
    register.add_argument("--fixed-mask", type=Path, help="fixed lung mask (0/1, on FIXED's grid); needed by --refine")
    register.add_argument(
        "--refine",
        nargs="?",
        const="default",
        metavar="SETTINGS.yaml",
        help="refine the network's outputs for this pair (instance optimisation, lungreg.network.refine): "
        "the workflow's default refinement, or the `refine:` section of a YAML file (e.g. a config file)",
    )
    register.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    # Imported only to run a command (deferred on purpose): `lungreg --help` and argument errors
    # answer at once instead of after loading torch and the library (about 4 s of CPU here).
    from .io import CorruptFileError, InputError
    from .registration.pair import refine_option, register_pair

    if arguments.command == "register":
        try:
            written = register_pair(
                arguments.model,
                arguments.fixed,
                arguments.moving,
                arguments.out,
                arguments.moving_mask,
                arguments.device,
                arguments.preprocessed,
                arguments.fixed_landmarks,
                arguments.fixed_mask,
                refine_option(arguments.refine),
            )
        except (InputError, CorruptFileError) as error:
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
