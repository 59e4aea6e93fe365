"""Torch files (checkpoints, models, the classifier's inputs): written atomically, read with a recovery hint.

Apart from `io` so that the jobs and the planning that never touch torch (cohort, preprocessing,
rules/common.smk) do not import it.
"""

from __future__ import annotations

import os
import zipfile

import torch

from .io import CorruptFileError, atomic_path


def save_torch(obj: object, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | os.PathLike, map_location: str = "cpu") -> dict:
    # save_torch always writes torch's zip format. Anything else would go to torch's legacy
    # unpickler, which on arbitrary bytes raises whatever the bytes happen to spell
    # (MemoryError, OverflowError, KeyError, ...), so it is refused before unpickling.
    if not zipfile.is_zipfile(path):
        raise CorruptFileError(path, "not a PyTorch checkpoint (no zip archive)")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # a damaged archive fails in the unpickler just as arbitrarily
        raise CorruptFileError(path, f"not a readable PyTorch checkpoint: {type(error).__name__}: {error}") from None
