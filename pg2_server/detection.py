"""Keypoints detected in photos: MediaPipe BlazePose's 33 landmarks as COCO-18 (the `pose` extra).

BlazePose (MediaPipe 0.10.14, `pose_landmark_full.tflite`, shipped inside the wheel, so nothing
is downloaded) finds one person per image and gives 33 landmarks with a visibility in [0, 1].
They map to the project's COCO-18 order (pg2_server.wire.keypoints) as follows; BlazePose's "left"/"right" are
the subject's own, as ours:

    nose ← 0, right/left eye ← 5/2, right/left ear ← 8/7, right/left shoulder ← 12/11,
    elbow ← 14/13, wrist ← 16/15, hip ← 24/23, knee ← 26/25, ankle ← 28/27,
    neck ← the midpoint of the shoulders when both are kept.

A keypoint is kept when its visibility reaches `visibility` (default 0.5) and it lies inside the
image; otherwise it is None. Coordinates are frame pixels with integer = pixel centre, so they
fit any image size and aspect ratio (BlazePose's normalised x, y are multiplied by W and H).

Several people: BlazePose reports one. To find the others the person found is painted out (its
segmentation mask, grown, filled with the image's border colour) and the image searched again;
the largest person (by the area of the box around their kept keypoints) is the answer and
`people` says how many were found.

This module imports neither torch nor the model: `pg2-server pose` and evaluation use it alone.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .drawing import read_rgb
from .errors import SetupError
from .keypoints import COUNT, INDEX, NAMES, box_area, pose_to_json
from .pose import crop_box, person_box

# BlazePose landmark index per COCO-18 keypoint, in NAMES order; None = derived (the neck).
BLAZEPOSE_INDEX: tuple[int | None, ...] = (
    0, None,            # nose, neck
    12, 14, 16,         # right shoulder, elbow, wrist
    11, 13, 15,         # left shoulder, elbow, wrist
    24, 26, 28,         # right hip, knee, ankle
    23, 25, 27,         # left hip, knee, ankle
    5, 2, 8, 7,         # right eye, left eye, right ear, left ear
)
VISIBILITY = 0.5
MIN_SIDE = 32           # px; BlazePose's detector sees a 224×224 view, below this there is no person to find
MAX_PEOPLE = 4
INSTALL_HINT = ('pose detection needs the `pose` extra: pip install -e ".[pose]" && '
                'pip install --no-deps mediapipe==0.10.14 (see the README, "Pose from a photo")')
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DetectionError(ValueError):
    """One image in which no pose could be detected; the message says why and what to do."""


class DetectorUnavailable(SetupError):
    """MediaPipe is not installed (or not the version that ships its models)."""


@dataclass
class Detection:
    """The pose found in one image: COCO-18 keypoints in its pixels, and what was seen."""
    size: tuple[int, int]                       # (W, H) of the image
    keypoints: np.ndarray                       # (18, 2) float64, NaN = not detected
    visibility: np.ndarray                      # (18,) BlazePose's visibility (neck: the lower shoulder's)
    people: int = 1                             # people found; above 1 the largest was taken
    notes: list[str] = field(default_factory=list)

    @property
    def found(self) -> int:
        """How many of the 18 keypoints were detected."""
        return int((~np.isnan(self.keypoints[:, 0])).sum())

    def to_json(self) -> dict:
        """The project's pose JSON: {"size": [W, H], "keypoints": [[x, y] or null, ...]}."""
        data = pose_to_json(self.size, self.keypoints)
        data["keypoints"] = [None if p is None else [round(p[0], 2), round(p[1], 2)] for p in data["keypoints"]]
        return data

    def to_openpose(self) -> dict:
        """OpenPose's JSON (COCO-18 x, y, confidence per keypoint; 0, 0, 0 = missing)."""
        flat: list[float] = []
        for point, confidence in zip(self.keypoints, self.visibility):
            if np.isnan(point).any():
                flat += [0.0, 0.0, 0.0]
            else:
                flat += [round(float(point[0]), 2), round(float(point[1]), 2), round(float(confidence), 4)]
        return {"version": 1.3, "canvas_width": int(self.size[0]), "canvas_height": int(self.size[1]),
                "people": [{"person_id": [-1], "pose_keypoints_2d": flat}]}


def _import_mediapipe():
    """mediapipe's pose solution, with protobuf 6's spelling of the two calls it still makes the old way."""
    try:
        from google.protobuf import message_factory, symbol_database
    except ImportError as e:
        raise DetectorUnavailable(INSTALL_HINT) from e
    # mediapipe 0.10.14 calls GetPrototype, which protobuf ≥ 5 replaced by GetMessageClass;
    # without this its packet getters fail on every image.
    for cls in (symbol_database.SymbolDatabase, message_factory.MessageFactory):
        if not hasattr(cls, "GetPrototype"):
            cls.GetPrototype = lambda self, descriptor: message_factory.GetMessageClass(descriptor)
    try:
        from mediapipe.python.solutions import pose as mp_pose
    except ImportError as e:
        raise DetectorUnavailable(f"{INSTALL_HINT} ({e})") from e
    return mp_pose


def available() -> bool:
    """True when MediaPipe's pose solution can be imported here."""
    try:
        _import_mediapipe()
    except DetectorUnavailable:
        return False
    return True


def landmarks_to_coco(landmarks: np.ndarray, size: tuple[int, int],
                      visibility: float = VISIBILITY) -> tuple[np.ndarray, np.ndarray]:
    """BlazePose landmarks (33, 3: normalised x, y, visibility) → COCO-18 pixels and visibility.

    Returns ((18, 2) keypoints with NaN where not kept, (18,) visibility).
    """
    width, height = size
    landmarks = np.asarray(landmarks, dtype=np.float64)
    points = np.full((COUNT, 2), np.nan)
    seen = np.zeros(COUNT)
    for i, source in enumerate(BLAZEPOSE_INDEX):
        if source is None:
            continue
        x, y, v = landmarks[source]
        seen[i] = v
        # Normalised 0..1 spans the image's edges; pixel centres are integers.
        px, py = x * width - 0.5, y * height - 0.5
        if v >= visibility and -0.5 <= px <= width - 0.5 and -0.5 <= py <= height - 0.5:
            points[i] = (px, py)
    right, left, neck = INDEX["right_shoulder"], INDEX["left_shoulder"], INDEX["neck"]
    seen[neck] = min(seen[right], seen[left])
    if not np.isnan(points[[right, left]]).any():
        points[neck] = points[[right, left]].mean(axis=0)
    return points, seen


def check_photo(image: np.ndarray, where: str = "image") -> np.ndarray:
    """An RGB uint8 (H, W, 3) image large enough to detect a person in, or a DetectionError."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise DetectionError(f"{where}: expected an RGB uint8 image (H, W, 3), got "
                             f"{getattr(image, 'shape', type(image).__name__)}")
    height, width = image.shape[:2]
    if min(width, height) < MIN_SIDE:
        raise DetectionError(f"{where}: the image is {width}×{height} px; pose detection needs at least "
                             f"{MIN_SIDE} px on the shorter side (use a larger photo)")
    return image


def read_photo(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8, with a DetectionError that names the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise DetectionError(f"{path}: no such file")
    try:
        return read_rgb(path)
    except ValueError:
        raise DetectionError(f"{path}: not an image OpenCV can read (PNG, JPEG, BMP, WebP)") from None


class PoseDetector:
    """BlazePose (full model, static images) turned into COCO-18 keypoints; one instance per process.

    `several_people`: search again with each found person painted out, keep the largest (costs
    one more BlazePose pass per image; turn it off where one person is known to be in view).
    Thread-safe: calls are serialised, as MediaPipe's graph runs one image at a time.
    """

    def __init__(self, visibility: float = VISIBILITY, several_people: bool = True,
                 min_detection_confidence: float = 0.5):
        if not 0.0 <= visibility <= 1.0:
            raise ValueError(f"visibility threshold must be in [0, 1], got {visibility}")
        mp_pose = _import_mediapipe()
        self.visibility = visibility
        self.several_people = several_people
        self._pose = mp_pose.Pose(static_image_mode=True, model_complexity=1, smooth_landmarks=False,
                                  enable_segmentation=several_people,
                                  min_detection_confidence=min_detection_confidence)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Free MediaPipe's graph."""
        self._pose.close()

    def __enter__(self) -> PoseDetector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, image: np.ndarray):
        """One BlazePose pass: ((33, 3) landmarks, segmentation mask or None), or None if no person."""
        with self._lock:
            result = self._pose.process(np.ascontiguousarray(image))
        if result.pose_landmarks is None:
            return None
        landmarks = np.array([(p.x, p.y, p.visibility) for p in result.pose_landmarks.landmark])
        mask = getattr(result, "segmentation_mask", None)
        return landmarks, mask

    def detect(self, image: np.ndarray, where: str = "image") -> Detection:
        """The pose of the (largest) person in an RGB uint8 image; DetectionError if there is none."""
        check_photo(image, where)
        height, width = image.shape[:2]
        size = (width, height)
        first = self._run(image)
        if first is None:
            raise DetectionError(f"{where}: no person found (BlazePose needs a person's head and "
                                 "shoulders in view; crop closer if the person is small)")
        people = [landmarks_to_coco(first[0], size, self.visibility)]
        if self.several_people:
            people += self._others(image, first, size)
        areas = [box_area(points) for points, _ in people]
        best = int(np.argmax(areas))
        points, seen = people[best]
        notes = []
        if len(people) > 1:
            notes.append(f"{where}: {len(people)} people found; took the largest")
        if np.isnan(points[:, 0]).all():
            raise DetectionError(f"{where}: a person was found but no keypoint reached visibility "
                                 f"{self.visibility} (a blurred, dark or heavily cut photo?)")
        return Detection(size, points, seen, people=len(people), notes=notes)

    def _others(self, image: np.ndarray, first, size) -> list[tuple[np.ndarray, np.ndarray]]:
        """People beyond the first: paint each found one out and search again."""
        height, width = image.shape[:2]
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        fill = np.median(border, axis=0).astype(np.uint8)
        grow = np.ones((max(3, min(width, height) // 20),) * 2, np.uint8)
        work = image.copy()
        found = [landmarks_to_coco(first[0], size, self.visibility)[0]]
        others = []
        last = first
        for _ in range(MAX_PEOPLE - 1):
            landmarks, mask = last
            if mask is not None:
                region = cv2.dilate((mask > 0.3).astype(np.uint8), grow) > 0
            else:
                region = np.zeros((height, width), bool)
            # Also the box around the landmarks: hair and loose clothes outside the mask.
            xy = landmarks[landmarks[:, 2] >= self.visibility, :2] * (width, height)
            if len(xy):
                (x0, y0), (x1, y1) = xy.min(axis=0), xy.max(axis=0)
                pad = 0.1 * max(x1 - x0, y1 - y0)
                # clipped at 0 both ends: landmarks above or left of the photo must not wrap to its far side
                region[max(0, int(y0 - pad)):max(0, int(y1 + pad) + 1),
                       max(0, int(x0 - pad)):max(0, int(x1 + pad) + 1)] = True
            work[region] = fill
            last = self._run(work)
            if last is None:
                break
            points, seen = landmarks_to_coco(last[0], size, self.visibility)
            centre = np.nanmean(points, axis=0) if not np.isnan(points[:, 0]).all() else None
            # A person again where one was painted out is the same person's remains, not another.
            if (~np.isnan(points[:, 0])).sum() < 6 or centre is None or \
                    any(_inside_box(centre, other) for other in found):
                break
            found.append(points)
            others.append((points, seen))
        return others

    def detect_file(self, path: str | Path) -> Detection:
        """The pose of the person in an image file (see `detect`)."""
        return self.detect(read_photo(path), str(path))


@dataclass(frozen=True)
class Framing:
    """What frame_person did with a photo: the box it cropped (x, y, w, h), or None and why not."""
    box: tuple[int, int, int, int] | None
    note: str


def frame_person(image: np.ndarray, detector: PoseDetector, aspect: float) -> tuple[np.ndarray, Framing]:
    """A photo cropped to its person as the datasets frame people (pose.person_box, width/height
    = `aspect`, the model canvas's), for a source whose person is small in it: a phone photo,
    a wide shot. A photo framed like the datasets already, or one where no person is found, is
    returned as it is — framing is a help, never a reason to refuse a photo."""
    try:
        detection = detector.detect(image, "source photo")
    except DetectionError as e:
        return image, Framing(None, f"left as taken: {e}")
    box = person_box(detection.keypoints, detection.size, aspect)
    if box is None:
        return image, Framing(None, "left as taken: the person fills the photo as in the datasets")
    return crop_box(image, box), Framing(box, f"cropped to the person: {box[2]}×{box[3]} at ({box[0]}, {box[1]})")


def _inside_box(point: np.ndarray, points: np.ndarray) -> bool:
    kept = points[~np.isnan(points[:, 0])]
    if len(kept) < 2:
        return False
    low, high = kept.min(axis=0), kept.max(axis=0)
    return bool((point >= low).all() and (point <= high).all())


def image_files(paths) -> list[Path]:
    """Image files named, or found (sorted, not recursively) in folders named, in `paths`."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)
    return files


__all__ = ["BLAZEPOSE_INDEX", "Detection", "DetectionError", "DetectorUnavailable", "Framing", "PoseDetector",
           "available", "check_photo", "frame_person", "image_files", "landmarks_to_coco", "read_photo", "NAMES"]
