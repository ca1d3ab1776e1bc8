"""Pair datasets in PATN's format: an image folder, an annotation CSV and a pairs CSV.

Each item is (source, target, target heat-maps, target pose mask, target coordinates) on the
model's canvas, computed on the fly with the pose encoding and framing of `pg2_server.pose`,
as the server does. The order of items, the flips and the colour-jitter draws come from `PairSampler`, a
seeded stream that can restart at any position, so a resumed run sees exactly the batches an
uninterrupted run would.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pg2_server.codec import exif_orientation
from pg2_server.drawing import read_rgb
from pg2_server.keypoints import AnnotationError, first_line, read_annotations, utf8_text
from pg2_server.model import ModelConfig
from pg2_server.pose import fit_frame, flip_horizontal, heatmaps, pose_coordinates, pose_mask, \
    to_unit_range


log = logging.getLogger("training")

# PATN reads its CSVs with pandas and picks the columns by these names, so the header decides
# which list holds x and which y.
ANNOTATION_COLUMNS = {("keypoints_y", "keypoints_x"): False, ("keypoints_x", "keypoints_y"): True}
PAIR_COLUMNS = {("from", "to"): False, ("to", "from"): True}


class DataError(ValueError):
    """A dataset file that is missing or malformed (in strict mode: any bad row)."""


# The problems for which a pair is left out (the others, such as keypoints outside the image,
# are mended and the pair kept).
PAIR_SKIPS = frozenset({"missing images", "pairs without annotation", "unreadable images", "malformed pair rows"})


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


def _looks_like_header(cells: list[str]) -> bool:
    """A first row none of whose cells names a file (no `.`) is a header, not a pair."""
    return bool(cells) and not any("." in cell for cell in cells)


def read_pairs(path: str | Path, report: DataReport, strict: bool = False) -> list[tuple[str, str]]:
    """Read a pairs CSV as (source, target); its header `from,to` or `to,from` says the order.

    Malformed rows go to `report` (or raise with `strict`); an unknown header is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pairs file {path} does not exist")
    pairs = []
    swapped = False
    first = True
    try:
        with utf8_text(path) as f:
            lines = f.read().splitlines()
    except AnnotationError as e:
        raise DataError(str(e)) from None
    for number, row in enumerate(csv.reader(lines), start=1):
        cells = [c.strip() for c in row]
        if not row or not any(cells):
            continue
        header, first = first and _looks_like_header(cells), False   # the first non-blank line
        if header:
            if tuple(c.lower() for c in cells) not in PAIR_COLUMNS:
                raise DataError(f"{path}:{number}: header {','.join(row)!r} is not a pairs header: write "
                                f"`from,to` (PATN's) or `to,from` above the rows")
            swapped = PAIR_COLUMNS[tuple(c.lower() for c in cells)]
            continue
        if len(row) != 2 or not cells[0] or not cells[1]:
            message = f"{path}:{number}: expected `from,to`, got {','.join(row)!r}"
            if strict:
                raise DataError(message)
            report.add("malformed pair rows", message)
            continue
        pairs.append((cells[1], cells[0]) if swapped else (cells[0], cells[1]))
    return pairs


def annotation_order(path: str | Path) -> bool:
    """True if the annotation CSV's header puts x before y (`name:keypoints_x:keypoints_y`).

    No header means PATN's order (y, then x); a header with other column names is an error.
    """
    first = first_line(path)
    if "[" in first or not first:   # a data row (or an empty file): no header
        return False
    columns = tuple(c.strip().lower() for c in first.split(":"))
    if columns[:1] != ("name",) or columns[1:] not in ANNOTATION_COLUMNS:
        raise DataError(f"{path}: header {first!r} is not an annotation header: write "
                        f"`name:keypoints_y:keypoints_x` (PATN's) or `name:keypoints_x:keypoints_y`")
    return ANNOTATION_COLUMNS[columns[1:]]


def read_annotation_file(path: str | Path, report: DataReport, strict: bool = False) -> dict[str, np.ndarray]:
    """Read an annotation CSV into {name: (18, 2) x, y}; its header says which list is x.

    Malformed rows go to `report` (or raise with `strict`).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file {path} does not exist")
    try:
        x_first = annotation_order(path)
        rows, problems = read_annotations(path, strict=strict)
    except AnnotationError as e:
        raise DataError(str(e)) from None
    for message in problems:
        report.add("malformed annotation rows", message)
    if x_first:  # the rows were parsed as `name:[y...]:[x...]`
        rows = {name: np.ascontiguousarray(points[:, ::-1]) for name, points in rows.items()}
    return rows


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(W, H) of an image from its header alone (no decoding); None if it is not a readable image."""
    from PIL import Image, UnidentifiedImageError  # the `train` extra's; OpenCV cannot read a header alone

    try:
        with Image.open(path) as image:
            width, height = image.size
            # A phone photo stored sideways with an EXIF orientation of 5–8 is decoded upright
            # (read_rgb, codec.decode_photo), and its keypoints are in that upright frame.
            turned = exif_orientation(image) in (5, 6, 7, 8)
            return (height, width) if turned else (width, height)
    except (UnidentifiedImageError, OSError):
        return None


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
    """One split ready to load: image folder, keypoints by name, and (source, target) pairs.

    `strict`: an image that cannot be decoded during training stops it instead of being skipped.
    """
    image_dir: Path
    keypoints: dict[str, np.ndarray]
    pairs: list[tuple[str, str]]
    report: DataReport
    strict: bool = False

    @property
    def names(self) -> list[str]:
        return sorted({name for pair in self.pairs for name in pair})

    @property
    def pairs_digest(self) -> str:
        """sha256 of the pairs in order: a resumed run must draw from the same list."""
        return hashlib.sha256("".join(f"{a},{b}\n" for a, b in self.pairs).encode()).hexdigest()


def load_split(image_dir: str | Path, annotations: str | Path, pairs: str | Path,
               strict: bool = False) -> PairSplit:
    """Read and cross-check a split; returns it with what was skipped in `report`.

    Pairs with a missing or unreadable image or without an annotation are skipped; keypoints
    outside their image are marked missing. With `strict` the first problem raises DataError.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"image folder {image_dir} does not exist")
    report = DataReport()
    keypoints = read_annotation_file(annotations, report, strict)
    rows = read_pairs(pairs, report, strict)
    files = {entry.name for entry in os.scandir(image_dir) if entry.is_file()}

    def exists(name: str) -> bool:   # a name may reach into a subfolder (`WOMEN/bob_01.jpg`)
        return name in files or (len(Path(name).parts) > 1 and (image_dir / name).is_file())

    sizes: dict[str, tuple[int, int] | None] = {}
    kept = []
    for source, target in rows:
        problem = None
        for name in (source, target):
            if not exists(name):
                problem = ("missing images", f"{image_dir / name} (pair {source},{target})")
                break
            if name not in keypoints:
                problem = ("pairs without annotation", f"{name} is not in {annotations}")
                break
            if name not in sizes:
                sizes[name] = image_size(image_dir / name)
                if sizes[name] is not None:
                    keypoints[name] = drop_outside(name, keypoints[name], sizes[name], report, strict)
            if sizes[name] is None:
                problem = ("unreadable images", f"{image_dir / name} is not an image (pair {source},{target})")
                break
        if problem:
            if strict:
                raise DataError(f"{problem[0]}: {problem[1]}")
            report.add(*problem)
            continue
        kept.append((source, target))
    if not kept:
        if not rows:
            raise DataError(f"{pairs} lists no pairs: `pg2-train pairs` makes them from an annotated folder (a "
                            "person needs images with both shoulders and hips annotated to be paired)")
        raise DataError(f"no usable pairs in {pairs} (images in {image_dir}, annotations {annotations}); "
                        f"{report.summary()}")
    return PairSplit(image_dir, keypoints, kept, report, strict)


def jitter_colors(images: list[np.ndarray], strength: float, salt: int) -> list[np.ndarray]:
    """The same random hue turn, saturation and brightness change applied to every image (RGB uint8).

    `strength` in [0, 1]: hue turns by up to ±180°·strength, saturation scales by e^(±strength),
    brightness by e^(±strength/4); `salt` seeds the draw, so a pair's source and target change alike
    and a resumed run draws the same. Grey and white (a studio backdrop) keep their hue-free colour.
    """
    rng = np.random.default_rng(salt)
    turn, saturation, value = rng.uniform(-1.0, 1.0, 3) * strength
    out = []
    for image in images:
        hsv = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2HSV)  # H in degrees
        hsv[..., 0] = (hsv[..., 0] + 180.0 * turn) % 360.0
        hsv[..., 1] = np.clip(hsv[..., 1] * np.exp(saturation), 0.0, 1.0)
        hsv[..., 2] = np.clip(hsv[..., 2] * np.exp(value / 4), 0.0, 1.0)
        rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        out.append(np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8))
    return out


class PairDataset(Dataset):
    """Items `dataset[(index, flip, salt)]`: pair `index`, mirrored left-right if `flip`, its colours
    changed alike in both images by `jitter_colors(…, color_jitter, salt)` when `color_jitter` > 0.

    A pair whose image cannot be decoded is replaced by the next readable pair (so batches keep
    their size and a resumed run sees the same data), and the item's `skipped` counts the pairs
    passed over; with a strict split it raises DataError instead.
    """

    def __init__(self, split: PairSplit, config: ModelConfig, color_jitter: float = 0.0):
        if not 0.0 <= color_jitter <= 1.0:
            raise DataError(f"colour jitter is a strength in [0, 1] (0: off), got {color_jitter}")
        self.split = split
        self.config = config
        self.color_jitter = color_jitter

    def __len__(self) -> int:
        return len(self.split.pairs)

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        index, flip, salt = (*key, 0)[:3] if isinstance(key, tuple) else (key, False, 0)
        for skipped in range(len(self)):
            position = (index + skipped) % len(self)
            try:
                item = self.pair(position, flip, salt)
            except ValueError as e:   # read_rgb's error names the file
                if self.split.strict:
                    raise DataError(f"{e} (pair {position}: {','.join(self.split.pairs[position])})") from None
                log.warning("skipping pair %d: %s", position, e)
                continue
            item["skipped"] = torch.tensor(skipped)
            return item
        raise DataError(f"no image of the {len(self)} pairs in {self.split.image_dir} can be read")

    def pair(self, index: int, flip: bool, salt: int = 0) -> dict[str, torch.Tensor]:
        """Pair `index` read and encoded; ValueError if an image cannot be read."""
        source_name, target_name = self.split.pairs[index]
        source = read_rgb(self.split.image_dir / source_name)
        target = read_rgb(self.split.image_dir / target_name)
        points = self.split.keypoints[target_name]
        if self.color_jitter:
            source, target = jitter_colors([source, target], self.color_jitter, salt)
        if flip:
            source = np.ascontiguousarray(source[:, ::-1])
            target, points = flip_horizontal(target, points)
        return encode_pair(source, target, points, self.config)


def encode_pair(source: np.ndarray, target: np.ndarray, target_keypoints, config: ModelConfig) -> dict:
    """Frame both images onto the canvas and encode the target pose, as the pipeline does."""
    canvas = config.canvas
    source_fit = fit_frame((source.shape[1], source.shape[0]), canvas)
    target_fit = fit_frame((target.shape[1], target.shape[0]), canvas)
    on_canvas = target_fit.keypoints_to_canvas(target_keypoints)
    return {
        "source": torch.from_numpy(to_unit_range(source_fit.image_to_canvas(source))),
        "target": torch.from_numpy(to_unit_range(target_fit.image_to_canvas(target))),
        "heatmaps": torch.from_numpy(heatmaps(on_canvas, canvas, config.heatmap_radius,
                                              config.heatmap_kind, config.heatmap_sigma)),
        "mask": torch.from_numpy(pose_mask(on_canvas, canvas, config.heatmap_radius)[None].astype(np.float32)),
        "coordinates": torch.from_numpy(pose_coordinates(on_canvas, canvas)),
        "keypoints": torch.from_numpy(on_canvas.astype(np.float32)),  # canvas pixels, NaN = missing
    }


class PairSampler(Sampler):
    """An endless, seeded stream of (index, flip, salt) for one rank, restartable at `start`.

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

    def __iter__(self) -> Iterator[tuple[int, bool, int]]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.size, generator=generator)
            flips = torch.rand(self.size, generator=generator) < 0.5
            # The colour-jitter seeds are drawn last, so order and flips are those of older versions.
            salts = torch.randint(0, 2 ** 31 - 1, (self.size,), generator=generator)
            mine = range(self.rank, self.per_rank * self.world_size, self.world_size)
            for position in mine[offset:]:
                yield int(order[position]), bool(flips[position]) and self.flip, int(salts[position])
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # one epoch; the stream itself never ends
        return self.per_rank


# The signals that stop a training run, which saves its state first: a scheduler's or torchrun's
# SIGTERM, Ctrl-C, a closed terminal or SSH session (SIGHUP), and SIGUSR1, which batch schedulers
# (Slurm's --signal) send ahead of a time limit. Those a platform lacks are left out.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1")
                     if hasattr(signal, name))


def _worker_init(_: int) -> None:
    # The loader's processes are the parallelism; OpenCV threads would fight. Forked workers already
    # have 1 from make_loader (then this is a no-op); spawned ones (macOS, Windows) need it here.
    cv2.setNumThreads(1)
    # Ctrl-C and schedulers signal the whole process group: only the trainer may act on it (save
    # the state, then shut the loader down). Workers exit by themselves when the trainer dies.
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)


def make_loader(dataset: PairDataset, batch_size: int, sampler: PairSampler, workers: int,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader over the endless sampler, full batches only (a batch that spans the end of an
    epoch may hold a pair of each epoch, rarely the same one)."""
    if batch_size > len(sampler):
        share = f"the {len(sampler)} pairs" + (f" each of {sampler.world_size} processes gets"
                                               if sampler.world_size > 1 else f" of the split")
        raise DataError(f"batch {batch_size} is larger than {share}, so a batch would repeat images; "
                        f"lower --batch-size to at most {len(sampler)} or use more pairs")
    if workers:
        # Forked workers inherit OpenCV's thread pool without its threads: a child that touches the
        # pool (setNumThreads, a parallel resize) waits forever for them. With one thread in the
        # parent there is no pool to inherit; the parent's OpenCV work here is small anyway.
        cv2.setNumThreads(1)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, drop_last=True, worker_init_fn=_worker_init,
                      persistent_workers=False, prefetch_factor=4 if workers else None)


class BatchStream:
    """The endless batches of a loader; `close()` stops its worker processes at once."""

    def __init__(self, loader: DataLoader):
        self.iterator = iter(loader)

    def __next__(self) -> dict[str, torch.Tensor]:
        return next(self.iterator)

    def close(self) -> None:
        # An error (a worker's included) reaches the trainer with a traceback that keeps the
        # iterator alive, so the DataLoader never shuts its workers down by itself; they ignore
        # SIGTERM (see _worker_init), and the exiting process would wait for them forever.
        shutdown = getattr(self.iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
