"""Torch files (checkpoints, models, the classifier's inputs): written atomically, read with a recovery hint.

Apart from `io` so that the jobs and the planning that never touch torch (cohort, preprocessing,
rules/common.smk) do not import it.
"""

from __future__ import annotations

import os
import pickle
import zipfile

import torch

from .io import CorruptFileError, atomic_path


def save_torch(obj: object, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | os.PathLike, map_location: str = "cpu") -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        raise CorruptFileError(path, f"not a readable PyTorch checkpoint: {error}") from None
