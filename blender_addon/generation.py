"""One generation run: plan frames on the main thread, talk to the server on a worker thread.

The main thread does everything that touches `bpy` (frame_set, projection, reading the
source); a `Batch` thread sends pipelined requests, composites and writes the frame files,
and hands events back through a queue that the operator polls (modal timer in the UI, a
plain loop in background mode).
"""
from __future__ import annotations

import os
import queue
import re
import threading
from dataclasses import dataclass
from typing import Sequence

import bpy

from . import imaging
from .mapping import BoneMapping
from .projection import Crop, Point, frame_size, person_crop, project_armature
from .wire import client

_HASHES = re.compile(r"#+")


class GenerationError(ValueError):
    """Settings or inputs that stop a run before anything is sent; says what to fix."""


def frame_path(pattern: str, frame: int) -> str:
    """Absolute file of `frame`: the last run of # becomes the zero-padded frame number
    (Blender's convention); without #, four digits are appended; .png added if no extension."""
    path = bpy.path.abspath(pattern)
    if not path or path.endswith(("/", "\\")) or os.path.isdir(path):
        path = os.path.join(path, "####")
    matches = list(_HASHES.finditer(os.path.basename(path)))
    head, base = os.path.split(path)
    if matches:
        last = matches[-1]
        base = base[:last.start()] + f"{frame:0{len(last.group())}d}" + base[last.end():]
    else:
        stem, ext = os.path.splitext(base)
        base = f"{stem}{frame:04d}{ext}"
    if not os.path.splitext(base)[1]:
        base += ".png"
    return os.path.join(head, base)


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
        if image.packed_file is not None:
            data = bytes(image.packed_file.data)
        elif image.source == "FILE" and os.path.isfile(bpy.path.abspath(image.filepath)):
            with open(bpy.path.abspath(image.filepath), "rb") as file:
                data = file.read()
        else:
            data = None
        if data is not None and data[:8].startswith((b"\x89PNG", b"\xff\xd8\xff")):
            return data, None
        return _image_pixels(image)
    path = bpy.path.abspath(settings.source_path) if settings.source_path else ""
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


def _image_pixels(image) -> tuple[bytes, tuple[int, int]]:
    import numpy as np
    width, height = image.size
    if width == 0 or height == 0:
        raise GenerationError(f"the source image {image.name!r} has no pixels (missing file?)")
    pixels = np.empty(width * height * 4, np.float32)
    image.pixels.foreach_get(pixels)
    rgb = pixels.reshape(height, width, 4)[::-1, :, :3]
    data = np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8).tobytes()
    return data, (width, height)


@dataclass
class FrameJob:
    """One frame to generate: its keypoints in frame pixels and where the result goes."""
    frame: int
    keypoints: list[Point | None]
    frame_size: tuple[int, int]
    path: str | None = None  # None: the single-frame result, kept as pixels
    render: str | None = None  # rendered frame to composite over (Blender loads it: main thread)


@dataclass(frozen=True)
class Framing:
    """How a frame becomes a request and a result comes back into the frame."""
    mode: str = "CAMERA"  # "CAMERA" | "PERSON"
    margin: float = 0.15
    background: tuple | str | None = (1.0, 1.0, 1.0)  # RGB 0..1, "RENDER", None = transparent


def plan_frames(scene, armature, mapping: BoneMapping, frames: Sequence[int],
                paths: Sequence[str | None], keep_outside: bool) -> list[FrameJob]:
    """Pose each frame and project its keypoints (main thread; restores the current frame)."""
    current = scene.frame_current, scene.frame_subframe
    jobs = []
    try:
        for frame, path in zip(frames, paths):
            scene.frame_set(frame)
            keypoints = project_armature(scene, armature, mapping=mapping, keep_outside=keep_outside)
            if sum(p is not None for p in keypoints) < 2:
                raise GenerationError(
                    f"frame {frame}: fewer than two joints of {armature.name} are in front of the "
                    "camera; frame the armature with the active camera")
            jobs.append(FrameJob(frame, keypoints, frame_size(scene), path))
    finally:
        scene.frame_set(current[0], subframe=current[1])
    return jobs


@dataclass
class Event:
    """What the worker hands the main thread: a finished frame, an error, or the end."""
    kind: str  # "frame" | "error" | "end"
    job: FrameJob | None = None
    pixels: object = None  # (H, W, 3|4) uint8: the single-frame result, or a crop that the
    crop: Crop | None = None  # main thread composites over job.render at `crop`
    message: str = ""


class Batch:
    """Pipelined requests for a list of frames on its own thread (or the caller's, blocking)."""

    def __init__(self, connection, source: bytes, source_size, jobs: list[FrameJob],
                 framing: Framing, in_flight: int = 4):
        self.connection = connection
        self.source, self.source_size = source, source_size
        self.jobs = jobs
        self.framing = framing
        self.in_flight = in_flight
        self.events: queue.Queue[Event] = queue.Queue()
        self.cancelled = threading.Event()
        self.thread: threading.Thread | None = None
        self.done = 0

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="pg2-batch", daemon=True)
        self.thread.start()

    def cancel(self) -> None:
        self.cancelled.set()

    def run(self) -> None:
        """Send every job, finish each result; always ends with an "end" event."""
        try:
            with self.connection.open() as server:
                crops = self._crops(server)
                for result in server.generate_many(self._requests(crops), in_flight=self.in_flight):
                    if self.cancelled.is_set():
                        break
                    self._finish(result)
        except client.ServerError as e:
            self.events.put(Event("error", message=describe_server_error(e)))
        except Exception as e:  # reported to the user; the add-on must not die silently
            self.events.put(Event("error", message=f"{type(e).__name__}: {e}"))
        finally:
            self.events.put(Event("end"))

    def _crops(self, server) -> list[Crop | None]:
        if self.framing.mode != "PERSON":
            return [None] * len(self.jobs)
        models = server.info().get("models") or [{}]
        height, width = models[0].get("canvas", (256, 256))
        return [person_crop(job.keypoints, width / height, self.framing.margin) for job in self.jobs]

    def _requests(self, crops):
        person = self.framing.mode == "PERSON"
        for job, crop in zip(self.jobs, crops):
            if self.cancelled.is_set():
                return
            keypoints = crop.shift(job.keypoints) if crop else job.keypoints
            size = (crop.width, crop.height) if crop else job.frame_size
            # Files in camera framing take the server's PNG/JPEG as is; anything composited
            # or shown in Blender needs pixels.
            fmt = file_format(job.path) if job.path and not person else "raw"
            yield client.GenerateRequest(
                self.source, [None if p is None else [float(p[0]), float(p[1])] for p in keypoints],
                list(size), source_size=self.source_size, output_format=fmt, alpha=person,
                tag=(job, crop))

    def _finish(self, result) -> None:
        job, crop = result.request.tag
        image = result.image
        if image.format != "raw" and job.path:
            imaging.write_atomic(job.path, image.data)
            pixels = None
        else:
            pixels = imaging.raw_image(image.data, image.width, image.height, image.channels)
            if crop is not None and job.render is not None:
                self.events.put(Event("frame", job, pixels, crop=crop))
                return  # the main thread loads the render, composites, writes and counts it
            if crop is not None:
                width, height = job.frame_size
                frame = imaging.background(width, height, self.framing.background)
                pixels = imaging.composite(frame, pixels, crop.x, crop.y)
            if job.path:
                imaging.write_atomic(job.path, imaging.encode_png(pixels))
                pixels = None
        self.done += 1
        self.events.put(Event("frame", job, pixels))


def render_pixels(path: str):
    """A rendered frame file as an (H, W, 4) uint8 array, read by Blender (main thread only)."""
    import numpy as np
    image = bpy.data.images.load(path, check_existing=False)
    try:
        width, height = image.size
        pixels = np.empty(width * height * 4, np.float32)
        image.pixels.foreach_get(pixels)
    finally:
        bpy.data.images.remove(image)
    rgba = pixels.reshape(height, width, 4)[::-1]
    return np.clip(np.rint(rgba * 255), 0, 255).astype(np.uint8)


def finish_over_render(event: Event):
    """Composite a crop over its frame's render (main thread); writes the file if the job has
    one, else returns the frame's pixels."""
    job = event.job
    frame = render_pixels(job.render)
    if frame.shape[1::-1] != tuple(job.frame_size):
        raise GenerationError(f"the render {job.render} is {frame.shape[1]}x{frame.shape[0]}, "
                              f"but the frame is {job.frame_size[0]}x{job.frame_size[1]}; render it again")
    pixels = imaging.composite(frame, event.pixels, event.crop.x, event.crop.y)
    if job.path:
        imaging.write_atomic(job.path, imaging.encode_png(pixels))
        return None
    return pixels


def describe_server_error(error) -> str:
    """A short report line for a client.ServerError (timeouts read as an unreachable server)."""
    if isinstance(error, client.ServerTimeout):
        return f"PG2 server not reachable: {error.message}"
    if error.code == "overloaded":
        return f"PG2 server is overloaded ({error.message}); lower In Flight or try again"
    return f"PG2 server error {error.code}: {error.message}"
