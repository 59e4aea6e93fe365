"""Training the registration network: Adam, reduce-on-plateau, early stopping, checkpoints.

A killed training resumes from its last checkpoint; with the same settings on CPU the resumed
run ends with exactly the weights of an uninterrupted one (the data order of every epoch is
drawn from its own seeded generator, and the checkpoint holds optimiser, scheduler and
early-stopping state).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .. import io, torch_io
from ..config import settings_from
from ..metrics import dice
from ..plots import training_curve
from ..study import PreprocessedLayout
from .device import choose_device
from .losses import LossSettings, registration_loss
from .model import Acceleration, ModelSettings, RegistrationNet
from .refine import RefineSettings, identity_refined_displacement
from .transform import warp

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """The training (config ``train:``)."""

    epochs: int  # no default: the paper's runs to early stopping, a CPU study's lasts minutes
    coarse_epochs: int = 0  # the first epochs on 2x average-pooled volumes (coarse to fine; 8x cheaper steps)
    batch_size: int = 2
    learning_rate: float = 1e-3
    # "plateau" (the paper's ReduceLROnPlateau), or "cosine": within each phase (the coarse epochs,
    # then the full-resolution ones) the rate decays from learning_rate towards 0 along a cosine,
    # so a short training ends settled instead of at its full step size
    schedule: str = "plateau"
    plateau_patience: int = 50
    plateau_factor: float = 0.9
    early_stopping_patience: int = 100
    checkpoint_every: int = 1
    seed: int = 2018
    device: str = "auto"  # auto: cuda when present, else cpu
    # with loss.distillation: the targets' steps per refinement stage and learning-rate schedule
    # (None: the refinement's own). At a constant rate the targets keep more of the motion's
    # amplitude, and the network trained on them predicts better (bench/README.md)
    distillation_steps: list[int] | None = field(default_factory=lambda: [40, 30])
    distillation_schedule: str | None = "constant"
    # How the network runs (lungreg.network.model.Acceleration); only bf16 changes the numbers enough
    # to make a checkpoint belong to other settings.
    bf16: bool = False  # bf16 autocast of the convolutions (CUDA, or CPU)
    channels_last: bool = False  # channels_last_3d weights and inputs
    cudnn_benchmark: bool = False  # cuDNN autotuning (CUDA only)
    compile: bool | str = False  # torch.compile the forward pass (true or a mode name)

    def __post_init__(self):
        if self.schedule not in ("plateau", "cosine"):
            raise ValueError(f"train: unknown schedule {self.schedule!r}; choose plateau or cosine")

    @property
    def acceleration(self) -> Acceleration:
        return Acceleration.from_config(asdict(self))

    def cosine_rate(self, epoch: int) -> float:
        """The cosine schedule's rate at `epoch` (1-based): from learning_rate down along a cosine
        over the epochs of its phase (coarse, then full resolution)."""
        first, count = (
            (1, self.coarse_epochs)
            if epoch <= self.coarse_epochs
            else (self.coarse_epochs + 1, self.epochs - self.coarse_epochs)
        )
        return self.learning_rate * 0.5 * (1.0 + math.cos(math.pi * (epoch - first) / max(count, 1)))

    @classmethod
    def from_config(cls, section: Mapping) -> "TrainSettings":
        return settings_from(cls, section, "train")


@dataclass(frozen=True)
class PairFiles:
    """Preprocessed files of one training or validation pair."""

    moving_image: str
    fixed_image: str
    moving_mask: str
    fixed_mask: str


def _pool(tensor: torch.Tensor) -> torch.Tensor:
    return F.avg_pool3d(tensor, 2, ceil_mode=True)


def coarse(volumes: list[torch.Tensor]) -> list[torch.Tensor]:
    """(moving, fixed, moving_mask, fixed_mask) at half resolution: images averaged over 2^3
    blocks, masks the blocks' maximum (a block touching the lung is lung)."""
    moving, fixed, moving_mask, fixed_mask = volumes
    top = lambda t: F.max_pool3d(t, 2, ceil_mode=True)  # noqa: E731
    return [_pool(moving), _pool(fixed), top(moving_mask), top(fixed_mask)]


class PairSet:
    """All pairs of a set held in memory as (moving, fixed, moving_mask, fixed_mask) stacks, and
    the fixed images' voxel sizes (N, 3; x, y, z mm) for the physical regulariser; `targets`, when
    set, the pairs' distillation targets ((N, 3, D, H, W) mm, `refine.identity_refined_displacement`).

    Each distinct file is read once, however many pairs use it.
    """

    targets: torch.Tensor | None = None

    def __init__(self, pairs: list[PairFiles]):
        if not pairs:
            raise ValueError("no pairs to train or validate on")
        cache: dict[str, tuple[torch.Tensor, tuple[float, ...]]] = {}

        def read(path: str) -> tuple[torch.Tensor, tuple[float, ...]]:
            if path not in cache:
                image = io.read_intermediate_image(path)
                array = sitk.GetArrayFromImage(image).astype(np.float32)
                cache[path] = torch.from_numpy(array)[None], image.GetSpacing()
            return cache[path]

        self.tensors = [torch.stack([read(getattr(p, f.name))[0] for p in pairs]) for f in fields(PairFiles)]
        # the fixed images' spacing from the same read (x, y, z mm)
        self.spacing = torch.tensor([read(p.fixed_image)[1] for p in pairs], dtype=torch.float32)

    def __len__(self) -> int:
        return self.tensors[0].shape[0]

    def batch(
        self, index: torch.Tensor, device: torch.device, half: bool = False
    ) -> tuple[list, torch.Tensor, torch.Tensor | None]:
        """The pairs' volumes on `device` (at half resolution with `half`), their voxel sizes and
        their distillation targets (None without)."""
        volumes = [t[index].to(device, non_blocking=True) for t in self.tensors]
        spacing = self.spacing[index].to(device)
        target = None if self.targets is None else self.targets[index].to(device)
        if not half:
            return volumes, spacing, target
        return coarse(volumes), 2 * spacing, None if target is None else _pool(target)

    def compute_targets(
        self, model_settings: ModelSettings, settings: RefineSettings, device: torch.device, batch_size: int = 4
    ) -> None:
        """The distillation targets: each pair refined from the identity (the workflow's refinement)."""
        targets = []
        for start in range(0, len(self), batch_size):
            (moving, fixed, _, fixed_mask), spacing, _ = self.batch(
                torch.arange(start, min(start + batch_size, len(self))), device
            )
            targets.append(
                identity_refined_displacement(model_settings, settings, moving, fixed, fixed_mask, spacing).cpu()
            )
        self.targets = torch.cat(targets)


def fingerprint(*parts: object) -> str:
    """A short hash of everything that makes a checkpoint resumable by this run."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_finite(losses: dict[str, torch.Tensor], epoch: int, batch: int) -> None:
    for name, value in losses.items():
        if not math.isfinite(float(value.detach())):
            raise FloatingPointError(
                f"epoch {epoch}, batch {batch}: the {name} is {float(value.detach())}; training stopped "
                "(lower the learning rate, check the intensity range, or disable bf16)"
            )


def _progress(epoch: int, epochs: int, done: int, total: int, loss: float) -> str:
    filled = round(20 * done / total)
    return f"epoch {epoch}/{epochs} |{'#' * filled}{'.' * (20 - filled)}| {done}/{total} batches, loss {loss:.5f}"


@torch.no_grad()
def validate(
    model: RegistrationNet, data: PairSet, loss_settings: LossSettings, device, batch_size: int, half: bool = False
) -> dict:
    """Validation loss and Dice of the warped moving masks (also the unregistered Dice), at the
    resolution of the epoch (`half`: the coarse epochs')."""
    model.eval()
    losses, dices, unregistered = [], [], []
    for start in range(0, len(data), batch_size):
        index = torch.arange(start, min(start + batch_size, len(data)))
        (moving, fixed, moving_mask, fixed_mask), spacing, _ = data.batch(index, device, half)
        out = model(moving, fixed)
        loss = registration_loss(
            loss_settings, fixed, out.warped, out.theta, out.gradients, fixed_mask, out.grid, spacing
        )  # validation pairs have no distillation target: the unsupervised loss alone picks the model
        losses.append(float(loss["loss"]) * len(index))
        warped_mask = warp(moving_mask, out.grid) > 0.5
        for k in range(len(index)):
            dices.append(dice(warped_mask[k].cpu().numpy(), fixed_mask[k].cpu().numpy() > 0.5))
            unregistered.append(dice(moving_mask[k].cpu().numpy() > 0.5, fixed_mask[k].cpu().numpy() > 0.5))
    model.train()
    return {
        "val_loss": sum(losses) / len(data),
        "val_dice": float(np.nanmean(dices)),
        "val_dice_unregistered": float(np.nanmean(unregistered)),
    }


@dataclass
class TrainingState:
    """Everything a resumed run needs besides the data."""

    epoch: int = 0
    best_loss: float = math.inf
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    best_state: dict | None = None
    rows: list = None

    def __post_init__(self):
        self.rows = self.rows or []


def _rng_states() -> dict:
    """Every global random generator (the epoch order has its own seeded one; this keeps a resumed
    run exact should anything in training draw from the global ones)."""
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def _save_checkpoint(path, model, optimizer, scheduler, state: TrainingState, key: str) -> None:
    torch_io.save_torch(
        {
            "fingerprint": key,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "state": asdict(state),
            "rng": _rng_states(),
        },
        path,
    )


def _resume(path: Path | None, key: str, model, optimizer, scheduler) -> TrainingState:
    if path is None or not Path(path).exists():
        return TrainingState()
    try:
        checkpoint = torch_io.load_torch(path)
    except io.CorruptFileError as error:  # not an output: snakemake --forcerun would read it again
        raise io.CorruptFileError(
            path, error.reason, "it is the resume point of an interrupted training; delete it to train from epoch 1"
        ) from None
    if checkpoint.get("fingerprint") != key:
        log.warning("checkpoint %s belongs to other settings or data; starting over", path)
        return TrainingState()
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if "rng" in checkpoint:
        _set_rng_states(checkpoint["rng"])
    state = TrainingState(**checkpoint["state"])
    log.info("resuming from %s after epoch %d", path, state.epoch)
    return state


def train(
    train_pairs: list[PairFiles],
    val_pairs: list[PairFiles],
    model_settings: ModelSettings,
    loss_settings: LossSettings,
    settings: TrainSettings,
    checkpoint_path: str | Path | None = None,
    extra: dict | None = None,
    refine_settings: RefineSettings | None = None,
) -> tuple[dict, pd.DataFrame]:
    """Train and return (the best model's checkpoint dictionary, the per-epoch log).

    `extra` is stored in the model file (preprocessing settings, so the `register` command can
    prepare new images the same way). With a `loss.distillation` weight, each training pair is
    first refined from the identity with `refine_settings` (the workflow's refinement) and the
    network also learns to predict that displacement.
    """
    distilled = bool(loss_settings.distillation)
    if distilled and (refine_settings is None or not refine_settings.stages):
        raise ValueError("loss.distillation needs refinement steps (refine: stages) to make its targets")
    if distilled and refine_settings is not None and settings.distillation_steps is not None:
        refine_settings = refine_settings.with_steps(settings.distillation_steps)
    if distilled and refine_settings is not None and settings.distillation_schedule is not None:
        refine_settings = replace(refine_settings, schedule=settings.distillation_schedule)
    if distilled and (refine_settings is None or not refine_settings.steps):
        raise ValueError("loss.distillation needs refinement steps (refine: stages) to make its targets")
    device = choose_device(settings.device)
    torch.manual_seed(settings.seed)
    model = RegistrationNet(model_settings)
    acceleration = settings.acceleration
    forward = acceleration.prepare(model, device)  # the compiled module, or model itself
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=settings.plateau_factor, patience=settings.plateau_patience
    )
    resumable = {
        k: v
        for k, v in asdict(settings).items()
        if k not in ("epochs", "checkpoint_every", "device", "channels_last", "cudnn_benchmark", "compile")
    }
    key = fingerprint(
        model_settings.as_dict(),
        asdict(loss_settings),
        asdict(refine_settings) if distilled else None,
        resumable,
        [asdict(p) for p in train_pairs],
        [asdict(p) for p in val_pairs],
    )
    state = _resume(checkpoint_path, key, model, optimizer, scheduler)
    train_data, val_data = PairSet(train_pairs), PairSet(val_pairs)
    if distilled:
        started = time.perf_counter()
        train_data.compute_targets(model_settings, refine_settings, device)
        log.info(
            "distillation targets: %d pairs refined from the identity in %.1f s",
            len(train_data),
            time.perf_counter() - started,
        )
    log.info("training on %d pairs, validating on %d, device %s", len(train_data), len(val_data), device)
    model.train()
    for epoch in range(state.epoch + 1, settings.epochs + 1):
        half = epoch <= settings.coarse_epochs
        if epoch == settings.coarse_epochs + 1 and settings.coarse_epochs:
            # Full resolution from here: its losses are not comparable with the coarse epochs', so
            # the best model, early stopping and the plateau schedule start afresh.
            state.best_loss, state.best_state, state.epochs_without_improvement = math.inf, None, 0
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=settings.plateau_factor, patience=settings.plateau_patience
            )
        if state.epochs_without_improvement >= settings.early_stopping_patience and not half:
            break
        if settings.schedule == "cosine":
            for group in optimizer.param_groups:
                group["lr"] = settings.cosine_rate(epoch)
        started = time.perf_counter()
        order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(settings.seed * 100003 + epoch))
        batches = order.split(settings.batch_size)
        sums = {"loss": 0.0, "similarity": 0.0, "regularizer": 0.0, "distillation": 0.0}
        for number, index in enumerate(batches, start=1):
            (moving, fixed, _, fixed_mask), spacing, target = train_data.batch(index, device, half)
            moving, fixed = acceleration.inputs(moving, fixed)
            with acceleration.autocast(device):
                out = forward(moving, fixed)
            warped, gradients = out.warped.float(), out.gradients.float()
            losses = registration_loss(
                loss_settings, fixed, warped, out.theta, gradients, fixed_mask, out.grid, spacing, target
            )
            check_finite(losses, epoch, number)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            for name in sums:
                sums[name] += float(losses[name].detach()) * len(index)
            if number == len(batches) or number % max(1, len(batches) // 5) == 0:
                log.info(_progress(epoch, settings.epochs, number, len(batches), float(losses["loss"].detach())))
        scores = validate(model, val_data, loss_settings, device, settings.batch_size, half)
        check_finite({"validation loss": torch.tensor(scores["val_loss"])}, epoch, 0)
        if settings.schedule == "plateau":
            scheduler.step(scores["val_loss"])
        if scores["val_loss"] < state.best_loss:
            state.best_loss, state.best_epoch, state.epochs_without_improvement = scores["val_loss"], epoch, 0
            state.best_state = copy.deepcopy(model.state_dict())
        else:
            state.epochs_without_improvement += 1
        state.epoch = epoch
        state.rows.append(
            {
                "epoch": epoch,
                **{f"train_{k}": v / len(train_data) for k, v in sums.items()},
                **scores,
                "lr": optimizer.param_groups[0]["lr"],
                "resolution": "half" if half else "full",
                "device": device.type,
                "seconds": time.perf_counter() - started,
            }
        )
        log.info(
            "epoch %d: train loss %.5f, validation loss %.5f, Dice %.4f (unregistered %.4f)",
            epoch,
            state.rows[-1]["train_loss"],
            scores["val_loss"],
            scores["val_dice"],
            scores["val_dice_unregistered"],
        )
        if checkpoint_path and (epoch % settings.checkpoint_every == 0 or epoch == settings.epochs):
            _save_checkpoint(checkpoint_path, model, optimizer, scheduler, state, key)
    best = {k: v.cpu().contiguous() for k, v in (state.best_state or model.state_dict()).items()}
    checkpoint = {
        "state_dict": best,
        "model_settings": model_settings.as_dict(),
        "best_epoch": state.best_epoch,
        "best_val_loss": state.best_loss,
        "fingerprint": key,
        **(extra or {}),
    }
    return checkpoint, pd.DataFrame(state.rows)


def pair_files(rows: list[dict], preprocessed: str | Path) -> list[PairFiles]:
    """PairFiles of the pairs (as `study.Pair.as_row` dictionaries) in a preprocessed folder."""
    layout = PreprocessedLayout(Path(preprocessed))
    return [
        PairFiles(
            str(layout.image(r["moving_subject"], r["moving_phase"])),
            str(layout.image(r["fixed_subject"], r["fixed_phase"])),
            str(layout.mask(r["moving_subject"], r["moving_phase"])),
            str(layout.mask(r["fixed_subject"], r["fixed_phase"])),
        )
        for r in rows
    ]


def run_training(
    train_rows: list[dict],
    validation_rows: list[dict],
    preprocessed: str | Path,
    model: dict,
    loss: dict,
    settings: dict,
    preprocess: dict,
    model_path: str | Path,
    log_path: str | Path,
    checkpoint_path: str | Path | None = None,
    curve_path: str | Path | None = None,
    refine: dict | None = None,
) -> pd.DataFrame:
    """The training job: train, then write the best model, the per-epoch log and its figure.

    `refine`: the workflow's refine: section (its workflow keys left out), the distillation
    targets' refinement."""
    checkpoint, history = train(
        pair_files(train_rows, preprocessed),
        pair_files(validation_rows, preprocessed),
        ModelSettings.from_config(model),
        LossSettings.from_config(loss),
        TrainSettings.from_config(settings),
        checkpoint_path,
        extra={"preprocess": preprocess},
        refine_settings=RefineSettings.from_config(refine) if refine is not None else None,
    )
    torch_io.save_torch(checkpoint, model_path)
    io.write_table(history, log_path)
    if curve_path:
        training_curve(history, curve_path)
    return history
