"""Where torch runs: the device (`auto`: CUDA when present) and the CPU threads of a job."""

from __future__ import annotations

import torch


def choose_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def set_threads(threads: int) -> None:
    """Use exactly the threads Snakemake granted (torch would take every core)."""
    torch.set_num_threads(max(1, int(threads)))
