"""Where torch runs: the device (`auto`: CUDA when present), a job's threads, and a deterministic mode."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import torch

from ..workflow import limit_threads

log = logging.getLogger(__name__)


def choose_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def set_threads(threads: int) -> None:
    """Use exactly the threads Snakemake granted (torch would take every core): torch's intra-op and
    inter-op pools, and everything `workflow.limit_threads` sets (SimpleITK, the thread variables)."""
    threads = max(1, int(threads))
    limit_threads(threads)
    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != threads:
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError as error:  # only possible before any inter-op work, and once
            log.warning("torch inter-op threads stay %d: %s", torch.get_num_interop_threads(), error)
    log.info("torch threads: %d, inter-op %d", torch.get_num_threads(), torch.get_num_interop_threads())


@contextlib.contextmanager
def deterministic(warn_only: bool = False) -> Iterator[None]:
    """Deterministic kernels only, inside the block: `torch.use_deterministic_algorithms`, cuDNN's
    deterministic algorithms and no autotuning (cudnn.benchmark off). An op without a
    deterministic CUDA kernel then raises RuntimeError naming it (with `warn_only`: a UserWarning,
    and it runs as usual). cuBLAS needs CUBLAS_WORKSPACE_CONFIG set before its first use in the
    process; it is set here if absent (too late when cuBLAS already ran). The previous settings
    come back on exit."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
