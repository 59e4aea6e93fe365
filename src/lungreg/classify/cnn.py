"""The shallow 3D CNN on the displacement fields: its settings, network, input scaling, training."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..config import settings_from
from ..network.device import choose_device
from .features import center_fields

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CnnSettings:
    """The shallow CNN and its training (config ``classify: cnn:``)."""

    epochs: int = 150
    width: int = 8  # channels of the first convolution; 2 x width after it
    batch_size: int = 4
    learning_rate: float = 1e-4
    halve_every: int = 50  # StepLR: learning rate x 0.5 every this many epochs
    pool: int = 2  # average-pool the field by this inside the network (1: full resolution)
    spatial: int = 2  # the last features are averaged onto spatial^3 cells (1: global average)
    dropout: float = 0.2
    weight_decay: float = 0.0
    class_weighted: bool = True  # BCE pos_weight = n_healthy / n_ILD of the training fold
    center: bool = True  # subtract each subject's mean displacement in the lung (center_fields)
    flip: bool = True  # augmentation: random left-right mirror (x axis reversed, x component negated)
    device: str = "auto"

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> "CnnSettings":
        return settings_from(cls, section, "classify.cnn")


class ShallowCNN(nn.Module):
    """Average-pool by ``pool``, three 3x3x3 convolutions (LeakyReLU, max-pooling after the
    first two), adaptive average pooling onto ``spatial``^3 cells (2: keeps coarse position,
    apex vs base, left vs right), dropout and one linear unit giving the logit of P(ILD)."""

    def __init__(self, settings: CnnSettings, in_channels: int = 3):
        super().__init__()
        w = int(settings.width)
        pool = int(settings.pool)
        self.features = nn.Sequential(
            nn.AvgPool3d(pool, ceil_mode=True) if pool > 1 else nn.Identity(),
            nn.Conv3d(in_channels, w, 3, padding=1),
            nn.LeakyReLU(0.1),
            nn.MaxPool3d(2, ceil_mode=True),
            nn.Conv3d(w, 2 * w, 3, padding=1),
            nn.LeakyReLU(0.1),
            nn.MaxPool3d(2, ceil_mode=True),
            nn.Conv3d(2 * w, 2 * w, 3, padding=1),
            nn.LeakyReLU(0.1),
            nn.AdaptiveAvgPool3d(int(settings.spatial)),
        )
        cells = int(settings.spatial) ** 3
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(settings.dropout), nn.Linear(2 * w * cells, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))[:, 0]


def shallow_cnn(settings: CnnSettings, in_channels: int = 3) -> ShallowCNN:
    return ShallowCNN(settings, in_channels)


@dataclass(frozen=True)
class FieldScaler:
    """Per-channel scale (root mean square over the training fields); no shift, so a masked
    field stays zero outside the lung.  Fitted on the training fold only."""

    scale: tuple[float, ...]

    @classmethod
    def fit(cls, fields: np.ndarray) -> "FieldScaler":
        fields = np.asarray(fields, np.float64)
        rms = np.sqrt(np.mean(fields**2, axis=(0, *range(2, fields.ndim))))
        return cls(tuple(float(s) if s > 0 else 1.0 for s in rms))

    def transform(self, fields: np.ndarray) -> np.ndarray:
        scale = np.asarray(self.scale, np.float32).reshape(1, -1, *([1] * (np.ndim(fields) - 2)))
        return (np.asarray(fields, np.float32) / scale).astype(np.float32)


def prepare_cnn_input(fields: np.ndarray, masks: np.ndarray, settings: CnnSettings) -> np.ndarray:
    """The per-subject input transform of the CNN (no label, no other subject): centring."""
    return center_fields(fields, masks) if settings.center else np.asarray(fields, np.float32)


def train_cnn(
    x_train: np.ndarray, y_train: np.ndarray, settings: CnnSettings, seed: int, device: str | None = None
) -> tuple[dict, pd.DataFrame]:
    """Train the shallow CNN on the training fold; returns (checkpoint, history).

    x_train: (n, 3, z, y, x) fields (after ``prepare_cnn_input``); y_train: 1 = ILD, 0 = healthy.
    The checkpoint holds the state dict, the settings and the fitted FieldScaler.  Seeded: on
    CPU with the same threads two runs give identical weights.
    """
    y_train = np.asarray(y_train, np.float32)
    if len(np.unique(y_train)) < 2:
        raise ValueError("the training fold holds a single class")
    target = choose_device(device or settings.device)
    scaler = FieldScaler.fit(x_train)
    x = torch.from_numpy(scaler.transform(x_train)).to(target)
    y = torch.from_numpy(y_train).to(target)
    torch.manual_seed(int(seed))
    model = shallow_cnn(settings, x.shape[1]).to(target)
    n_pos, n_neg = float(y_train.sum()), float(len(y_train) - y_train.sum())
    pos_weight = torch.tensor(n_neg / n_pos if settings.class_weighted else 1.0, device=target)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimiser, step_size=settings.halve_every, gamma=0.5)
    order = torch.Generator().manual_seed(int(seed))
    history = []
    began = time.perf_counter()
    for epoch in range(1, settings.epochs + 1):
        model.train()
        permutation = torch.randperm(len(y), generator=order).to(target)
        total = 0.0
        for start in range(0, len(y), settings.batch_size):
            batch = permutation[start : start + settings.batch_size]
            inputs = x[batch]
            if settings.flip:
                mirrored = (torch.rand(len(batch), generator=order) < 0.5).to(target)
                sign = torch.tensor([-1.0, 1.0, 1.0], device=target).view(1, 3, 1, 1, 1)
                flipped = torch.flip(inputs, dims=(-1,)) * sign
                inputs = torch.where(mirrored.view(-1, 1, 1, 1, 1), flipped, inputs)
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), y[batch])
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(batch)
        history.append({"epoch": epoch, "train_loss": total / len(y), "learning_rate": optimiser.param_groups[0]["lr"]})
        scheduler.step()
    log.info(
        "CNN trained on %d subjects (%d ILD) for %d epochs on %s in %.1f s; final loss %.4f",
        len(y),
        int(n_pos),
        settings.epochs,
        target,
        time.perf_counter() - began,
        history[-1]["train_loss"],
    )
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    checkpoint = {
        "state_dict": state,
        "settings": dataclasses.asdict(settings),
        "scaler": scaler.scale,
        "in_channels": int(x.shape[1]),
        "pos_weight": float(pos_weight),
    }
    return checkpoint, pd.DataFrame(history)


def predict_cnn(checkpoint: dict, x: np.ndarray, device: str | None = None) -> np.ndarray:
    """P(ILD) of each field (n, 3, z, y, x) with a checkpoint of `train_cnn`."""
    settings = CnnSettings(**checkpoint["settings"])
    target = choose_device(device or settings.device)
    model = shallow_cnn(settings, checkpoint["in_channels"]).to(target)
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    inputs = torch.from_numpy(FieldScaler(tuple(checkpoint["scaler"])).transform(x))
    with torch.no_grad():
        out = [torch.sigmoid(model(inputs[i : i + 8].to(target))).cpu() for i in range(0, len(inputs), 8)]
    return torch.cat(out).numpy().astype(float) if out else np.zeros(0)
