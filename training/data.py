"""Pair datasets in PATN's format: an image folder, an annotation CSV and a pairs CSV.

Each item is (source, target, target heat-maps, target pose mask, target coordinates) on the
model's canvas, computed on the fly with the foundation's pose encoding and framing. The
order of items and the flips come from `PairSampler`, a seeded stream that can restart at
any position, so a resumed run sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import csv
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pg2_server.drawing import read_rgb
from pg2_server.keypoints import AnnotationError, read_annotations
from pg2_server.model import ModelConfig
from pg2_server.pose import fit_frame, flip_horizontal, heatmaps, pose_coordinates, pose_mask, \
    to_unit_range


class DataError(ValueError):
    """A dataset file that is missing or malformed (in strict mode: any bad row)."""


@dataclass
class DataReport:
    """What was skipped while reading a dataset, with counts per kind of problem."""
    problems: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, message: str) -> None:
        self.problems.setdefault(kind, []).append(message)

    def count(self, kind: str) -> int:
        return len(self.problems.get(kind, []))

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.problems.values())

    def summary(self) -> str:
        """One line: `skipped: 3 malformed rows, 1 missing image` (or `no problems`)."""
        if not self.problems:
            return "no problems"
        return "skipped: " + ", ".join(f"{len(v)} {k}" for k, v in sorted(self.problems.items()))

    def details(self, limit: int = 5) -> str:
        lines = []
        for kind, messages in sorted(self.problems.items()):
            lines += [f"  {kind}: {m}" for m in messages[:limit]]
            if len(messages) > limit:
                lines.append(f"  {kind}: … and {len(messages) - limit} more")
        return "\n".join(lines)


def read_pairs(path: str | Path, report: DataReport, strict: bool = False) -> list[tuple[str, str]]:
    """Read a `from,to` pairs CSV; malformed rows go to `report` (or raise with `strict`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pairs file {path} does not exist")
    pairs = []
    with open(path, newline="", encoding="utf-8") as f:
        for number, row in enumerate(csv.reader(f), start=1):
            if number == 1 and [c.strip() for c in row] == ["from", "to"]:
                continue
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                message = f"{path}:{number}: expected `from,to`, got {','.join(row)!r}"
                if strict:
                    raise DataError(message)
                report.add("malformed pair rows", message)
                continue
            pairs.append((row[0].strip(), row[1].strip()))
    return pairs


def read_annotation_file(path: str | Path, report: DataReport, strict: bool = False) -> dict[str, np.ndarray]:
    """Read a `name:[y...]:[x...]` annotation CSV; malformed rows go to `report`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file {path} does not exist")
    try:
        rows, problems = read_annotations(path, strict=strict)
    except AnnotationError as e:
        raise DataError(str(e)) from None
    for message in problems:
        report.add("malformed annotation rows", message)
    return rows


def drop_outside(name: str, keypoints: np.ndarray, size: tuple[int, int], report: DataReport,
                 strict: bool = False) -> np.ndarray:
    """Mark keypoints outside a (W, H) image as missing, reporting them (raising with `strict`)."""
    width, height = size
    x, y = keypoints[:, 0], keypoints[:, 1]
    present = ~np.isnan(x)
    outside = present & ((x < 0) | (x > width - 1) | (y < 0) | (y > height - 1))
    if outside.any():
        joints = np.flatnonzero(outside).tolist()
        message = f"{name}: keypoints {joints} lie outside the {width}×{height} image"
        if strict:
            raise DataError(message)
        report.add("keypoints outside the image", message)
        keypoints = keypoints.copy()
        keypoints[outside] = np.nan
    return keypoints


@dataclass
class PairSplit:
    """One split ready to load: image folder, keypoints by name, and (source, target) pairs."""
    image_dir: Path
    keypoints: dict[str, np.ndarray]
    pairs: list[tuple[str, str]]
    report: DataReport

    @property
    def names(self) -> list[str]:
        return sorted({name for pair in self.pairs for name in pair})


def load_split(image_dir: str | Path, annotations: str | Path, pairs: str | Path,
               strict: bool = False) -> PairSplit:
    """Read and cross-check a split; pairs with a missing image or annotation are skipped."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"image folder {image_dir} does not exist")
    report = DataReport()
    keypoints = read_annotation_file(annotations, report, strict)
    rows = read_pairs(pairs, report, strict)
    files = {entry.name for entry in os.scandir(image_dir) if entry.is_file()}
    kept = []
    for source, target in rows:
        problem = None
        for name in (source, target):
            if name not in files:
                problem = ("missing images", f"{image_dir / name} (pair {source},{target})")
                break
            if name not in keypoints:
                problem = ("pairs without annotation", f"{name} is not in {annotations}")
                break
        if problem:
            if strict:
                raise DataError(f"{problem[0]}: {problem[1]}")
            report.add(*problem)
            continue
        kept.append((source, target))
    if not kept:
        raise DataError(f"no usable pairs in {pairs} (images in {image_dir}, annotations {annotations}); "
                        f"{report.summary()}")
    return PairSplit(image_dir, keypoints, kept, report)


class PairDataset(Dataset):
    """Items `dataset[(index, flip)]`: pair `index`, mirrored left-right if `flip`."""

    def __init__(self, split: PairSplit, config: ModelConfig):
        self.split = split
        self.config = config

    def __len__(self) -> int:
        return len(self.split.pairs)

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        index, flip = key if isinstance(key, tuple) else (key, False)
        source_name, target_name = self.split.pairs[index]
        source = read_rgb(self.split.image_dir / source_name)
        target = read_rgb(self.split.image_dir / target_name)
        points = self.split.keypoints[target_name]
        if flip:
            source = np.ascontiguousarray(source[:, ::-1])
            target, points = flip_horizontal(target, points)
        return encode_pair(source, target, points, self.config)


def encode_pair(source: np.ndarray, target: np.ndarray, target_keypoints, config: ModelConfig) -> dict:
    """Frame both images onto the canvas and encode the target pose, as the pipeline does."""
    height, width = config.canvas
    source_fit = fit_frame((source.shape[1], source.shape[0]), config.canvas)
    target_fit = fit_frame((target.shape[1], target.shape[0]), config.canvas)
    on_canvas = target_fit.keypoints_to_canvas(target_keypoints)
    return {
        "source": torch.from_numpy(to_unit_range(source_fit.image_to_canvas(source))),
        "target": torch.from_numpy(to_unit_range(target_fit.image_to_canvas(target))),
        "heatmaps": torch.from_numpy(heatmaps(on_canvas, height, width, config.heatmap_radius,
                                              config.heatmap_kind, config.heatmap_sigma)),
        "mask": torch.from_numpy(pose_mask(on_canvas, height, width, config.heatmap_radius)[None].astype(np.float32)),
        "coordinates": torch.from_numpy(pose_coordinates(on_canvas, height, width)),
        "keypoints": torch.from_numpy(on_canvas.astype(np.float32)),  # canvas pixels, NaN = missing
    }


class PairSampler(Sampler):
    """An endless, seeded stream of (index, flip) for one rank, restartable at `start`.

    Epoch e is a permutation drawn from seed + e; rank r takes every world_size-th entry, so
    ranks see disjoint pairs. `start` counts items already consumed by this rank.
    """

    def __init__(self, size: int, seed: int = 0, flip: bool = True, rank: int = 0,
                 world_size: int = 1, start: int = 0):
        if size < world_size:
            raise DataError(f"{size} pairs cannot be shared among {world_size} processes")
        self.size, self.seed, self.flip = size, seed, flip
        self.rank, self.world_size, self.start = rank, world_size, start
        self.per_rank = size // world_size

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.size, generator=generator)
            flips = torch.rand(self.size, generator=generator) < 0.5
            mine = range(self.rank, self.per_rank * self.world_size, self.world_size)
            for position in mine[offset:]:
                yield int(order[position]), bool(flips[position]) and self.flip
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # one epoch; the stream itself never ends
        return self.per_rank


def _worker_init(_: int) -> None:
    # The loader's processes are the parallelism; OpenCV threads would fight. Forked workers already
    # have 1 from make_loader (then this is a no-op); spawned ones (macOS, Windows) need it here.
    cv2.setNumThreads(1)
    # Ctrl-C and schedulers signal the whole process group: only the trainer may act on it (save
    # the state, then shut the loader down). Workers exit by themselves when the trainer dies.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset: PairDataset, batch_size: int, sampler: PairSampler, workers: int,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader over the endless sampler, full batches only."""
    if workers:
        # Forked workers inherit OpenCV's thread pool without its threads: a child that touches the
        # pool (setNumThreads, a parallel resize) waits forever for them. With one thread in the
        # parent there is no pool to inherit; the parent's OpenCV work here is small anyway.
        cv2.setNumThreads(1)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, drop_last=True, worker_init_fn=_worker_init,
                      persistent_workers=False, prefetch_factor=4 if workers else None)
