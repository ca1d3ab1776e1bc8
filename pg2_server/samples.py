"""The bundled sample set (held-out people and poses) and the sample grid the README shows.

A sample set is a folder with `samples.json`: a list of {"source": IMAGE, "pose": POSE.json,
"target": IMAGE or null}, paths relative to the folder. `target` is the real photo of that
person in that pose, when known, shown beside the generated one for comparison.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .drawing import draw_pose, image_grid, read_rgb, write_rgb
from .keypoints import load_pose_file
from .pipeline import Pipeline

BUNDLED = Path(__file__).parent / "samples"


@dataclass
class Sample:
    source: np.ndarray
    size: tuple[int, int]
    keypoints: np.ndarray
    target: np.ndarray | None


def load_samples(folder: str | Path = BUNDLED) -> list[Sample]:
    """Read a sample set; errors name the folder or file that is wrong."""
    folder = Path(folder)
    index = folder / "samples.json"
    if not index.is_file():
        raise ValueError(f"{folder} is not a sample set: {index.name} is missing")
    try:
        entries = json.loads(index.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{index} is not valid JSON: {e}") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{index} must hold a non-empty list of {{source, pose, target}} entries")
    samples = []
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("source", "pose")):
            raise ValueError(f"{index}: entry {number} must name its \"source\" and \"pose\" files "
                             f"(and optionally \"target\"), got {entry!r}")
        size, keypoints = load_pose_file(folder / entry["pose"])
        target = read_rgb(folder / entry["target"]) if entry.get("target") else None
        samples.append(Sample(read_rgb(folder / entry["source"]), size, keypoints, target))
    return samples


def sample_grid(pipeline: Pipeline, samples: list[Sample]) -> np.ndarray:
    """One row per sample: source | target pose | G1 | G2 (| real target, if every sample has one)."""
    results = pipeline.generate([s.source for s in samples], [s.keypoints for s in samples],
                                [s.size for s in samples], with_g1=True)
    with_target = all(s.target is not None for s in samples)
    rows = []
    for sample, result in zip(samples, results):
        row = [sample.source, draw_pose(sample.keypoints, sample.size), result.g1, result.image]
        rows.append(row + ([sample.target] if with_target else []))
    header = ["source", "target pose", "G1", "G2"] + (["real target"] if with_target else [])
    return image_grid(rows, header)


def write_sample_grid(pipeline: Pipeline, out: str | Path, folder: str | Path = BUNDLED) -> Path:
    """Generate every sample of `folder` and write the grid image to `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_rgb(out, sample_grid(pipeline, load_samples(folder)))
    return out
