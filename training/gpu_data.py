"""A dataset cut to a byte budget, whole people at a time, to carry to a GPU machine.

    python -m training.gpu_data SOURCE_DIR OUT_DIR --max-mib 40

SOURCE_DIR is a `pg2-train synth` (or `prepare`) folder: `train/`, `test/` and one
`*annotation-{train,test}.csv` and `*pairs-{train,test}.csv` each. OUT_DIR gets the same
splits under fixed names (`annotation-train.csv`, `pairs-train.csv`, …), people taken in the
order of their identity until the budget is spent, `--test-share` of it for the test split.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from pg2_server.keypoints import write_annotations

from .data import DataError, DataReport, read_annotation_file, read_pairs
from .pairs import identity, write_pairs


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise DataError(f"{folder}: expected one file matching {pattern}, found {len(found)}")
    return found[0]


def copy_split(source: Path, out: Path, split: str, max_bytes: int) -> dict:
    """Copy whole people of one split until `max_bytes` of images; returns counts."""
    report = DataReport()
    rows = read_annotation_file(_one(source, f"*annotation-{split}.csv"), report)
    pairs = read_pairs(_one(source, f"*pairs-{split}.csv"), report)
    people: dict[str, list[str]] = {}
    for name in sorted(rows):
        person = identity(name)
        if person is not None and (source / split / name).is_file():
            people.setdefault(person, []).append(name)
    chosen: list[str] = []
    used = 0
    for person in sorted(people):
        size = sum((source / split / name).stat().st_size for name in people[person])
        if used + size > max_bytes:
            break
        chosen += people[person]
        used += size
    if not chosen:
        raise DataError(f"{source / split}: not even one person fits in {max_bytes} bytes")
    (out / split).mkdir(parents=True, exist_ok=True)
    for name in chosen:
        shutil.copyfile(source / split / name, out / split / name)
    keep = set(chosen)
    kept_pairs = [(a, b) for a, b in pairs if a in keep and b in keep]
    write_annotations(out / f"annotation-{split}.csv", ((name, rows[name]) for name in chosen))
    write_pairs(out / f"pairs-{split}.csv", kept_pairs)
    return {"people": sum(1 for p in people if people[p][0] in keep), "images": len(chosen),
            "pairs": len(kept_pairs), "bytes": used}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.gpu_data", description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-mib", type=float, default=40.0, help="images of both splits together (default 40)")
    parser.add_argument("--test-share", type=float, default=0.1, help="share of the budget for test (default 0.1)")
    args = parser.parse_args(argv)
    if not 0 < args.test_share < 1:
        parser.error("--test-share must lie between 0 and 1")
    if args.out.exists():
        shutil.rmtree(args.out)
    budget = int(args.max_mib * 2 ** 20)
    try:
        for split, share in (("train", 1 - args.test_share), ("test", args.test_share)):
            counts = copy_split(args.source, args.out, split, int(budget * share))
            print(f"{split}: {counts['people']} people, {counts['images']} images, {counts['pairs']} pairs, "
                  f"{counts['bytes'] / 2 ** 20:.1f} MiB", file=sys.stderr)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
