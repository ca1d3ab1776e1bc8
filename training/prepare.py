"""Raw DeepFashion In-shop / Market-1501 downloads → the PATN layout the trainer reads.

    OUT/train/*.jpg, OUT/test/*.jpg, OUT/<the given annotation and pairs CSVs, checked>

DeepFashion: `img/WOMEN/Tees_Tanks/id_00005085/45_1_front.jpg` becomes
`fashionWOMENTees_Tanksid0000508545_1front.jpg` (PATN's flattening), fitted into 256×256 (a
non-square image, e.g. from `img_highres/`, is scaled to 256 high and padded with white at the
sides, as the low-resolution release is) and, by default, cropped 40 px each side to PATN's
256×176. A 256×256 image kept at 256×256 is copied byte for byte. The published annotations are
in 256×176 coordinates; for `--size 256x256` their x is shifted by 40. Without annotation CSVs the
split comes from the release's `Eval/list_eval_partition.txt` (train → train/, query and gallery
→ test/: In-shop's own split by item, about half the images each, not PATN's 48,674 / 4,038, which
only its annotation CSVs carry); without that file every image goes to train/.
Market-1501: `bounding_box_train/` → train, `bounding_box_test/` → test, dropping junk (`-1_…`)
and distractor (`0000_…`) images.
The split of each annotation/pairs file is read from its name (`…-train.csv`, `…-test.csv`).
Rows naming a missing image, malformed rows and keypoints outside the image are reported with
counts and skipped (`--strict`: the first one is an error).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np

from pg2_server.keypoints import write_annotations
from pg2_server.wire.protocol import Size

from .data import DataError, DataReport, drop_outside, read_annotation_file, read_pairs
from .pairs import write_pairs

DEEPFASHION_SIZES = {"256x176": Size(176, 256), "256x256": Size(256, 256)}  # flag HEIGHTxWIDTH → Size
PATN_CROP = 40  # px cut from each side of the 256×256 image for 256×176
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PARTITION_FILES = ("Eval/list_eval_partition.txt", "list_eval_partition.txt")
# Where the release's images are, below --raw: the zip unpacks to Img/img/ beside Eval/.
IMAGE_FOLDERS = ("img", "Img/img", "img_highres", "Img/img_highres")
GENDERS = ("WOMEN", "MEN")
PARTITION_SPLITS = {"train": "train", "query": "test", "gallery": "test"}
WHITE = (255, 255, 255)


def flatten_deepfashion_name(relative: Path) -> str:
    """`WOMEN/Tees_Tanks/id_00005085/45_1_front.jpg` → `fashionWOMENTees_Tanksid0000508545_1front.jpg`."""
    parts = relative.parts
    if len(parts) != 4:
        raise DataError(f"{relative}: expected GENDER/CATEGORY/id_XXXXXXXX/FILE under img/")
    gender, category, item, file = parts
    first, *rest = file.split("_")
    return "fashion" + gender + category + item.replace("_", "") + first + "_" + "".join(rest)


def split_of(path: str | Path) -> str:
    """'train' or 'test', from a PATN file name such as `fasion-resize-pairs-test.csv`."""
    stem = Path(path).stem.lower()
    for split in ("train", "test"):
        if stem.endswith(split) or f"-{split}" in stem or f"_{split}" in stem:
            return split
    raise DataError(f"cannot tell the split of {path}: its name should end in -train or -test")


def read_partition(path: str | Path) -> dict[str, str]:
    """In-shop's `list_eval_partition.txt` as {flattened name: 'train' | 'test'}.

    Rows are `img/GENDER/CATEGORY/id_X/FILE item_id status` after a count and a header line;
    status train → train, query and gallery → test (In-shop's split by item, not PATN's).
    """
    path = Path(path)
    split: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if len(fields) != 3 or fields[2] not in PARTITION_SPLITS:
            if number > 2 and line.strip():
                raise DataError(f"{path}:{number}: expected `img/…/FILE.jpg item_id train|query|gallery`, "
                                f"got {line.strip()!r}")
            continue
        relative = Path(fields[0])
        if relative.parts and relative.parts[0] in ("img", "img_highres"):
            relative = Path(*relative.parts[1:])
        split[flatten_deepfashion_name(relative)] = PARTITION_SPLITS[fields[2]]
    if not split:
        raise DataError(f"{path} lists no image; is it In-shop's Eval/list_eval_partition.txt?")
    return split


def image_root(raw: Path) -> Path:
    """The folder holding In-shop's GENDER/CATEGORY/id_X/ tree: RAW/img, RAW/Img/img (the
    release unpacked in place), their img_highres, or RAW itself."""
    if not raw.is_dir():
        raise DataError(f"--raw {raw} is not a folder: give the unpacked In-shop release")
    for folder in IMAGE_FOLDERS:
        if (raw / folder).is_dir():
            return raw / folder
    if any((raw / gender).is_dir() for gender in GENDERS):
        return raw
    raise DataError(f"{raw} holds none of {', '.join(IMAGE_FOLDERS)} nor WOMEN/ or MEN/: give --raw the "
                    "unpacked In-shop release (the folder with Img/img/WOMEN/…/id_…/*.jpg)")


def find_partition(raw: Path) -> Path | None:
    """In-shop's list_eval_partition.txt in RAW (or Eval/ there), or beside RAW when RAW is Img/."""
    for base in (raw, raw.parent):
        for name in PARTITION_FILES:
            if (base / name).is_file():
                return base / name
    return None


def refuse_overwriting(out: Path, csv_paths) -> None:
    """The prepared CSVs go to OUT under their own names: never over the published inputs."""
    for csv_path in csv_paths:
        target = out / Path(csv_path).name
        if target.exists() and target.resolve() == Path(csv_path).resolve():
            raise DataError(f"--out {out} would overwrite the input {csv_path} with its prepared copy: keep the "
                            "published CSVs in another folder, or choose another --out")


def fit_square(image: np.ndarray, side: int = 256) -> np.ndarray:
    """Scale an image (H, W, 3) to fit side×side keeping its aspect ratio; pad the rest white, centred."""
    height, width = image.shape[:2]
    scale = side / max(height, width)
    scaled = (min(side, max(1, round(width * scale))), min(side, max(1, round(height * scale))))
    if scaled != (width, height):
        image = cv2.resize(image, scaled, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    left, top = (side - scaled[0]) // 2, (side - scaled[1]) // 2
    return cv2.copyMakeBorder(image, top, side - scaled[1] - top, left, side - scaled[0] - left,
                              cv2.BORDER_CONSTANT, value=WHITE)


def _check(report: DataReport, strict: bool, kind: str, message: str) -> None:
    if strict:
        raise DataError(f"{kind}: {message}")
    report.add(kind, message)


def _write_annotations_for(out: Path, csv_path: Path, sizes: dict[str, tuple[int, int]], report: DataReport,
                           strict: bool, x_shift: int = 0, dropped: frozenset[str] = frozenset()) -> int:
    """Copy one annotation CSV into `out`, keeping rows whose image exists; returns rows kept.
    Rows of `dropped` images (left out on purpose) go without a word."""
    rows = read_annotation_file(csv_path, report, strict)
    kept = []
    for name, keypoints in rows.items():
        if name in dropped:
            continue
        if name not in sizes:
            _check(report, strict, "annotated images missing", f"{name} ({csv_path.name})")
            continue
        keypoints = keypoints + np.array([x_shift, 0.0])
        kept.append((name, drop_outside(name, keypoints, sizes[name], report, strict)))
    write_annotations(out / csv_path.name, kept)
    return len(kept)


def _write_pairs_for(out: Path, csv_path: Path, names: set[str], report: DataReport, strict: bool,
                     dropped: frozenset[str] = frozenset()) -> int:
    pairs = read_pairs(csv_path, report, strict)
    kept = []
    for a, b in pairs:
        if a in dropped or b in dropped:
            continue
        if a in names and b in names:
            kept.append((a, b))
        else:
            _check(report, strict, "pairs with a missing image", f"{a},{b} ({csv_path.name})")
    write_pairs(out / csv_path.name, kept)
    return len(kept)


def prepare_deepfashion(raw: str | Path, out: str | Path, size: str = "256x176", annotations=(), pairs=(),
                        strict: bool = False, partition: str | Path | None = None) -> tuple[dict, DataReport]:
    """Flatten, fit and crop the In-shop `img/` tree; returns (counts, problems).

    The split comes from the annotation CSVs, else from `partition` (default: the release's
    list_eval_partition.txt when present), else everything is train."""
    raw, out = Path(raw), Path(out)
    root = image_root(raw)
    refuse_overwriting(out, [*annotations, *pairs])
    if size not in DEEPFASHION_SIZES:
        raise DataError(f"--size must be one of {list(DEEPFASHION_SIZES)}, got {size!r}")
    width, height = DEEPFASHION_SIZES[size]
    report = DataReport()
    split_names: dict[str, set[str]] = {}
    for csv_path in annotations:
        names = set(read_annotation_file(csv_path, DataReport(), False))
        split_names.setdefault(split_of(csv_path), set()).update(names)
    # An image in both splits would be trained on and then scored: it stays in test only.
    leaked = frozenset(split_names.get("train", set()) & split_names.get("test", set()))
    for name in sorted(leaked):
        _check(report, strict, "images annotated in both splits (kept in test only)", name)
        split_names["train"].discard(name)
    if partition is None and not annotations:
        partition = find_partition(raw)
    split_by_name = read_partition(partition) if partition is not None and not annotations else None
    sizes: dict[str, tuple[int, int]] = {}
    written = {"train": 0, "test": 0}
    skipped_unlisted = copied = 0
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            name = flatten_deepfashion_name(path.relative_to(root))
        except DataError as e:
            _check(report, strict, "unexpected paths", str(e))
            continue
        if split_names:
            split = next((s for s, names in split_names.items() if name in names), None)
        else:
            split = split_by_name.get(name) if split_by_name is not None else "train"
        if split is None:
            skipped_unlisted += 1
            continue
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            _check(report, strict, "unreadable images", str(path))
            continue
        target = out / split / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if image.shape[:2] == (256, 256) and width == 256:   # nothing to change: keep the original bytes
            shutil.copyfile(path, target)
            copied += 1
        else:
            image = fit_square(image)
            if width == 176:
                image = image[:, PATN_CROP:256 - PATN_CROP]
            cv2.imwrite(str(target), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        sizes[name] = (width, height)
        written[split] += 1
    counts = {"train images": written["train"], "test images": written["test"],
              "images copied unchanged": copied,
              ("images in no annotation file" if annotations else "images not in the partition file"
               if split_by_name is not None else "images in no split"): skipped_unlisted}
    x_shift = PATN_CROP if width == 256 else 0  # published keypoints are in 256×176 coordinates
    for csv_path in annotations:
        dropped = leaked if split_of(csv_path) == "train" else frozenset()
        counts[f"rows in {Path(csv_path).name}"] = _write_annotations_for(out, Path(csv_path), sizes, report,
                                                                          strict, x_shift, dropped)
    for csv_path in pairs:
        dropped = leaked if split_of(csv_path) == "train" else frozenset()
        counts[f"pairs in {Path(csv_path).name}"] = _write_pairs_for(out, Path(csv_path), set(sizes), report, strict,
                                                                     dropped)
    return counts, report


def prepare_market(raw: str | Path, out: str | Path, annotations=(), pairs=(),
                   strict: bool = False) -> tuple[dict, DataReport]:
    """Copy Market-1501's train/test crops without junk and distractors; returns (counts, problems)."""
    raw, out = Path(raw), Path(out)
    refuse_overwriting(out, [*annotations, *pairs])
    report = DataReport()
    sizes: dict[str, tuple[int, int]] = {}
    counts = {"junk or distractor images dropped": 0}
    dropped: set[str] = set()
    for split, folder in (("train", "bounding_box_train"), ("test", "bounding_box_test")):
        source = raw / folder
        if not source.is_dir():
            raise DataError(f"{raw} has no {folder}/ folder (the Market-1501 release layout)")
        (out / split).mkdir(parents=True, exist_ok=True)
        copied = 0
        for path in sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            if path.name.startswith(("-1", "0000")):
                counts["junk or distractor images dropped"] += 1
                dropped.add(path.name)
                continue
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if image is None:
                _check(report, strict, "unreadable images", str(path))
                continue
            shutil.copyfile(path, out / split / path.name)
            sizes[path.name] = (image.shape[1], image.shape[0])
            copied += 1
        counts[f"{split} images"] = copied
    # PATN's market-annotation-test.csv annotates the junk and distractors too: their rows are not problems
    dropped = frozenset(dropped)
    for csv_path in annotations:
        counts[f"rows in {Path(csv_path).name}"] = _write_annotations_for(out, Path(csv_path), sizes, report, strict,
                                                                          dropped=dropped)
    for csv_path in pairs:
        counts[f"pairs in {Path(csv_path).name}"] = _write_pairs_for(out, Path(csv_path), set(sizes), report, strict,
                                                                     dropped)
    return counts, report


def cmd_prepare(args: argparse.Namespace) -> int:
    if args.dataset == "deepfashion":
        image_root(Path(args.raw))   # a wrong --raw is named before anything else is said
        partition = args.partition
        if partition is None and not args.annotations:
            partition = find_partition(Path(args.raw))
            print(f"split: {partition} (train → train/, query and gallery → test/)" if partition else
                  f"split: no list_eval_partition.txt in {args.raw}, its Eval/ or beside it: every image goes to "
                  "train/ (give --partition to split by In-shop's items)", file=sys.stderr)
        counts, report = prepare_deepfashion(args.raw, args.out, args.size, args.annotations, args.pairs, args.strict,
                                             partition)
    else:
        counts, report = prepare_market(args.raw, args.out, args.annotations, args.pairs, args.strict)
    print(f"prepared {args.dataset} in {args.out}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    print(report.summary())
    if report.total:
        print(report.details(), file=sys.stderr)
    if counts.get("train images", 0) + counts.get("test images", 0) == 0:
        print(f"error: no image was prepared from {args.raw}; the problems above say why", file=sys.stderr)
        return 2
    if not args.annotations:
        from pg2_server.detection import available
        needed = [s for s in ("train", "test") if (Path(args.out) / s).is_dir() and any((Path(args.out) / s).iterdir())]
        written = annotate_splits(Path(args.out), "fasion-resize" if args.dataset == "deepfashion" else "market")
        if available() and len(written) < len(needed):   # without the detector: a hint, not a failure
            return 2
    return 0


def annotate_splits(out: Path, prefix: str) -> list[Path]:
    """Without PATN's annotation CSVs: detect keypoints in OUT/train and OUT/test (the pose extra)."""
    from pg2_server.detection import INSTALL_HINT, available

    if not available():
        print(f"no annotation CSVs given and MediaPipe is not installed: {INSTALL_HINT}; then run "
              "`pg2-train annotate` and `pg2-train pairs`", file=sys.stderr)
        return []
    from .annotate import annotate_folder

    written = []
    for split in ("train", "test"):
        folder = out / split
        if folder.is_dir() and any(folder.iterdir()):
            csv_path = out / f"{prefix}-annotation-{split}.csv"
            print(f"no annotation CSVs given: detecting keypoints in {folder} → {csv_path}", file=sys.stderr)
            if annotate_folder(folder, csv_path) == 0:
                written.append(csv_path)
    if written:
        print("next: pg2-train pairs --images OUT/train --annotations " + str(written[0]) + " --out PAIRS.csv",
              file=sys.stderr)
    return written


def add_parser(sub) -> None:
    p = sub.add_parser("prepare", help="turn a raw DeepFashion In-shop or Market-1501 download into PATN's layout")
    p.add_argument("dataset", choices=["deepfashion", "market"])
    p.add_argument("--raw", required=True, help="the unpacked download (In-shop: holds img/; Market: "
                                                "holds bounding_box_train/ and bounding_box_test/)")
    p.add_argument("--out", required=True, help="output folder (train/, test/, CSVs)")
    p.add_argument("--annotations", nargs="*", default=[], help="published annotation CSVs (…-train.csv, …-test.csv)")
    p.add_argument("--pairs", nargs="*", default=[], help="published pairs CSVs (…-train.csv, …-test.csv)")
    p.add_argument("--size", default="256x176", choices=list(DEEPFASHION_SIZES),
                   help="DeepFashion only: PATN's 256x176 crop (default) or PG2's 256x256")
    p.add_argument("--strict", action="store_true", help="stop at the first problem instead of skipping it")
    p.add_argument("--partition", help="DeepFashion without annotation CSVs: In-shop's list_eval_partition.txt "
                                       "(default: RAW/Eval/list_eval_partition.txt if present)")
    p.set_defaults(func=cmd_prepare)
