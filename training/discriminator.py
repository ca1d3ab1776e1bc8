"""PG2's discriminator: the official code's DCGAN D, or the paper's pair-conditioned variant.

5×5 stride-2 convolutions 64-128-256-512 (a fifth 512 for DeepFashion), batch norm on all but
the first, LeakyReLU 0.2, then a linear layer to one logit; weights uniform ±0.02·√3. Works on
any canvas: each conv halves the side (rounding up) and the linear layer takes what is left.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pg2_server.wire.protocol import Size

D_KINDS = ("source-negative", "pair")


@dataclass(frozen=True)
class DiscriminatorConfig:
    """`kind`: "source-negative" (code: one image in, the source as extra negative) or "pair"
    (paper: source and image concatenated)."""
    canvas: Size  # (width, height)
    layers: int = 4
    base_width: int = 64
    kind: str = "source-negative"

    def __post_init__(self) -> None:
        object.__setattr__(self, "canvas", Size(*(int(v) for v in self.canvas)))
        if self.kind not in D_KINDS:
            raise ValueError(f"discriminator kind must be one of {D_KINDS}, got {self.kind!r}")
        if self.layers < 1 or self.base_width < 1:
            raise ValueError("discriminator layers and base_width must be positive")


class Discriminator(nn.Module):
    """Image (or source + image for "pair") → one real/fake logit per sample."""

    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        self.config = config
        channels = 6 if config.kind == "pair" else 3
        layers: list[nn.Module] = []
        width, height = config.canvas
        for i in range(config.layers):
            out = config.base_width * 2 ** min(i, 3)   # 64-128-256-512, then 512 again
            layers.append(nn.Conv2d(channels, out, 5, stride=2, padding=2))
            if i > 0:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.LeakyReLU(0.2))
            channels = out
            height, width = math.ceil(height / 2), math.ceil(width / 2)
        self.features = nn.Sequential(*layers)
        self.logit = nn.Linear(channels * height * width, 1)
        bound = 0.02 * math.sqrt(3)  # uniform with standard deviation 0.02, as the official init
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward(self, image: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        if self.config.kind == "pair":
            if source is None:
                raise ValueError("the pair-conditioned discriminator needs the source image")
            image = torch.cat([source, image], 1)
        return self.logit(self.features(image).flatten(1)).squeeze(1)
