"""Synthetic looks: skin tone, hair and garments (upper, lower, shoes) painted as vertex colours.

Garment regions come from the body part of each vertex (its dominant skinning bone) and where it
lies along its limb in the rest pose; patterns are functions of rest-pose coordinates, so they
move with the body when it is posed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .synth_body import ARM, EYE, FOOT, HAND, HEAD, LEG, TORSO

PATTERNS = ("plain", "stripes", "checks", "print")

# Skin tones, light to dark (sRGB 0–255), after the Monk skin tone scale.
_SKIN = np.array([[246, 237, 228], [243, 231, 219], [247, 234, 208], [234, 218, 186],
                  [215, 189, 150], [160, 126, 86], [130, 92, 67], [96, 65, 52],
                  [58, 49, 42], [41, 36, 32]], float)
_HAIR = np.array([[20, 17, 15], [44, 34, 29], [80, 55, 35], [113, 77, 45], [167, 133, 90],
                  [220, 190, 130], [150, 60, 30], [180, 180, 180], [90, 90, 95]], float)


@dataclass(frozen=True)
class Garment:
    """A garment's look: main and second colour (sRGB 0–1), pattern and its scale in metres."""
    colour: tuple[float, float, float]
    second: tuple[float, float, float]
    pattern: str
    scale: float
    phase: float


@dataclass(frozen=True)
class Look:
    """Everything that makes an identity recognisable apart from its body shape."""
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    hair_style: str  # "short", "long" or "bald"
    upper: Garment
    lower: Garment
    shoes: Garment
    sleeve: float  # fraction of the arm (shoulder → wrist) the upper garment covers
    leg_length: float  # fraction of the leg (hip → ankle) the lower garment covers


def _colour(rng: np.random.Generator) -> tuple[float, float, float]:
    """A garment colour: some greys and darks as in real wardrobes, the rest saturated hues."""
    kind = rng.random()
    if kind < 0.25:
        v = rng.uniform(0.05, 0.95)
        return (v, v, v)
    hue = rng.uniform(0, 1)
    sat = rng.uniform(0.35, 0.95)
    val = rng.uniform(0.25, 0.95)
    i = int(hue * 6) % 6
    f = hue * 6 - int(hue * 6)
    p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
    return [(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)][i]


def _garment(rng: np.random.Generator, patterns=PATTERNS, weights=(0.4, 0.2, 0.2, 0.2)) -> Garment:
    pattern = str(rng.choice(patterns, p=weights))
    return Garment(_colour(rng), _colour(rng), pattern, float(rng.uniform(0.03, 0.08)),
                   float(rng.uniform(0, 1)))


def sample_look(rng: np.random.Generator, female: bool) -> Look:
    """A random identity's look."""
    skin = _SKIN[rng.integers(len(_SKIN))] * rng.uniform(0.95, 1.05, 3)
    hair = _HAIR[rng.integers(len(_HAIR))]
    styles, p = ("short", "long", "bald"), ((0.3, 0.68, 0.02) if female else (0.85, 0.07, 0.08))
    return Look(
        skin=tuple(float(c) for c in np.clip(skin / 255, 0, 1)),
        hair=tuple(float(c) for c in hair / 255),
        hair_style=str(rng.choice(styles, p=p)),
        upper=_garment(rng),
        lower=_garment(rng, weights=(0.7, 0.1, 0.1, 0.1)),
        shoes=_garment(rng, weights=(0.85, 0.15, 0.0, 0.0)),
        sleeve=float(rng.choice([0.05, 0.4, 0.75, 0.98], p=[0.15, 0.4, 0.1, 0.35])),
        leg_length=float(rng.choice([0.35, 0.55, 0.97], p=[0.2, 0.15, 0.65])),
    )


def _along(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Position of each point along the segment start → end, 0 at start, 1 at end."""
    axis = end - start
    return (points - start) @ axis / (axis @ axis)


def _pattern(g: Garment, p: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Blend weight (0 = main colour, 1 = second colour) of the garment pattern at rest points p."""
    height = p[:, 2] / g.scale + g.phase
    if g.pattern == "plain":
        return np.zeros(len(p))
    if g.pattern == "stripes":
        return (np.floor(height) % 2).astype(float)
    # arc length around the vertical axis through the body (or limb) centre
    around = np.arctan2(p[:, 0] - centre[0], p[:, 1] - centre[1]) * 0.15 / g.scale
    if g.pattern == "checks":
        return ((np.floor(height) + np.floor(around)) % 2).astype(float)
    # print: dots on a jittered lattice
    u, v = height * 1.5, around * 1.5
    du, dv = u - np.round(u), v - np.round(v + 0.5 * (np.round(u) % 2))
    return (du * du + dv * dv < 0.09).astype(float)


def vertex_colours(look: Look, rest: np.ndarray, parts: np.ndarray, rest_joints: np.ndarray) -> np.ndarray:
    """Linear-RGB colour per vertex (V,4) for a body in its rest pose with COCO-18 joints."""
    j = rest_joints
    colours = np.tile(np.array(look.skin), (len(rest), 1))
    upper = parts == TORSO
    shoulder_z = (j[2, 2] + j[5, 2]) / 2
    hip_z = (j[8, 2] + j[11, 2]) / 2
    waist_z = hip_z + 0.3 * (shoulder_z - hip_z)
    # Necklines: the torso above the shoulders is neck skin; a scoop at the front.
    neck = (parts == TORSO) & ((rest[:, 2] > shoulder_z + 0.02)
                              | ((rest[:, 2] > shoulder_z - 0.07) & (np.abs(rest[:, 0] - j[1, 0]) < 0.07)
                                 & (rest[:, 1] < j[1, 1])))
    upper &= ~neck & (rest[:, 2] >= waist_z)
    lower = (parts == TORSO) & (rest[:, 2] < waist_z)
    shoes = parts == FOOT
    for shoulder, wrist in ((2, 4), (5, 7)):
        side = np.sign(rest[:, 0]) == np.sign(j[shoulder, 0])
        t = _along(rest, j[shoulder], j[wrist])
        upper |= (parts == ARM) & side & (t < look.sleeve)
    for hip, ankle in ((8, 10), (11, 13)):
        side = np.sign(rest[:, 0]) == np.sign(j[hip, 0])
        t = _along(rest, j[hip], j[ankle])
        leg = (parts == LEG) & side
        lower |= leg & (t < look.leg_length)
        shoes |= leg & (t > 0.96)
    centre = (j[8] + j[11]) / 2
    for mask, garment in ((upper, look.upper), (lower, look.lower), (shoes, look.shoes)):
        w = _pattern(garment, rest[mask], centre)[:, None]
        colours[mask] = (1 - w) * np.array(garment.colour) + w * np.array(garment.second)
    if look.hair_style != "bald":
        head = (parts == HEAD) | ((parts == TORSO) & (rest[:, 2] > shoulder_z + 0.02))
        ears = (j[16] + j[17]) / 2
        rel = rest - ears
        eyes_z = (j[14, 2] + j[15, 2]) / 2 - ears[2]
        # A cap over the skull down to the brow at the front and the nape at the back.
        hair = head & ((rel[:, 2] > eyes_z + 0.035) | ((rel[:, 1] > 0.02) & (rel[:, 2] > -0.05)))
        if look.hair_style == "long":
            hair |= head & (rel[:, 1] > -0.01) & (rel[:, 2] > -0.16)
        colours[hair] = look.hair
    colours[parts == EYE] = (0.08, 0.06, 0.05)
    rgba = np.ones((len(rest), 4))
    rgba[:, :3] = _srgb_to_linear(colours)
    return rgba.astype(np.float32)


def _srgb_to_linear(c: np.ndarray) -> np.ndarray:
    c = np.clip(c, 0, 1)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
