"""Same-person pairs for any annotated image folder, as PATN's pairs CSVs (`from,to`).

Identity comes from the file name:
- DeepFashion (flattened In-shop names): everything up to and including `id` + 8 digits,
  e.g. `fashionWOMENTees_Tanksid0000508545_1front.jpg` → `fashionWOMENTees_Tanksid00005085`.
- Market-1501: the leading person number, `0364_c2s1_084546_01.jpg` → `0364`; `-1` (junk)
  and `0000` (distractors) have no identity and are skipped.
- Any other name: the part before the first `_` (so a user's own `alice_01.png` works).
An image takes part if both shoulders and both hips are annotated inside the image. Every
ordered pair (a, b), a ≠ b, of one identity is a pair; `per_identity` / `max_pairs` sample
them with a seed.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

import numpy as np

from pg2_server.atomic import write_atomic
from pg2_server.keypoints import INDEX

from .data import DataError, DataReport, drop_outside, image_size, read_annotation_file

_DEEPFASHION = re.compile(r"^(.*?id_?\d{8})")
_MARKET = re.compile(r"^(-1|\d{4})_c\d")
REQUIRED_JOINTS = tuple(INDEX[n] for n in ("right_shoulder", "left_shoulder", "right_hip", "left_hip"))


def identity(name: str) -> str | None:
    """The person a file name shows, by the rule in the module docstring; None = no identity."""
    match = _DEEPFASHION.match(name)
    if match:
        return match[1]
    match = _MARKET.match(Path(name).name)   # in any subfolder: Market's ids are the dataset's own
    if match:
        return None if match[1] in ("-1", "0000") else match[1]
    stem = Path(name).stem
    return stem.split("_", 1)[0] if "_" in stem else None


def has_torso(keypoints: np.ndarray) -> bool:
    """Both shoulders and both hips present."""
    return not np.isnan(keypoints[list(REQUIRED_JOINTS)]).any()


def build_pairs(image_dir: str | Path, annotations: str | Path, seed: int = 0, per_identity: int | None = None,
                max_pairs: int | None = None, strict: bool = False) -> tuple[list[tuple[str, str]], DataReport, dict]:
    """Pairs of one folder; returns (pairs, problems, counts of what was used and why not)."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"image folder {image_dir} does not exist")
    report = DataReport()
    rows = read_annotation_file(annotations, report, strict)
    people: dict[str, list[str]] = {}
    counts = {"annotated": len(rows), "no identity": 0, "no shoulders and hips": 0}
    for name, keypoints in sorted(rows.items()):
        person = identity(name)
        if person is None:
            counts["no identity"] += 1
            continue
        size = image_size(image_dir / name)   # from the header: nothing decoded
        if size is None:
            message = f"{image_dir / name} is missing or not an image"
            if strict:
                raise DataError(message)
            report.add("missing images", message)
            continue
        keypoints = drop_outside(name, keypoints, size, report, strict)
        if not has_torso(keypoints):
            counts["no shoulders and hips"] += 1
            continue
        people.setdefault(person, []).append(name)
    rng = np.random.default_rng(seed)
    pairs: list[tuple[str, str]] = []
    for person in sorted(people):
        names = people[person]
        mine = [(a, b) for a in names for b in names if a != b]
        if per_identity is not None and len(mine) > per_identity:
            mine = [mine[i] for i in sorted(rng.choice(len(mine), per_identity, replace=False))]
        pairs += mine
    if max_pairs is not None and len(pairs) > max_pairs:
        pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), max_pairs, replace=False))]
    counts.update(identities=len(people), images=sum(len(v) for v in people.values()), pairs=len(pairs))
    return pairs, report, counts


def write_pairs(path: str | Path, pairs: list[tuple[str, str]]) -> None:
    """Write PATN's pairs CSV (header `from,to`, one pair per line), replacing any old one at once."""
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["from", "to"])
            writer.writerows(pairs)

    write_atomic(path, write)


def cmd_pairs(args: argparse.Namespace) -> int:
    pairs, report, counts = build_pairs(args.images, args.annotations, args.seed, args.per_identity,
                                        args.max_pairs, args.strict)
    write_pairs(args.out, pairs)
    print(f"wrote {args.out}: {counts['pairs']} pairs of {counts['images']} images, {counts['identities']} "
          f"identities; of {counts['annotated']} annotated images, {counts['no identity']} have no identity "
          f"in their name and {counts['no shoulders and hips']} lack a shoulder or hip; {report.summary()}")
    if report.total:
        print(report.details(), file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("pairs", help="build a pairs CSV (same person, shoulders and hips visible)")
    p.add_argument("--images", required=True, help="image folder")
    p.add_argument("--annotations", required=True, help="annotation CSV of that folder")
    p.add_argument("--out", required=True, help="pairs CSV to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--per-identity", type=int, help="at most N pairs per person (seeded sample)")
    p.add_argument("--max-pairs", type=int, help="at most N pairs in all (seeded sample)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad row, missing image or "
                                                          "keypoint outside the image")
    p.set_defaults(func=cmd_pairs)
