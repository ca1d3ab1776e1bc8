"""Camera projection of the mapped joints into render-frame pixels, and the "person" crop.

Pixels: x right, y down, origin at the frame's top-left corner; the frame is the render
resolution times its percentage (the target frame of docs/protocol.md), or the render border
when the scene crops its renders to it: the frame is what Blender writes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from bpy_extras.object_utils import world_to_camera_view

from .mapping import BoneMapping, armature_mapping, keypoints_3d

Point = tuple[float, float]


class ProjectionError(ValueError):
    """A scene that cannot be projected (no camera)."""


def _full_frame(render) -> tuple[int, int]:
    """The camera's whole frame (W, H): resolution × percentage, in whole numbers as Blender
    computes it (800 px at 29 % is 232 px; in floats, 0.29 × 800 truncates to 231)."""
    percentage = render.resolution_percentage
    return (max(1, render.resolution_x * percentage // 100),
            max(1, render.resolution_y * percentage // 100))


def frame_region(scene) -> tuple[int, int, int, int]:
    """(x, y, W, H): where the written render lies in the camera's full frame, in pixels from
    its top-left corner. The full frame is resolution × percentage; with Render Region and Crop
    to Render Region on, Blender writes only the region, its edges truncated to whole pixels
    (in float32, as Blender computes them; its y runs from the bottom)."""
    import numpy as np
    render = scene.render
    full_w, full_h = _full_frame(render)
    if not (render.use_border and render.use_crop_to_border):
        return 0, 0, full_w, full_h
    f32 = np.float32
    x0, x1 = (int(f32(v) * f32(full_w)) for v in (render.border_min_x, render.border_max_x))
    y0, y1 = (int(f32(v) * f32(full_h)) for v in (render.border_min_y, render.border_max_y))
    return x0, full_h - y1, max(1, x1 - x0), max(1, y1 - y0)


def frame_size(scene) -> tuple[int, int]:
    """Render frame (W, H) in pixels, as Blender sizes its renders (`frame_region`)."""
    return frame_region(scene)[2:]


def pixel_aspect(scene) -> float:
    """Width over height of one render pixel: Blender's Pixel Aspect X / Y (1 for square
    pixels; anamorphic and some video presets differ)."""
    render = scene.render
    return render.pixel_aspect_x / render.pixel_aspect_y


def square_scale(aspect: float) -> tuple[float, float]:
    """(sx, sy) that take frame pixels of `pixel_aspect` to square pixels showing the same
    picture. One axis shrinks and none grows, so a frame within the server's size limit stays
    within it."""
    return (aspect, 1.0) if aspect < 1.0 else (1.0, 1.0 / aspect)


def project_points(scene, camera, points, keep_outside: bool = False) -> list[Point | None]:
    """Project world points (None passes through) to frame pixels; None behind the camera,
    and outside the frame unless `keep_outside`."""
    x0, y0, width, height = frame_region(scene)
    full_w, full_h = _full_frame(scene.render)
    result: list[Point | None] = []
    for point in points:
        if point is None:
            result.append(None)
            continue
        x, y, depth = world_to_camera_view(scene, camera, point)
        if depth <= 0.0 or not (math.isfinite(x) and math.isfinite(y)):
            result.append(None)
            continue
        x, y = x * full_w - x0, (1.0 - y) * full_h - y0
        if not keep_outside and not (0.0 <= x <= width and 0.0 <= y <= height):
            result.append(None)
            continue
        result.append((x, y))
    return result


def project_armature(scene, armature, camera=None, mapping: BoneMapping | None = None,
                     keep_outside: bool = False) -> list[Point | None]:
    """18 keypoints (x, y) or None of `armature` in its current pose, seen by `scene.camera`.

    Pass a `mapping` from `armature_mapping` to skip resolving the bones on every frame.
    """
    camera = camera if camera is not None else scene.camera
    if camera is None:
        raise ProjectionError("the scene has no camera: add one and make it the active camera")
    if mapping is None:
        mapping = armature_mapping(armature)
    return project_points(scene, camera, keypoints_3d(armature, mapping), keep_outside)


@dataclass(frozen=True)
class Crop:
    """A rectangle of the frame in pixels (may reach outside it) and its keypoints."""
    x: int
    y: int
    width: int
    height: int

    def shift(self, keypoints: Sequence[Point | None]) -> list[Point | None]:
        """Keypoints in the crop's own pixels."""
        return [None if p is None else (p[0] - self.x, p[1] - self.y) for p in keypoints]


def person_crop(keypoints: Sequence[Point | None], aspect: float, margin: float = 0.15) -> Crop:
    """The rectangle around the visible keypoints with width/height = `aspect`, grown by
    `margin` of its height on every side; clamped to at least 8 px per side."""
    visible = [p for p in keypoints if p is not None]
    if len(visible) < 2:
        raise ProjectionError("fewer than two joints are visible: the person crop needs a pose "
                              "in view of the camera")
    xs, ys = [p[0] for p in visible], [p[1] for p in visible]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    height = max(max(ys) - min(ys), (max(xs) - min(xs)) / aspect)
    # The face and feet extend past the outermost joints: the margin covers them.
    height = max(8.0, height * (1.0 + 2.0 * margin))
    width = max(8.0, height * aspect)
    w, h = int(round(width)), int(round(height))
    return Crop(int(round(cx - w / 2)), int(round(cy - h / 2)), w, h)
