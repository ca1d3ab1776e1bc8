"""Pose encoding (heat-maps, pose mask), framing a target frame into the model canvas, framing
a source photo to its person, flips.

Coordinates are pixels, x right, y down, origin top-left; integer coordinates are pixel
centres (the convention of cv2.resize, so keypoints and images stay aligned after resizing).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from .keypoints import INDEX, MASK_LIMBS, as_array, flip_keypoints
from .wire.protocol import Size


@lru_cache(maxsize=16)
def _disk_offsets(radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Row/column offsets of the pixels within Euclidean distance `radius` of a centre."""
    r = np.arange(-radius, radius + 1)
    dy, dx = np.meshgrid(r, r, indexing="ij")
    inside = dy ** 2 + dx ** 2 <= radius ** 2
    return dy[inside], dx[inside]


def _stamp(canvas: np.ndarray, centres: np.ndarray, radius: int, value, channels: np.ndarray | None = None) -> None:
    """Set the disks of `radius` around the pixels nearest each (x, y) of `centres` (N, 2) to `value`.

    With `channels` (N,), disk i goes to channel channels[i] of a (C, H, W) canvas; otherwise
    every disk goes to the (H, W) canvas. Pixels outside the canvas are clipped.
    """
    if len(centres) == 0:
        return
    dy, dx = _disk_offsets(radius)
    # np.rint rounds half to even, as Python's round() does for the scalar version of this rule.
    rows = (np.rint(centres[:, 1]).astype(np.int64)[:, None] + dy[None, :]).ravel()
    cols = (np.rint(centres[:, 0]).astype(np.int64)[:, None] + dx[None, :]).ravel()
    h, w = canvas.shape[-2:]
    keep = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    if channels is None:
        canvas[rows[keep], cols[keep]] = value
    else:
        canvas[np.repeat(channels, len(dy))[keep], rows[keep], cols[keep]] = value


def _inside(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Per keypoint (N, 2): present and its nearest pixel lies on the canvas."""
    x, y = np.rint(points[:, 0]), np.rint(points[:, 1])
    with np.errstate(invalid="ignore"):
        return ~np.isnan(x) & ~np.isnan(y) & (x >= 0) & (x < width) & (y >= 0) & (y < height)


def heatmaps(keypoints, size: tuple[int, int], radius: int = 4, kind: str = "disk",
             sigma: float = 6.0) -> np.ndarray:
    """Pose heat-maps on a canvas of `size` (W, H), float32 (18, H, W).

    `disk` (PG2): +1 within Euclidean distance `radius` of the keypoint's pixel, -1 elsewhere.
    `gaussian` (PATN and later): exp(-d²/2σ²) in [0, 1]. A missing keypoint, or one whose pixel
    lies outside the canvas, gives an empty channel (-1 for disk, 0 for gaussian).
    """
    width, height = size
    points = as_array(keypoints)
    present = np.flatnonzero(_inside(points, height, width))
    if kind == "disk":
        maps = np.full((len(points), height, width), -1.0, dtype=np.float32)
        _stamp(maps, points[present], radius, 1.0, channels=present)
        return maps
    if kind == "gaussian":
        maps = np.zeros((len(points), height, width), dtype=np.float32)
        ys = np.arange(height, dtype=np.float32)[:, None]
        xs = np.arange(width, dtype=np.float32)[None, :]
        for channel in present:
            x, y = points[channel]
            maps[channel] = np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma ** 2))
        return maps
    raise ValueError(f"unknown heat-map kind {kind!r}; use 'disk' or 'gaussian'")


def _near_canvas(a: np.ndarray, b: np.ndarray, height: int, width: int,
                 margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Per segment a→b (N, 2): the interval [lo, hi] of t in [0, 1] where a + t(b - a) lies
    within `margin` pixels of the canvas (Liang–Barsky clipping); lo > hi when it never does."""
    lo, hi = np.zeros(len(a)), np.ones(len(a))
    d = b - a
    for axis, size in ((0, width), (1, height)):
        start, delta = a[:, axis], d[:, axis]
        low, high = -margin, size - 1 + margin
        with np.errstate(divide="ignore", invalid="ignore"):
            t_low, t_high = (low - start) / delta, (high - start) / delta
        moving = delta != 0
        enter = np.where(moving, np.minimum(t_low, t_high), -np.inf)
        leave = np.where(moving, np.maximum(t_low, t_high), np.inf)
        # A segment parallel to this axis is near the canvas everywhere or nowhere.
        outside = ~moving & ((start < low) | (start > high))
        lo = np.maximum(lo, enter)
        hi = np.where(outside, -1.0, np.minimum(hi, leave))
    return lo, hi


_CLOSING_KERNEL = np.ones((5, 5), np.uint8)
_LIMB_ENDS = np.array(MASK_LIMBS)


def pose_mask(keypoints, size: tuple[int, int], radius: int = 4) -> np.ndarray:
    """The original's pose mask M on a canvas of `size` (W, H), uint8 (H, W) in {0, 1}.

    For each of the 23 limbs with both ends present: disks of `radius` at both ends and at
    int(dist/radius) - 1 evenly spaced interior points; their union, closed with a 5×5 square.
    """
    width, height = size
    points = as_array(keypoints)
    mask = np.zeros((height, width), dtype=np.uint8)
    a, b = points[_LIMB_ENDS[:, 0]], points[_LIMB_ENDS[:, 1]]
    both = ~np.isnan(a[:, 0]) & ~np.isnan(b[:, 0])
    a, b = a[both], b[both]
    # Interior samples i/n, i = 1..n-1, with n = int(length / radius), per limb. Only the samples
    # whose disk can touch the canvas are made: a limb to a keypoint far off the frame would
    # otherwise cost memory and time in proportion to its length, not to the canvas.
    samples = (np.hypot(b[:, 0] - a[:, 0], b[:, 1] - a[:, 1]) / radius).astype(np.int64)
    near_lo, near_hi = _near_canvas(a, b, height, width, radius + 2)
    first = np.maximum(1, np.ceil(near_lo * samples)).astype(np.int64)
    last = np.minimum(samples - 1, np.floor(near_hi * samples)).astype(np.int64)
    interior = np.maximum(last - first + 1, 0)
    limb = np.repeat(np.arange(len(a)), interior)
    step = np.arange(len(limb)) - np.repeat(np.cumsum(interior) - interior, interior) + first[limb]
    t = step / samples[limb]
    between = a[limb] + (b[limb] - a[limb]) * t[:, None]
    _stamp(mask, np.concatenate([a, b, between]), radius, 1)
    return cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _CLOSING_KERNEL)


def pose_coordinates(keypoints, size: tuple[int, int]) -> np.ndarray:
    """Keypoints as a (36,) float32 vector for the CE pose embedding: x/W, y/H; -1 if missing."""
    width, height = size
    points = as_array(keypoints)
    scaled = points / np.array([width, height], dtype=np.float64)
    scaled[~_inside(points, height, width)] = -1.0
    return scaled.reshape(-1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Framing: a W×H frame fitted into the model canvas (scaled, centred, padded) and back.

@dataclass(frozen=True)
class FrameFit:
    """How a frame of `frame` pixels sits in a canvas of `canvas` pixels (both Size: W, H).

    The frame is resized to `scaled`, preserving aspect ratio to the nearest pixel, and placed
    at `offset` = (x, y) in the canvas; the rest is padding.
    """
    frame: Size
    canvas: Size
    scaled: Size
    offset: tuple[int, int]

    @property
    def is_identity(self) -> bool:
        return self.frame == self.canvas

    @property
    def scale(self) -> tuple[float, float]:
        return self.scaled[0] / self.frame[0], self.scaled[1] / self.frame[1]

    def keypoints_to_canvas(self, keypoints) -> np.ndarray:
        """Frame pixels → canvas pixels (NaN stays NaN)."""
        points = as_array(keypoints)
        sx, sy = self.scale
        return np.stack([(points[:, 0] + 0.5) * sx - 0.5 + self.offset[0],
                         (points[:, 1] + 0.5) * sy - 0.5 + self.offset[1]], axis=1)

    def keypoints_to_frame(self, keypoints) -> np.ndarray:
        """Canvas pixels → frame pixels (NaN stays NaN)."""
        points = as_array(keypoints)
        sx, sy = self.scale
        return np.stack([(points[:, 0] - self.offset[0] + 0.5) / sx - 0.5,
                         (points[:, 1] - self.offset[1] + 0.5) / sy - 0.5], axis=1)

    def image_to_canvas(self, image: np.ndarray, border: str = "replicate") -> np.ndarray:
        """Resize a frame-sized image (H, W[, C]) into the canvas, padding the margins.

        `border` is "replicate" (repeat the edge pixels, the default: no hard edge for the
        network to copy) or "constant" (zeros).
        """
        check_image(image, "image", channels=None)
        if image.shape[1] != self.frame[0] or image.shape[0] != self.frame[1]:
            raise ValueError(f"image is {image.shape[1]}×{image.shape[0]} but the frame is "
                             f"{self.frame[0]}×{self.frame[1]}")
        if self.is_identity:
            return image.copy()
        interpolation = cv2.INTER_AREA if self.scaled[0] < self.frame[0] else cv2.INTER_LINEAR
        resized = cv2.resize(image, self.scaled, interpolation=interpolation)
        if resized.ndim == 2 and image.ndim == 3:
            resized = resized[:, :, None]
        top, left = self.offset[1], self.offset[0]
        bottom = self.canvas.height - self.scaled.height - top
        right = self.canvas.width - self.scaled.width - left
        mode = cv2.BORDER_REPLICATE if border == "replicate" else cv2.BORDER_CONSTANT
        padded = cv2.copyMakeBorder(resized, top, bottom, left, right, mode, value=0)
        if padded.ndim == 2 and image.ndim == 3:
            padded = padded[:, :, None]
        return padded

    def image_to_frame(self, image: np.ndarray, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
        """Crop a canvas-sized image (H, W[, C]) back to the frame's area and resize to W×H."""
        if image.shape[0] != self.canvas.height or image.shape[1] != self.canvas.width:
            raise ValueError(f"image is {image.shape[1]}×{image.shape[0]} but the canvas is "
                             f"{self.canvas.width}×{self.canvas.height}")
        if self.is_identity:
            return image.copy()
        x, y = self.offset
        crop = image[y:y + self.scaled[1], x:x + self.scaled[0]]
        resized = cv2.resize(np.ascontiguousarray(crop), self.frame, interpolation=interpolation)
        if resized.ndim == 2 and image.ndim == 3:
            resized = resized[:, :, None]
        return resized


def fit_frame(frame: tuple[int, int], canvas: tuple[int, int]) -> FrameFit:
    """Fit a frame into a canvas, both (width, height) pixels, preserving aspect ratio."""
    width, height = frame
    canvas_w, canvas_h = canvas
    for name, value in (("frame width", width), ("frame height", height),
                        ("canvas height", canvas_h), ("canvas width", canvas_w)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    scale = min(canvas_w / width, canvas_h / height)
    scaled_w = min(canvas_w, max(1, round(width * scale)))
    scaled_h = min(canvas_h, max(1, round(height * scale)))
    offset = ((canvas_w - scaled_w) // 2, (canvas_h - scaled_h) // 2)
    return FrameFit(Size(int(width), int(height)), Size(int(canvas_w), int(canvas_h)),
                    Size(int(scaled_w), int(scaled_h)), (int(offset[0]), int(offset[1])))


# ---------------------------------------------------------------------------------------------
# A source photo framed to its person, as the datasets frame people.

PERSON_MARGIN = 0.15   # of the box height, on every side: the head and feet reach past the joints
FRAMED = 0.8           # a person whose box is this much of the photo's height is left as taken
_ANKLES = (INDEX["right_ankle"], INDEX["left_ankle"])


def person_box(person, frame: tuple[int, int], aspect: float, margin: float = PERSON_MARGIN,
               framed: float = FRAMED) -> tuple[int, int, int, int] | None:
    """The box (x, y, w, h) of a photo of `frame` (W, H) pixels that frames its person as the
    datasets do — the visible keypoints `person` (18, 2) centred, grown by `margin` of the
    height on every side, width/height = `aspect` (the model canvas's) — or None where the photo
    already does: the box would span at least `framed` of the height the photo fills in the
    canvas, or fewer than two keypoints are known.

    A photo without ankles is cut (at the thigh, at the knee): its bottom edge stays the
    person's lower end, so a half-body photo keeps its own framing instead of being cut again.
    May reach outside the photo (crop_box pads it).
    """
    points = as_array(person)
    known = points[~np.isnan(points[:, 0])]
    if len(known) < 2:
        return None
    width, height = frame
    (x0, y0), (x1, y1) = known.min(axis=0), known.max(axis=0)
    cut = bool(np.isnan(points[list(_ANKLES), 0]).all())
    if cut:
        y1 = height - 1.0
    box_h = max(y1 - y0, (x1 - x0) / aspect) * (1 + 2 * margin)
    if box_h >= framed * max(height, width / aspect):   # the height the photo spans in the canvas
        return None
    box_w = box_h * aspect
    top = y1 + 1.0 - box_h if cut else (y0 + y1) / 2 - box_h / 2
    return (int(round((x0 + x1) / 2 - box_w / 2)), int(round(top)), max(1, int(round(box_w))),
            max(1, int(round(box_h))))


def person_framed_pose(keypoints, frame: tuple[int, int], aspect: float
                       ) -> tuple[tuple[int, int], np.ndarray, tuple[int, int, int, int] | None]:
    """A target pose moved into the frame person_box gives its person (width/height = `aspect`):
    (frame size, keypoints in it, box), or the pose as it is and None where its frame already
    holds the person as the datasets do. A person small in a wide reference photo then comes out
    at the size the model draws people, not small and blurred in the photo's whole frame."""
    points = as_array(keypoints)
    box = person_box(points, frame, aspect)
    if box is None:
        return (int(frame[0]), int(frame[1])), points, None
    x, y, w, h = box
    return (w, h), points - np.array([x, y], np.float64), box


def crop_box(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The (x, y, w, h) box of an image (H, W, C); where it reaches outside, the edge pixels are
    repeated (the backdrop goes on, as fit_frame pads)."""
    x, y, w, h = box
    height, width = image.shape[:2]
    x0, x1 = min(max(x, 0), width), min(max(x + w, 0), width)
    y0, y1 = min(max(y, 0), height), min(max(y + h, 0), height)
    if x0 < x1 and y0 < y1:   # pad only the part inside the photo, each side by its own overshoot
        return np.ascontiguousarray(cv2.copyMakeBorder(image[y0:y1, x0:x1], y0 - y, y + h - y1, x0 - x,
                                                       x + w - x1, cv2.BORDER_REPLICATE))
    pad = max(-x, -y, x + w - width, y + h - height)   # wholly outside: the nearest edge repeated
    image = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    return np.ascontiguousarray(image[y + pad:y + pad + h, x + pad:x + pad + w])


def flip_horizontal(image: np.ndarray, keypoints) -> tuple[np.ndarray, np.ndarray]:
    """Mirror an image (H, W, C) and its keypoints left-right, swapping left/right joints."""
    return np.ascontiguousarray(image[:, ::-1]), flip_keypoints(keypoints, image.shape[1])


def check_image(image, what: str = "image", channels: int | None = 3) -> np.ndarray:
    """Check that `image` is a non-empty uint8 array (H, W, channels); say what is wrong if not."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{what} must be a numpy uint8 array (H, W, 3), got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"{what} must be uint8 RGB (0-255), got dtype {image.dtype}")
    if image.ndim not in (2, 3) or image.size == 0 or 0 in image.shape:
        raise ValueError(f"{what} must be a non-empty (H, W, 3) array, got shape {image.shape}")
    if channels is not None and (image.ndim != 3 or image.shape[2] != channels):
        raise ValueError(f"{what} must have {channels} channels (H, W, {channels}), got shape {image.shape}")
    return image


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) → float32 (3, H, W) in [-1, 1]."""
    return (image.astype(np.float32).transpose(2, 0, 1) / 127.5) - 1.0


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float (3, H, W) in [-1, 1] → uint8 (H, W, 3), clipped (as the original does when saving)."""
    return np.clip((np.asarray(image, dtype=np.float32).transpose(1, 2, 0) + 1.0) * 127.5 + 0.5,
                   0, 255).astype(np.uint8)


__all__ = [
    "heatmaps", "pose_mask", "pose_coordinates", "FrameFit", "fit_frame", "person_box", "crop_box",
    "flip_horizontal", "check_image", "to_unit_range", "to_uint8",
]

