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
(trilinear) before the positive activation, so every upsampled gradient is still in (0, maxgrad).

How the network runs (not what it computes, up to rounding) is `Acceleration`: bf16 autocast,
channels_last_3d, cuDNN autotuning, torch.compile. Under bf16 autocast only the convolutions of
encoder and branches run in bfloat16: the last layers of both branches, the positive activation,
the integration of the gradients, the affine and the warp always run in float32 (a cumulative
sum over 192 voxels in bfloat16, whose spacing is 1 above 128, would be meaningless).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Callable, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import settings_from
from . import transform

ENCODER_CHANNELS = (32, 64, 128, 32, 32)
ENCODER_DILATIONS = (1, 1, 2, 3, 5)
DEFORMABLE_CHANNELS = (128, 64, 32, 32, 32)


@dataclass(frozen=True)
class ModelSettings:
    """The network's architecture (config ``model:``; the affine switch comes from the method)."""

    width: float  # channel multiplier: the paper's 1, or the CPU-sized study's (no default: say which)
    affine: bool = True  # False: the paper's "w/o affine" variant
    maxgrad: float = 2.0
    feature_reduction: int | None = None  # channels of the 1x1x1 reduction (None: paper)
    deformable_stride: int = 1  # 2: deformable branch on a grid twice as coarse
    se_reduction: int = 16
    integration: str = "sequential"  # or "paper" (can fold, see transform.deform_points)
    affine_map: str = "exponential"  # or "additive" (the paper's I + output; det can be <= 0)

    @classmethod
    def from_config(cls, section: Mapping) -> "ModelSettings":
        return settings_from(cls, section, "model")

    def as_dict(self) -> dict:
        return asdict(self)


class NetworkOutputs(NamedTuple):
    """What the network predicts, before it becomes a transform: the parameters that the per-pair
    refinement (`lungreg.network.refine`) optimises further under the same construction."""

    logits: torch.Tensor  # (N, 3, D, H, W) full resolution; gradients = logistic_growth(logits) > 0
    affine_output: torch.Tensor | None  # (N, 3, 4) raw linear-branch output, 0 = identity; None w/o affine


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
        self.layers = nn.ModuleList(conv_block(i, o, d) for i, o, d in zip(inputs, channels, ENCODER_DILATIONS))
        self.out_channels = 2 + sum(channels)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        features = [torch.cat([moving, fixed], dim=1)]
        for layer in self.layers:
            features.append(layer(features[-1]))
        dtype = features[-1].dtype  # bfloat16 under autocast: keep the wide concatenation narrow too
        return torch.cat([f.to(dtype) for f in features], dim=1)


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

    def output(self, features: torch.Tensor) -> torch.Tensor:
        """The raw (N, 3, 4) output (float32), zero for the identity."""
        pooled = F.adaptive_avg_pool3d(features, 1)
        with full_precision(features):
            return self.conv(widened(pooled)).view(-1, 3, 4)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return affine_from_output(self.output(features), self.affine_map)


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


def full_precision(tensor: torch.Tensor):
    """A region where autocast is off (float32 stays float32), on the tensor's device type."""
    return torch.autocast(tensor.device.type, enabled=False)


def widened(tensor: torch.Tensor) -> torch.Tensor:
    """bfloat16 / float16 activations as float32; float32 and float64 unchanged."""
    return tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor


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
        self.convs = nn.Sequential(*(conv_block(i, o) for i, o in zip([in_channels] + channels[:-1], channels)))
        self.head = nn.Conv3d(channels[-1], 3, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Full-resolution logits (float32) of the spatial gradients."""
        full_size = features.shape[2:]
        x = self.se(features)
        if self.reduce is not None:
            x = self.reduce(x)
        if self.settings.deformable_stride > 1:
            x = F.avg_pool3d(x, self.settings.deformable_stride, ceil_mode=True)
        x = self.convs(x)
        with full_precision(x):
            logits = self.head(widened(x))
            if logits.shape[2:] != full_size:
                # Upsample the logits, then the activation: any real logit gives a gradient in
                # (0, maxgrad), so the coarse variant cannot fold either.
                logits = F.interpolate(logits, size=full_size, mode="trilinear", align_corners=True)
            return logits

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return logistic_growth(self.logits(features), self.settings.maxgrad)


class Predictor(nn.Module):
    """What predicts `NetworkOutputs` for a pair, and the one transform they define.

    `outputs` is the prediction; `transform` turns any outputs (predicted or refined) into the
    sampling grid and the warp under the construction (positive gradients, det A > 0).
    """

    settings: ModelSettings

    def outputs(self, moving: torch.Tensor, fixed: torch.Tensor) -> NetworkOutputs:
        raise NotImplementedError

    def transform(self, outputs: NetworkOutputs, moving: torch.Tensor) -> RegistrationOutput:
        """The transform of `outputs` (positive gradients, det A > 0 by construction) and the warp."""
        with full_precision(outputs.logits):
            gradients = logistic_growth(outputs.logits, self.settings.maxgrad)
            theta = None
            if outputs.affine_output is not None:
                theta = affine_from_output(outputs.affine_output, self.settings.affine_map)
            grid = transform.sampling_grid(gradients, theta, self.settings.integration)
            return RegistrationOutput(transform.warp(widened(moving), grid), grid, theta, gradients)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        return self.transform(self.outputs(moving, fixed), moving)


class RegistrationNet(Predictor):
    def __init__(self, settings: ModelSettings):
        super().__init__()
        self.settings = settings
        self.encoder = Encoder(settings.width)
        self.deformable = DeformableBranch(self.encoder.out_channels, settings)
        self.linear = LinearBranch(self.encoder.out_channels, settings.affine_map) if settings.affine else None

    def outputs(self, moving: torch.Tensor, fixed: torch.Tensor) -> NetworkOutputs:
        features = self.encoder(moving, fixed)
        affine_output = self.linear.output(features) if self.linear is not None else None
        return NetworkOutputs(self.deformable.logits(features), affine_output)


class IdentityPredictor(Predictor):
    """No network: predicts the identity for every pair (logits 0: every gradient 1; a raw affine 0).

    The refinement started from it is pure instance optimisation under the network's own
    construction and settings (the reference method `identity_refined`, lungreg.study): what the
    network's prediction adds is measured against it, same objective, same steps.
    """

    def __init__(self, settings: ModelSettings):
        super().__init__()
        self.settings = settings

    def outputs(self, moving: torch.Tensor, fixed: torch.Tensor) -> NetworkOutputs:
        n, shape = fixed.shape[0], fixed.shape[2:]
        logits = torch.zeros((n, 3, *shape), device=fixed.device, dtype=torch.float32)
        affine = torch.zeros((n, 3, 4), device=fixed.device, dtype=torch.float32) if self.settings.affine else None
        return NetworkOutputs(logits, affine)


def load_model(checkpoint: dict, device: str | torch.device = "cpu") -> RegistrationNet:
    """Rebuild a trained network from the dictionary `train` saves as model.pt."""
    model = RegistrationNet(ModelSettings(**checkpoint["model_settings"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval()


# ------------------------------------------------------------------ running the network fast

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class Acceleration:
    """How the network runs on a device; none of it changes what it computes beyond rounding.

    bf16: bfloat16 autocast of the convolutions, on CUDA and on CPU alike (one code path; on a
        CPU without native bf16 instructions it is slower than float32). See the module notes
        for what stays float32.
    channels_last: weights and inputs in the channels_last_3d (NDHWC) memory format, which
        tensor-core convolutions prefer.
    cudnn_benchmark: cuDNN times its convolution algorithms for each new input shape and keeps
        the fastest (CUDA only; ignored on CPU).
    compile: torch.compile the module: False, True (the default mode) or a mode name. Every new
        input shape compiles on its first call (minutes at paper scale on a GPU).
    """

    bf16: bool = False
    channels_last: bool = False
    cudnn_benchmark: bool = False
    compile: bool | str = False

    def __post_init__(self):
        if not isinstance(self.compile, bool) and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be true, false or one of {', '.join(COMPILE_MODES)}; got {self.compile!r}")

    @classmethod
    def from_config(cls, section: Mapping | None) -> "Acceleration":
        """The acceleration keys of a config section (train: or inference:); other keys are ignored."""
        section = section or {}
        return cls(**{f.name: section[f.name] for f in fields(cls) if f.name in section})

    @property
    def needs_warmup(self) -> bool:
        """Whether the first call of a shape is slower by design (compilation, autotuning)."""
        return bool(self.compile) or self.cudnn_benchmark

    def autocast(self, device: torch.device):
        """The autocast context of this device type (a no-op unless bf16)."""
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def prepare(self, model: nn.Module, device: torch.device) -> Callable[..., RegistrationOutput]:
        """Move `model` to `device` in the chosen memory format and return what to call: the
        compiled module, or `model` itself. `model` keeps its own parameter names (state_dict)."""
        if self.cudnn_benchmark and device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        model.to(device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last_3d)
        if self.compile:
            return torch.compile(model, mode=None if self.compile in (True, "default") else self.compile, dynamic=False)
        return model

    def inputs(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Input volumes (N, C, D, H, W) in the chosen memory format."""
        if not self.channels_last:
            return tensors
        return tuple(t.contiguous(memory_format=torch.channels_last_3d) for t in tensors)
