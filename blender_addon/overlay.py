"""Viewport overlay: the keypoints the model will get, drawn as an OpenPose skeleton.

UI only: the draw handler is never added in background mode (no GPU there).
"""
from __future__ import annotations

import bpy
import gpu
from gpu_extras.batch import batch_for_shader

from .mapping import MappingError, keypoints_3d
from .projection import project_points
from .skeleton import COLORS, SKELETON  # noqa: F401  (the tests pin them to the server's)

HIDDEN = (0.4, 0.4, 0.4, 0.8)  # joints the camera does not see: left out of the request

_handle = None


def _rgba(index: int) -> tuple[float, float, float, float]:
    r, g, b = COLORS[index]
    return (r / 255, g / 255, b / 255, 1.0)


def skeleton_geometry(points, visible):
    """Line vertices/colours per limb and point vertices/colours per joint (None = skipped)."""
    lines, line_colors, joints, joint_colors = [], [], [], []
    for limb, (a, b) in enumerate(SKELETON):
        if points[a] is None or points[b] is None:
            continue
        color = _rgba(limb) if visible[a] and visible[b] else HIDDEN
        lines += [points[a], points[b]]
        line_colors += [color, color]
    for i, point in enumerate(points):
        if point is not None:
            joints.append(point)
            joint_colors.append(_rgba(i) if visible[i] else HIDDEN)
    return lines, line_colors, joints, joint_colors


def scene_geometry(scene):
    """What the overlay draws for `scene` (lines, line colours, joints, joint colours), or None.

    Everything but the GPU calls, so it runs (and is tested) headless. Points stay
    `mathutils.Vector`s for the projection: `world_to_camera_view` multiplies them by a matrix.
    """
    settings = getattr(scene, "pg2", None)
    if settings is None or not settings.show_overlay:
        return None
    armature = settings.armature
    if armature is None or armature.type != "ARMATURE":
        return None
    try:
        mapping = settings.bone_mapping()
    except MappingError:
        return None  # the panel says what is wrong; the overlay just stays empty
    points = keypoints_3d(armature, mapping)
    if scene.camera is not None:
        visible = [p is not None for p in project_points(scene, scene.camera, points)]
    else:
        visible = [False] * len(points)
    points = [None if p is None else tuple(p) for p in points]  # the GPU batch wants tuples
    return skeleton_geometry(points, visible)


def draw() -> None:
    """The POST_VIEW draw handler: the skeleton over the 3D view."""
    geometry = scene_geometry(bpy.context.scene)
    if geometry is None:
        return
    lines, line_colors, joints, joint_colors = geometry
    gpu.state.depth_test_set("NONE")
    gpu.state.blend_set("ALPHA")
    viewport = gpu.state.viewport_get()[2:]
    if lines:
        shader = gpu.shader.from_builtin("POLYLINE_FLAT_COLOR")
        shader.uniform_float("viewportSize", viewport)
        shader.uniform_float("lineWidth", 4.0)
        batch_for_shader(shader, "LINES", {"pos": lines, "color": line_colors}).draw(shader)
    if joints:
        shader = gpu.shader.from_builtin("POINT_FLAT_COLOR")
        gpu.state.point_size_set(9.0)
        batch_for_shader(shader, "POINTS", {"pos": joints, "color": joint_colors}).draw(shader)
    gpu.state.blend_set("NONE")


def register() -> None:
    global _handle
    if bpy.app.background or _handle is not None:
        return
    _handle = bpy.types.SpaceView3D.draw_handler_add(draw, (), "WINDOW", "POST_VIEW")


def unregister() -> None:
    global _handle
    if _handle is not None:
        bpy.types.SpaceView3D.draw_handler_remove(_handle, "WINDOW")
        _handle = None
