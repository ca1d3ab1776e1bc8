"""Pictures people look at: poses drawn in OpenPose colours, and side-by-side sample grids."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .codec import decode_photo
from .keypoints import COLORS, SKELETON, as_array


def draw_pose(keypoints, size: tuple[int, int], background: np.ndarray | None = None,
              thickness: int | None = None) -> np.ndarray:
    """Draw 18 keypoints (frame pixels) as an OpenPose skeleton on a (H, W, 3) uint8 RGB image.

    `size` is (W, H); the background is black unless an image of that size is given.
    """
    width, height = size
    if background is None:
        canvas = np.zeros((height, width, 3), np.uint8)
    else:
        canvas = np.ascontiguousarray(background[..., :3]).copy()
    # OpenCV draws with int32 coordinates; points a million pixels out are off the image anyway.
    points = np.clip(as_array(keypoints), -(1 << 20), 1 << 20)
    if thickness is None:
        thickness = max(1, round(min(width, height) / 64))
    radius = thickness + 1
    for index, (a, b) in enumerate(SKELETON):
        if np.isnan(points[a]).any() or np.isnan(points[b]).any():
            continue
        pa = tuple(int(round(v)) for v in points[a])
        pb = tuple(int(round(v)) for v in points[b])
        cv2.line(canvas, pa, pb, COLORS[index % len(COLORS)], thickness, cv2.LINE_AA)
    for index, point in enumerate(points):
        if not np.isnan(point).any():
            cv2.circle(canvas, tuple(int(round(v)) for v in point), radius, COLORS[index], -1, cv2.LINE_AA)
    return canvas


def image_grid(rows: Sequence[Sequence[np.ndarray]], header: Sequence[str] | None = None,
               cell_height: int | None = None, gap: int = 2) -> np.ndarray:
    """Tile rows of RGB images (any sizes) into one image; cells scaled to a common height.

    `header` labels the columns (e.g. source | target pose | G1 | G2).
    """
    if not rows or not rows[0]:
        raise ValueError("image_grid needs at least one row with one image")
    if cell_height is None:
        cell_height = max(image.shape[0] for row in rows for image in row)

    def fit(image: np.ndarray) -> np.ndarray:
        image = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
        width = max(1, round(image.shape[1] * cell_height / image.shape[0]))
        return cv2.resize(np.ascontiguousarray(image[..., :3]), (width, cell_height), interpolation=cv2.INTER_AREA)

    columns = max(len(row) for row in rows)
    scaled = [[fit(image) for image in row] for row in rows]
    widths = [max(row[c].shape[1] for row in scaled if c < len(row)) for c in range(columns)]
    label_height = 18 if header else 0
    total_w = sum(widths) + gap * (columns + 1)
    total_h = label_height + len(rows) * cell_height + gap * (len(rows) + 1)
    grid = np.full((total_h, total_w, 3), 255, np.uint8)
    if header:
        x = gap
        for c, text in enumerate(header[:columns]):
            cv2.putText(grid, text, (x + 2, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
            x += widths[c] + gap
    y = label_height + gap
    for row in scaled:
        x = gap
        for c, image in enumerate(row):
            grid[y:y + cell_height, x:x + image.shape[1]] = image
            x += widths[c] + gap
        y += cell_height + gap
    return grid


def read_rgb(path) -> np.ndarray:
    """Read an image file as uint8 RGB (H, W, 3) as codec.decode_photo does, with an error that names the file."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        data = b""
    image = decode_photo(data) if data else None
    if image is None:
        raise ValueError(f"cannot read image {path}: missing, or not a PNG/JPEG/BMP file")
    return image


def write_rgb(path, image: np.ndarray) -> None:
    """Write a uint8 RGB (or RGBA) image; the format follows the file extension."""
    code = cv2.COLOR_RGBA2BGRA if image.ndim == 3 and image.shape[2] == 4 else cv2.COLOR_RGB2BGR
    try:
        written = cv2.imwrite(str(path), cv2.cvtColor(image, code))
    except cv2.error:   # no extension, one OpenCV has no writer for, or a folder
        written = False
    if not written:
        raise ValueError(f"cannot write image {path}: name a .png or .jpg file in a writable folder")
