"""Garments, hair and accessories as their own meshes that move with the posed body.

Two kinds of surface, both recomputed from each posed body so they follow it:

- shells: the body's own faces over a region (a top, slim trousers, shoes, a beanie, a cap of
  hair), pushed out along the posed vertex normals by a few millimetres to centimetres;
- tubes: rings around an axis (a leg, an arm, the hips, the head), each ring the support curve
  of the body points near it plus a margin, widened to a flare profile: skirts and dresses that
  enclose both legs, wide trousers, bell sleeves, hair falling to the chin, the shoulders or the
  back, ponytails and buns, a bag.

Every layer carries its points' rest coordinates (`rest`), which the fabric shaders use for
patterns, so prints stay on the cloth.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .synth_body import ARM, EYE, FOOT, HAND, HEAD, LEG, TORSO
from .synth_clothing import Look, garment_regions

# COCO-18 indices (pg2_server.wire.keypoints' order)
_NOSE, _NECK, _RSH, _REL, _RWR, _LSH, _LEL, _LWR, _RHIP, _RKNEE, _RANK, _LHIP, _LKNEE, _LANK = range(14)
_REYE, _LEYE, _REAR, _LEAR = 14, 15, 16, 17
_Z = np.array([0.0, 0.0, 1.0])


@dataclass(frozen=True)
class Layer:
    """One mesh over the body: its material key, triangles, rest coordinates (n,3) and posed points (K,n,3)."""
    name: str
    material: str
    faces: np.ndarray
    rest: np.ndarray
    vertices: np.ndarray


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals (K,V,3) of posed meshes (K,V,3)."""
    a, b, c = (vertices[:, faces[:, i]] for i in range(3))
    fn = np.cross(b - a, c - a)
    normals = np.zeros_like(vertices)
    for i in range(3):
        np.add.at(normals, (slice(None), faces[:, i]), fn)
    return normals / np.maximum(np.linalg.norm(normals, axis=2, keepdims=True), 1e-12)


def shell(name: str, material: str, mask: np.ndarray, faces: np.ndarray, rest: np.ndarray,
          posed: np.ndarray, normals: np.ndarray, offset, band: bool = False) -> Layer | None:
    """The body's faces whose three corners are in `mask`, pushed out by `offset` metres (scalar or per
    vertex); a `band` (a strap narrower than the body's triangles) takes those with any corner in it."""
    inside = mask[faces]
    chosen = faces[inside.any(1) if band else inside.all(1)]
    if len(chosen) == 0:
        return None
    used = np.unique(chosen)
    remap = np.full(len(mask), -1, np.int64)
    remap[used] = np.arange(len(used))
    off = np.broadcast_to(np.asarray(offset, float), (len(mask),))[used]
    points = posed[:, used] + normals[:, used] * off[None, :, None]
    return Layer(name, material, remap[chosen].astype(np.int32), rest[used].astype(np.float32),
                 points.astype(np.float32))


def _grid_faces(rings: int, around: int, closed: bool) -> np.ndarray:
    """Triangles joining `rings` rings of `around` points (wrapping round when `closed`)."""
    cols = around if closed else around - 1
    faces = []
    for r in range(rings - 1):
        for i in range(cols):
            a, b = r * around + i, r * around + (i + 1) % around
            c, d = a + around, b + around
            faces += [(a, b, d), (a, d, c)]
    return np.array(faces, np.int32)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def enclose(centres: np.ndarray, e1: np.ndarray, e2: np.ndarray, thetas: np.ndarray, points: np.ndarray,
            point_s: np.ndarray, ring_s: np.ndarray, band: float, margin: float, flare: float = 0.0,
            grow: bool = False, floor: np.ndarray | None = None) -> np.ndarray:
    """Rings (R,N,3) around `centres` (R,3) in the planes spanned by e1, e2 (R,3): ring j at angle θ lies
    `margin` outside the support of the points whose parameter is within `band` of ring_s[j], and
    at least at the first ring's mean radius plus `flare` per unit of |s − s0|. `grow`: no ring
    narrower than the one above (cloth hangs, it does not tuck in). `floor`: least radius per ring."""
    directions = (np.cos(thetas)[None, :, None] * e1[:, None] + np.sin(thetas)[None, :, None] * e2[:, None])
    radii = np.zeros((len(centres), len(thetas)))
    for j in range(len(centres)):
        near = np.abs(point_s - ring_s[j]) < band
        if near.any():
            radii[j] = ((points[near] - centres[j]) @ directions[j].T).max(0)
        elif j:
            radii[j] = radii[j - 1] - margin
        radii[j] += margin
    top = radii[0].mean()
    radii = np.maximum(radii, (top + flare * np.abs(ring_s - ring_s[0]))[:, None])
    if floor is not None:
        radii = np.maximum(radii, floor[:, None])
    if grow:
        radii = np.maximum.accumulate(radii, axis=0)
    return centres[:, None] + radii[..., None] * directions


def _tube_layer(name: str, material: str, rings: np.ndarray, rest: np.ndarray, closed: bool) -> Layer:
    """rings (K,R,N,3) posed, rest (R,N,3)."""
    k, r, n, _ = rings.shape
    return Layer(name, material, _grid_faces(r, n, closed), rest.reshape(-1, 3).astype(np.float32),
                 rings.reshape(k, r * n, 3).astype(np.float32))


def _rest_tube(r: int, n: int, z0: float, length: float, radius: float, thetas: np.ndarray) -> np.ndarray:
    """Rest coordinates of a tube: a cylinder of `radius` going down from z0, for the patterns."""
    zs = z0 - np.linspace(0, length, r)
    return np.stack(np.broadcast_arrays(radius * np.cos(thetas)[None], radius * np.sin(thetas)[None],
                                        zs[:, None]), axis=-1)


def _along(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    axis = end - start
    return (points - start) @ axis / (axis @ axis)


def _chain(joints: np.ndarray, a: int, b: int, c: int, split: float, s: np.ndarray):
    """Centres (R,3) and unit directions (R,3) at fractions s of a two-bone chain a→b→c whose
    middle joint sits at fraction `split`."""
    ja, jb, jc = joints[a], joints[b], joints[c]
    first = s < split
    t1 = np.clip(s / split, 0, 1)[:, None]
    t2 = np.clip((s - split) / (1 - split), 0, 1)[:, None]
    centres = np.where(first[:, None], ja + (jb - ja) * t1, jb + (jc - jb) * t2)
    d1, d2 = _unit(jb - ja), _unit(jc - jb)
    blend = np.clip((s - split) / 0.12 + 0.5, 0, 1)[:, None]  # bend smoothly at the middle joint
    return centres, _unit(d1 * (1 - blend) + d2 * blend)


def _limb_tubes(name: str, material: str, look_side_pts, posed: np.ndarray, joints: np.ndarray,
                rest_joints: np.ndarray, chain: tuple[int, int, int], s_range: tuple[float, float],
                margin: float, flare: float, grow: bool, rings: int = 14, around: int = 24) -> Layer:
    """A tube round one limb chain (e.g. hip→knee→ankle) of each posed body."""
    mask, rest_s = look_side_pts
    a, b, c = chain
    split = float(_along(rest_joints[b], rest_joints[a], rest_joints[c]))
    s = np.linspace(*s_range, rings)
    thetas = np.linspace(0, 2 * np.pi, around, endpoint=False)
    out = []
    for k in range(len(posed)):
        centres, axis = _chain(joints[k], a, b, c, split, s)
        lateral = _unit(joints[k][_LHIP] - joints[k][_RHIP])
        e1 = _unit(lateral - (axis @ lateral)[:, None] * axis)
        e2 = np.cross(axis, e1)
        band = 0.6 * (s[1] - s[0]) + 0.02
        out.append(enclose(centres, e1, e2, thetas, posed[k][mask], rest_s[mask], s, band, margin,
                           flare, grow))
    limb = np.linalg.norm(rest_joints[b] - rest_joints[a]) + np.linalg.norm(rest_joints[c] - rest_joints[b])
    rest = _rest_tube(rings, around, float(rest_joints[a][2]), limb * (s_range[1] - s_range[0]), 0.06, thetas)
    return _tube_layer(name, material, np.stack(out), rest, closed=True)


def _head_frame(joints: np.ndarray):
    """Centre between the ears, forward (horizontal, towards the face) and lateral (to the left ear)."""
    centre = (joints[_REAR] + joints[_LEAR]) / 2
    forward = joints[_NOSE] - centre
    forward[2] = 0
    forward = _unit(forward)
    lateral = _unit(np.cross(_Z, forward))  # Z x (-Y) = +X, the subject's left
    return centre, forward, lateral


def dress(look: Look, rest: np.ndarray, posed: np.ndarray, faces: np.ndarray, parts: np.ndarray,
          rest_joints: np.ndarray, joints: np.ndarray) -> list[Layer]:
    """Every layer a person wears, in all their poses: garments, shoes, hair, accessories."""
    normals = vertex_normals(posed, faces)
    regions = garment_regions(look, rest, parts, rest_joints)
    j = rest_joints
    layers: list[Layer | None] = []
    add = layers.append

    def limb_s(shoulder: int, end: int, part: int):
        side = np.sign(rest[:, 0]) == np.sign(j[shoulder, 0])
        return (parts == part) & side, _along(rest, j[shoulder], j[end])

    # --- lower garment
    kind = look.lower_kind
    if kind in ("skirt", "dress"):
        add(_skirt(look, rest, posed, parts, rest_joints, joints))
        if kind == "dress":
            add(shell("dress-top", "upper", regions["upper"], faces, rest, posed, normals, look.top_offset))
        else:
            add(shell("briefs", "lower", regions["pelvis"], faces, rest, posed, normals, 0.006))
    else:
        if look.leg_width > 0:  # straight, wide or flared legs hang free of the leg
            add(shell("pelvis", "lower", regions["pelvis"], faces, rest, posed, normals, 0.008))
            for hip, knee, ankle in ((_RHIP, _RKNEE, _RANK), (_LHIP, _LKNEE, _LANK)):
                add(_limb_tubes(f"leg{hip}", "lower", limb_s(hip, ankle, LEG), posed, joints, rest_joints,
                                (hip, knee, ankle), (0.05, look.leg_length), 0.01, look.leg_width, grow=True))
        else:
            add(shell("trousers", "lower", regions["lower"], faces, rest, posed, normals, 0.008))
    # --- upper garment (a dress's top was added above)
    if kind != "dress":
        offset = np.full(len(rest), look.top_offset)
        if look.untucked:  # a loose hem over the trousers
            offset += np.clip((j[_RHIP, 2] + 0.15 - rest[:, 2]) / 0.15, 0, 1) * 0.008
        add(shell("top", "upper", regions["upper"], faces, rest, posed, normals, offset))
    if look.sleeve_flare > 0 and look.sleeve > 0.3:
        for sh, el, wr in ((_RSH, _REL, _RWR), (_LSH, _LEL, _LWR)):
            arm = limb_s(sh, wr, ARM)
            add(_limb_tubes(f"sleeve{sh}", "upper", arm, posed, joints, rest_joints, (sh, el, wr),
                            (0.45, look.sleeve), 0.012, look.sleeve_flare, grow=True, rings=8, around=20))
    if look.top_kind == "hoodie":
        add(shell("hood", "upper", regions["hood"], faces, rest, posed, normals, 0.045))
    if look.outer is not None:
        add(shell("outer", "outer", regions["outer"], faces, rest, posed, normals, look.top_offset + 0.016))
    add(shell("shoes", "shoes", regions["shoes"], faces, rest, posed, normals, 0.009))
    # --- hair
    if look.hair_style != "bald":
        add(shell("hair-cap", "hair", regions["scalp"], faces, rest, posed, normals,
                  0.010 if look.hair_style == "short" else 0.014))
        if look.hair_style in ("bob", "shoulder", "long"):
            add(_hair_fall(look, rest, posed, parts, joints))
        elif look.hair_style in ("ponytail", "bun"):
            add(_hair_tie(look.hair_style, joints))
    # --- accessories
    if "beanie" in look.accessories:
        add(shell("beanie", "hat", regions["beanie"], faces, rest, posed, normals, 0.03))
    if "sunglasses" in look.accessories:
        add(shell("sunglasses", "lens", regions["glasses"], faces, rest, posed, normals, 0.012))
    if "necklace" in look.accessories:
        add(shell("necklace", "metal", regions["necklace"], faces, rest, posed, normals,
                  look.top_offset + 0.004))
    if "bag" in look.accessories:
        add(shell("strap", "leather", regions["strap"], faces, rest, posed, normals, look.top_offset + 0.03, band=True))
        add(_bag(joints, look.bag_side))
    return [layer for layer in layers if layer is not None]


def _skirt(look: Look, rest, posed, parts, rest_joints, joints) -> Layer:
    """A skirt (or a dress's skirt): rings down from the waist enclosing both legs, flared."""
    rings, around = 14, 40
    thetas = np.linspace(0, 2 * np.pi, around, endpoint=False)
    legs = np.isin(parts, (LEG, TORSO, FOOT))
    out = []
    for k in range(len(posed)):
        jk = joints[k]
        hips = (jk[_RHIP] + jk[_LHIP]) / 2
        shoulders = (jk[_RSH] + jk[_LSH]) / 2
        waist = hips[2] + 0.28 * (shoulders[2] - hips[2])
        ankle = min(jk[_RANK, 2], jk[_LANK, 2])
        hem = hips[2] - look.leg_length * (hips[2] - ankle)
        zs = np.linspace(waist, hem, rings)
        centres = np.tile(hips, (rings, 1))
        centres[:, 2] = zs
        lateral = _unit((jk[_LHIP] - jk[_RHIP]) * np.array([1, 1, 0]))
        e1 = np.tile(lateral, (rings, 1))
        e2 = np.tile(np.cross(_Z, lateral), (rings, 1))
        pts = posed[k][legs & (posed[k][:, 2] < waist + 0.05)]
        band = 0.6 * abs(zs[1] - zs[0]) + 0.015
        out.append(enclose(centres, e1, e2, thetas, pts, pts[:, 2], zs, band, 0.012, look.skirt_flare,
                           grow=True))
    hip_z = float((rest_joints[_RHIP, 2] + rest_joints[_LHIP, 2]) / 2)
    rest_rings = _rest_tube(rings, around, hip_z + 0.1, 0.9 * look.leg_length, 0.17, thetas)
    return _tube_layer("skirt", "lower" if look.lower_kind == "skirt" else "upper", np.stack(out),
                       rest_rings, closed=True)


def _hair_fall(look: Look, rest, posed, parts, joints) -> Layer:
    """Hair from above the ears down to the chin (bob), the shoulders or the back, open at the face."""
    length = {"bob": 0.11, "shoulder": 0.24, "long": 0.4}[look.hair_style]
    rings, around = 14, 25
    opening = np.radians(125)  # the face's sector, centred on the forward direction
    thetas = np.linspace(-np.pi + opening / 2, np.pi - opening / 2, around)  # 0 = backwards
    near_body = np.isin(parts, (HEAD, TORSO, EYE))
    out = []
    for k in range(len(posed)):
        centre, forward, lateral = _head_frame(joints[k])
        top = centre[2] + 0.07
        zs = np.linspace(top, centre[2] - length, rings)
        centres = np.tile(centre - 0.01 * forward, (rings, 1))
        centres[:, 2] = zs
        back = -forward
        e1 = np.tile(back, (rings, 1))
        e2 = np.tile(lateral, (rings, 1))
        rel = posed[k] - centre
        across = np.abs(rel @ lateral)
        pts_mask = near_body & (across < 0.09) & (posed[k][:, 2] > centre[2] - length - 0.05)
        pts = posed[k][pts_mask]
        band = 0.6 * abs(zs[1] - zs[0]) + 0.015
        floor = np.full(rings, 0.0)
        out.append(enclose(centres, e1, e2, thetas, pts, pts[:, 2], zs, band, 0.016, 0.0, grow=True,
                           floor=floor))
    rest_rings = _rest_tube(rings, around, 1.6, length + 0.07, 0.1, thetas)
    return _tube_layer("hair-fall", "hair", np.stack(out), rest_rings, closed=False)


def _hair_tie(style: str, joints) -> Layer:
    """A ponytail hanging from the back of the head, or a bun on it."""
    rings, around = 12, 16
    thetas = np.linspace(0, 2 * np.pi, around, endpoint=False)
    s = np.linspace(0, 1, rings)
    out = []
    for k in range(len(joints)):
        centre, forward, lateral = _head_frame(joints[k])
        if style == "ponytail":
            start = centre - 0.095 * forward + 0.035 * _Z
            centres = start - 0.04 * np.sin(s * np.pi / 2)[:, None] * forward - 0.28 * s[:, None] * _Z
            radius = 0.026 * (1 - 0.55 * s) * np.clip(s * 6 + 0.5, 0, 1)
            axis = _unit(np.gradient(centres, axis=0))
        else:
            # on the back of the crown, half out of the hair (nearer the centre, the skull swallows it)
            centres = centre - 0.11 * forward + 0.095 * _Z + np.outer((s - 0.5) * 0.08, _unit(-forward + _Z))
            radius = 0.045 * np.sqrt(np.clip(1 - (2 * s - 1) ** 2, 0.02, 1))
            axis = np.tile(_unit(-forward + _Z), (rings, 1))
        e1 = _unit(np.cross(axis, lateral))
        e2 = np.cross(axis, e1)
        out.append(centres[:, None] + radius[:, None, None] * (np.cos(thetas)[None, :, None] * e1[:, None]
                                                                + np.sin(thetas)[None, :, None] * e2[:, None]))
    rest_rings = _rest_tube(rings, around, 1.6, 0.3, 0.03, thetas)
    return _tube_layer(style, "hair", np.stack(out), rest_rings, closed=True)


def _bag(joints, side: int) -> Layer:
    """A shoulder bag hanging at the hip (`side` +1 = the subject's left)."""
    thetas = np.radians([45, 135, 225, 315])
    out = []
    for k in range(len(joints)):
        jk = joints[k]
        hip = jk[_LHIP] if side > 0 else jk[_RHIP]
        lateral = _unit((jk[_LHIP] - jk[_RHIP]) * np.array([1, 1, 0]))
        forward = np.cross(_Z, lateral) * -1
        centre = hip + side * lateral * 0.13 + forward * 0.02
        centres = np.stack([centre + 0.09 * _Z, centre - 0.1 * _Z])
        # a 0.26 x 0.09 box: scale the unit square's axes
        ring = (np.cos(thetas)[:, None] * lateral * 0.16 + np.sin(thetas)[:, None] * forward * 0.065)
        out.append(centres[:, None] + ring[None])
    rest_rings = _rest_tube(2, 4, 1.0, 0.19, 0.1, thetas)
    return _tube_layer("bag", "leather", np.stack(out), rest_rings, closed=True)
