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
                 lens: float = 60.0) -> Camera:
    """A camera whose frame holds the whole body, its height filling `fill` of the image height."""
    w, h = size
    lo, hi = vertices.min(0), vertices.max(0)
    body_h, body_w = hi[2] - lo[2], hi[0] - lo[0]
    # distance to the body's nearest plane so that height (and width, with a margin) fit
    near = max(body_h / fill, body_w / 0.95 * h / w) * lens / SENSOR_HEIGHT
    view_h = near * SENSOR_HEIGHT / lens
    cx = (lo[0] + hi[0]) / 2 + offset[0] * view_h
    cz = (lo[2] + hi[2]) / 2 + offset[1] * view_h
    cam = Camera((float(cx), float(lo[1] - near), float(cz)), lens, size)
    # perspective makes the nearest parts a little larger than planned: pull back until all fit
    for _ in range(20):
        uv = cam.project(vertices)
        if (uv[:, 1].min() >= 0.5 and uv[:, 1].max() <= h - 0.5 and uv[:, 0].min() >= 0.5
                and uv[:, 0].max() <= w - 0.5):
            break
        x, y, z = cam.position
        cam = Camera((x, y - 0.05 * near, z), lens, size)
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


class Renderer:
    """A Blender scene holding one body mesh, a camera and Workbench settings; renders RGBA."""

    def __init__(self, faces: np.ndarray, vertex_count: int, size: tuple[int, int]):
        import bpy
        self.bpy = bpy
        bpy.ops.wm.read_factory_settings(use_empty=True)
        scene = bpy.context.scene
        self.scene = scene
        scene.render.engine = "BLENDER_WORKBENCH"
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
        mesh = bpy.data.meshes.new("body")
        mesh.vertices.add(vertex_count)
        mesh.loops.add(len(faces) * 3)
        mesh.polygons.add(len(faces))
        mesh.loops.foreach_set("vertex_index", faces.reshape(-1).astype(np.int32))
        mesh.polygons.foreach_set("loop_start", np.arange(0, len(faces) * 3, 3, dtype=np.int32))
        mesh.polygons.foreach_set("loop_total", np.full(len(faces), 3, dtype=np.int32))
        mesh.polygons.foreach_set("use_smooth", np.ones(len(faces), dtype=bool))
        mesh.update()
        mesh.validate()
        self.colour = mesh.color_attributes.new("colour", "FLOAT_COLOR", "POINT")
        self.mesh = mesh
        body = bpy.data.objects.new("body", mesh)
        scene.collection.objects.link(body)
        cam_data = bpy.data.cameras.new("camera")
        cam_data.sensor_fit = "VERTICAL"
        cam_data.sensor_height = SENSOR_HEIGHT
        cam_data.clip_end = 1000.0
        self.camera = bpy.data.objects.new("camera", cam_data)
        self.camera.rotation_euler = (np.pi / 2, 0.0, 0.0)
        scene.collection.objects.link(self.camera)
        scene.camera = self.camera
        self._tmp = tempfile.mkdtemp(prefix="pg2-synth-")

    def set_colours(self, rgba: np.ndarray) -> None:
        """Linear RGBA per vertex (V,4)."""
        self.colour.data.foreach_set("color", rgba.astype(np.float32).reshape(-1))

    def render(self, vertices: np.ndarray, camera: Camera) -> np.ndarray:
        """The body with these vertices through `camera`: uint8 RGBA (H, W, 4), alpha = coverage."""
        import cv2
        self.mesh.vertices.foreach_set("co", vertices.astype(np.float32).reshape(-1))
        self.mesh.update()
        self.camera.location = camera.position
        self.camera.data.lens = camera.lens
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
