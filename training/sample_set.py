"""A sample set from a dataset split: chosen (source, target) pairs, each with its target's pose.

    pg2-train samples --data-root D/test --annotations A.csv --pair SRC.jpg TGT.jpg [--pair ...] --out DIR

A sample set is the folder that `pg2-server demo` and the model card's grid show
(`pg2_server/samples.py`): the source photo, the target pose as the project's pose JSON and the
real target photo to compare with. The photos are copied byte for byte; `samples.json` names the
dataset pair each sample came from.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pg2_server.atomic import write_bytes_atomic
from pg2_server.keypoints import pose_to_json

from .data import DataReport, image_size, read_annotation_file

INDEX = "samples.json"


class SampleSetError(ValueError):
    """A pair, image or annotation that cannot make a sample; the message says which."""


def write_sample_set(out: str | Path, data_root: str | Path, annotations: str | Path,
                     pairs: list[tuple[str, str]], replace: bool = False) -> list[dict]:
    """Copy each (source, target) pair into `out` as personN_{source,target} + personN_pose.json."""
    out, data_root = Path(out), Path(data_root)
    if not pairs:
        raise SampleSetError("give at least one --pair SOURCE TARGET")
    rows = read_annotation_file(annotations, DataReport(), strict=True)   # x or y first, as its header says
    entries, files = [], []  # files: (source path, target path, pose JSON) per entry
    for number, (source, target) in enumerate(pairs):
        for name in (source, target):
            if not (data_root / name).is_file():
                raise SampleSetError(f"{data_root / name} does not exist")
        if target not in rows:
            raise SampleSetError(f"{target} has no row in {annotations}: its pose is unknown")
        size = image_size(data_root / target)   # upright, as training reads it (EXIF orientation)
        if size is None:
            raise SampleSetError(f"{data_root / target} is not a readable image")
        width, height = size
        stem = f"person{number}"
        entries.append({"source": f"{stem}_source{Path(source).suffix}", "pose": f"{stem}_pose.json",
                        "target": f"{stem}_target{Path(target).suffix}", "dataset_pair": [source, target]})
        files.append((data_root / source, data_root / target, pose_to_json((width, height), rows[target])))
    out.mkdir(parents=True, exist_ok=True)
    old = out / INDEX
    if old.exists():
        if not replace:
            raise SampleSetError(f"{out} already holds a sample set; pass --replace to write a new one over it")
        for entry in json.loads(old.read_text(encoding="utf-8")):
            for key in ("source", "pose", "target"):
                if entry.get(key):
                    (out / entry[key]).unlink(missing_ok=True)
    for entry, (source_path, target_path, pose) in zip(entries, files):
        write_bytes_atomic(out / entry["source"], source_path.read_bytes())
        write_bytes_atomic(out / entry["target"], target_path.read_bytes())
        write_bytes_atomic(out / entry["pose"], json.dumps(pose).encode())
    write_bytes_atomic(old, (json.dumps(entries, indent=1) + "\n").encode())
    return entries


def add_parser(sub) -> None:
    """Register `pg2-train samples`."""
    p = sub.add_parser("samples", help="copy chosen test pairs into a sample set (what pg2-server demo shows)")
    p.add_argument("--data-root", required=True, help="image folder of the split")
    p.add_argument("--annotations", required=True, help="its annotation CSV (the targets' poses)")
    p.add_argument("--pair", nargs=2, action="append", metavar=("SOURCE", "TARGET"), required=True,
                   help="image names in --data-root; repeat for each sample, in grid order")
    p.add_argument("--out", required=True, help="sample-set folder (e.g. pg2_server/samples)")
    p.add_argument("--replace", action="store_true", help="replace the sample set already in --out")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        entries = write_sample_set(args.out, args.data_root, args.annotations,
                                   [tuple(pair) for pair in args.pair], replace=args.replace)
    except (SampleSetError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {len(entries)} samples")
    return 0
