"""Render posed bodies with Blender's Workbench engine and project their keypoints.

The camera looks along +Y (the body faces −Y before its yaw), Z up, so projection is a plain
pinhole: it is computed here in numpy and checked against Blender's own in the tests.
Visibility rule for a keypoint (documented in docs/synthetic.md): it is kept when it lies inside
the frame and the first body surface on the camera ray towards it is no more than `tolerance`
in front of it (0.04 m for the face points, 0.15 m for the joints, which lie inside the limbs).
The neck, the shoulders' midpoint deep inside the body, is kept in the frame when a shoulder is,
as OpenPose finds it in photos.
"""
from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

SENSOR_HEIGHT = 24.0  # mm, with vertical sensor fit
FACE = (0, 14, 15, 16, 17)
NECK = 1
SHOULDERS = (2, 5)
FACE_TOLERANCE = 0.04
JOINT_TOLERANCE = 0.15


@dataclass(frozen=True)
class Camera:
    """A pinhole camera at `position` looking along +Y, Z up; `lens` in mm."""
    position: tuple[float, float, float]
    lens: float
    size: tuple[int, int]  # (W, H) in pixels

    def project(self, points: np.ndarray) -> np.ndarray:
        """Continuous pixel coordinates (N,2) of world points (N,3); pixel (i, j) covers [i, i+1)."""
        w, h = self.size
        f = self.lens / SENSOR_HEIGHT * h
        rel = points - np.array(self.position)
        depth = rel[:, 1]
        return np.stack([w / 2 + f * rel[:, 0] / depth, h / 2 - f * rel[:, 2] / depth], axis=1)


def frame_camera(vertices: np.ndarray, size: tuple[int, int], fill: float, offset: tuple[float, float],
                 lens: float = 60.0, cut: float | None = None) -> Camera:
    """A camera whose frame holds the whole body, its height filling `fill` of the image height;
    with `cut` (a height in metres) the frame's bottom edge cuts the body there instead."""
    w, h = size
    if cut is not None:
        vertices = vertices[vertices[:, 2] >= cut]
    lo, hi = vertices.min(0), vertices.max(0)
    if cut is not None:
        lo[2] = cut
    body_h, body_w = hi[2] - lo[2], hi[0] - lo[0]
    # distance to the body's middle plane (in depth) so that height (and width, with a margin) fit
    middle = (lo[1] + hi[1]) / 2
    near = max(body_h / fill, body_w / 0.95 * h / w) * lens / SENSOR_HEIGHT

    def placed(distance: float) -> Camera:
        view_h = distance * SENSOR_HEIGHT / lens   # the frame's height at the middle plane
        cx = (lo[0] + hi[0]) / 2 + offset[0] * view_h
        # A cut sits on the bottom edge (the head then 1 - fill below the top); else the offset.
        cz = cut + view_h / 2 if cut is not None else (lo[2] + hi[2]) / 2 + offset[1] * view_h
        return Camera((float(cx), float(middle - distance), float(cz)), lens, size)

    cam = placed(near)
    # perspective makes the nearest parts a little larger than planned: pull back until all fit
    for step in range(1, 21):
        uv = cam.project(vertices)
        if (uv[:, 1].min() >= 0.5 and (cut is not None or uv[:, 1].max() <= h - 0.5) and uv[:, 0].min() >= 0.5
                and uv[:, 0].max() <= w - 0.5):
            break
        cam = placed(near * (1 + 0.05 * step))
    return cam


def visible_keypoints(camera: Camera, vertices: np.ndarray, faces: np.ndarray, joints: np.ndarray) -> np.ndarray:
    """Pixel keypoints (18,2), NaN where outside the frame or hidden behind the body."""
    import bpy  # noqa: F401  (mathutils is importable only once bpy is loaded)
    from mathutils import Vector
    from mathutils.bvhtree import BVHTree

    tree = BVHTree.FromPolygons(vertices.tolist(), faces.tolist(), all_triangles=True)
    uv = camera.project(joints)
    w, h = camera.size
    origin = Vector(camera.position)
    out = np.full((len(joints), 2), np.nan)
    for k, (point, (u, v)) in enumerate(zip(joints, uv)):
        if not (0 <= u < w and 0 <= v < h) or k == NECK:
            continue
        ray = Vector(point.tolist()) - origin
        distance = ray.length
        hit, _, _, hit_distance = tree.ray_cast(origin, ray.normalized(), distance + 1.0)
        tolerance = FACE_TOLERANCE if k in FACE else JOINT_TOLERANCE
        if hit is not None and hit_distance < distance - tolerance:
            continue
        out[k] = (np.floor(u), np.floor(v))
    u, v = uv[NECK]
    if 0 <= u < w and 0 <= v < h and not np.isnan(out[list(SHOULDERS)]).all():
        out[NECK] = (np.floor(u), np.floor(v))
    return out


@contextmanager
def _quiet_stdout():
    """Send the process's file descriptor 1 (where Blender's C code prints) to /dev/null."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


ENGINES = ("cycles", "workbench")
# Cycles path samples per pixel before OpenImageDenoise (chosen by measurement: docs/synthetic.md)
SAMPLES = 8
# Watts of the studio's area lights (the key's scaled per image). Exposed as a fashion photographer
# exposes: a white garment keeps its folds while the paper behind, glowing, stays white
# (docs/synthetic.md has the measurement).
LIGHTS = {"key": 100.0, "fill": 43.0, "top": 32.0}


@dataclass(frozen=True)
class Studio:
    """One image's studio: seamless paper colour (sRGB 0–1) and glow, key light side (+1 = camera's
    right) and strength factor, the floor's height and where the paper's wall stands (y)."""
    paper: tuple[float, float, float]
    glow: float
    key_side: float
    key: float
    floor: float
    wall: float


class Renderer:
    """A Blender scene holding one body, its garment/hair layers, a camera, studio lights and a
    seamless backdrop; renders RGBA with Cycles (photo-like) or Workbench (flat vertex colours)."""

    def __init__(self, faces: np.ndarray, vertex_count: int, size: tuple[int, int], engine: str = "workbench",
                 uvs: np.ndarray | None = None, samples: int = SAMPLES):
        import bpy
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r} is unknown; use one of {', '.join(ENGINES)}")
        self.bpy = bpy
        self.engine = engine
        bpy.ops.wm.read_factory_settings(use_empty=True)
        scene = bpy.context.scene
        self.scene = scene
        scene.render.resolution_x, scene.render.resolution_y = size
        scene.render.resolution_percentage = 100
        scene.render.film_transparent = True
        scene.render.image_settings.file_format = "PNG"
        scene.render.image_settings.color_mode = "RGBA"
        scene.render.image_settings.color_depth = "8"
        scene.view_settings.view_transform = "Standard"
        # FXAA: 0.13 s per 176x256 image against 0.36 s for 8 samples, with edges as smooth
        scene.display.render_aa = "FXAA"
        shading = scene.display.shading
        shading.light = "STUDIO"
        shading.color_type = "VERTEX"
        shading.show_cavity = False
        shading.show_specular_highlight = False  # cloth and skin, not plastic
        self.mesh = _new_mesh(bpy, "body", faces, vertex_count)
        self.colour = self.mesh.color_attributes.new("colour", "FLOAT_COLOR", "POINT")
        if uvs is not None:
            layer = self.mesh.uv_layers.new(name="uv")
            layer.data.foreach_set("uv", np.asarray(uvs, np.float32).reshape(-1))
        self.body = bpy.data.objects.new("body", self.mesh)
        scene.collection.objects.link(self.body)
        cam_data = bpy.data.cameras.new("camera")
        cam_data.sensor_fit = "VERTICAL"
        cam_data.sensor_height = SENSOR_HEIGHT
        cam_data.clip_end = 1000.0
        self.camera = bpy.data.objects.new("camera", cam_data)
        self.camera.rotation_euler = (np.pi / 2, 0.0, 0.0)
        scene.collection.objects.link(self.camera)
        scene.camera = self.camera
        self.layers: list = []
        self._layer_data: list = []
        self._materials: list = []
        self._tmp = tempfile.mkdtemp(prefix="pg2-synth-")
        if engine == "cycles":
            self._setup_cycles(samples)
        else:
            scene.render.engine = "BLENDER_WORKBENCH"

    def _setup_cycles(self, samples: int) -> None:
        from . import synth_materials
        bpy, scene = self.bpy, self.scene
        scene.render.engine = "CYCLES"
        c = scene.cycles
        c.device = "CPU"
        c.samples = samples
        c.use_adaptive_sampling = True
        c.adaptive_threshold = 0.05
        c.use_denoising = True
        c.denoiser = "OPENIMAGEDENOISE"
        c.denoising_input_passes = "RGB_ALBEDO_NORMAL"
        c.seed = 0  # the same noise pattern every image: renders depend only on the scene
        c.max_bounces, c.diffuse_bounces, c.glossy_bounces = 4, 2, 1
        c.transmission_bounces, c.volume_bounces, c.transparent_max_bounces = 0, 0, 2
        c.caustics_reflective = c.caustics_refractive = False
        c.blur_glossy = 1.0
        # no persistent data: a render must not depend on what the process rendered before (a kept
        # Cycles session made the same image differ in the last bits between runs)
        scene.render.use_persistent_data = False
        world = bpy.data.worlds.new("world")
        world.use_nodes = True
        world.node_tree.nodes["Background"].inputs["Color"].default_value = (0.8, 0.8, 0.8, 1.0)
        world.node_tree.nodes["Background"].inputs["Strength"].default_value = 0.1
        scene.world = world
        self.paper = synth_materials.backdrop(bpy)
        self.backdrop = bpy.data.objects.new("backdrop", _cyclorama(bpy))
        self.backdrop.data.materials.append(self.paper)
        scene.collection.objects.link(self.backdrop)
        self.lights = {}
        for name, size in (("key", 2.5), ("fill", 3.0), ("top", 2.0)):
            light = bpy.data.lights.new(name, "AREA")
            light.shape = "DISK"
            light.size = size
            obj = bpy.data.objects.new(name, light)
            scene.collection.objects.link(obj)
            self.lights[name] = obj
        self.skin = None

    def set_colours(self, rgba: np.ndarray) -> None:
        """Linear RGBA per vertex (V,4)."""
        self.colour.data.foreach_set("color", rgba.astype(np.float32).reshape(-1))

    def set_person(self, look, layers) -> None:
        """A person's skin material and garment/hair layers (`synth_garments.Layer`, posed K times;
        Cycles only: the flat look keeps garments painted on the skin)."""
        if self.engine != "cycles":
            return
        from . import synth_materials as m
        bpy = self.bpy
        for obj in self.layers:
            mesh = obj.data
            bpy.data.objects.remove(obj)
            bpy.data.meshes.remove(mesh)
        for mat in self._materials:
            bpy.data.materials.remove(mat)
        self.layers, self._layer_data, self._materials = [], [], []
        skin = m.skin(bpy, look.skin, look.lips)
        self._materials.append(skin)
        self.mesh.materials.clear()
        self.mesh.materials.append(skin)
        materials = {}

        def material(key: str):
            if key not in materials:
                if key in ("upper", "lower", "outer", "shoes", "hat"):
                    g = {"upper": look.upper, "lower": look.lower, "outer": look.outer or look.upper,
                         "shoes": look.shoes, "hat": look.upper if look.upper.pattern == "knit" else look.lower}[key]
                    if key == "hat":
                        from .synth_clothing import Garment
                        g = Garment(g.colour, g.second, "knit", g.scale, g.phase)
                    materials[key] = m.fabric(bpy, key, g, panel=self.graphic_panel)
                elif key == "hair":
                    materials[key] = m.hair(bpy, look.hair)
                elif key == "leather":
                    materials[key] = m.plain(bpy, key, look.shoes.colour, 0.35, specular=0.6)
                elif key == "metal":
                    materials[key] = m.plain(bpy, key, (0.85, 0.7, 0.4), 0.25, metallic=1.0)
                elif key == "lens":
                    materials[key] = m.plain(bpy, key, (0.02, 0.02, 0.025), 0.05, specular=1.0)
                self._materials.append(materials[key])
            return materials[key]

        for layer in layers:
            mesh = _new_mesh(bpy, layer.name, layer.faces, len(layer.rest))
            rest = mesh.attributes.new("rest", "FLOAT_VECTOR", "POINT")
            rest.data.foreach_set("vector", layer.rest.astype(np.float32).reshape(-1))
            mesh.materials.append(material(layer.material))
            obj = bpy.data.objects.new(layer.name, mesh)
            self.scene.collection.objects.link(obj)
            self.layers.append(obj)
            self._layer_data.append(layer.vertices)

    graphic_panel = None  # (x0, x1, z0, z1, y): where a graphic print sits on the chest, rest coordinates

    def _pose(self, vertices: np.ndarray, camera: Camera, pose: int | None) -> None:
        self.mesh.vertices.foreach_set("co", vertices.astype(np.float32).reshape(-1))
        self.mesh.update()
        for obj, data in zip(self.layers, self._layer_data):
            obj.data.vertices.foreach_set("co", data[pose if pose is not None else 0].reshape(-1))
            obj.data.update()
        self.camera.location = camera.position
        self.camera.data.lens = camera.lens

    def _light(self, studio: Studio, camera: Camera, vertices: np.ndarray) -> None:
        from . import synth_materials
        lo, hi = vertices.min(0), vertices.max(0)
        centre = (lo + hi) / 2
        target = np.array([centre[0], centre[1], lo[2] + 0.6 * (hi[2] - lo[2])])
        places = {"key": (studio.key_side * 2.6, -3.2, 2.6), "fill": (-studio.key_side * 3.2, -3.0, 1.2),
                  "top": (0.0, 0.6, 3.4)}
        energy = {**LIGHTS, "key": LIGHTS["key"] * studio.key}
        for name, obj in self.lights.items():
            pos = target + np.array(places[name])
            obj.location = pos.tolist()
            obj.rotation_euler = _aim(pos, target)
            obj.data.energy = energy[name]
        self.backdrop.location = (float(centre[0]), float(studio.wall), float(studio.floor))
        synth_materials.set_backdrop(self.paper, studio.paper, studio.glow)

    def render(self, vertices: np.ndarray, camera: Camera, pose: int | None = None,
               studio: Studio | None = None) -> np.ndarray:
        """The body with these vertices (and its layers in pose number `pose`) through `camera`:
        uint8 RGBA (H, W, 4). With a `studio` (Cycles only) the backdrop is rendered too and alpha
        is opaque; otherwise alpha is the person's coverage."""
        self._pose(vertices, camera, pose)
        if self.engine == "cycles":
            self.scene.render.film_transparent = studio is None
            self.backdrop.hide_render = studio is None
            if studio is not None:
                self._light(studio, camera, vertices)
            else:
                lo, hi = vertices.min(0), vertices.max(0)
                self._light(Studio((1, 1, 1), 0.0, 1.0, 1.0, float(lo[2]), float(hi[1] + 2)), camera, vertices)
        return self._render()

    def mask(self, vertices: np.ndarray, camera: Camera, pose: int | None = None) -> np.ndarray:
        """Coverage (H, W) uint8 of the person (body and layers), rendered flat by Workbench."""
        scene = self.scene
        engine, transparent = scene.render.engine, scene.render.film_transparent
        hidden = getattr(self, "backdrop", None)
        scene.render.engine = "BLENDER_WORKBENCH"
        scene.render.film_transparent = True
        if hidden is not None:
            hidden.hide_render = True
        try:
            self._pose(vertices, camera, pose)
            return self._render()[..., 3]
        finally:
            scene.render.engine, scene.render.film_transparent = engine, transparent

    def _render(self) -> np.ndarray:
        import cv2
        path = os.path.join(self._tmp, "frame.png")
        self.scene.render.filepath = path
        with _quiet_stdout():  # Blender prints a "Saved: ..." line per render, which buries the progress bar
            self.bpy.ops.render.render(write_still=True)
        bgra = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if bgra is None or bgra.shape[2] != 4:
            raise RuntimeError(f"Blender wrote no RGBA image at {path}")
        return cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGBA)

    def blender_projection(self, points: np.ndarray) -> np.ndarray:
        """Pixel coordinates through Blender's own camera model (for checking `Camera.project`)."""
        from bpy_extras.object_utils import world_to_camera_view
        from mathutils import Vector
        self.bpy.context.view_layer.update()
        w, h = self.scene.render.resolution_x, self.scene.render.resolution_y
        out = []
        for p in points:
            x, y, _ = world_to_camera_view(self.scene, self.camera, Vector(p.tolist()))
            out.append((x * w, (1 - y) * h))
        return np.array(out)


def _new_mesh(bpy, name: str, faces: np.ndarray, vertex_count: int):
    """A smooth-shaded triangle mesh with `vertex_count` vertices (placed later) and these faces."""
    mesh = bpy.data.meshes.new(name)
    mesh.vertices.add(vertex_count)
    mesh.loops.add(len(faces) * 3)
    mesh.polygons.add(len(faces))
    mesh.loops.foreach_set("vertex_index", faces.reshape(-1).astype(np.int32))
    mesh.polygons.foreach_set("loop_start", np.arange(0, len(faces) * 3, 3, dtype=np.int32))
    mesh.polygons.foreach_set("loop_total", np.full(len(faces), 3, dtype=np.int32))
    mesh.polygons.foreach_set("use_smooth", np.ones(len(faces), dtype=bool))
    mesh.update()
    mesh.validate()
    return mesh


def _cyclorama(bpy, width: float = 16.0, cove: float = 1.2, depth: float = 10.0, height: float = 8.0):
    """A seamless studio sweep: floor towards the camera (−Y), a curved cove, a wall at y = 0."""
    # (y, z) along the sweep: floor, quarter circle of radius `cove` ending vertical at y = 0, wall
    angles = np.linspace(0, np.pi / 2, 12)
    profile = [(-depth, 0.0)] + [(-cove + cove * np.sin(a), cove - cove * np.cos(a)) for a in angles] + [(0.0, height)]
    xs = (-width / 2, width / 2)
    verts = [(x, y, z) for (y, z) in profile for x in xs]
    faces = [(2 * i, 2 * i + 1, 2 * i + 3, 2 * i + 2) for i in range(len(profile) - 1)]
    mesh = bpy.data.meshes.new("cyclorama")
    mesh.from_pydata(verts, [], faces)
    mesh.polygons.foreach_set("use_smooth", np.ones(len(faces), dtype=bool))
    mesh.update()
    return mesh


def _aim(position: np.ndarray, target: np.ndarray) -> tuple[float, float, float]:
    """Euler angles that point an object's −Z axis (a light's direction) from position to target."""
    from mathutils import Vector
    return tuple(Vector((target - position).tolist()).to_track_quat("-Z", "Y").to_euler())
