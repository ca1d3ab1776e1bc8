"""Pixels of results: raw server images to arrays, compositing a crop into a frame, PNG files.

numpy is Blender's own; PNG encoding uses zlib so nothing depends on Blender's image API
(the writing runs on a worker thread).
"""
from __future__ import annotations

import os
import struct
import tempfile
import zlib

import numpy as np


def raw_image(data: bytes, width: int, height: int, channels: int) -> np.ndarray:
    """A server's raw image payload as an (H, W, C) uint8 array."""
    expected = width * height * channels
    if len(data) != expected:
        raise ValueError(f"raw image of {width}x{height}x{channels} needs {expected} bytes, "
                         f"got {len(data)}")
    return np.frombuffer(data, np.uint8).reshape(height, width, channels)


def composite(frame: np.ndarray, image: np.ndarray, x: int, y: int) -> np.ndarray:
    """Paste `image` (RGB or RGBA, alpha = coverage) into a copy of `frame` with its top-left
    corner at (x, y); the parts outside the frame are dropped. Both uint8, frame RGB or RGBA."""
    out = frame.copy()
    fh, fw = frame.shape[:2]
    ih, iw = image.shape[:2]
    x0, y0, x1, y1 = max(0, x), max(0, y), min(fw, x + iw), min(fh, y + ih)
    if x0 >= x1 or y0 >= y1:
        return out
    patch = image[y0 - y:y1 - y, x0 - x:x1 - x]
    target = out[y0:y1, x0:x1]
    if patch.shape[2] == 4:
        alpha = patch[..., 3:4].astype(np.float32) / 255.0
    else:
        alpha = np.ones(patch.shape[:2] + (1,), np.float32)
    rgb = patch[..., :3].astype(np.float32) * alpha + target[..., :3].astype(np.float32) * (1 - alpha)
    target[..., :3] = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    if out.shape[2] == 4:
        # Alpha "over": coverage of the frame grows by the person's coverage.
        below = target[..., 3:4].astype(np.float32) / 255.0
        target[..., 3:4] = np.clip(np.rint((alpha + below * (1 - alpha)) * 255), 0, 255).astype(np.uint8)
    return out


def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """`image` (H, W, C uint8; alpha, if any, is coverage) resampled bilinearly to
    width × height, pixel centres aligned as OpenCV's INTER_LINEAR does. For enlarging:
    shrinking by more than 2× would alias."""
    src = image.astype(np.float32)
    if src.shape[2] == 4:   # premultiplied, so that uncovered pixels lend no colour to edges
        src[..., :3] *= src[..., 3:4] / 255.0
    for axis, size in ((0, height), (1, width)):
        n = src.shape[axis]
        at = np.clip((np.arange(size, dtype=np.float32) + 0.5) * (n / size) - 0.5, 0, n - 1)
        lo = np.floor(at).astype(np.intp)
        hi = np.minimum(lo + 1, n - 1)
        t = (at - lo).reshape((-1, 1, 1) if axis == 0 else (1, -1, 1))
        src = np.take(src, lo, axis) * (1 - t) + np.take(src, hi, axis) * t
    if src.shape[2] == 4:
        alpha = src[..., 3:4]
        src[..., :3] = np.where(alpha > 0, src[..., :3] * 255.0 / np.maximum(alpha, 1e-6), 0)
    return np.clip(np.rint(src), 0, 255).astype(np.uint8)


def background(width: int, height: int, color=None) -> np.ndarray:
    """A frame of one RGB colour (0..1 floats), or fully transparent RGBA when `color` is None."""
    if color is None:
        return np.zeros((height, width, 4), np.uint8)
    rgb = np.clip(np.rint(np.asarray(color[:3], np.float32) * 255), 0, 255).astype(np.uint8)
    return np.broadcast_to(rgb, (height, width, 3)).copy()


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3|4) uint8 array."""
    image = np.ascontiguousarray(image, np.uint8)
    height, width, channels = image.shape
    color_type = {3: 2, 4: 6}[channels]
    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, -1)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b""))


# JPEG start-of-frame markers carry the image size (not DHT C4, JPG C8, DAC CC).
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def file_image_size(path: str) -> tuple[int, int] | None:
    """(W, H) of a PNG or JPEG file from its header; None for anything else or a damaged file."""
    try:
        with open(path, "rb") as file:
            head = file.read(24)
            if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
                return struct.unpack(">II", head[16:24])
            if head[:2] != b"\xff\xd8":
                return None
            file.seek(2)
            while True:
                marker = file.read(2)
                if len(marker) < 2 or marker[0] != 0xFF:
                    return None
                if marker[1] == 0xFF:          # fill byte before a marker
                    file.seek(-1, os.SEEK_CUR)
                    continue
                if marker[1] in (0x01, *range(0xD0, 0xD8)):   # markers without a length
                    continue
                length = struct.unpack(">H", file.read(2))[0]
                if marker[1] in _JPEG_SOF:
                    height, width = struct.unpack(">xHH", file.read(5))
                    return width, height
                file.seek(length - 2, os.SEEK_CUR)
    except (OSError, struct.error):
        return None


def write_atomic(path: str, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, so a crash or a
    cancel never leaves a half-written result under the final name."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".pg2-", suffix=".part", dir=folder)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.chmod(temporary, 0o644)   # mkstemp makes 0600; frames are for compositors and other users
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


def to_blender_pixels(image: np.ndarray) -> np.ndarray:
    """Flat float RGBA in Blender's bottom-up row order, for `Image.pixels.foreach_set`."""
    height, width, channels = image.shape
    rgba = np.empty((height, width, 4), np.float32)
    rgba[..., :3] = image[..., :3] / 255.0
    rgba[..., 3] = image[..., 3] / 255.0 if channels == 4 else 1.0
    return rgba[::-1].reshape(-1)
