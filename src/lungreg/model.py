"""The joint affine + deformable registration network (Christodoulidis et al., 2018).

Encoder: five 3x3x3 convolutions with dilations 1, 1, 2, 3, 5 (Fibonacci, against the gridding
artefact of exponential dilation), instance norm and LeakyReLU, no pooling; the input and all
five outputs are concatenated (multi-resolution feature merging, 290 channels at paper width).
Linear branch: global average pooling and a 1x1x1 convolution to a 3 x 4 affine offset from the
identity. Deformable branch: squeeze-and-excitation, 3x3x3 convolutions, and a last layer whose
logistic growth gives 3 spatial gradients per voxel in (0, maxgrad), 1 at zero input. Both last
layers start at zero, so an untrained network is the identity transform.

The CPU-fast variant (`feature_reduction`, `deformable_stride`) keeps every piece above and the
no-folding construction: it only thins the features entering the deformable branch with a
1x1x1 convolution and/or runs that branch on a grid twice as coarse, upsampling its logits
before the positive activation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import transform

ENCODER_CHANNELS = (32, 64, 128, 32, 32)
ENCODER_DILATIONS = (1, 1, 2, 3, 5)
DEFORMABLE_CHANNELS = (128, 64, 32, 32, 32)


@dataclass(frozen=True)
class ModelSettings:
    width: float = 1.0  # channel multiplier; the paper is 1
    affine: bool = True  # False: the paper's "w/o affine" variant
    maxgrad: float = 2.0
    feature_reduction: int | None = None  # channels of the 1x1x1 reduction (None: paper)
    deformable_stride: int = 1  # 2: deformable branch on a grid twice as coarse
    se_reduction: int = 16
    integration: str = "sequential"  # or "paper" (can fold, see transform.deform_points)
    affine_map: str = "exponential"  # or "additive" (the paper's I + output; det can be <= 0)

    @classmethod
    def from_config(cls, section: dict) -> "ModelSettings":
        known = {f.name for f in fields(cls)}
        unknown = set(section) - known
        if unknown:
            raise ValueError(f"unknown model setting(s): {', '.join(sorted(unknown))}")
        return cls(**section)

    def as_dict(self) -> dict:
        return asdict(self)


class RegistrationOutput(NamedTuple):
    warped: torch.Tensor  # (N, 1, D, H, W) moving image resampled on the fixed grid
    grid: torch.Tensor  # (N, D, H, W, 3) normalised composite sampling grid
    theta: torch.Tensor | None  # (N, 3, 4) affine in normalised coordinates, None w/o affine
    gradients: torch.Tensor  # (N, 3, D, H, W) spatial gradients Phi


def _scaled(channels: int, width: float) -> int:
    return max(2, int(round(channels * width)))


def conv_block(in_channels: int, out_channels: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, 3, padding=dilation, dilation=dilation),
        nn.InstanceNorm3d(out_channels),
        nn.LeakyReLU(0.01),
    )


class Encoder(nn.Module):
    def __init__(self, width: float):
        super().__init__()
        channels = [_scaled(c, width) for c in ENCODER_CHANNELS]
        inputs = [2] + channels[:-1]
        self.layers = nn.ModuleList(
            conv_block(i, o, d) for i, o, d in zip(inputs, channels, ENCODER_DILATIONS)
        )
        self.out_channels = 2 + sum(channels)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        features = [torch.cat([moving, fixed], dim=1)]
        for layer in self.layers:
            features.append(layer(features[-1]))
        return torch.cat(features, dim=1)


class LinearBranch(nn.Module):
    """Global average pooling and a 1x1x1 convolution to 12 values, read as a 3 x 4 affine
    matrix such that zero output is the identity.

    "additive" (the paper): A = [I | 0] + output. "exponential": the 3 x 3 part is the matrix
    exponential of the output's 3 x 3 part, so det A = exp(trace) > 0 and the affine can never
    mirror or collapse the volume; to first order the two agree.
    """

    def __init__(self, in_channels: int, affine_map: str = "exponential"):
        super().__init__()
        if affine_map not in ("exponential", "additive"):
            raise ValueError(f"unknown affine_map {affine_map!r}: expected 'exponential' or 'additive'")
        self.affine_map = affine_map
        self.conv = nn.Conv3d(in_channels, 12, 1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        output = self.conv(F.adaptive_avg_pool3d(features, 1)).view(-1, 3, 4)
        return affine_from_output(output, self.affine_map)


def affine_from_output(output: torch.Tensor, affine_map: str = "exponential") -> torch.Tensor:
    """The (N, 3, 4) normalised affine for the linear branch's raw (N, 3, 4) output."""
    linear, translation = output[..., :3], output[..., 3:]
    if affine_map == "exponential":
        linear = torch.linalg.matrix_exp(linear)
    else:
        linear = linear + torch.eye(3, device=output.device, dtype=output.dtype)
    return torch.cat([linear, translation], dim=-1)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.squeeze = nn.Conv3d(channels, hidden, 1)
        self.excite = nn.Conv3d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.sigmoid(self.excite(F.relu(self.squeeze(F.adaptive_avg_pool3d(x, 1)))))
        return x * scale


def logistic_growth(x: torch.Tensor, maxgrad: float) -> torch.Tensor:
    """c / (1 + (c - 1) e^-x): values in (0, c), equal to 1 at x = 0 (the official code's)."""
    return maxgrad / (1.0 + (maxgrad - 1.0) * torch.exp(-x))


class DeformableBranch(nn.Module):
    def __init__(self, in_channels: int, settings: ModelSettings):
        super().__init__()
        self.settings = settings
        self.se = SqueezeExcitation(in_channels, settings.se_reduction)
        self.reduce = None
        if settings.feature_reduction:
            self.reduce = nn.Sequential(
                nn.Conv3d(in_channels, settings.feature_reduction, 1),
                nn.InstanceNorm3d(settings.feature_reduction),
                nn.LeakyReLU(0.01),
            )
            in_channels = settings.feature_reduction
        channels = [_scaled(c, settings.width) for c in DEFORMABLE_CHANNELS]
        self.convs = nn.Sequential(
            *(conv_block(i, o) for i, o in zip([in_channels] + channels[:-1], channels))
        )
        self.head = nn.Conv3d(channels[-1], 3, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        full_size = features.shape[2:]
        x = self.se(features)
        if self.reduce is not None:
            x = self.reduce(x)
        if self.settings.deformable_stride > 1:
            x = F.avg_pool3d(x, self.settings.deformable_stride, ceil_mode=True)
        logits = self.head(self.convs(x))
        if logits.shape[2:] != full_size:
            logits = F.interpolate(logits, size=full_size, mode="trilinear", align_corners=True)
        return logistic_growth(logits, self.settings.maxgrad)


class RegistrationNet(nn.Module):
    def __init__(self, settings: ModelSettings = ModelSettings()):
        super().__init__()
        self.settings = settings
        self.encoder = Encoder(settings.width)
        self.deformable = DeformableBranch(self.encoder.out_channels, settings)
        self.linear = LinearBranch(self.encoder.out_channels, settings.affine_map) if settings.affine else None

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        features = self.encoder(moving, fixed)
        gradients = self.deformable(features)
        theta = self.linear(features) if self.linear is not None else None
        grid = transform.sampling_grid(gradients, theta, self.settings.integration)
        return RegistrationOutput(transform.warp(moving, grid), grid, theta, gradients)


def load_model(checkpoint: dict, device: str | torch.device = "cpu") -> RegistrationNet:
    """Rebuild a trained network from the dictionary `train` saves as model.pt."""
    model = RegistrationNet(ModelSettings(**checkpoint["model_settings"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval()
