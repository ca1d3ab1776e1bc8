"""training/losses.py: pose-mask L1 and the BCE-on-logits adversarial terms, by hand."""
from __future__ import annotations

import math

import pytest
import torch

from pg2_server.wire.protocol import Size
from training.discriminator import Discriminator, DiscriminatorConfig
from training.losses import discriminator_logits, discriminator_loss, generator_adversarial_loss, \
    reconstruction_loss


def test_pose_mask_l1_is_l1_times_one_plus_mask():
    generated = torch.zeros(1, 3, 2, 2)
    target = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    mask = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 2, 2)
    assert reconstruction_loss(generated, target, mask, "l1").item() == pytest.approx(2.5)
    # mean(|d| · (1 + M)) = (2 + 2 + 3 + 8) / 4
    assert reconstruction_loss(generated, target, mask).item() == pytest.approx(15 / 4)
    with pytest.raises(ValueError, match="pose-mask"):
        reconstruction_loss(generated, target, mask, "l2")


def _bce(logit, real):
    p = 1 / (1 + math.exp(-logit))
    return -math.log(p if real else 1 - p)


def test_code_discriminator_loss_weights_real_source_and_generated():
    real, source, generated = torch.tensor([2.0]), torch.tensor([-1.0]), torch.tensor([0.5])
    expected = 0.5 * _bce(2.0, True) + 0.25 * _bce(-1.0, False) + 0.25 * _bce(0.5, False)
    assert discriminator_loss(real, source, generated).item() == pytest.approx(expected, rel=1e-6)
    paper = 0.5 * _bce(2.0, True) + 0.5 * _bce(0.5, False)
    assert discriminator_loss(real, None, generated).item() == pytest.approx(paper, rel=1e-6)
    assert generator_adversarial_loss(torch.tensor([0.5])).item() == pytest.approx(_bce(0.5, True), rel=1e-6)
    # Saturated logits stay finite (a sigmoid + BCELoss would clamp or give inf).
    assert math.isfinite(generator_adversarial_loss(torch.tensor([-200.0])).item())


def test_all_images_go_through_d_in_one_batch():
    calls = []

    class Recording(torch.nn.Module):
        def forward(self, images, sources=None):
            calls.append((images.shape[0], None if sources is None else sources.shape[0]))
            return images.flatten(1).mean(1)

    target, source, generated = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4), torch.full((2, 3, 4, 4), 2.0)
    real, src, gen = discriminator_logits(Recording(), target, source, generated, "source-negative")
    assert calls == [(6, None)]
    assert real.tolist() == [0, 0] and src.tolist() == [1, 1] and gen.tolist() == [2, 2]
    calls.clear()
    real, src, gen = discriminator_logits(Recording(), target, source, generated, "pair")
    assert calls == [(4, 4)] and src is None and gen.tolist() == [2, 2]


def test_losses_backpropagate_through_a_real_discriminator():
    d = Discriminator(DiscriminatorConfig(Size(16, 32), 4, 8))
    generated = torch.rand(2, 3, 32, 16, requires_grad=True)
    _, _, logits = discriminator_logits(d, torch.rand(2, 3, 32, 16), torch.rand(2, 3, 32, 16), generated,
                                        "source-negative")
    generator_adversarial_loss(logits).backward()
    assert generated.grad is not None and generated.grad.abs().sum() > 0
