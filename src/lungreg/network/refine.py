"""Per-pair refinement (instance optimisation) of the network's outputs.

The network predicts, in one forward pass, logits of the spatial gradients and the raw output of
its linear branch (`model.NetworkOutputs`). Refinement optimises corrections of exactly these for
each pair, starting from the prediction, so the guarantees stay those of the construction:
every gradient is logistic_growth(logits) > 0 and the affine is a matrix exponential (det > 0).

Coarse to fine, in `stages`: a stage optimises a logit correction on a control grid of every
`control_stride`-th voxel (trilinearly upsampled; as in the network's own coarse variant, the
activation comes after the upsampling, so any correction keeps the gradients positive) with the
similarity evaluated at the centres of `loss_level`^3 voxel blocks (2: eight times fewer points,
against a 2x average-pooled fixed image and a 3-voxel box-blurred moving image). Corrections
add up over the stages. The objective per pair is

    similarity (lung-mask weighted) + beta ||Phi - 1||_1 + diffusion * D(u) + bending * B(u)

with D the diffusion and B the (pure second-derivative) bending energy of the displacement in
physical units (`losses.diffusion`, `losses.bending`). The default: a strong diffusion energy on
the coarse stage, then bending on the fine one (bending on both, config/refine_bending.yaml,
smooths away more of the motion's regional curvature that the ILD classifier reads). Each
stage's Adam rate ramps up and then decays along a cosine (`schedule`): with a constant rate a
stage ends at Adam's step size, which ignores how near the start already was, so the network's
prediction bought nothing at the default budget (bench/README.md, "the network earns its place").
Started from the identity (`IdentityPredictor`, the rows `identity_refined`) the same refinement
is pure instance optimisation: the tables' measure of what the network's prediction adds.

The result, per pair: of the network's prediction and the ends of the stages, the state with the
lowest full-resolution objective (with the finest stage's weights) among those whose finite-
difference Jacobian (the one the tables compute) has no determinant <= 0 inside the fixed lung.
So a refined pair never has a higher objective than the network's prediction, and refinement
never introduces folding at voxel resolution. The objective is summed over the pairs of a batch,
so each pair's optimisation is independent of the batch it is in (Adam acts per parameter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..config import settings_from
from . import losses, transform
from .model import (
    IdentityPredictor,
    ModelSettings,
    NetworkOutputs,
    Predictor,
    RegistrationOutput,
    affine_from_output,
    logistic_growth,
)


@dataclass(frozen=True)
class RefineStage:
    """One stage of the refinement (an item of config ``refine: stages:``)."""

    steps: int  # Adam steps (a stage may end earlier, see RefineSettings.tolerance)
    control_stride: int = 1  # the logit correction lives on every n-th voxel (trilinear in between)
    loss_level: int = 1  # similarity at the centres of n^3 voxel blocks (1: every voxel)
    learning_rate: float = 0.05  # Adam, on the logits
    diffusion: float = 0.0  # weight of the diffusion energy in this stage
    bending: float = 0.0  # weight of the bending energy in this stage

    def __post_init__(self):
        if self.steps < 0 or self.control_stride < 1 or self.loss_level < 1:
            raise ValueError(f"refine stage {self}: steps >= 0, control_stride >= 1 and loss_level >= 1 expected")
        if self.control_stride < self.loss_level:
            # Between the loss points a finer correction is unconstrained by the data (measured:
            # voxel-scale noise that folds at voxel resolution).
            raise ValueError(f"refine stage {self}: control_stride must be >= loss_level")


# The workflow's default (config/schemas/config.schema.yaml, tests/test_config.py keeps them equal):
# a smooth correction on a coarse grid against pooled images, then a finer one at full resolution.
DEFAULT_STAGES = (
    RefineStage(steps=10, control_stride=4, loss_level=2, learning_rate=0.1, diffusion=0.3),
    RefineStage(steps=20, control_stride=2, loss_level=1, learning_rate=0.05, bending=0.9),
)


SCHEDULES = ("constant", "cosine")


def learning_rate_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """The factor of a stage's learning rate at `step` (0-based) of `steps`: a linear warm-up
    (Adam's first steps overshoot), then constant or a cosine decay to 0 at the last step."""
    ramp = min(1.0, (step + 1) / warmup)
    if schedule == "constant" or steps <= 1:
        return ramp
    return ramp * 0.5 * (1.0 + math.cos(math.pi * step / (steps - 1)))


@dataclass(frozen=True)
class RefineSettings:
    """The refinement (config ``refine:``); no stages (or 0 steps) is the paper's single pass."""

    stages: tuple[RefineStage, ...] = DEFAULT_STAGES
    affine_learning_rate: float = 0.002  # Adam, on the raw affine output (0: keep the network's)
    beta: float = 1e-3  # weight of ||Phi - 1||_1 (mean over voxels)
    similarity: str = "ncc"  # lungreg.network.losses.SIMILARITIES (local NCC: landmarks 2.8 mm vs MSE 3.4)
    mask_margin_voxels: int = 2  # the similarity weight: the fixed lung mask dilated by this
    warmup: int = 5  # steps of a linear learning-rate ramp at the start of each stage
    # then "constant", or "cosine": the rate decays to 0 at the stage's last step, so a stage ends
    # settled rather than at Adam's step size (which ignores how near the start already was)
    schedule: str = "cosine"
    tolerance: float = 1e-4  # a stage stops when its best loss improved by less than this (relative) ...
    patience: int = 8  # ... for this many steps

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple(self.stages))
        if self.schedule not in SCHEDULES:
            raise ValueError(f"refine: unknown schedule {self.schedule!r}; choose from {list(SCHEDULES)}")
        if self.similarity not in losses.SIMILARITIES:
            known = sorted(losses.SIMILARITIES)
            raise ValueError(f"refine: unknown similarity {self.similarity!r}; choose from {known}")

    @property
    def steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    def with_steps(self, budget: Sequence[int]) -> "RefineSettings":
        """The same refinement with `budget[k]` steps in stage k (a budget of the curve, or the
        distillation targets')."""
        if len(budget) != len(self.stages):
            raise ValueError(f"refine budget {list(budget)}: one step count per stage ({len(self.stages)} stages)")
        return replace(self, stages=tuple(replace(stage, steps=int(n)) for stage, n in zip(self.stages, budget)))

    @classmethod
    def from_config(cls, section: Mapping | None) -> "RefineSettings":
        section = dict(section or {})
        stages = [settings_from(RefineStage, s, f"refine.stages[{k}]") for k, s in enumerate(section.pop("stages", []))]
        return settings_from(cls, {**section, "stages": tuple(stages)}, "refine")


@dataclass
class RefineReport:
    """Per pair: the objective before and after, and the stages that were kept."""

    initial_loss: list[float]
    final_loss: list[float]
    steps: int = 0  # Adam steps taken by the batch (a pair that stopped earlier took fewer)
    stages_kept: list[list[bool]] = field(default_factory=list)  # per stage, per pair: its end was the best so far

    def notes(self, k: int) -> dict:
        """Pair k's table columns."""
        return {
            "refine_steps": self.steps,
            "refine_objective_initial": self.initial_loss[k],
            "refine_objective_final": self.final_loss[k],
        }


def _blur(image: torch.Tensor) -> torch.Tensor:
    """A 3-voxel box blur (replicated border): the moving image's smoothing at coarse levels."""
    return F.avg_pool3d(F.pad(image, (1, 1, 1, 1, 1, 1), mode="replicate"), 3, stride=1)


def _upsampled(correction: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    if tuple(correction.shape[2:]) == shape:
        return correction
    return F.interpolate(correction, size=shape, mode="trilinear", align_corners=True)


class _Objective:
    """The refinement objective of a batch at one loss level, per pair."""

    def __init__(self, model: Predictor, settings: RefineSettings, moving, fixed, weight, spacing, level):
        """`weight`: the similarity's, the fixed lung mask dilated by `settings.mask_margin_voxels`."""
        self.model, self.settings, self.level = model, settings, level
        self.shape = tuple(fixed.shape[2:])
        self.moving = moving if level == 1 else _blur(moving)
        self.fixed = fixed if level == 1 else F.avg_pool3d(fixed, level, ceil_mode=True)
        self.weight = weight if level == 1 else F.avg_pool3d(weight, level, ceil_mode=True)
        self.points = transform.block_centres(self.shape, level, fixed.shape[0], fixed.device, fixed.dtype)
        self.spacing = spacing

    def grid(self, gradients: torch.Tensor, theta: torch.Tensor | None) -> torch.Tensor:
        if self.level == 1:
            return transform.sampling_grid(gradients, theta, self.model.settings.integration)
        n = gradients.shape[0]
        points = transform.map_normalised_points(
            gradients, theta, self.points.reshape(n, -1, 3), self.model.settings.integration
        )
        return points.reshape(self.points.shape)

    def per_pair(self, logits: torch.Tensor, theta: torch.Tensor | None, weights: RefineStage | None) -> torch.Tensor:
        """The objective per pair, (N,), with the regulariser weights of the stage `weights` (None: none).

        Every term is reduced over each pair's own voxels, so a pair's value and gradient do not
        depend on the other pairs of its batch."""
        gradients = logistic_growth(logits, self.model.settings.maxgrad)
        grid = self.grid(gradients, theta)
        warped = transform.warp(self.moving, grid)
        similarity = losses.SIMILARITIES[self.settings.similarity]
        value = similarity(self.fixed, warped, self.weight, per_pair=True)
        value = value + self.settings.beta * losses.gradient_penalty(gradients, per_pair=True)
        if weights is not None and (weights.diffusion or weights.bending):
            displacement = transform.grid_displacement_mm(grid, self.points, self.shape, self.spacing)
            if weights.diffusion:
                value = value + weights.diffusion * losses.diffusion(displacement, self.spacing, self.level, True)
            if weights.bending:
                value = value + weights.bending * losses.bending(displacement, self.spacing, self.level, True)
        return value


def _folds(model: Predictor, logits, theta, fixed_mask) -> torch.Tensor:
    """Per pair: whether the full-resolution grid has a finite-difference det J <= 0 in the lung."""
    grid = transform.sampling_grid(logistic_growth(logits, model.settings.maxgrad), theta, model.settings.integration)
    determinant = transform.jacobian_determinant_fd(grid.double())
    return ((determinant <= 0) & (fixed_mask[:, 0] > 0.5)).flatten(1).any(1)


def _run_stage(stage, settings, model, moving, fixed, weight, spacing, logits, affine_output, theta_of):
    """Adam on a control-grid correction of the logits (and on the affine); returns the stage's end."""
    n, shape = logits.shape[0], tuple(logits.shape[2:])
    objective = _Objective(model, settings, moving, fixed, weight, spacing, stage.loss_level)
    control = tuple(math.ceil(d / stage.control_stride) for d in shape)
    correction = torch.zeros((n, 3, *control), device=logits.device, requires_grad=True)
    groups = [{"params": [correction], "lr": stage.learning_rate}]
    affine_step = None
    if affine_output is not None and settings.affine_learning_rate > 0:
        affine_step = torch.zeros_like(affine_output, requires_grad=True)
        groups.append({"params": [affine_step], "lr": settings.affine_learning_rate})
    optimiser = torch.optim.Adam(groups)
    best = torch.full((n,), math.inf, device=logits.device)
    since_best = torch.zeros(n, dtype=torch.long, device=logits.device)
    stopped = torch.zeros(n, dtype=torch.bool, device=logits.device)
    taken = 0
    for step in range(stage.steps):
        for group, rate in zip(optimiser.param_groups, (stage.learning_rate, settings.affine_learning_rate)):
            group["lr"] = rate * learning_rate_factor(step, stage.steps, settings.warmup, settings.schedule)
        raw = affine_output if affine_step is None else affine_output + affine_step
        per_pair = objective.per_pair(logits + _upsampled(correction, shape), theta_of(raw), stage)
        held = [p.detach().clone() for p in (correction, affine_step) if p is not None]
        optimiser.zero_grad(set_to_none=True)
        per_pair.sum().backward()  # a sum: each pair's gradient is its own, whatever the batch
        optimiser.step()
        taken += 1
        with torch.no_grad():
            # Early stopping per pair, on its own loss; a stopped pair's parameters stay where they
            # were (Adam's momentum would move them on), so its result does not depend on its batch.
            value = per_pair.detach()
            improved = ~torch.isfinite(best) | (value < best - settings.tolerance * best.abs())
            best = torch.where(improved, torch.minimum(value, best), best)
            since_best = torch.where(improved, torch.zeros_like(since_best), since_best + 1)
            for parameter, before in zip((p for p in (correction, affine_step) if p is not None), held):
                parameter[stopped] = before[stopped]
            stopped |= since_best >= settings.patience
        if bool(stopped.all()):
            break
    logits = logits + _upsampled(correction.detach(), shape)
    if affine_step is not None:
        affine_output = affine_output + affine_step.detach()
    return logits, affine_output, taken


def refine(
    model: Predictor,
    outputs: NetworkOutputs,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    fixed_mask: torch.Tensor,
    spacing: torch.Tensor,
    settings: RefineSettings,
) -> tuple[RegistrationOutput, RefineReport]:
    """Refine the network's `outputs` for a batch of pairs; returns the transform and a report.

    `moving`, `fixed`, `fixed_mask`: (N, 1, D, H, W) on one device; `spacing`: (N, 3) fixed voxel
    sizes in mm (x, y, z). With no steps the result is `model.transform(outputs, moving)` exactly.
    """
    logits, affine_output = outputs.logits.detach().float(), outputs.affine_output
    affine_output = None if affine_output is None else affine_output.detach().float()
    n = logits.shape[0]
    spacing = spacing.to(fixed.device, torch.float32).reshape(n, 3)

    def theta_of(raw: torch.Tensor | None) -> torch.Tensor | None:
        return None if raw is None else affine_from_output(raw, model.settings.affine_map)

    finest = settings.stages[-1] if settings.stages else None
    with torch.enable_grad():
        weight = losses.mask_weight(fixed_mask, settings.mask_margin_voxels)  # once: every objective's
        full = _Objective(model, settings, moving, fixed, weight, spacing, 1)
        with torch.no_grad():
            initial = full.per_pair(logits, theta_of(affine_output), finest)
        best, best_logits, best_affine = initial.clone(), logits, affine_output
        steps, kept = 0, []
        for stage in settings.stages:
            if stage.steps == 0:
                continue
            logits, affine_output, taken = _run_stage(
                stage, settings, model, moving, fixed, weight, spacing, logits, affine_output, theta_of
            )
            steps += taken
            with torch.no_grad():  # the stage's end, if it is the best feasible state so far (per pair)
                value = full.per_pair(logits, theta_of(affine_output), finest)
                accept = (value <= best) & ~_folds(model, logits, theta_of(affine_output), fixed_mask)
                best = torch.where(accept, value, best)
                best_logits = torch.where(accept.view(n, 1, 1, 1, 1), logits, best_logits)
                if affine_output is not None:
                    best_affine = torch.where(accept.view(n, 1, 1), affine_output, best_affine)
                kept.append(accept.tolist())
        logits, affine_output = best_logits, best_affine
    with torch.no_grad():
        result = model.transform(NetworkOutputs(logits, affine_output), moving)
    return result, RefineReport(initial.tolist(), best.tolist(), steps, kept)


def refine_batch(
    model: Predictor,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    fixed_mask: torch.Tensor,
    spacing: torch.Tensor | Sequence,
    settings: RefineSettings,
    forward=None,
) -> tuple[RegistrationOutput, RefineReport | None]:
    """The network's prediction for a batch and, when `settings` has steps, its refinement.

    `forward`: what computes the network's outputs (a compiled module's `outputs`), default
    `model.outputs`. Without steps this is exactly the single forward pass."""
    with torch.no_grad():
        outputs = (forward or model.outputs)(moving, fixed)
        if settings.steps == 0:
            return model.transform(outputs, moving), None
    spacing = torch.as_tensor(spacing, dtype=torch.float32, device=fixed.device)
    return refine(model, outputs, moving, fixed, fixed_mask, spacing, settings)


def identity_refined_displacement(
    model_settings: ModelSettings,
    settings: RefineSettings,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    fixed_mask: torch.Tensor,
    spacing: torch.Tensor,
) -> torch.Tensor:
    """The refinement from the identity of a batch, as a displacement (N, 3, D, H, W) in mm along
    the grid axes (`transform.grid_displacement_mm`): the training's distillation targets.

    The same construction as the network (`model_settings`) and the same refinement as the
    workflow's rows (`settings`): the network learns what the refinement would find."""
    predictor = IdentityPredictor(model_settings)
    spacing = torch.as_tensor(spacing, dtype=torch.float32, device=fixed.device).reshape(-1, 3)
    with torch.no_grad():
        outputs = predictor.outputs(moving, fixed)
    result, _ = refine(predictor, outputs, moving, fixed, fixed_mask, spacing, settings)
    shape = tuple(fixed.shape[2:])
    points = transform.identity_grid(shape, fixed.shape[0], fixed.device, result.grid.dtype)
    return transform.grid_displacement_mm(result.grid, points, shape, spacing)
