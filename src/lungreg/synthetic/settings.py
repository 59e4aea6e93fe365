"""What defines the synthetic cohort, and its subject table.

Cheap by design (nothing is rendered): the workflow reads the subject ids and labels from here
when it plans the jobs (rules/common.smk).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import numpy as np
import pandas as pd

from ..config import settings_from
from ..geometry import Grid, covering_shape


@dataclass(frozen=True)
class Intensities:
    """Tissue intensities (arbitrary MRI units, before bias field and noise).

    Chosen so that the paper's clip to [0, 1300] matters: fat is partly above it.
    """

    lung: float = 90.0
    lung_gradient: float = 40.0  # dependent (posterior) lung brighter by up to this
    vessel: float = 430.0
    airway_wall: float = 380.0
    airway_lumen: float = 10.0
    fat: float = 1380.0
    muscle: float = 760.0
    rib: float = 330.0
    mediastinum: float = 520.0
    heart: float = 610.0
    aorta: float = 240.0
    liver: float = 470.0
    abdomen: float = 650.0
    bone: float = 860.0
    disc: float = 470.0
    csf: float = 260.0


@dataclass(frozen=True)
class SyntheticCohortSettings:
    """Everything that defines the synthetic cohort; equal settings give equal files."""

    n_subjects: int = 41
    n_ild: int = 29
    shape: tuple[int, int, int] = (36, 72, 72)  # z, y, x voxels
    field_of_view_mm: tuple[float, float, float] = (300.0, 400.0, 400.0)  # z, y, x
    effect_size: float = 1.0
    seed: int = 2018
    breathing_depth_mm: float = 35.0  # median diaphragm excursion
    breathing_depth_variation: float = 0.25  # log-normal sigma, same in both groups
    noise_std: float = 15.0  # Rician noise sigma
    bias_field_strength: float = 0.2  # log-amplitude of the smooth multiplicative bias
    anatomy_variation: float = 0.06  # relative sd of body / organ sizes
    pose_rotation_deg: float = 3.0
    pose_translation_mm: float = 8.0
    repositioning_rotation_deg: float = 2.0
    repositioning_translation_mm: float = 4.0
    intensities: Intensities = field(default_factory=Intensities)

    def __post_init__(self) -> None:
        for f in fields(self):  # config values (YAML lists, ints for floats) to the field types
            if f.name == "intensities":
                object.__setattr__(self, f.name, _intensities(self.intensities))
                continue
            try:
                object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name)))
            except (TypeError, ValueError) as error:
                raise ValueError(f"synthetic.{f.name}: {error}") from None
        problems = []
        if not 1 <= self.n_subjects <= 9999:
            problems.append(f"n_subjects must be in 1..9999, got {self.n_subjects}")
        if not 0 <= self.n_ild <= self.n_subjects:
            problems.append(f"n_ild must be in 0..n_subjects ({self.n_subjects}), got {self.n_ild}")
        if len(self.shape) != 3 or min(self.shape) < 8:
            problems.append(f"shape must be three sizes (z, y, x) of at least 8, got {list(self.shape)}")
        if len(self.field_of_view_mm) != 3 or min(self.field_of_view_mm) < 200:
            problems.append(f"field_of_view_mm must be three lengths >= 200 mm, got {list(self.field_of_view_mm)}")
        for name in (
            "effect_size",
            "noise_std",
            "bias_field_strength",
            "anatomy_variation",
            "breathing_depth_variation",
            "pose_rotation_deg",
            "pose_translation_mm",
            "repositioning_rotation_deg",
            "repositioning_translation_mm",
        ):
            if not np.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                problems.append(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not 5 <= self.breathing_depth_mm <= 60:
            problems.append(f"breathing_depth_mm must be in 5..60, got {self.breathing_depth_mm}")
        if problems:
            raise ValueError("synthetic cohort settings: " + "; ".join(problems))

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> "SyntheticCohortSettings":
        """Settings from the config's `synthetic:` section; unknown keys are an error."""
        return settings_from(cls, section, "synthetic")

    @property
    def grid(self) -> Grid:
        """The scanner grid shared by every image: identity direction, centred at the origin."""
        size = np.asarray(self.shape[::-1], dtype=int)
        spacing = np.asarray(self.field_of_view_mm[::-1], dtype=float) / size
        origin = -spacing * (size - 1) / 2
        return Grid(
            tuple(int(s) for s in size),
            tuple(float(s) for s in spacing),
            tuple(float(o) for o in origin),
            (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        )

    def covering_shape(self, factor: float) -> tuple[int, int, int]:
        """The preprocessing grid shape (z, y, x) that holds the rendered field of view at `factor`
        (what `preprocess.grid_shape: auto` is for this cohort: 24 x 48 x 48 for the default)."""
        return covering_shape(self.grid.corners(), self.grid, factor)

    def subject_ids(self) -> list[str]:
        width = max(3, len(str(self.n_subjects)))
        return [f"sub-{i:0{width}d}" for i in range(1, self.n_subjects + 1)]


def _coerce(name: str, value: Any) -> Any:
    """A config value of a scalar or vector field as its type (YAML lists, ints for floats)."""
    if name in ("n_subjects", "n_ild", "seed"):
        if isinstance(value, bool) or int(value) != value:
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value)
    if name == "shape":
        return tuple(int(v) for v in _three(value))
    if name == "field_of_view_mm":
        return tuple(float(v) for v in _three(value))
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def _intensities(value: Any) -> Intensities:
    if isinstance(value, Intensities):
        return value
    if not isinstance(value, Mapping):
        raise ValueError("synthetic.intensities: expected a mapping of tissue name to intensity")
    return settings_from(Intensities, {k: float(v) for k, v in value.items()}, "synthetic.intensities")


def _three(value: Any) -> list:
    if isinstance(value, (str, bytes)) or len(value) != 3:
        raise ValueError(f"expected three values (z, y, x), got {value!r}")
    return list(value)


def subject_table(settings: SyntheticCohortSettings) -> pd.DataFrame:
    """Subject ids and labels; cheap (nothing rendered), so the workflow can plan from it.

    Which subjects are ILD is a seeded random draw, independent of everything else.
    """
    rng = np.random.default_rng(np.random.SeedSequence(settings.seed, spawn_key=(0,)))
    ild = np.zeros(settings.n_subjects, dtype=bool)
    ild[rng.choice(settings.n_subjects, size=settings.n_ild, replace=False)] = True
    return pd.DataFrame({"subject": settings.subject_ids(), "label": np.where(ild, "ILD", "healthy")})
