"""Poses as files without a server: OpenPose JSON (`pose_keypoints_2d`, COCO-18) and skeleton
images in OpenPose's drawing convention (what ControlNet's OpenPose models take).

Plain numpy (Blender's own): runs on the worker thread. Drawing follows OpenPose's
`draw_bodypose`: black canvas, a filled disk of radius 4 per joint in that joint's colour,
then each limb as a filled ellipse 4 px wide blended at 60 % over what is there.
"""
from __future__ import annotations

import json
import math
from typing import Sequence

import numpy as np

from .skeleton import COLORS, SKELETON

Point = tuple[float, float]

JOINT_RADIUS = 4
STICK_WIDTH = 4
LIMB_ALPHA = 0.6


def pose_json(people: Sequence[Sequence[Point | None]], size: tuple[int, int]) -> dict:
    """An OpenPose JSON object: one entry per person, 18 × (x, y, confidence); missing = 0, 0, 0."""
    entries = []
    for keypoints in people:
        flat: list[float] = []
        for point in keypoints:
            flat += [0.0, 0.0, 0.0] if point is None else [round(float(point[0]), 3), round(float(point[1]), 3), 1.0]
        entries.append({"person_id": [-1], "pose_keypoints_2d": flat, "face_keypoints_2d": [],
                        "hand_left_keypoints_2d": [], "hand_right_keypoints_2d": [],
                        "pose_keypoints_3d": [], "face_keypoints_3d": [],
                        "hand_left_keypoints_3d": [], "hand_right_keypoints_3d": []})
    return {"version": 1.3, "people": entries, "canvas_width": int(size[0]), "canvas_height": int(size[1])}


def pose_json_bytes(people, size) -> bytes:
    """`pose_json` encoded as UTF-8 text."""
    return json.dumps(pose_json(people, size), indent=1).encode("utf-8")


def _disk_mask(shape, cx: float, cy: float, radius: float):
    h, w = shape
    x0, x1 = max(0, int(math.floor(cx - radius))), min(w, int(math.ceil(cx + radius)) + 1)
    y0, y1 = max(0, int(math.floor(cy - radius))), min(h, int(math.ceil(cy + radius)) + 1)
    if x0 >= x1 or y0 >= y1:
        return None
    ys, xs = np.mgrid[y0:y1, x0:x1]
    return (slice(y0, y1), slice(x0, x1)), (xs - cx) ** 2 + (ys - cy) ** 2 <= radius * radius


def _ellipse_mask(shape, a: Point, b: Point, half_width: float):
    """Pixels inside the ellipse with the segment a-b as major axis and `half_width` minor semi-axis."""
    h, w = shape
    cx, cy = (a[0] + b[0]) / 2, (a[1] + b[1]) / 2
    half_length = math.hypot(b[0] - a[0], b[1] - a[1]) / 2
    reach = max(half_length, half_width) + 1
    x0, x1 = max(0, int(cx - reach)), min(w, int(cx + reach) + 1)
    y0, y1 = max(0, int(cy - reach)), min(h, int(cy + reach) + 1)
    if x0 >= x1 or y0 >= y1:
        return None
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    angle = math.atan2(b[1] - a[1], b[0] - a[0])
    c, s = math.cos(angle), math.sin(angle)
    along = (xs - cx) * c + (ys - cy) * s
    across = -(xs - cx) * s + (ys - cy) * c
    inside = (along / max(half_length, 0.5)) ** 2 + (across / half_width) ** 2 <= 1.0
    return (slice(y0, y1), slice(x0, x1)), inside


def draw_skeleton(people: Sequence[Sequence[Point | None]], size: tuple[int, int],
                  canvas: np.ndarray | None = None) -> np.ndarray:
    """An (H, W, 3) uint8 image of every person's skeleton, OpenPose style, on black (or on `canvas`)."""
    width, height = size
    image = np.zeros((height, width, 3), np.uint8) if canvas is None else canvas[..., :3].copy()
    for keypoints in people:
        for i, point in enumerate(keypoints):
            if point is None:
                continue
            found = _disk_mask(image.shape[:2], point[0], point[1], JOINT_RADIUS)
            if found is not None:
                region, mask = found
                image[region][mask] = COLORS[i]
    for keypoints in people:
        for limb, (a, b) in enumerate(SKELETON):
            if keypoints[a] is None or keypoints[b] is None:
                continue
            found = _ellipse_mask(image.shape[:2], keypoints[a], keypoints[b], STICK_WIDTH / 2 + 0.5)
            if found is None:
                continue
            region, mask = found
            patch = image[region]
            blended = patch[mask].astype(np.float32) * (1 - LIMB_ALPHA) + np.float32(COLORS[limb]) * LIMB_ALPHA
            patch[mask] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return image
