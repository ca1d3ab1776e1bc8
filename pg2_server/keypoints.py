"""The COCO-18 keypoint schema shared by every part, and the datasets' annotation rows.

Order and left/right convention: `pg2_server.wire.keypoints` ("right" is the subject's own right).
Annotation rows are PATN's `name:[y0, ..., y17]:[x0, ..., x17]` with -1 for a missing joint.
"""
from __future__ import annotations

from contextlib import contextmanager

import json
import math
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .atomic import write_atomic
from .wire.keypoints import COUNT, INDEX, NAMES  # noqa: F401  (the names live with the protocol)

# Pairs swapped by a horizontal flip.
FLIP_PAIRS: tuple[tuple[int, int], ...] = (
    (2, 5), (3, 6), (4, 7), (8, 11), (9, 12), (10, 13), (14, 15), (16, 17),
)
FLIP_PERMUTATION: tuple[int, ...] = tuple(
    next((b if a == i else a for a, b in FLIP_PAIRS if i in (a, b)), i) for i in range(COUNT)
)

# The 23 limbs of the original pose mask, converted from its 1-indexed pairs.
MASK_LIMBS: tuple[tuple[int, int], ...] = tuple((a - 1, b - 1) for a, b in (
    (2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12),
    (12, 13), (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18), (2, 17), (2, 18),
    (9, 12), (12, 6), (9, 3), (17, 18),
))

# OpenPose's drawing skeleton (the first 17 limbs of MASK_LIMBS) and its colours (RGB).
SKELETON: tuple[tuple[int, int], ...] = MASK_LIMBS[:17]
COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)

Keypoints = list  # list of 18 items, each (x, y) or None


class KeypointError(ValueError):
    """Keypoints that do not follow the COCO-18 schema."""


def as_array(keypoints: Sequence | np.ndarray) -> np.ndarray:
    """Validate 18 keypoints ((x, y) or None) and return a (18, 2) float64 array, NaN = missing."""
    if isinstance(keypoints, np.ndarray):
        array = np.asarray(keypoints, dtype=np.float64)
        if array.shape != (COUNT, 2):
            raise KeypointError(f"keypoints must have shape (18, 2), got {array.shape}")
        return array.copy()
    if isinstance(keypoints, (str, bytes)) or not isinstance(keypoints, Sequence):
        raise KeypointError(
            f"keypoints must be a list of 18 [x, y] pairs or None, got {type(keypoints).__name__}")
    if len(keypoints) != COUNT:
        raise KeypointError(
            f"expected 18 keypoints in COCO-18 order ({', '.join(NAMES)}), got {len(keypoints)}")
    array = np.full((COUNT, 2), np.nan)
    for i, point in enumerate(keypoints):
        if point is None:
            continue
        if isinstance(point, (str, bytes)) or not isinstance(point, (Sequence, np.ndarray)) \
                or len(point) != 2:
            raise KeypointError(f"keypoint {i} ({NAMES[i]}) must be [x, y] or None, got {point!r}")
        for value in point:
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise KeypointError(
                    f"keypoint {i} ({NAMES[i]}) has a non-numeric coordinate {value!r}")
            if not math.isfinite(float(value)):
                raise KeypointError(
                    f"keypoint {i} ({NAMES[i]}) has a non-finite coordinate {value!r}; "
                    "use None for a missing keypoint")
        array[i] = (float(point[0]), float(point[1]))
    return array


def as_list(array: np.ndarray) -> Keypoints:
    """The inverse of `as_array`: a list of 18 (x, y) tuples or None."""
    return [None if np.isnan(p).any() else (float(p[0]), float(p[1])) for p in np.asarray(array)]


def flip_keypoints(keypoints: Sequence | np.ndarray, width: int) -> np.ndarray:
    """Mirror keypoints of a `width`-pixel-wide image left-right and swap left/right joints."""
    array = as_array(keypoints)
    mirrored = array.copy()
    mirrored[:, 0] = (width - 1) - array[:, 0]
    return mirrored[list(FLIP_PERMUTATION)]


# ---------------------------------------------------------------------------------------------
# Annotation rows: `name:[y...]:[x...]`, with or without a space after the colons.

_ROW = re.compile(r"^\s*(?P<name>[^:]+?)\s*:\s*\[(?P<y>[^\]]*)\]\s*:\s*\[(?P<x>[^\]]*)\]\s*$")
ANNOTATION_HEADER = "name:keypoints_y:keypoints_x"


class AnnotationError(ValueError):
    """A malformed annotation row."""


# A value as numpy 2 prints it in a list (`np.int64(39)`): what scripts built on PATN's write today.
_NUMPY_SCALAR = re.compile(r"^\s*np\.\w+\((?P<value>[^()]*)\)\s*$")


def _ints(text: str, what: str, line: str) -> list[int]:
    try:
        values = [int(round(float(_NUMPY_SCALAR.sub(r"\g<value>", v))))   # a detector's floats: nearest
                  for v in text.split(",") if v.strip()]
    except ValueError:
        raise AnnotationError(f"{what} list is not integers in row {line!r}") from None
    if len(values) != COUNT:
        raise AnnotationError(f"{what} list has {len(values)} values, expected 18, in row {line!r}")
    return values


def parse_annotation_row(line: str) -> tuple[str, np.ndarray]:
    """Parse `name:[y...]:[x...]` into (name, (18, 2) array of x, y with NaN for -1)."""
    match = _ROW.match(line)
    if not match:
        raise AnnotationError(f"not an annotation row `name:[y...]:[x...]`: {line.strip()!r}")
    ys = _ints(match["y"], "y", line.strip())
    xs = _ints(match["x"], "x", line.strip())
    array = np.full((COUNT, 2), np.nan)
    for i, (x, y) in enumerate(zip(xs, ys)):
        if x != -1 and y != -1:
            array[i] = (x, y)
    return match["name"], array


def format_annotation_row(name: str, keypoints: Sequence | np.ndarray) -> str:
    """Format one row as PATN writes it: `name: [y...]: [x...]`, rounded ints, -1 missing."""
    array = as_array(keypoints)
    ys = [-1 if np.isnan(y) else int(round(y)) for y in array[:, 1]]
    xs = [-1 if np.isnan(x) else int(round(x)) for x in array[:, 0]]
    return f"{name}: {ys}: {xs}"


def read_annotations(path: str | Path, strict: bool = True) -> tuple[dict[str, np.ndarray], list[str]]:
    """Read an annotation CSV into {name: keypoints}; returns (rows, problems).

    With `strict`, the first malformed row raises; otherwise malformed rows are skipped and
    described in `problems` (with line numbers) so the caller can report counts.
    """
    path = Path(path)
    rows: dict[str, np.ndarray] = {}
    problems: list[str] = []
    first = True
    with utf8_text(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            header, first = first and _is_header(line), False
            if header:
                continue
            try:
                name, array = parse_annotation_row(line)
                if name in rows:
                    raise AnnotationError(f"{name} is annotated twice; the first row is kept")
            except AnnotationError as e:
                if strict:
                    raise AnnotationError(f"{path}:{number}: {e}") from None
                problems.append(f"{path}:{number}: {e}")
                continue
            rows[name] = array
    return rows, problems


def _is_header(line: str) -> bool:
    return "[" not in line and line.replace(" ", "").lower().startswith("name:")


def first_line(path: str | Path) -> str:
    """The first non-blank line of a text file, stripped ('' if there is none)."""
    with utf8_text(path) as f:
        return next((line.strip() for line in f if line.strip()), "")


@contextmanager
def utf8_text(path: str | Path):
    """A CSV opened as UTF-8 text (a byte-order mark, as Excel writes, is read past); a file in
    another encoding is an AnnotationError naming it, wherever in the file the bad byte is."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            yield f
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): "
                              "save it as UTF-8") from None


def write_annotations(path: str | Path, rows: Iterable[tuple[str, Sequence | np.ndarray]]) -> None:
    """Write an annotation CSV with the header PATN's files carry, replacing any old one at once."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(ANNOTATION_HEADER + "\n")
            for name, keypoints in rows:
                f.write(format_annotation_row(name, keypoints) + "\n")

    write_atomic(path, write)


# ---------------------------------------------------------------------------------------------
# Pose files: the CLI's `--pose` argument.

class PoseFileError(ValueError):
    """A pose JSON file that is neither of the accepted formats."""


class NoPersonError(PoseFileError):
    """An OpenPose file with nobody in it (a frame in which no person was found)."""


# OpenPose's default BODY_25 model: COCO-18's joints in the same order, with MidHip (8) and the
# six foot points (19-24) added; COCO-18 is BODY_25 without them.
BODY_25_TO_COCO = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)


def _openpose_person(person: object, where: str) -> list:
    """One OpenPose person's 18 COCO points ([x, y] or None, confidence 0 = missing)."""
    flat = person.get("pose_keypoints_2d") if isinstance(person, dict) else None
    if not isinstance(flat, list) or len(flat) not in (COUNT * 3, 25 * 3):
        raise PoseFileError(
            f"{where}: pose_keypoints_2d must hold 54 numbers (COCO-18 × x, y, confidence) or 75 (BODY_25), "
            f"got {len(flat) if isinstance(flat, list) else type(flat).__name__}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
        raise PoseFileError(f"{where}: pose_keypoints_2d must hold numbers only")
    order = BODY_25_TO_COCO if len(flat) == 25 * 3 else range(COUNT)
    return [None if flat[3 * i + 2] == 0 else [flat[3 * i], flat[3 * i + 1]] for i in order]


def box_area(points: np.ndarray) -> float:
    """The area of the box around a person's present keypoints ((18, 2), NaN = missing); 0 for
    fewer than two: how the largest of several people is chosen."""
    kept = points[~np.isnan(points[:, 0])]
    if len(kept) < 2:
        return 0.0
    extent = kept.max(axis=0) - kept.min(axis=0)
    return float(extent[0] * extent[1])


def parse_pose(data: object, where: str = "pose", frame: tuple[int, int] | None = None
               ) -> tuple[tuple[int, int], np.ndarray]:
    """Read a pose object: `{"size": [W, H], "keypoints": [...]}` or OpenPose JSON.

    OpenPose JSON means `people[].pose_keypoints_2d`: COCO-18 or BODY_25 (OpenPose's default,
    mapped to COCO-18), x, y, confidence (0 = missing); of several people the largest is taken
    (OpenPose lists them in no order). Its frame size is `canvas_width` / `canvas_height` (the
    ControlNet editors write them; OpenPose itself does not), else `frame`. Coordinates are
    pixels: a pose whose points all lie within ±1 (OpenPose's `--keypoint_scale 3/4`) is refused.
    Returns ((W, H), (18, 2) array).
    """
    if not isinstance(data, dict):
        raise PoseFileError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if "people" in data:
        people = data["people"]
        if not isinstance(people, list):
            raise PoseFileError(f"{where}: OpenPose \"people\" must be a list, got {type(people).__name__}")
        if not people:
            raise NoPersonError(f"{where}: OpenPose file has no people")
        try:
            points = max((as_array(_openpose_person(person, where)) for person in people), key=box_area)
        except KeypointError as e:
            raise PoseFileError(f"{where}: {e}") from None
        try:
            size = (int(data["canvas_width"]), int(data["canvas_height"]))
        except (KeyError, TypeError, ValueError):
            if frame is None:
                raise PoseFileError(
                    f"{where}: OpenPose file without canvas_width and canvas_height (OpenPose does not write "
                    "them): give the frame size the keypoints are in (generate --size W H), or add both to "
                    "the file") from None
            size = (int(frame[0]), int(frame[1]))
    else:
        if "size" not in data or "keypoints" not in data:
            raise PoseFileError(
                f"{where}: expected {{\"size\": [W, H], \"keypoints\": [[x, y] or null, ... 18]}} "
                "or an OpenPose JSON with people[0].pose_keypoints_2d")
        raw_size = data["size"]
        if (not isinstance(raw_size, list) or len(raw_size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in raw_size)):
            raise PoseFileError(f"{where}: size must be [W, H] integers, got {raw_size!r}")
        size = (raw_size[0], raw_size[1])
        points = data["keypoints"]
    if size[0] <= 0 or size[1] <= 0:
        raise PoseFileError(f"{where}: size must be positive, got {list(size)}")
    try:
        keypoints = as_array(points)
    except KeypointError as e:
        raise PoseFileError(f"{where}: {e}") from None
    present = keypoints[~np.isnan(keypoints[:, 0])]
    if len(present) >= 2 and np.abs(present).max() <= 1.0 and min(size) > 4:
        raise PoseFileError(
            f"{where}: every keypoint lies within ±1 in a {size[0]}×{size[1]} frame: these look like normalised "
            "coordinates (OpenPose --keypoint_scale 3 or 4); write pixels (x × width, y × height)")
    return size, keypoints


def load_pose_file(path: str | Path, frame: tuple[int, int] | None = None) -> tuple[tuple[int, int], np.ndarray]:
    """Load a pose JSON file (see `parse_pose`; `frame`: the size for files that give none)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))   # a byte-order mark: Notepad, PowerShell
    except FileNotFoundError:
        raise PoseFileError(f"pose file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise PoseFileError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); is it a pose JSON?") from None
    except json.JSONDecodeError as e:
        raise PoseFileError(f"{path} is not valid JSON: {e}") from None
    return parse_pose(data, str(path), frame)


def pose_to_json(size: tuple[int, int], keypoints: Sequence | np.ndarray) -> dict:
    """The project's own pose JSON object for a frame size and keypoints."""
    return {"size": [int(size[0]), int(size[1])],
            "keypoints": [None if p is None else [p[0], p[1]] for p in as_list(as_array(keypoints))]}
