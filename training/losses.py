"""PG2's losses: the pose-mask L1 of stage 1 and the adversarial losses of stage 2.

All adversarial terms are binary cross-entropy on logits (a sigmoid followed by BCELoss is a
known porting bug: it saturates). With the code's D, real targets, real sources and generated
images go through D in one batch, so batch norm sees all three together.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .discriminator import Discriminator

RECONSTRUCTION_LOSSES = ("pose-mask", "l1")


def reconstruction_loss(generated: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                        kind: str = "pose-mask") -> torch.Tensor:
    """"pose-mask": mean|G − I_B| + mean(|G − I_B| ⊙ M_B) = L1 ⊙ (1 + M_B); "l1": mean|G − I_B|."""
    difference = (generated.float() - target.float()).abs()
    if kind == "l1":
        return difference.mean()
    if kind == "pose-mask":
        return difference.mean() + (difference * mask).mean()
    raise ValueError(f"reconstruction loss must be one of {RECONSTRUCTION_LOSSES}, got {kind!r}")


def _bce(logits: torch.Tensor, real: bool) -> torch.Tensor:
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 1.0 if real else 0.0))


def discriminator_logits(d: Discriminator | torch.nn.Module, target: torch.Tensor, source: torch.Tensor,
                         generated: torch.Tensor, kind: str) -> tuple[torch.Tensor, ...]:
    """One D forward pass over the whole batch; returns logits (real, source, generated).

    For the pair-conditioned D the source logits are None (the paper has no such negative).
    """
    batch = len(target)
    if kind == "pair":
        logits = d(torch.cat([target, generated]), torch.cat([source, source]))
        return logits[:batch], None, logits[batch:]
    logits = d(torch.cat([target, source, generated]))
    return logits[:batch], logits[batch:2 * batch], logits[2 * batch:]


def discriminator_loss(real: torch.Tensor, source: torch.Tensor | None, generated: torch.Tensor) -> torch.Tensor:
    """Code: 0.5·BCE(D(I_B),1) + 0.25·BCE(D(I_A),0) + 0.25·BCE(D(G),0); paper's pair D: ½ + ½.

    DeepFashion's ½[BCE(D(I_B),1) + mean BCE(D([G; I_A]),0)] is the same number for equal batches.
    """
    if source is None:
        return 0.5 * _bce(real, True) + 0.5 * _bce(generated, False)
    return 0.5 * _bce(real, True) + 0.25 * _bce(source, False) + 0.25 * _bce(generated, False)


def generator_adversarial_loss(generated: torch.Tensor) -> torch.Tensor:
    """BCE(D(G), 1): the generator wants its images called real (the paper, and the Market code).

    The DeepFashion code averages BCE(·, 1) over [D(G); D(I_A)]: the source half is a constant
    for G, so its GAN gradient is half of this one, and its λ = 50 weighs L1 as λ = 100 does here.
    """
    return _bce(generated, True)
