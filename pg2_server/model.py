"""PG2's generators as the official code builds them, and the model config saved with weights.

G1 (pose integration): residual U-Net with a fully connected bottleneck, input source image
(3) + target pose heat-maps (18), output a coarse image. G2 (refinement): U-Net without FC,
input G1's output + source image (6), output a difference map added to G1's output.
Layer by layer it follows the official TensorFlow release of PG2.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .keypoints import COUNT, NAMES
from .wire.protocol import Size

POSE_EMBEDDINGS = ("heatmaps", "ce", "hme")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild G1 and G2; saved as JSON next to the weights."""
    preset: str
    canvas: Size                      # the model's canvas in pixels, (width, height)
    base_width: int = 128             # channels of the first level; level i has base·(i+1)
    g1_levels: int = 5                # N in the paper: log2(H) - 2 for the official presets
    g2_levels: int = 3                # N - 2 in the official code
    z_dim: int = 64                   # G1's FC bottleneck
    g2_skip_finest: bool = False      # Market's G2 does not concatenate the finest skip
    pose_embedding: str = "heatmaps"  # "heatmaps" (default), "ce" or "hme" (paper ablations)
    heatmap_kind: str = "disk"        # "disk" (PG2, ±1) or "gaussian" (PATN, [0, 1])
    heatmap_radius: int = 4
    heatmap_sigma: float = 6.0
    keypoints: tuple[str, ...] = field(default=NAMES)

    def __post_init__(self) -> None:
        canvas = self.canvas
        if (not isinstance(canvas, (tuple, list)) or len(canvas) != 2
                or not all(_is_int(v) and v > 0 for v in canvas)):
            raise ValueError(f"canvas must be two positive integers (width, height), got {canvas!r}")
        object.__setattr__(self, "canvas", Size(*(int(v) for v in canvas)))
        if isinstance(self.keypoints, str) or not isinstance(self.keypoints, (tuple, list)):
            raise ValueError(f"keypoints must be a list of keypoint names, got {self.keypoints!r}")
        object.__setattr__(self, "keypoints", tuple(self.keypoints))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field that is inconsistent or of the wrong type."""
        for name in ("preset", "pose_embedding", "heatmap_kind"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("base_width", "g1_levels", "g2_levels", "z_dim", "heatmap_radius"):
            value = getattr(self, name)
            if not _is_int(value):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be ≥ 1, got {value}")
        if not isinstance(self.g2_skip_finest, bool):
            raise ValueError(f"g2_skip_finest must be true or false, got {self.g2_skip_finest!r}")
        sigma = self.heatmap_sigma
        if not (isinstance(sigma, numbers.Real) and not isinstance(sigma, bool)):
            raise ValueError(f"heatmap_sigma must be a number, got {sigma!r}")
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"heatmap_sigma must be a positive number, got {sigma}")
        width, height = self.canvas
        for levels, name in ((self.g1_levels, "g1_levels"), (self.g2_levels, "g2_levels")):
            step = 2 ** (levels - 1)
            if height % step or width % step:
                raise ValueError(f"canvas {width}×{height} (W×H) must be divisible by 2^({name}-1) = {step}")
        if self.pose_embedding not in POSE_EMBEDDINGS:
            raise ValueError(f"pose_embedding must be one of {POSE_EMBEDDINGS}, got {self.pose_embedding!r}")
        if self.heatmap_kind not in ("disk", "gaussian"):
            raise ValueError(f"heatmap_kind must be 'disk' or 'gaussian', got {self.heatmap_kind!r}")
        if tuple(self.keypoints) != NAMES:
            raise ValueError(f"keypoint order {list(self.keypoints)} differs from COCO-18 {list(NAMES)}")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["canvas"] = self.canvas._asdict()  # {"width": W, "height": H}: says its own order
        data["keypoints"] = list(self.keypoints)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """Read `to_dict`'s output, or the older layout whose "canvas" is a list [height, width]."""
        if not isinstance(data, dict):
            raise ValueError(f"the model config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known: {sorted(known)}")
        # Every field is saved; a default would build another network (or other inputs) than the
        # weights were trained with, and then the weights' shapes, not the file, would be blamed.
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data]
        if missing:
            raise ValueError(f"model config lacks {missing}: every field is saved with the weights, so the "
                             "file was edited or cut short; restore them from the run that trained the weights")
        data = dict(data)
        canvas = data.get("canvas")
        if isinstance(canvas, dict):
            if set(canvas) != {"width", "height"}:
                raise ValueError(f"canvas must be {{\"width\": W, \"height\": H}}, got {canvas}")
            data["canvas"] = Size(canvas["width"], canvas["height"])
        elif isinstance(canvas, (list, tuple)) and len(canvas) == 2:
            data["canvas"] = Size(width=canvas[1], height=canvas[0])
        else:
            raise ValueError(f"canvas must be {{\"width\": W, \"height\": H}}, got {canvas!r}")
        return cls(**data)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # The official Market-1501 network (128×64, N = 5).
    "market": ModelConfig("market", Size(64, 128), 128, 5, 3, 64, g2_skip_finest=True),
    # The official DeepFashion network (256×256, N = 6).
    "deepfashion": ModelConfig("deepfashion", Size(256, 256), 128, 6, 4, 64),
    # DeepFashion's 256×176 frame at full resolution: 5 G1 levels (176 = 11·16) and a width whose
    # fp16 checkpoint is small enough to bundle (7.3 M parameters, 13.9 MiB, 35 GFLOP per image).
    "fashion": ModelConfig("fashion", Size(176, 256), 32, 5, 4, 64),
    # Small enough to train on a CPU: the bundled default model (DeepFashion's 256×176 at ½).
    "demo": ModelConfig("demo", Size(88, 128), 16, 4, 2, 64),
    # For tests: milliseconds per forward pass.
    "tiny": ModelConfig("tiny", Size(16, 32), 8, 3, 1, 8),
}


def preset(name: str, **overrides) -> ModelConfig:
    """The named preset, optionally with fields replaced (e.g. pose_embedding="ce")."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2)


def _init_glorot(module: nn.Module) -> None:
    """Glorot-uniform weights and zero biases, as the official code's slim defaults."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def _upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


class _ResidualBlock(nn.Module):
    """Two 3×3 conv + ReLU with an identity shortcut around them (x + f(x))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = _conv(channels, channels)
        self.conv2 = _conv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.conv2(F.relu(self.conv1(x))))


class _ResidualEncoder(nn.Module):
    """G1's encoder: stem conv, then per level a residual block (kept as skip) and a stride-2 conv."""

    def __init__(self, in_channels: int, base: int, levels: int):
        super().__init__()
        self.stem = _conv(in_channels, base)
        self.blocks = nn.ModuleList(_ResidualBlock(base * (i + 1)) for i in range(levels))
        self.downs = nn.ModuleList(_conv(base * (i + 1), base * (i + 2), stride=2) for i in range(levels - 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        x = F.relu(self.stem(x))
        for i, block in enumerate(self.blocks):
            x = block(x)
            skips.append(x)
            if i < len(self.downs):
                x = F.relu(self.downs[i](x))
        return skips


class Generator1(nn.Module):
    """G1: residual U-Net with an FC bottleneck; (source, pose) → coarse target image."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        base, levels, z = config.base_width, config.g1_levels, config.z_dim
        width, height = config.canvas
        self.bottom = (height // 2 ** (levels - 1), width // 2 ** (levels - 1))
        bottom_pixels = self.bottom[0] * self.bottom[1]
        pose_in_image = config.pose_embedding == "heatmaps"
        self.encoder = _ResidualEncoder(3 + (COUNT if pose_in_image else 0), base, levels)
        self.fc_encode = nn.Linear(bottom_pixels * base * levels, z)
        embed = 0
        if config.pose_embedding == "ce":
            # Paper's "CE": keypoint coordinates through two FC layers, joined to the embedding.
            self.pose_fc = nn.Sequential(nn.Linear(2 * COUNT, 128), nn.ReLU(), nn.Linear(128, z))
            embed = z
        elif config.pose_embedding == "hme":
            # Paper's "HME": heat-maps through their own encoder and FC, joined to the embedding.
            self.pose_encoder = _ResidualEncoder(COUNT, base, levels)
            self.pose_fc = nn.Linear(bottom_pixels * base * levels, z)
            embed = z
        self.fc_decode = nn.Linear(z + embed, bottom_pixels * base)
        self.decoder = nn.ModuleList()
        self.reduce = nn.ModuleList()
        channels = base
        for i in range(levels):
            channels += base * (levels - i)     # concatenated skip of the matching level
            self.decoder.append(_ResidualBlock(channels))
            if i < levels - 1:
                self.reduce.append(_conv(channels, base * (levels - i - 1), kernel=1))
                channels = base * (levels - i - 1)
        self.out = _conv(channels, 3)
        _init_glorot(self)

    def forward(self, source: torch.Tensor, heatmaps: torch.Tensor,
                coordinates: torch.Tensor | None = None) -> torch.Tensor:
        """source (B, 3, H, W) in [-1, 1], heatmaps (B, 18, H, W); coordinates (B, 36) for CE."""
        embedding = self.config.pose_embedding
        x = torch.cat([source, heatmaps], 1) if embedding == "heatmaps" else source
        skips = self.encoder(x)
        z = self.fc_encode(skips[-1].flatten(1))
        if embedding == "ce":
            if coordinates is None:
                raise ValueError("the CE pose embedding needs keypoint coordinates (B, 36)")
            z = torch.cat([z, self.pose_fc(coordinates)], 1)
        elif embedding == "hme":
            z = torch.cat([z, self.pose_fc(self.pose_encoder(heatmaps)[-1].flatten(1))], 1)
        x = self.fc_decode(z).view(-1, self.config.base_width, *self.bottom)
        for i, block in enumerate(self.decoder):
            x = block(torch.cat([x, skips[-1 - i]], 1))
            if i < len(self.reduce):
                x = F.relu(self.reduce[i](_upsample(x)))
        return self.out(x)


class Generator2(nn.Module):
    """G2: U-Net without FC or shortcuts; (G1 output, source) → difference map."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        base, levels = config.base_width, config.g2_levels
        self.stem = _conv(6, base)
        self.encoder = nn.ModuleList()
        self.downs = nn.ModuleList()
        channels = base
        for i in range(levels):
            width = base * (i + 1)
            self.encoder.append(nn.ModuleList([_conv(channels, width), _conv(width, width)]))
            channels = width
            if i < levels - 1:
                self.downs.append(_conv(width, width, stride=2))
        self.decoder = nn.ModuleList()
        for i in range(levels):
            skip = 0 if (config.g2_skip_finest and i == levels - 1) else base * (levels - i)
            self.decoder.append(nn.ModuleList([_conv(channels + skip, base), _conv(base, base)]))
            channels = base
        self.out = _conv(base, 3)
        _init_glorot(self)

    def forward(self, coarse: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(torch.cat([coarse, source], 1)))
        skips = []
        for i, (conv1, conv2) in enumerate(self.encoder):
            x = F.relu(conv2(F.relu(conv1(x))))
            skips.append(x)
            if i < len(self.downs):
                x = F.relu(self.downs[i](x))
        levels = len(self.decoder)
        for i, (conv1, conv2) in enumerate(self.decoder):
            if not (self.config.g2_skip_finest and i == levels - 1):
                x = torch.cat([x, skips[-1 - i]], 1)
            x = F.relu(conv2(F.relu(conv1(x))))
            if i < levels - 1:
                x = _upsample(x)
        return self.out(x)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_flops(config: ModelConfig) -> dict[str, int]:
    """FLOPs per image (2 per multiply-add) of G1 and G2, measured with FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    width, height = config.canvas
    with torch.device("meta"):  # shapes only: counting costs no compute or memory
        g1, g2 = Generator1(config), Generator2(config)
        source = torch.zeros(1, 3, height, width)
        pose = torch.zeros(1, COUNT, height, width)
        coords = torch.zeros(1, 2 * COUNT)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter1:
            coarse = g1(source, pose, coords)
        with FlopCounterMode(display=False) as counter2:
            g2(coarse, source)
    return {"g1": int(counter1.get_total_flops()), "g2": int(counter2.get_total_flops())}
