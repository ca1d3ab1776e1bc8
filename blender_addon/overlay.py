"""Viewport overlay: the keypoints the model will get, drawn as an OpenPose skeleton.

UI only: the draw handler is never added in background mode (no GPU there).
"""
from __future__ import annotations

import bpy
import gpu
from gpu_extras.batch import batch_for_shader

from .generation import frame_keypoints
from .mapping import MappingError, keypoints_3d
from .occlusion import Occluder
from .skeleton import COLORS, SKELETON  # noqa: F401  (the tests pin them to the server's)

HIDDEN = (0.4, 0.4, 0.4, 0.8)  # joints outside the frame or behind the body: left out of the request

_handle = None
_updates = 0           # bumped on every scene change: the overlay's geometry is kept until then
_drawn: tuple = (None, None)  # (key, geometry) of the last draw


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
    if scene.camera is not None:
        # As a run sees the frame: with Hide Occluded Joints, joints behind the body are grey
        # and the face sits on the head's surface. A fresh Occluder per draw: the pose may
        # have changed on the same frame.
        occluder = Occluder(armature, mapping) if settings.occlusion else None
        points, keypoints = frame_keypoints(scene, armature, mapping, False, occluder)
        visible = [p is not None for p in keypoints]
    else:
        points = keypoints_3d(armature, mapping)
        visible = [False] * len(points)
    points = [None if p is None else tuple(p) for p in points]  # the GPU batch wants tuples
    return skeleton_geometry(points, visible)


@bpy.app.handlers.persistent
def _scene_changed(*_args) -> None:
    global _updates
    _updates += 1


def drawn_geometry(scene):
    """`scene_geometry`, recomputed only after the scene changed: orbiting the view redraws
    without a change, and hiding occluded joints casts rays against the whole body (~10 ms for
    a 20k-vertex mesh)."""
    global _drawn
    settings = getattr(scene, "pg2", None)
    # The add-on's own settings are part of the key: setting them does not update the depsgraph.
    key = (_updates, scene.as_pointer(), scene.frame_current, scene.frame_subframe) + (() if settings is None else (
        settings.show_overlay, settings.occlusion, settings.preset,
        settings.armature.as_pointer() if settings.armature is not None else None,
        tuple((o.keypoint, o.bone, o.end) for o in settings.overrides)))
    if _drawn[0] != key:
        _drawn = (key, scene_geometry(scene))
    return _drawn[1]


def draw() -> None:
    """The POST_VIEW draw handler: the skeleton over the 3D view."""
    geometry = drawn_geometry(bpy.context.scene)
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
    for handlers in (bpy.app.handlers.depsgraph_update_post, bpy.app.handlers.frame_change_post,
                     bpy.app.handlers.load_post):
        if _scene_changed not in handlers:
            handlers.append(_scene_changed)
    if bpy.app.background or _handle is not None:
        return
    _handle = bpy.types.SpaceView3D.draw_handler_add(draw, (), "WINDOW", "POST_VIEW")


def unregister() -> None:
    global _handle, _drawn
    for handlers in (bpy.app.handlers.depsgraph_update_post, bpy.app.handlers.frame_change_post,
                     bpy.app.handlers.load_post):
        if _scene_changed in handlers:
            handlers.remove(_scene_changed)
    _drawn = (None, None)
    if _handle is not None:
        bpy.types.SpaceView3D.draw_handler_remove(_handle, "WINDOW")
        _handle = None
_updates = 0           # bumped on every scene change: the overlay's geometry is kept until then
_drawn: tuple = (None, None)  # (key, geometry) of the last draw
