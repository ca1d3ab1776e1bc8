"""The record of a frame sequence, kept beside its files (`.pg2-frames.json` in the output folder):
the settings its frames were made with, so that resuming with Overwrite off never mixes frames
of other settings into one sequence, and which frames are placeholders to make again.

One record file serves every sequence of its folder, each under the name of its frame 0 file.
A sequence's entry holds `settings` (what shapes its frames: `settings_of`), `model` (the
server's model, once known), `blank` (frames written with the background only, tried again on
a resume) and `stale` (files of other settings still to be replaced: an Overwrite run that was
stopped).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import bpy

from . import imaging
from .generation import GenerationError, frame_path, sequence_files
from .projection import frame_size, pixel_aspect

RECORD_NAME = ".pg2-frames.json"

# What each setting is called in a refusal, in the order they are listed.
LABELS = {"frame_size": "frame size", "pixel_aspect": "pixel aspect", "framing": "framing", "margin": "margin",
          "background": "background", "source": "source", "armature": "armature", "people": "more people"}
# Settings of Person framing alone.
PERSON_ONLY = {"margin", "background", "people"}


def source_of(settings) -> dict | None:
    """What identifies the source photo: a file by its path, size and time of change; an image
    datablock by its name."""
    if settings.source_kind == "IMAGE":
        image = settings.source_image
        return None if image is None else {"image": image.name}
    return photo_of(settings.source_path)


def photo_of(path_setting: str) -> dict:
    """A photo file's path (as a setting types it, `//` = next to the .blend), size and time of change."""
    path = bpy.path.abspath(path_setting) if path_setting else ""
    try:
        status = os.stat(path)
    except OSError:
        return {"file": path}
    return {"file": path, "bytes": status.st_size, "modified": int(status.st_mtime)}


def settings_of(scene, armature) -> dict:
    """The settings that shape a frame file (main thread): frame size and pixel aspect, framing
    (margin and background for Person framing), the source and the armature (and the More
    People rows)."""
    settings = scene.pg2
    out = {"frame_size": list(frame_size(scene)), "pixel_aspect": round(pixel_aspect(scene), 6),
           "framing": settings.framing, "source": source_of(settings), "armature": armature.name}
    if settings.framing == "PERSON":
        out["margin"] = round(settings.margin, 6)
        out["background"] = ([round(c, 4) for c in settings.background_color] if settings.background == "COLOR"
                             else settings.background)
        if len(settings.people):
            out["people"] = [[getattr(p.armature, "name", None), photo_of(p.source_path)] for p in settings.people]
    return out


def _shown(key: str, value) -> str:
    if value is None:
        return "none"
    if key == "frame_size":
        return f"{value[0]}x{value[1]}"
    if key == "framing":
        return str(value).title()
    if key == "source":
        return os.path.basename(value["file"]) if "file" in value else value["image"]
    if key == "background" and isinstance(value, list):
        return "colour (" + ", ".join(f"{c:g}" for c in value) + ")"
    if isinstance(value, str):
        return value.title() if value.isupper() else value
    return json.dumps(value) if not isinstance(value, (int, float)) else f"{value:g}"


def differences(recorded: dict, now: dict) -> list[str]:
    """What changed from `recorded` settings to `now`, one phrase each ("frame size 120x160 →
    240x320", "source person.png changed")."""
    out = []
    for key, label in LABELS.items():
        if recorded.get(key) == now.get(key):
            continue
        if key in PERSON_ONLY and recorded.get("framing") != now.get("framing"):
            continue   # Person framing's own settings: the change of framing says it
        before, after = _shown(key, recorded.get(key)), _shown(key, now.get(key))
        out.append(f"{label} {before} changed" if before == after else f"{label} {before} → {after}")
    return out


def read(folder: str) -> dict:
    """The sequences recorded in `folder` ({} when there is no record, or one unreadable)."""
    try:
        with open(os.path.join(folder, RECORD_NAME), encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, ValueError):
        return {}
    sequences = data.get("sequences") if isinstance(data, dict) else None
    return sequences if isinstance(sequences, dict) else {}


def write(folder: str, name: str, entry: dict) -> None:
    """Record one sequence's entry, keeping the folder's other sequences (atomically)."""
    sequences = read(folder)
    sequences[name] = entry
    imaging.write_atomic(os.path.join(folder, RECORD_NAME),
                         json.dumps({"version": 1, "sequences": sequences}, indent=1).encode("utf-8"))


@dataclass
class Resume:
    """What a Generate Frames run does to its sequence: the frames to make (`todo`, indices into
    the run's frames) and the entry recorded when it starts, updated when it ends."""
    folder: str
    name: str
    entry: dict
    todo: list[int] = field(default_factory=list)
    expect_model: str | None = None   # the model the frames kept were made with, if known
    recorded: bool = False   # the folder's record has an entry for this sequence

    def start(self) -> None:
        """Before any frame is written: an entry that changes (or old files to replace, which must
        be known even if Blender stops) is recorded now; a new sequence's, with its first frame."""
        if self.recorded or self.entry["stale"]:
            write(self.folder, self.name, self.entry)
            self.recorded = True

    def finish(self, written, model: str | None) -> None:
        """After the run, however it ended: `written` (FrameJobs) are no longer stale, the blank
        ones are placeholders now, the others real frames."""
        entry = dict(self.entry)
        done = {job.frame for job in written}
        blank = {job.frame for job in written if job.blank}
        entry["stale"] = sorted(set(entry.get("stale", [])) - done)
        entry["blank"] = sorted((set(entry.get("blank", [])) - done) | blank)
        entry["model"] = model or entry.get("model")
        self.entry = entry
        if self.recorded or done:
            write(self.folder, self.name, entry)
            self.recorded = True


def plan(pattern: str, frames, paths, settings: dict, overwrite: bool) -> Resume:
    """Which frames to make, from the files there and the folder's record. Overwrite: all of
    them. Otherwise the missing ones and the placeholders, after checking that the frames kept
    were made with these settings (by the record, or for a folder without a record by the
    files' sizes); raises GenerationError naming what changed."""
    folder, name = os.path.dirname(frame_path(pattern, 0)), os.path.basename(frame_path(pattern, 0))
    recorded = read(folder).get(name)
    recorded = recorded if isinstance(recorded, dict) and isinstance(recorded.get("settings"), dict) else None
    same = recorded is not None and not differences(recorded["settings"], settings)
    if overwrite:
        if same:
            stale = set(recorded.get("stale", []))
        else:   # every file of the sequence, in the range or not, was made otherwise
            stale = set(sequence_files(pattern))
        entry = {"settings": settings, "model": recorded.get("model") if same else None,
                 "blank": sorted(set(recorded.get("blank", [])) if same else ()), "stale": sorted(stale)}
        return Resume(folder, name, entry, list(range(len(frames))), recorded=recorded is not None)
    redo = set(recorded.get("blank", [])) | set(recorded.get("stale", [])) if same else set()
    files = {**sequence_files(pattern), **{f: p for f, p in zip(frames, paths) if os.path.exists(p)}}
    kept = {frame: path for frame, path in files.items() if frame not in redo}
    if kept and recorded is not None and not same:
        raise GenerationError(f"the frames in {folder} were made with other settings "
                              f"({', '.join(differences(recorded['settings'], settings))}): tick Overwrite to "
                              "make them again, or choose another output folder")
    if kept and recorded is None:
        width, height = settings["frame_size"]
        for frame, path in sorted(kept.items()):
            size = imaging.file_image_size(path)
            if size is not None and size != (width, height):
                raise GenerationError(f"{os.path.basename(path)} in {folder} is {size[0]}x{size[1]}, but the frames "
                                      f"are now {width}x{height}: it was made with other settings; tick Overwrite "
                                      "to make the frames again, or choose another output folder")
    entry = {"settings": settings, "model": recorded.get("model") if same else None,
             "blank": sorted(recorded.get("blank", [])) if same else [],
             "stale": sorted(recorded.get("stale", [])) if same else []}
    todo = [i for i, (frame, path) in enumerate(zip(frames, paths)) if frame in redo or not os.path.exists(path)]
    in_range_kept = any(frame in kept for frame in frames)
    return Resume(folder, name, entry, todo, entry["model"] if in_range_kept else None, recorded is not None)
