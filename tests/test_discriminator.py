"""training/discriminator.py: the official DCGAN D on any canvas, and the paper's pair D."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pg2_server.model import PRESETS
from pg2_server.wire.protocol import Size
from training.discriminator import Discriminator, DiscriminatorConfig


@pytest.mark.parametrize("name, layers", [("market", 4), ("deepfashion", 5), ("demo", 4), ("tiny", 4)])
def test_one_logit_per_image_on_every_canvas(name, layers):
    canvas = PRESETS[name].canvas
    with torch.device("meta"):
        d = Discriminator(DiscriminatorConfig(canvas, layers))
        logits = d(torch.zeros(3, 3, canvas.height, canvas.width))
    assert logits.shape == (3,)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 512][:layers]
    assert all(c.kernel_size == (5, 5) and c.stride == (2, 2) for c in convs)
    side = (math.ceil(canvas[0] / 2 ** layers), math.ceil(canvas[1] / 2 ** layers))
    assert d.logit.in_features == 512 * side[0] * side[1]


def test_batch_norm_on_all_but_the_first_and_leaky_relu():
    d = Discriminator(DiscriminatorConfig(Size(16, 32), 4, 8))
    kinds = [type(m).__name__ for m in d.features]
    assert kinds == ["Conv2d", "LeakyReLU", "Conv2d", "BatchNorm2d", "LeakyReLU", "Conv2d", "BatchNorm2d",
                     "LeakyReLU", "Conv2d", "BatchNorm2d", "LeakyReLU"]
    assert all(m.negative_slope == 0.2 for m in d.features if isinstance(m, nn.LeakyReLU))


def test_initialisation_uniform_with_std_002():
    torch.manual_seed(0)
    d = Discriminator(DiscriminatorConfig(Size(64, 128), 4))
    weights = torch.cat([m.weight.flatten() for m in d.modules() if isinstance(m, (nn.Conv2d, nn.Linear))])
    bound = 0.02 * math.sqrt(3)
    assert weights.abs().max() <= bound
    assert weights.std().item() == pytest.approx(0.02, rel=0.02)
    assert all((m.bias == 0).all() for m in d.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def test_pair_discriminator_takes_source_and_image():
    d = Discriminator(DiscriminatorConfig(Size(16, 32), 4, 8, kind="pair"))
    assert d.features[0].in_channels == 6
    image, source = torch.rand(2, 3, 32, 16), torch.rand(2, 3, 32, 16)
    assert d(image, source).shape == (2,)
    with pytest.raises(ValueError, match="needs the source"):
        d(image)
    with pytest.raises(ValueError, match="kind"):
        DiscriminatorConfig(Size(16, 32), kind="patch")
