"""`pg2-train annotate`: a folder of photos → PATN's annotation CSV, keypoints detected by BlazePose.

Each photo gets one row `name: [y...]: [x...]` (-1 = not detected); a photo that cannot be read,
is too small or shows no person is reported by name and left out, and the rest carry on. With
`--truth`, the detected keypoints are scored against another annotation file of the same
images (PCKh@0.5, PATN's rule, per keypoint and per DeepFashion view): how the detector's
accuracy in docs/pose-detection.md is measured.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pg2_server.keypoints import NAMES, write_annotations


def detect_folder(images: str | Path, visibility: float = 0.5, several_people: bool = True,
                  progress: bool = True) -> tuple[dict[str, np.ndarray], list[str], list[str], float, float]:
    """Detect every photo of a folder; returns ({name: keypoints}, problems, notes, seconds per image,
    CPU seconds per image). The CPU time (all of the process's threads) shows the detector's own
    cost on a machine that other jobs share; the wall-clock time is what a run takes there."""
    from pg2_server.detection import DetectionError, PoseDetector, image_files

    folder = Path(images)
    if not folder.is_dir():
        raise ValueError(f"--images {folder} is not a folder")
    files = image_files([folder])
    if not files:
        raise ValueError(f"{folder} holds no PNG/JPEG/BMP/WebP images")
    rows: dict[str, np.ndarray] = {}
    problems: list[str] = []
    notes: list[str] = []
    spent = cpu = 0.0
    with PoseDetector(visibility=visibility, several_people=several_people) as detector:
        for path in tqdm(files, desc="annotate", unit="image", disable=not progress, dynamic_ncols=True):
            started, cpu_started = time.perf_counter(), time.process_time()
            try:
                detection = detector.detect_file(path)
            except DetectionError as e:
                problems.append(str(e))
                tqdm.write(f"skipped {e}", file=sys.stderr)
                continue
            finally:
                spent += time.perf_counter() - started
                cpu += time.process_time() - cpu_started
            rows[path.name] = detection.keypoints
            for note in detection.notes:
                notes.append(note)
                tqdm.write(note, file=sys.stderr)
    return rows, problems, notes, spent / len(files), cpu / len(files)


def accuracy(detected: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict:
    """PCKh@0.5 of detected keypoints against annotated ones: overall, limbs, per keypoint, per view.

    Images the detector missed count as all wrong; images without a head size are left out.
    """
    from .evaluate import LIMB_JOINTS, pckh_counts, view_of

    sums: dict[str, list] = {}
    for name, keypoints in truth.items():
        counts = pckh_counts(detected.get(name), keypoints)
        if counts is None:
            continue
        for key in ("all", view_of(name)):
            if key is None:
                continue
            entry = sums.setdefault(key, [np.zeros(len(NAMES)), np.zeros(len(NAMES)), 0, 0])
            entry[0] += counts[0]
            entry[1] += counts[1]
            entry[2] += name in detected
            entry[3] += 1
    result = {}
    for key, (right, annotated, found, images) in sums.items():
        limbs = list(LIMB_JOINTS)
        result[key] = {
            "images": images, "detected": found / images,
            "pckh": float(right.sum() / annotated.sum()) if annotated.sum() else None,
            "pckh_limbs": float(right[limbs].sum() / annotated[limbs].sum()) if annotated[limbs].sum() else None,
            "per_keypoint": {n: (float(r / a) if a else None) for n, r, a in zip(NAMES, right, annotated)},
            "annotated": {n: int(a) for n, a in zip(NAMES, annotated)},
        }
    return result


def accuracy_table(result: dict) -> str:
    """Per-keypoint PCKh as a markdown table, one column per view ('all' first)."""
    keys = ["all"] + sorted(k for k in result if k != "all")
    lines = ["| keypoint | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name in NAMES:
        cells = []
        for key in keys:
            value = result[key]["per_keypoint"][name]
            cells.append("—" if value is None else f"{value:.3f} ({result[key]['annotated'][name]})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for metric in ("pckh", "pckh_limbs", "detected"):
        cells = ["—" if result[k][metric] is None else f"**{result[k][metric]:.3f}**" for k in keys]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    lines.append("| images | " + " | ".join(str(result[k]["images"]) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def annotate_folder(images: str | Path, out: str | Path, visibility: float = 0.5, truth: str | Path | None = None,
                    several_people: bool = True) -> int:
    """The `pg2-train annotate` command; returns its exit status."""
    rows, problems, notes, per_image, cpu_per_image = detect_folder(images, visibility, several_people)
    if not rows:
        print(f"error: no person found in any of {len(problems)} images of {images}", file=sys.stderr)
        return 2
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_annotations(out, sorted(rows.items()))
    print(f"wrote {out}: {len(rows)} images annotated, {len(problems)} skipped, {len(notes)} with several people "
          f"(the largest taken); {per_image * 1000:.0f} ms per image ({cpu_per_image * 1000:.0f} ms CPU; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    if truth:
        from .data import DataReport, read_annotation_file
        # As training reads it: PATN's y-first rows, or x first where the header says so.
        expected = read_annotation_file(truth, DataReport())
        expected = {name: keypoints for name, keypoints in expected.items()
                    if (Path(images) / name).is_file()}
        print(f"PCKh@0.5 against {truth} ({len(expected)} images):")
        print(accuracy_table(accuracy(rows, expected)))
    return 0
