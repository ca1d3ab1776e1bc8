"""One generation run: plan frames on the main thread a few at a time, talk to the server on
a worker thread.

The main thread does only what touches `bpy` (frame_set, projection, loading a render,
reading the source), in `Run.step()` calls that each stay within a time budget, so a long
range never freezes the UI (the modal timer calls `step`; background mode loops over it).
A `Batch` thread takes the planned frames as they come, sends pipelined requests,
composites and writes the frame files, and hands events back through a queue.
"""
from __future__ import annotations

import heapq
import itertools
import os
import queue
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import bpy
import zmq

from . import imaging, openpose
from .mapping import BoneMapping, keypoints_3d
from .projection import (Crop, Point, ProjectionError, frame_size, person_crop, project_points,
                         square_scale)
from .wire import client, images, protocol

_HASHES = re.compile(r"#+")


class GenerationError(ValueError):
    """Settings or inputs that stop a run before anything is sent; says what to fix."""


def frame_path(pattern: str, frame: int) -> str:
    """Absolute file of `frame`: the last run of # becomes the zero-padded frame number
    (Blender's convention, a minus sign before the digits: `frame_-0003.png`); without #, four
    digits are appended; .png added if no extension."""
    folder, prefix, digits, suffix = sequence_pattern(pattern)
    return os.path.join(folder, prefix + frame_number(frame, digits) + suffix)


def frame_number(frame: int, digits: int) -> str:
    """`frame` zero-padded to `digits` digits, the sign in front, as Blender names frame files."""
    return ("-" if frame < 0 else "") + f"{abs(frame):0{digits}d}"


def sequence_pattern(pattern: str) -> tuple[str, str, int, str]:
    """(folder, text before the number, its digits, text after it) of the frame files of an
    output setting: what `frame_path` fills in."""
    path = bpy.path.abspath(pattern)
    if not path or path.endswith(("/", "\\")) or os.path.isdir(path):
        path = os.path.join(path, "####")
    head, base = os.path.split(path)
    matches = list(_HASHES.finditer(base))
    if matches:
        last = matches[-1]
        prefix, digits, suffix = base[:last.start()], len(last.group()), base[last.end():]
    else:
        ext = _extension(base)
        prefix, digits, suffix = base[:len(base) - len(ext)], 4, ext
    if not _extension(prefix + "0" * digits + suffix):
        suffix += ".png"
    return head, prefix, digits, suffix


def sequence_files(pattern: str) -> dict[int, str]:
    """The frame files of an output setting that exist now, by frame number."""
    folder, prefix, digits, suffix = sequence_pattern(pattern)
    name = re.compile(re.escape(prefix) + r"(-?\d+)" + re.escape(suffix))
    try:
        names = os.listdir(folder)
    except OSError:
        return {}
    files = {}
    for file_name in names:
        match = name.fullmatch(file_name)
        if match and frame_number(int(match.group(1)), digits) == match.group(1):
            files[int(match.group(1))] = os.path.join(folder, file_name)
    return files


def _extension(name: str) -> str:
    """A file name's extension: letters after the last dot ("shot_v1.2_0005" has none)."""
    ext = os.path.splitext(name)[1]
    return ext if re.fullmatch(r"\.[A-Za-z]+", ext) else ""


def file_format(path: str) -> str:
    """The image format a frame file's extension asks for: "png" or "jpeg"."""
    extension = os.path.splitext(path)[1].lower()
    formats = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}
    if extension not in formats:
        raise GenerationError(f"frame files must end in .png, .jpg or .jpeg, not {extension!r} ({path})")
    return formats[extension]


def read_source(settings) -> tuple[bytes, tuple[int, int] | None]:
    """The source photo as PNG/JPEG bytes (size None) or raw RGB bytes with its (W, H)."""
    if settings.source_kind == "IMAGE":
        image = settings.source_image
        if image is None:
            raise GenerationError("choose a source image of the person in the PG2 panel")
        if image.type == "RENDER_RESULT":
            return render_result_png(image), None
        if image.is_dirty:   # painted or edited in Blender and not saved: the file is not what is shown
            return _image_pixels(image)
        if image.packed_file is not None:
            data = bytes(image.packed_file.data)
        elif image.source == "FILE" and os.path.isfile(bpy.path.abspath(image.filepath)):
            with open(bpy.path.abspath(image.filepath), "rb") as file:
                data = file.read()
        else:
            data = None
        if data is not None and images.sniff_format(data) is not None:
            return data, None
        return _image_pixels(image)
    return read_photo(settings.source_path)


def read_photo(path_setting: str) -> tuple[bytes, None]:
    """A PNG/JPEG file's bytes (its path as typed in a setting, `//` = next to the .blend)."""
    path = bpy.path.abspath(path_setting) if path_setting else ""
    if not path:
        raise GenerationError("choose a source photo of the person in the PG2 panel")
    if not os.path.isfile(path):
        raise GenerationError(f"the source photo {path} does not exist")
    with open(path, "rb") as file:
        data = file.read()
    try:
        client.source_format(data)
    except ValueError:
        raise GenerationError(f"the source photo {path} is not a PNG or JPEG file") from None
    return data, None


# What the Render Result is saved as for a request: what the Render window shows, whatever the
# scene's own output (a video, black and white, 16 bits, a view transform of its own).
RENDER_RESULT_SAVE = {"media_type": "IMAGE", "file_format": "PNG", "color_mode": "RGBA", "color_depth": "8",
                      "color_management": "FOLLOW_SCENE"}


def render_result_png(image) -> bytes:
    """The Render Result as PNG bytes: its pixels are not readable from Python, so Blender
    saves it (with the scene's colour management) to a temporary file, read back at once.
    The scene's output settings are switched to an 8-bit RGBA PNG for that (RENDER_RESULT_SAVE,
    the media type first where Blender has one: a video output takes no PNG) and restored in
    full after (media type, format, colour depth, codec, quality: switching formats resets them)."""
    import tempfile
    folder = tempfile.mkdtemp(prefix="pg2-render-")
    path = os.path.join(folder, "source.png")
    scene = bpy.context.scene
    settings = scene.render.image_settings
    saved = _plain_settings(settings)
    try:
        for name, value in RENDER_RESULT_SAVE.items():
            if hasattr(settings, name):
                setattr(settings, name, value)
        image.save_render(path, scene=scene)
        with open(path, "rb") as file:
            return file.read()
    except (RuntimeError, OSError):
        raise GenerationError("the Render Result holds no image: render a frame first (Render › "
                              "Render Image) or choose another source") from None
    finally:
        for name, value in saved.items():   # the media type and format first: they reset the rest
            try:
                setattr(settings, name, value)
            except (TypeError, ValueError, AttributeError):
                pass   # a setting the restored format does not take
        for name in os.listdir(folder):
            os.unlink(os.path.join(folder, name))
        os.rmdir(folder)


def _plain_settings(struct) -> dict:
    """The writable single-valued settings of a Blender struct (media_type and file_format
    first, in that order)."""
    values = {}
    for prop in struct.bl_rna.properties:
        if prop.is_readonly or prop.type not in {"BOOLEAN", "INT", "FLOAT", "STRING", "ENUM"}:
            continue
        if getattr(prop, "is_array", False):
            continue
        values[prop.identifier] = getattr(struct, prop.identifier)
    first = {name: values.pop(name) for name in ("media_type", "file_format") if name in values}
    return {**first, **values}


def display_rgba(image, pixels, what: str):
    """Blender's float pixels of `image` as an 8-bit file holds them: straight alpha, sRGB-encoded,
    0..1. Byte images already are. 16-bit PNG and TIFF are read by Blender into linear light
    with premultiplied alpha: that is undone exactly. Linear files (EXR, HDR) would need the
    scene's view transform, so they are refused with what to do instead."""
    import numpy as np
    if not image.is_float:
        return pixels
    colorspace = image.colorspace_settings.name
    if colorspace != "sRGB":
        raise GenerationError(
            f"{what} is a float image in {colorspace} ({image.file_format}): its look depends on the "
            "view transform; save it as 8- or 16-bit PNG, TIFF or JPEG (Output Properties › Output)")
    rgba = pixels.reshape(-1, 4)
    alpha = rgba[:, 3:4]
    linear = np.clip(np.divide(rgba[:, :3], alpha, out=np.zeros_like(rgba[:, :3]), where=alpha > 0), 0.0, 1.0)
    encoded = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * np.power(linear, 1 / 2.4) - 0.055)
    return np.concatenate([encoded, np.clip(alpha, 0.0, 1.0)], axis=1).astype(np.float32).reshape(pixels.shape)


# An image datablock sent as raw pixels (no PNG/JPEG file behind it) is shrunk by a whole factor
# (box average) to at most this many pixels a side: 12 MB, far more than the model's canvas uses.
RAW_SOURCE_SIDE = 2048


def _image_pixels(image) -> tuple[bytes, tuple[int, int]]:
    import numpy as np
    width, height = image.size
    if width == 0 or height == 0:
        raise GenerationError(f"the source image {image.name!r} has no pixels (missing file?)")
    pixels = np.empty(width * height * 4, np.float32)
    image.pixels.foreach_get(pixels)
    rgba = display_rgba(image, pixels, f"the source image {image.name!r}").reshape(height, width, 4)[::-1]
    # transparency over white, as the server does with a PNG's: the datasets' studio backdrop
    rgb = rgba[:, :, :3] * rgba[:, :, 3:] + (1 - rgba[:, :, 3:])
    factor = -(-max(width, height) // RAW_SOURCE_SIDE)
    if factor > 1:   # a 24 MP photo is 72 MB raw: past the server's message limit (32 MiB by default)
        width, height = width // factor, height // factor
        rgb = rgb[:height * factor, :width * factor].reshape(height, factor, width, factor, 3).mean(axis=(1, 3))
    data = np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8).tobytes()
    return data, (width, height)


# Renders loaded ahead of the worker (float RGBA, 16 bytes a pixel) stay within this: 12 frames
# of 1080p, 3 of 4K.
RENDERS_QUEUED = 512 * 1024 * 1024
# A request a busy server answers `overloaded` is sent again for up to this many seconds in all.
OVERLOADED_PATIENCE = 300.0
# Step timings a run keeps for benchmarks (about 1 h 20 min of the UI's 20 steps a second).
STEPS_KEPT = 100_000
# Fewer visible keypoints than this on a frame: the run still goes, with a warning.
FEW_VISIBLE = 6
# The connection check before a long job: a dead server is reported after this long, not
# after the (much longer) per-reply timeout.
CHECK_TIMEOUT = 3.0


@dataclass
class FrameJob:
    """One frame to generate: its keypoints in frame pixels and where the result goes."""
    frame: int
    keypoints: list[Point | None]
    frame_size: tuple[int, int]
    path: str | None = None  # None: the single-frame result, kept as pixels
    render: object = None  # the frame's render as Blender's float pixels, to composite over
    blank: bool = False  # nothing to pose: write the background only
    encoded: bytes | None = None  # a blank frame's file, made on the main thread (JPEG needs Blender)
    # Several people: one (keypoints, source, source_size, camera distance) per person in
    # view; `keypoints` is then unused. Composited back to front.
    people: list | None = None
    results: dict | None = None  # the worker's crops of `people` received so far


@dataclass(frozen=True)
class Framing:
    """How a frame becomes a request and a result comes back into the frame."""
    mode: str = "CAMERA"  # "CAMERA" | "PERSON"
    margin: float = 0.15
    background: tuple | str | None = (1.0, 1.0, 1.0)  # RGB 0..1, "RENDER", None = transparent
    # Width over height of a frame pixel (projection.pixel_aspect). Requests are made in square
    # pixels, as the model draws people, and results stretched back to the frame's pixels.
    pixel_aspect: float = 1.0


def plan_frame(scene, armature, mapping: BoneMapping, keep_outside: bool,
               occlusion=None) -> list[Point | None]:
    """Keypoints of the current frame in frame pixels (main thread). With `keep_outside`,
    points far outside the frame (near the camera plane) are still dropped: they would make
    a person crop thousands of pixels wide. `occlusion` (occlusion.Occluder) drops joints
    hidden behind the body."""
    return frame_keypoints(scene, armature, mapping, keep_outside, occlusion)[1]


def frame_keypoints(scene, armature, mapping: BoneMapping, keep_outside: bool, occlusion=None):
    """`plan_frame`'s keypoints and the world points they were projected from (the face
    points moved onto the body's surface when `occlusion` has meshes)."""
    if scene.camera is None:
        raise ProjectionError("the scene has no camera: add one and make it the active camera")
    points = keypoints_3d(armature, mapping)
    if occlusion is not None and occlusion.meshes:
        points = occlusion.face_on_surface(points, occlusion.triangles(scene))
    keypoints = project_points(scene, scene.camera, points, keep_outside)
    if keep_outside:
        width, height = frame_size(scene)
        keypoints = [None if p is None or not (-width <= p[0] <= 2 * width and -height <= p[1] <= 2 * height)
                     else p for p in keypoints]
    if occlusion is not None:
        keypoints = occlusion.visible(scene, keypoints, points)
    return points, keypoints


def plan_frames(scene, armature, mapping: BoneMapping, frames: Sequence[int],
                paths: Sequence[str | None], keep_outside: bool) -> list[FrameJob]:
    """Pose each frame and project its keypoints, all at once (scripts and tests; the
    operators plan through `Run.step`). Restores the current frame."""
    current = scene.frame_current, scene.frame_subframe
    jobs = []
    try:
        for frame, path in zip(frames, paths):
            scene.frame_set(frame)
            jobs.append(FrameJob(frame, plan_frame(scene, armature, mapping, keep_outside),
                                 frame_size(scene), path))
    finally:
        scene.frame_set(current[0], subframe=current[1])
    return jobs


@dataclass
class Event:
    """What the worker hands the main thread: a finished or skipped frame, an error, the end."""
    kind: str  # "frame" | "skip" | "error" | "end"
    job: FrameJob | None = None
    pixels: object = None  # flat float RGBA, bottom-up (Image.pixels order): the single-frame result
    size: tuple[int, int] | None = None  # (W, H) of `pixels`
    message: str = ""


class Batch:
    """The worker: takes planned jobs from `add()` until `close()`, sends pipelined requests,
    finishes each result (composite, encode, write) off the main thread."""

    def __init__(self, connection, source: bytes, source_size, framing: Framing, in_flight: int = 4,
                 check_timeout: float = CHECK_TIMEOUT, expect_model: str | None = None):
        self.connection = connection
        # The model frames kept in the output folder were made with (None: not known): a server
        # running another one is refused before anything is sent. `model`: the server's.
        self.expect_model = expect_model
        self.model: str | None = None
        self.source, self.source_size = source, source_size
        self.framing = framing
        self.in_flight = in_flight
        self.check_timeout = check_timeout
        self.jobs: queue.Queue[FrameJob | None] = queue.Queue()
        self.events: queue.Queue[Event] = queue.Queue()
        self.cancelled = threading.Event()
        # Its own ZeroMQ context: terminating it wakes the worker from any socket wait, so
        # a cancel takes effect at once, not after the reply timeout.
        self.context = zmq.Context()
        self._terminating = threading.Lock()
        self.thread: threading.Thread | None = None
        self.done = 0  # frames finished; written by the worker thread alone (_frame_done)
        self.waiting = False  # the server answers but is not ready yet (loading its model)
        self._retries: list = []   # heap of (when, order, request) answered `overloaded`, to send again
        self._retry_order = itertools.count()
        self._overloaded: dict = {}  # id(request) → (tries, seconds waited)

    def add(self, job: FrameJob) -> None:
        self.jobs.put(job)

    def close(self) -> None:
        """No more jobs will come."""
        self.jobs.put(None)

    def backlog(self) -> int:
        """Jobs handed over but not yet sent."""
        return self.jobs.qsize()

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="pg2-batch", daemon=True)
        self.thread.start()

    def cancel(self) -> None:
        """Stop soon (within a fraction of a second); never blocks the caller."""
        self.cancelled.set()
        threading.Thread(target=self._terminate, name="pg2-cancel", daemon=True).start()

    def _terminate(self) -> None:
        with self._terminating:
            self.context.term()  # returns once the worker has closed its sockets (LINGER 0)

    def run(self) -> None:
        """Check the server, send every job, finish each result; always ends with "end"."""
        try:
            with self.connection.open(self.context, timeout=min(self.check_timeout,
                                                                 self.connection.timeout)) as check:
                if not self._wait_until_ready(check):
                    return  # cancelled
            with self.connection.open(self.context) as server:
                canvas, max_side = None, 1 << 16
                info = server.info()
                model = model_name(info)
                if self.expect_model and model and model != self.expect_model:
                    raise GenerationError(
                        f"the frames kept in the output folder were made with the model {self.expect_model}, "
                        f"but the server runs {model}: tick Overwrite to make them again, or choose "
                        "another output folder")
                self.model = model
                if self.framing.mode == "PERSON":
                    canvas = model_canvas(info, self.connection.endpoint)
                    max_side = int((info.get("limits") or {}).get("max_image_side", max_side))
                requests = self._with_retries(self._requests(canvas, max_side))
                while True:
                    for result in server.generate_many(requests, in_flight=self.in_flight, raise_errors=False):
                        if self.cancelled.is_set():
                            break
                        if result.error is not None:
                            if not self._retry_later(result):
                                raise result.error
                            continue
                        self._overloaded.pop(id(result.request), None)
                        self._finish(result)
                    # Requests answered `overloaded` after the last one went out: another pass sends them.
                    if not self._retries or self.cancelled.is_set():
                        break
                    requests = self._with_retries(iter(()))
        except zmq.ZMQError:
            if not self.cancelled.is_set():
                self.events.put(Event("error", message="PG2 connection closed unexpectedly"))
        except client.ServerError as e:
            if not self.cancelled.is_set():
                self.events.put(Event("error", message=describe_server_error(e)))
        except GenerationError as e:
            self.events.put(Event("error", message=str(e)))
        except Exception as e:  # reported to the user; the add-on must not die silently
            self.events.put(Event("error", message=f"{type(e).__name__}: {e}"))
        finally:
            self._terminate()  # after a cancel: waits for the cancel's own term, a no-op then
            self.events.put(Event("end"))

    def _retry_later(self, result) -> bool:
        """An `overloaded` reply (a shared server's queue is full): send the request again after
        a backoff (1, 2, 4 … 30 s) instead of ending the run; False once a request has waited
        OVERLOADED_PATIENCE seconds in all, or for any other error."""
        if result.error.code != "overloaded":
            return False
        request = result.request
        tries, waited = self._overloaded.get(id(request), (0, 0.0))
        delay = min(30.0, 2.0 ** tries)
        if waited + delay > OVERLOADED_PATIENCE:
            return False
        self._overloaded[id(request)] = (tries + 1, waited + delay)
        heapq.heappush(self._retries, (time.monotonic() + delay, next(self._retry_order), request))
        return True

    @property
    def retrying(self) -> int:
        """Requests answered `overloaded` that wait to be sent again."""
        return len(self._retries)

    def _with_retries(self, requests):
        """`requests`, with the overloaded ones sent again once their backoff has passed."""
        for request in requests:
            yield from self._due(wait=False)
            yield request
        while self._retries and not self.cancelled.is_set():
            yield from self._due(wait=True)

    def _due(self, wait: bool):
        while self._retries and (wait or self._retries[0][0] <= time.monotonic()):
            due, _, request = heapq.heappop(self._retries)
            if self.cancelled.wait(max(0.0, due - time.monotonic())):
                return
            yield request

    def _wait_until_ready(self, check) -> bool:
        """Ping until the server takes work: a server answers while it loads its model, and its
        `info` lists no model (so no canvas) until then. Waits at most the reply timeout; False
        when cancelled (Esc wakes the wait at once)."""
        deadline = time.monotonic() + self.connection.timeout
        try:
            while not check.ready():
                if time.monotonic() >= deadline:
                    raise GenerationError(describe_not_ready(check.info(), self.connection.endpoint,
                                                             self.connection.timeout))
                self.waiting = True
                if self.cancelled.wait(min(0.25, deadline - time.monotonic())):
                    return False
        finally:
            self.waiting = False
        return True

    def _next_job(self) -> FrameJob | None:
        while not self.cancelled.is_set():
            try:
                return self.jobs.get(timeout=0.05)
            except queue.Empty:
                continue
        return None

    def _requests(self, canvas, max_side: int):
        person = self.framing.mode == "PERSON"
        sx, sy = square_scale(self.framing.pixel_aspect)
        square = (sx, sy) == (1.0, 1.0)
        while (job := self._next_job()) is not None:
            if job.render is not None:
                self._background(job)   # held as bytes while its request is in flight
            if job.blank:
                if job.encoded is not None:
                    imaging.write_atomic(job.path, job.encoded)
                    self._frame_done(Event("frame", job))
                else:
                    self._write(job, self._background(job))
                continue
            parts = job.people if job.people is not None else [(job.keypoints, self.source, self.source_size, 0.0)]
            if not square:
                parts = [([None if p is None else (p[0] * sx, p[1] * sy) for p in keypoints], *rest)
                         for keypoints, *rest in parts]
            crops = []
            for keypoints, _, _, _ in parts:
                crop = None
                if person:
                    crop = person_crop(keypoints, canvas.width / canvas.height, self.framing.margin)
                    if max(crop.width, crop.height) > max_side:
                        self._skip(job, f"frame {job.frame}: the person crop would be {crop.width}x{crop.height} "
                                        f"px (the server takes at most {max_side}); an armature is too close to "
                                        "the camera")
                        break
                crops.append(crop)
            else:
                if job.people is not None:
                    job.results = {}
                for index, ((keypoints, source, source_size, _), crop) in enumerate(zip(parts, crops)):
                    keypoints = crop.shift(keypoints) if crop else keypoints
                    size = (crop.width, crop.height) if crop else \
                        (max(1, round(job.frame_size[0] * sx)), max(1, round(job.frame_size[1] * sy)))
                    # Files in camera framing of square pixels take the server's PNG/JPEG as is;
                    # anything composited, stretched or shown in Blender needs pixels.
                    fmt = file_format(job.path) if job.path and not person and square else "raw"
                    yield client.GenerateRequest(
                        source, [None if p is None else [float(p[0]), float(p[1])] for p in keypoints],
                        list(size), source_size=source_size, output_format=fmt, alpha=person,
                        tag=(job, crop, index))

    def _background(self, job: FrameJob):
        width, height = job.frame_size
        if job.render is not None:
            if job.render.dtype.kind == "f":   # float from Blender: a quarter of the memory as bytes
                job.render = render_array(job.render, width, height)
            return job.render
        color = self.framing.background
        return imaging.background(width, height, (1.0, 1.0, 1.0) if color == "RENDER" else color)

    def _skip(self, job: FrameJob, message: str) -> None:
        self.events.put(Event("skip", job, message=message))

    def _write(self, job: FrameJob, pixels) -> None:
        """The finished frame: to its file, or to the main thread as Blender pixels."""
        if job.path:
            imaging.write_atomic(job.path, imaging.encode_png(pixels))
            self._frame_done(Event("frame", job))
        else:
            height, width = pixels.shape[:2]
            self._frame_done(Event("frame", job, imaging.to_blender_pixels(pixels), (width, height)))

    def _frame_done(self, event: Event) -> None:
        """Count a finished frame and tell the main thread. Only the worker thread counts; the
        main thread only reads `done`."""
        self.done += 1
        self.events.put(event)

    def _finish(self, result) -> None:
        job, crop, index = result.request.tag
        image = result.image
        if job.people is not None:
            # Several people: wait for all of the frame's crops, then paste the farthest first.
            job.results[index] = (crop, imaging.raw_image(image.data, image.width, image.height, image.channels))
            if len(job.results) < len(job.people):
                return
            frame = self._background(job)
            for i in sorted(job.results, key=lambda i: -job.people[i][3]):
                pixels, (x, y) = self._in_frame(job, *job.results[i])
                frame = imaging.composite(frame, pixels, x, y)
            self._write(job, frame)
            return
        if image.format != "raw" and job.path:
            imaging.write_atomic(job.path, image.data)
            self._frame_done(Event("frame", job))
            return
        pixels, (x, y) = self._in_frame(job, crop, imaging.raw_image(image.data, image.width, image.height,
                                                                     image.channels))
        if crop is not None:
            pixels = imaging.composite(self._background(job), pixels, x, y)
        self._write(job, pixels)

    def _in_frame(self, job: FrameJob, crop: Crop | None, pixels):
        """A result, drawn in square pixels, in the frame's pixels: (pixels, top-left corner)."""
        sx, sy = square_scale(self.framing.pixel_aspect)
        if (sx, sy) == (1.0, 1.0):
            return pixels, ((crop.x, crop.y) if crop else (0, 0))
        if crop is None:
            return imaging.resize(pixels, *job.frame_size), (0, 0)
        x, y = round(crop.x / sx), round(crop.y / sy)
        width = max(1, round((crop.x + crop.width) / sx) - x)
        height = max(1, round((crop.y + crop.height) / sy) - y)
        return imaging.resize(pixels, width, height), (x, y)


class PoseExport(Batch):
    """The worker of Export Poses: per planned frame, an OpenPose JSON file
    (`<name>_keypoints.json`) and the skeleton image (`<name>.png`); no server involved."""

    def __init__(self):
        super().__init__(None, b"", None, Framing())

    def run(self) -> None:
        try:
            while (job := self._next_job()) is not None:
                people = [] if job.blank else [job.keypoints] if job.people is None else [p[0] for p in job.people]
                stem = os.path.splitext(job.path)[0]
                imaging.write_atomic(stem + "_keypoints.json", openpose.pose_json_bytes(people, job.frame_size))
                self._write(job, openpose.draw_skeleton(people, job.frame_size))
        except Exception as e:  # reported to the user; the add-on must not die silently
            self.events.put(Event("error", message=f"{type(e).__name__}: {e}"))
        finally:
            self._terminate()
            self.events.put(Event("end"))


def load_render(path: str, size: tuple[int, int] | None = None):
    """A rendered frame file as Blender's flat float pixels (main thread: Blender reads it);
    the worker turns them into an array with `render_array`. `size`, if given, must match."""
    import numpy as np
    image = bpy.data.images.load(path, check_existing=False)
    try:
        width, height = image.size
        if size is not None and (width, height) != tuple(size):
            raise GenerationError(f"the render {path} is {width}x{height}, but the frame is "
                                  f"{size[0]}x{size[1]}; render it again")
        pixels = np.empty(width * height * 4, np.float32)
        image.pixels.foreach_get(pixels)
        pixels = display_rgba(image, pixels, f"the render {path}")
    finally:
        bpy.data.images.remove(image)
    return pixels.reshape(height, width, 4)


def jpeg_bytes(size: tuple[int, int], color) -> bytes:
    """A JPEG file of one RGB colour (0..1), encoded by Blender (main thread)."""
    import tempfile

    import numpy as np
    width, height = size
    image = bpy.data.images.new("PG2 blank frame", width, height)
    folder = tempfile.mkdtemp(prefix="pg2-blank-")
    path = os.path.join(folder, "blank.jpg")
    try:
        image.pixels.foreach_set(np.tile(np.array([*color[:3], 1.0], np.float32), width * height))
        image.filepath_raw, image.file_format = path, "JPEG"
        image.save(quality=95)
        with open(path, "rb") as file:
            return file.read()
    finally:
        bpy.data.images.remove(image)
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(folder)


def render_array(pixels, width: int, height: int):
    """Blender's float pixels of a render as an (H, W, 4) uint8 array, top row first."""
    import numpy as np
    rgba = pixels.reshape(height, width, 4)[::-1]
    return np.clip(np.rint(rgba * 255), 0, 255).astype(np.uint8)


def render_pixels(path: str):
    """A rendered frame file as an (H, W, 4) uint8 array, read by Blender (main thread only)."""
    pixels = load_render(path)
    return render_array(pixels, pixels.shape[1], pixels.shape[0])


@dataclass
class Report:
    """What a run did besides generating: frames skipped or blank, frames with few joints."""
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (frame, why)
    blank: list[int] = field(default_factory=list)
    few_visible: list[int] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Warnings for the report area, one per kind."""
        out = []
        if self.skipped:
            frames = ", ".join(str(f) for f, _ in self.skipped[:8]) + ("…" if len(self.skipped) > 8 else "")
            out.append(f"skipped {len(self.skipped)} frame(s) ({frames}): {self.skipped[0][1]}")
        if self.blank:
            out.append(f"{len(self.blank)} frame(s) could not be projected and were written blank")
        if self.few_visible:
            frames = ", ".join(str(f) for f in self.few_visible[:8]) + ("…" if len(self.few_visible) > 8 else "")
            out.append(f"fewer than {FEW_VISIBLE} joints visible on {len(self.few_visible)} frame(s) "
                       f"({frames}): the result follows the pose poorly there")
        return out


class Run:
    """A generation (or export) from start to end, advanced by `step()` on the main thread.

    Each step plans frames for at most `budget` seconds (plus the one frame under way),
    loads renders for frames about to be sent, and handles the worker's events; the scene's
    current frame is restored at the end of every step.
    """

    def __init__(self, scene, armature, mapping: BoneMapping, frames: Sequence[int],
                 paths: Sequence[str | None], batch: Batch, *, keep_outside: bool = False,
                 unprojectable: str = "SKIP", renders: Sequence[str] | None = None,
                 occlusion=None, on_result=None, people=None):
        self.scene, self.armature, self.mapping = scene, armature, mapping
        # Several people: (armature, mapping, occluder, source, source_size) each; Person framing.
        self.people = people
        self.frames, self.paths = list(frames), list(paths)
        self.batch = batch
        self.keep_outside = keep_outside
        self.unprojectable = unprojectable  # "SKIP" | "BLANK"
        self.renders = list(renders) if renders is not None else None
        self.occlusion = occlusion
        self.on_result = on_result  # called with each single-frame Event that carries pixels
        self.report = Report()
        self.written: list[FrameJob] = []  # the frames whose files were written (blank ones too)
        self.error: str | None = None
        self.planned = 0
        self.ended = False
        # Wall-clock seconds of each step (the latest STEPS_KEPT: a run of a night ticks 20 times
        # a second), and its main-thread CPU seconds: the step's own work, without the time other
        # processes (or this worker thread, holding the GIL) took the core.
        self.step_times: deque[float] = deque(maxlen=STEPS_KEPT)
        self.step_cpu_times: deque[float] = deque(maxlen=STEPS_KEPT)
        # Frames planned ahead of the worker; bounds the renders held in memory: Blender's
        # float pixels until the worker takes a job, within RENDERS_QUEUED bytes.
        self.lookahead = 2 * batch.in_flight + 4
        if self.renders:
            width, height = frame_size(scene)
            self.lookahead = max(1, min(self.lookahead, RENDERS_QUEUED // (width * height * 16)))
        self._render = None  # the next frame's render, loaded a step before the frame is posed
        self._blank_files: dict = {}
        batch.start()

    @property
    def total(self) -> int:
        return len(self.frames)

    @property
    def done(self) -> int:
        return self.batch.done

    def progress_text(self) -> str:
        if self.batch.waiting:
            return f"waiting for the server to be ready (loading its model); posed {self.planned} / {self.total}"
        if self.batch.retrying:
            return f"{self.done} / {self.total}: the server is busy; {self.batch.retrying} request(s) wait to be sent again"
        if self.planned < self.total:
            return f"posing {self.planned} / {self.total}, generated {self.done}"
        return f"{self.done} / {self.total - len(self.report.skipped)}"

    def cancel(self) -> None:
        self.batch.cancel()

    def step(self, budget: float = 0.01, wait: float = 0.0) -> bool:
        """Do a slice of the work; True once the worker has ended. `wait` > 0 blocks up to that
        long for the worker's next event when there is nothing to plan (background mode)."""
        started, cpu = time.perf_counter(), time.thread_time()
        if self.planned < self.total and not self.batch.cancelled.is_set():
            self._plan(started, budget)
        self._drain(wait if self.planned >= self.total else 0.0)
        self.step_times.append(time.perf_counter() - started)
        self.step_cpu_times.append(time.thread_time() - cpu)
        return self.ended

    def _plan(self, started: float, budget: float) -> None:
        scene = self.scene
        current = scene.frame_current, scene.frame_subframe
        moved = worked = False
        try:
            # At least one piece of work per step, then as many frames as the budget allows. A
            # frame's render (read by Blender on this thread, ~30 ms for 600×800) is loaded in a
            # step of its own, so that reading it and posing the frame never add up in one step.
            while self.planned < self.total and self.batch.backlog() < self.lookahead \
                    and (not worked or time.perf_counter() - started < budget):
                i = self.planned
                frame, path = self.frames[i], self.paths[i]
                if self.renders and self._render is None:
                    if worked:
                        break
                    self._render = load_render(self.renders[i], frame_size(scene))
                    break
                scene.frame_set(frame)
                moved = worked = True
                render, self._render = self._render, None
                job = self._job(frame, path, render)
                self.planned += 1
                if job is not None:
                    self.batch.add(job)
        except (GenerationError, ProjectionError, RuntimeError) as e:
            self.error = str(e)
            self.batch.cancel()
        except ReferenceError:
            self.error = ("an object of this run (the armature, a person's armature or a mesh bound to one) "
                          "was deleted while it ran; generate again")
            self.batch.cancel()
        finally:
            if moved:
                scene.frame_set(current[0], subframe=current[1])
        if self.planned >= self.total and not self.batch.cancelled.is_set():
            self.batch.close()

    def _job(self, frame: int, path, render) -> FrameJob | None:
        """The frame's job (the scene is at `frame`; `render`: its loaded render or None)."""
        size = frame_size(self.scene)
        if self.people:
            return self._people_job(frame, path, size, render)
        keypoints = plan_frame(self.scene, self.armature, self.mapping, self.keep_outside, self.occlusion)
        visible = sum(p is not None for p in keypoints)
        if visible < 2:
            if self.unprojectable == "BLANK" and path:
                self.report.blank.append(frame)
                return self._blank(FrameJob(frame, keypoints, size, path, render, blank=True))
            self.report.skipped.append((frame, f"fewer than two joints of {self.armature.name} are in "
                                               "front of the camera"))
            return None
        if visible < FEW_VISIBLE:
            self.report.few_visible.append(frame)
        return FrameJob(frame, keypoints, size, path, render)

    def _blank(self, job: FrameJob) -> FrameJob:
        """A blank frame for a JPEG file gets its bytes here: the worker writes PNG itself, but
        encoding a JPEG takes Blender (main thread). One per size, reused."""
        color = self.batch.framing.background
        if job.path and file_format(job.path) == "jpeg" and isinstance(color, tuple):
            key = (job.frame_size, color)
            if key not in self._blank_files:
                self._blank_files[key] = jpeg_bytes(job.frame_size, color)
            job.encoded = self._blank_files[key]
        return job

    def _people_job(self, frame: int, path, size, render) -> FrameJob | None:
        camera = self.scene.camera.matrix_world.translation
        parts = []
        for armature, mapping, occluder, source, source_size in self.people:
            keypoints = plan_frame(self.scene, armature, mapping, self.keep_outside, occluder)
            points = [p for p in keypoints_3d(armature, mapping) if p is not None]
            if sum(p is not None for p in keypoints) < 2 or not points:
                continue  # this person is out of view on this frame
            distance = (sum(points, points[0] * 0) / len(points) - camera).length
            parts.append((keypoints, source, source_size, distance))
            if sum(p is not None for p in keypoints) < FEW_VISIBLE and frame not in self.report.few_visible[-1:]:
                self.report.few_visible.append(frame)   # once per frame, however many people
        if not parts:
            if self.unprojectable == "BLANK" and path:
                self.report.blank.append(frame)
                return self._blank(FrameJob(frame, [None] * 18, size, path, render, blank=True))
            self.report.skipped.append((frame, "no chosen armature is in front of the camera"))
            return None
        return FrameJob(frame, [], size, path, render, people=parts)

    def _drain(self, wait: float) -> None:
        while True:
            try:
                event = self.batch.events.get(timeout=wait) if wait else self.batch.events.get_nowait()
            except queue.Empty:
                return
            wait = 0.0
            if event.kind == "frame" and event.job.path:
                self.written.append(event.job)
            if event.kind == "frame" and event.pixels is not None and self.on_result is not None:
                self.on_result(event)
            elif event.kind == "skip":
                self.report.skipped.append((event.job.frame, event.message))
            elif event.kind == "error":
                self.error = self.error or event.message
                self.batch.cancel()  # stop planning for a worker that has given up
            elif event.kind == "end":
                self.ended = True
                return


def model_name(info: dict) -> str | None:
    """The name of the server's first model from its `info` (None when it lists none)."""
    models = info.get("models") or []
    name = models[0].get("name") if models and isinstance(models[0], dict) else None
    return str(name) if name else None


def model_canvas(info: dict, endpoint: str) -> protocol.Size:
    """The canvas (W, H) of the server's first model from its `info`; a clear error when it lists
    none, since Person framing crops to the model's aspect ratio and a guess would distort it."""
    models = info.get("models") or []
    if not models or "canvas" not in models[0]:
        raise GenerationError(f"PG2: the server at {endpoint} lists no model in its info, so Person "
                              "framing has no canvas to crop to; check the server's log")
    return protocol.info_canvas(models[0])


def describe_not_ready(info: dict, endpoint: str, waited: float) -> str:
    """Why a server that answers does not take work, from its `info`, for the report line."""
    server = info.get("server")
    role = server.get("role") if isinstance(server, dict) else None
    if role == "broker" and not info.get("workers"):
        return (f"PG2: the broker at {endpoint} has no worker yet (waited {waited:g} s); start a "
                "`pg2-server worker` connected to it, then try again")
    if not info.get("models"):
        return (f"PG2: the server at {endpoint} is still loading its model (waited {waited:g} s); try "
                "again in a moment, or raise Timeout in the add-on's preferences")
    return (f"PG2: the server at {endpoint} is not taking work (shutting down, or a device stopped); "
            "see its log")


def describe_server_error(error) -> str:
    """A short report line for a client.ServerError (timeouts read as an unreachable server)."""
    if isinstance(error, client.ServerTimeout):
        hint = "" if "pg2-server serve" in error.message else "; is `pg2-server serve` running there?"
        return f"PG2 server not reachable: {error.message}{hint}"
    if error.code == "overloaded":
        return f"PG2 server is overloaded ({error.message}); lower In Flight or try again"
    if error.code == "too_large":
        return (f"PG2 server error too_large: {error.message}; for a frame too large for the server, "
                "lower Resolution % (Output Properties › Format) or use Person framing")
    return f"PG2 server error {error.code}: {error.message}"
