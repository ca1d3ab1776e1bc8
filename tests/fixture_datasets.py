"""Tiny datasets in the real PATN formats, written by the training tests themselves.

DeepFashion style: flattened In-shop names, annotation rows without a space after the colons
(`name:[y...]:[x...]`). Market style: `0001_c1s1_000001_00.jpg` names, rows with a space
(`name: [y...]: [x...]`), plus junk (-1) and distractor (0000) images.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

# A standing person in a 32 × 64 (W × H) frame, COCO-18 order, (x, y).
STANDING = np.array([
    [16, 8], [16, 14], [11, 14], [9, 23], [8, 31], [21, 14], [23, 23], [24, 31],
    [12, 33], [12, 45], [12, 57], [20, 33], [20, 45], [20, 57], [15, 7], [17, 7], [13, 8], [19, 8]], float)
LIMBS = [(1, 8), (1, 11), (2, 3), (3, 4), (5, 6), (6, 7), (8, 9), (9, 10), (11, 12), (12, 13), (2, 5), (8, 11)]
FRAME = (32, 64)  # (W, H): the tiny canvas (32 × 16 H × W) at twice the size, so framing scales by ½


def person_image(keypoints: np.ndarray, identity: int, size=FRAME) -> np.ndarray:
    """RGB stick figure whose colours identify the person."""
    width, height = size
    image = np.full((height, width, 3), 235, np.uint8)
    color = (60 + 45 * identity % 190, 220 - 35 * identity % 180, 90 + 20 * identity % 150)
    for a, b in LIMBS:
        if np.isnan(keypoints[[a, b]]).any():
            continue
        cv2.line(image, tuple(int(v) for v in keypoints[a]), tuple(int(v) for v in keypoints[b]), color, 3)
    cv2.circle(image, tuple(int(v) for v in keypoints[0]), 4, (color[2], color[0], color[1]), -1)
    return image


def pose(view: int, rng: np.random.Generator) -> np.ndarray:
    """The standing pose, shifted and with the arms moved per view."""
    points = STANDING.copy()
    points[:, 0] += view - 1
    points[[4, 7], 1] -= 6 * (view % 3)
    points += rng.integers(-1, 2, size=points.shape)
    return points


def annotation_row(name: str, keypoints: np.ndarray, space: bool) -> str:
    ys = [-1 if np.isnan(y) else int(round(y)) for y in keypoints[:, 1]]
    xs = [-1 if np.isnan(x) else int(round(x)) for x in keypoints[:, 0]]
    sep = ": " if space else ":"
    text = sep.join([name, str(ys), str(xs)])
    return text if space else text.replace(", ", ",")


def write_dataset(root: Path, style: str = "deepfashion", identities: int = 4, views: int = 4,
                  split: str = "train", seed: int = 0) -> dict:
    """Write images, the annotation CSV and an all-pairs CSV; returns their paths and names."""
    rng = np.random.default_rng(seed)
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    rows, names = [], {}
    for person in range(identities):
        for view in range(views):
            if style == "deepfashion":
                name = f"fashionWOMENTees_Tanksid{person:08d}{view + 1:02d}_{view % 4 + 1}front.jpg"
            else:
                name = f"{person + 1:04d}_c{view + 1}s1_{1000 * view:06d}_00.jpg"
            keypoints = pose(view, rng)
            cv2.imwrite(str(image_dir / name), cv2.cvtColor(person_image(keypoints, person), cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
            rows.append(annotation_row(name, keypoints, space=(style == "market")))
            names.setdefault(person, []).append(name)
    prefix = "fasion-resize" if style == "deepfashion" else "market"
    annotations = root / f"{prefix}-annotation-{split}.csv"
    annotations.write_text("name:keypoints_y:keypoints_x\n" + "\n".join(rows) + "\n")
    pairs = root / f"{prefix}-pairs-{split}.csv"
    lines = [f"{a},{b}" for group in names.values() for a in group for b in group if a != b]
    pairs.write_text("from,to\n" + "\n".join(lines) + "\n")
    return {"images": image_dir, "annotations": annotations, "pairs": pairs, "names": names}


def sample_people_split(root: Path) -> tuple[Path, Path, Path]:
    """The six bundled sample targets (photo-like renders) under their dataset names, which carry
    the view, as a PATN split: (image folder, annotation CSV of their exact keypoints, pairs CSV
    taking each to the next one's pose)."""
    from pg2_server.keypoints import load_pose_file
    from pg2_server.samples import BUNDLED

    images = root / "images"
    images.mkdir(parents=True)
    rows = ["name:keypoints_y:keypoints_x"]
    names = []
    for sample in json.loads((BUNDLED / "samples.json").read_text()):
        name = sample["dataset_pair"][1]
        (images / name).write_bytes((BUNDLED / sample["target"]).read_bytes())
        _, truth = load_pose_file(BUNDLED / sample["pose"])
        ys = [-1 if np.isnan(y) else int(y) for y in truth[:, 1]]
        xs = [-1 if np.isnan(x) else int(x) for x in truth[:, 0]]
        rows.append(f"{name}: {ys}: {xs}")
        names.append(name)
    annotations = root / "truth.csv"
    annotations.write_text("\n".join(rows) + "\n")
    pairs = root / "pairs.csv"
    pairs.write_text("from,to\n" + "".join(f"{a},{b}\n" for a, b in zip(names, names[1:] + names[:1])))
    return images, annotations, pairs


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny networks on a shared 2-core machine: one thread is ~10× faster than two contending
    ones (OpenMP spin-waits), and the same thread count keeps CPU runs bit-reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def break_after_header(path: Path) -> None:
    """Overwrite an image with a PNG cut short after its header, as a broken download leaves it:
    its size can be read, its pixels cannot be decoded."""
    ok, encoded = cv2.imencode(".png", np.full((64, 32, 3), 128, np.uint8))
    path.write_bytes(encoded.tobytes()[:100])
