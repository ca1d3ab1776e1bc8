"""Synthetic looks: skin tone, hair and garments (upper, lower, shoes) painted as vertex colours.

Garment regions come from the body part of each vertex (its dominant skinning bone) and where it
lies along its limb in the rest pose; patterns are functions of rest-pose coordinates, so they
move with the body when it is posed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .synth_body import ARM, EYE, FOOT, HAND, HEAD, LEG, TORSO

PATTERNS = ("plain", "stripes", "checks", "print", "floral", "denim", "knit", "graphic")
TOPS = ("tee", "tank", "shirt", "knit", "hoodie")
LOWERS = ("trousers", "jeans", "shorts", "skirt", "dress")
HAIR_STYLES = ("short", "bob", "shoulder", "long", "ponytail", "bun", "bald")
ACCESSORIES = ("bag", "beanie", "sunglasses", "necklace")

# Skin tones, light to dark (sRGB 0–255), after the Monk skin tone scale.
_SKIN = np.array([[246, 237, 228], [243, 231, 219], [247, 234, 208], [234, 218, 186],
                  [215, 189, 150], [160, 126, 86], [130, 92, 67], [96, 65, 52],
                  [58, 49, 42], [41, 36, 32]], float)
_HAIR = np.array([[20, 17, 15], [44, 34, 29], [80, 55, 35], [113, 77, 45], [167, 133, 90],
                  [220, 190, 130], [150, 60, 30], [180, 180, 180], [90, 90, 95]], float)
_IRIS = np.array([[60, 38, 22], [95, 60, 30], [40, 28, 20], [70, 100, 130], [80, 110, 70]], float)
_DENIM = ((0.16, 0.24, 0.42), (0.28, 0.38, 0.58), (0.45, 0.55, 0.72), (0.1, 0.1, 0.13), (0.88, 0.88, 0.86))


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
    """Everything that makes an identity recognisable apart from its body shape.

    The first fields are what the flat (Workbench) look paints on the skin; the others shape
    the garments, hair and accessories that the photo-like renders build as meshes."""
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    hair_style: str  # one of HAIR_STYLES
    upper: Garment
    lower: Garment
    shoes: Garment
    sleeve: float  # fraction of the arm (shoulder → wrist) the upper garment covers
    leg_length: float  # fraction of the leg (hip → ankle) the lower garment (or skirt) covers
    top_kind: str = "tee"
    top_offset: float = 0.009  # how far the top stands off the skin (m): thin tee to thick knit
    sleeve_flare: float = 0.0  # widening per unit of arm length below the elbow: wide and bell sleeves
    untucked: bool = False
    outer: Garment | None = None  # an open jacket or cardigan over the top
    lower_kind: str = "trousers"
    leg_width: float = 0.0  # 0: slim (follows the leg); > 0 straight to wide legs (flare per leg length)
    skirt_flare: float = 0.0  # radius gained per metre below the waist
    accessories: tuple[str, ...] = ()
    bag_side: int = 1
    iris: tuple[float, float, float] = (0.25, 0.15, 0.08)
    lips: tuple[float, float, float] = (0.7, 0.4, 0.4)


def _colour(rng: np.random.Generator) -> tuple[float, float, float]:
    """A garment colour: whites and light neutrals common (as in fashion shops), some greys and
    darks, the rest hues."""
    kind = rng.random()
    if kind < 0.3:  # white, cream, pale grey
        v = rng.uniform(0.82, 0.98)
        tint = rng.normal(0, 0.015, 3) + np.array([0.0, -0.005, -0.02]) * rng.random()
        return tuple(float(c) for c in np.clip(v + tint, 0, 1))
    if kind < 0.5:
        v = rng.uniform(0.05, 0.8)
        return (v, v, v)
    hue = rng.uniform(0, 1)
    sat = rng.uniform(0.2, 0.9)
    val = rng.uniform(0.3, 0.95)
    i = int(hue * 6) % 6
    f = hue * 6 - int(hue * 6)
    p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
    return [(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)][i]


def _garment(rng: np.random.Generator, weights: dict[str, float]) -> Garment:
    names = list(weights)
    p = np.array([weights[n] for n in names])
    pattern = str(rng.choice(names, p=p / p.sum()))
    colour, second = _colour(rng), _colour(rng)
    if pattern == "denim":
        colour = _DENIM[int(rng.integers(len(_DENIM)))]
    scale = float(rng.uniform(0.03, 0.08)) if pattern != "graphic" else float(rng.uniform(0.02, 0.04))
    return Garment(colour, second, pattern, scale, float(rng.uniform(0, 1)))


def sample_look(rng: np.random.Generator, female: bool) -> Look:
    """A random identity's look."""
    skin = _SKIN[rng.integers(len(_SKIN))] * rng.uniform(0.95, 1.05, 3)
    hair = _HAIR[rng.integers(len(_HAIR))]
    if female:
        style_p = (0.1, 0.15, 0.2, 0.3, 0.15, 0.09, 0.01)
    else:
        style_p = (0.8, 0.03, 0.04, 0.03, 0.02, 0.0, 0.08)
    hair_style = str(rng.choice(HAIR_STYLES, p=style_p))
    top_kind = str(rng.choice(TOPS, p=(0.35, 0.12, 0.25, 0.15, 0.13)))
    top_patterns = {"plain": 0.4, "stripes": 0.12, "checks": 0.08, "print": 0.08, "floral": 0.1,
                    "knit": 0.04, "graphic": 0.14, "denim": 0.04}
    if top_kind == "knit":
        top_patterns = {"knit": 0.7, "plain": 0.2, "stripes": 0.1}
    upper = _garment(rng, top_patterns)
    lower_p = (0.3, 0.28, 0.1, 0.2, 0.12) if female else (0.5, 0.38, 0.12, 0.0, 0.0)
    lower_kind = str(rng.choice(LOWERS, p=lower_p))
    if lower_kind == "jeans":
        lower = _garment(rng, {"denim": 1.0})
    elif lower_kind == "dress":
        lower = upper
    else:
        lower = _garment(rng, {"plain": 0.55, "checks": 0.1, "stripes": 0.1, "print": 0.08, "floral": 0.1,
                               "denim": 0.07})
    shoes = _garment(rng, {"plain": 1.0})
    sleeve = {"tank": 0.05, "hoodie": 0.98}.get(top_kind)
    if sleeve is None:
        sleeve = float(rng.choice([0.05, 0.4, 0.75, 0.98], p=[0.1, 0.4, 0.15, 0.35]))
    flare = 0.0
    if sleeve > 0.5 and top_kind in ("shirt", "tee") and rng.random() < 0.35:
        flare = float(rng.uniform(0.03, 0.14))  # wide to bell sleeves (radius gained per arm length)
    if lower_kind in ("skirt", "dress"):
        leg_length = float(rng.choice([0.3, 0.5, 0.72, 0.92], p=[0.3, 0.3, 0.25, 0.15]))  # mini..maxi
        skirt_flare = float(rng.choice([0.0, rng.uniform(0.05, 0.2), rng.uniform(0.2, 0.6)], p=[0.3, 0.4, 0.3]))
        leg_width = 0.0
    else:
        leg_length = 0.35 if lower_kind == "shorts" else float(rng.uniform(0.9, 0.97))
        skirt_flare = 0.0
        leg_width = float(rng.choice([0.0, rng.uniform(0.0, 0.05), rng.uniform(0.05, 0.2)], p=[0.45, 0.3, 0.25]))
    outer = None
    if top_kind in ("tee", "tank", "shirt", "knit") and lower_kind != "dress" and rng.random() < 0.22:
        outer = _garment(rng, {"plain": 0.6, "denim": 0.15, "knit": 0.15, "checks": 0.1})
        sleeve = 0.98
        flare = 0.0
    accessories = tuple(a for a, p in zip(ACCESSORIES, (0.15, 0.07, 0.07, 0.12 if female else 0.03))
                        if rng.random() < p)
    return Look(
        skin=tuple(float(c) for c in np.clip(skin / 255, 0, 1)),
        hair=tuple(float(c) for c in hair / 255),
        hair_style=hair_style,
        upper=upper, lower=lower, shoes=shoes, sleeve=float(sleeve), leg_length=leg_length,
        top_kind=top_kind,
        top_offset={"tank": 0.008, "tee": 0.009, "shirt": 0.011, "knit": 0.015, "hoodie": 0.02}[top_kind],
        sleeve_flare=flare, untucked=bool(rng.random() < 0.5), outer=outer, lower_kind=lower_kind,
        leg_width=leg_width, skirt_flare=skirt_flare, accessories=accessories,
        bag_side=1 if rng.random() < 0.5 else -1,
        iris=tuple(float(c) for c in _IRIS[rng.integers(len(_IRIS))] / 255),
        lips=tuple(float(c) for c in np.clip(skin / 255 * np.array([0.85, 0.55, 0.55])
                                             + rng.uniform(0, 0.12) * np.array([0.5, 0, 0.1]), 0, 1)),
    )


def _along(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Position of each point along the segment start → end, 0 at start, 1 at end."""
    axis = end - start
    return (points - start) @ axis / (axis @ axis)


def _pattern(g: Garment, p: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Blend weight (0 = main colour, 1 = second colour) of the garment pattern at rest points p."""
    height = p[:, 2] / g.scale + g.phase
    if g.pattern in ("plain", "denim", "knit", "graphic"):
        return np.zeros(len(p))
    if g.pattern == "stripes":
        return (np.floor(height) % 2).astype(float)
    # arc length around the vertical axis through the body (or limb) centre
    around = np.arctan2(p[:, 0] - centre[0], p[:, 1] - centre[1]) * 0.15 / g.scale
    if g.pattern == "checks":
        return ((np.floor(height) + np.floor(around)) % 2).astype(float)
    # print (and florals): dots on a jittered lattice
    u, v = height * 1.5, around * 1.5
    du, dv = u - np.round(u), v - np.round(v + 0.5 * (np.round(u) % 2))
    return (du * du + dv * dv < 0.09).astype(float)


def garment_regions(look: Look, rest: np.ndarray, parts: np.ndarray, rest_joints: np.ndarray) -> dict[str, np.ndarray]:
    """Vertex masks (V,) of the rest body that each garment, the hair and accessories cover."""
    j = rest_joints
    shoulder_z = (j[2, 2] + j[5, 2]) / 2
    hip_z = (j[8, 2] + j[11, 2]) / 2
    waist_z = hip_z + 0.3 * (shoulder_z - hip_z)
    x, y, z = rest[:, 0], rest[:, 1], rest[:, 2]
    torso = parts == TORSO
    # Necklines: the torso above the shoulders is neck skin; a scoop at the front (deeper for tanks).
    scoop = 0.11 if look.top_kind == "tank" else 0.07
    neck = torso & ((z > shoulder_z + 0.02)
                    | ((z > shoulder_z - scoop) & (np.abs(x - j[1, 0]) < 0.07) & (y < j[1, 1])))
    if look.top_kind == "hoodie":
        neck = torso & (z > shoulder_z + 0.05)
    hem_z = hip_z - 0.04 if look.untucked and look.lower_kind != "dress" else waist_z
    upper = torso & ~neck & (z >= hem_z)
    pelvis = torso & (z < waist_z + 0.01)
    lower = pelvis.copy()
    shoes = parts == FOOT
    arms = np.zeros(len(rest), bool)
    for shoulder, wrist in ((2, 4), (5, 7)):
        side = np.sign(x) == np.sign(j[shoulder, 0])
        t = _along(rest, j[shoulder], j[wrist])
        upper |= (parts == ARM) & side & (t < look.sleeve)
        arms |= (parts == ARM) & side & (t < 0.97)
    painted_leg = look.leg_length if look.lower_kind not in ("skirt", "dress") else 0.15
    for hip, ankle in ((8, 10), (11, 13)):
        side = np.sign(x) == np.sign(j[hip, 0])
        t = _along(rest, j[hip], j[ankle])
        leg = (parts == LEG) & side
        lower |= leg & (t < painted_leg)
        pelvis |= leg & (t < 0.12)
        shoes |= leg & (t > 0.96)
    head = (parts == HEAD) | (torso & (z > shoulder_z + 0.02))
    ears = (j[16] + j[17]) / 2
    rel = rest - ears
    eyes_z = (j[14, 2] + j[15, 2]) / 2 - ears[2]
    # A cap over the skull down to the brow at the front and the nape at the back.
    scalp = head & ((rel[:, 2] > eyes_z + 0.035) | ((rel[:, 1] > 0.02) & (rel[:, 2] > -0.05)))
    if look.hair_style in ("long", "shoulder", "bob"):
        scalp |= head & (rel[:, 1] > -0.01) & (rel[:, 2] > -0.16)
    beanie = head & (rel[:, 2] > eyes_z + 0.022)
    eye_y = min(j[14, 1], j[15, 1])
    glasses = head & (np.abs(z - j[14, 2]) < 0.02) & (y < eye_y + 0.025) & (np.abs(x - j[0, 0]) < 0.075)
    centre = (j[8] + j[11]) / 2
    back = y > centre[1]
    hood = (torso | head) & back & (z > shoulder_z - 0.08) & (z < shoulder_z + 0.1) & (np.abs(x - j[1, 0]) < 0.13)
    front_open = ~back & (np.abs(x - j[1, 0]) < 0.055 + 0.05 * np.clip((z - waist_z) / (shoulder_z - waist_z), 0, 1))
    outer = ((torso & ~neck & (z > hip_z - 0.1) & ~front_open) | arms) & ~(head)
    # a sphere's shell above the shoulders, where it crosses the base of the neck and the chest above the
    # neckline (it crosses the jaw too: the torso only), a band wide enough for the body's coarse triangles
    base = np.array([j[1, 0], j[1, 1], shoulder_z + 0.05])
    distance = np.linalg.norm(rest - base, axis=1)
    necklace = torso & ~back & (z < shoulder_z + 0.03) \
        & (np.abs(distance - (0.1 if look.top_kind != "tank" else 0.13)) < 0.012)
    side = float(look.bag_side)  # strap over the opposite shoulder, across the chest to this hip
    strap = torso & (np.abs((x - j[1, 0]) * side * 0.8 + (z - (shoulder_z + hip_z) / 2) * 0.6) < 0.018) \
        & (z < shoulder_z + 0.06) & (z > hip_z)
    return {"upper": upper, "lower": lower, "pelvis": pelvis, "shoes": shoes, "scalp": scalp, "hood": hood,
            "outer": outer, "beanie": beanie, "glasses": glasses, "necklace": necklace, "strap": strap,
            "head": head}


def vertex_colours(look: Look, rest: np.ndarray, parts: np.ndarray, rest_joints: np.ndarray) -> np.ndarray:
    """Linear-RGB colour per vertex (V,4) for a body in its rest pose with COCO-18 joints: the skin
    with garments and hair painted on (the flat look, and what shows if skin pokes through a
    garment mesh), brows and eyes."""
    j = rest_joints
    regions = garment_regions(look, rest, parts, rest_joints)
    colours = np.tile(np.array(look.skin), (len(rest), 1))
    centre = (j[8] + j[11]) / 2
    for mask, garment in ((regions["upper"], look.upper), (regions["lower"], look.lower),
                          (regions["shoes"], look.shoes)):
        w = _pattern(garment, rest[mask], centre)[:, None]
        colours[mask] = (1 - w) * np.array(garment.colour) + w * np.array(garment.second)
    if look.hair_style != "bald":
        colours[regions["scalp"]] = look.hair
    # Brows: an arc above each eye, in the hair's colour (darkened for blond and grey hair).
    brow = np.minimum(np.array(look.hair), 0.35) * 0.8
    for eye in (14, 15):
        dx = rest[:, 0] - j[eye, 0]
        arc = j[eye, 2] + 0.017 + 0.004 * np.cos(dx / 0.022 * np.pi / 2)
        on = (regions["head"] & (np.abs(dx) < 0.022) & (np.abs(rest[:, 2] - arc) < 0.0035)
              & (rest[:, 1] < j[eye, 1] + 0.01))
        colours[on] = brow
    # Eyes: white, an iris and a pupil where the eyeball looks forward (−Y).
    eye = parts == EYE
    for side in (-1, 1):
        ball = eye & (np.sign(rest[:, 0] - j[0, 0]) == side)
        if not ball.any():
            continue
        centre_ball = rest[ball].mean(0)
        direction = rest[ball] - centre_ball
        cos = -direction[:, 1] / np.maximum(np.linalg.norm(direction, axis=1), 1e-9)
        c = np.where((cos > 0.93)[:, None], np.array(look.iris), np.array((0.86, 0.84, 0.8)))
        c[cos > 0.985] = (0.03, 0.03, 0.03)
        colours[ball] = c
    rgba = np.ones((len(rest), 4))
    rgba[:, :3] = _srgb_to_linear(colours)
    return rgba.astype(np.float32)


def _srgb_to_linear(c: np.ndarray) -> np.ndarray:
    c = np.clip(c, 0, 1)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
