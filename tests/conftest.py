"""Shared fixtures: paths to the real public test data, skipped cleanly when absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LUNGREG_SHARED_DATA", REPO.parent / "shared" / "data"))


def _shared(name: str) -> Path:
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"real test data {folder} is absent")
    return folder


@pytest.fixture
def elastix_lung_pair() -> Path:
    """Real chest CT of one patient at two time points, 100 landmarks (see ../shared/data)."""
    return _shared("elastix_lung_pair")


@pytest.fixture
def cip_thorax_ct64() -> Path:
    """Real thorax CT with a copy whose header is rotated 20 degrees about z and shifted."""
    return _shared("cip_thorax_ct64")


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory) -> Path:
    """The whole workflow run once on the tiny synthetic cohort (shared by the workflow tests)."""
    from workflow_runner import copy_workflow, snakemake

    workdir = copy_workflow(tmp_path_factory.mktemp("tiny_study"))
    snakemake(workdir)
    return workdir
