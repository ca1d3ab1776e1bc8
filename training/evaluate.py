"""Score a checkpoint on test pairs the way the field does, next to the copy-the-source baseline.

Images come from the one inference pipeline (pg2_server.pipeline.Pipeline); metrics from
scikit-image. Columns:
- SSIM (PG2): skimage, 7×7 uniform window, uint8 RGB, data range 255.
- SSIM (PATN): Gaussian weights σ 1.5, no sample covariance, data range of the generated image.
- mask-SSIM: PG2's SSIM with both images multiplied by the *target* pose mask (as PATN; PG2's
  own script used the source mask). The mask is drawn from the target's annotated keypoints at
  the target image's own resolution (PG2's radius 4 px, 23 limbs, 5×5 closing), not on the
  model's canvas.
- PSNR (data range 255) and L1 (mean absolute difference, images scaled to [0, 1]).
- ΔE: CIEDE2000 colour difference (skimage.color.deltaE_ciede2000, CIELAB from sRGB, D65),
  mean over the pixels inside that target mask.
- detail: mean |Laplacian| (OpenCV's 4-neighbour kernel on 8-bit grey) inside the target mask;
  the `target` row gives the real image's value to compare with.
- with a pose detector (`--pckh`): PCKh@0.5 as PATN (a keypoint is right when |dx| < ½ head
  width and |dy| < ½ head height, the head box spanning the target's nose, neck, eyes and ears
  when ≥ 2 are annotated; torso-based when not), counted over the target's annotated keypoints
  and side-aware (a right wrist found where the left one is counts as wrong); "limbs" are the
  12 shoulders, elbows, wrists, hips, knees and ankles; detected = images where a person is found.
Rows: copy-source (the source image as the answer), blank (the source's backdrop colour, a flat
image: what SSIM gives for no person at all), canvas (the real target scaled to the model's
canvas and back: roughly what the canvas keeps, not a bound), G1 alone, G1 + G2, and target
(the real image: the detector's ceiling and the real detail).
Given local weight files, also IS / mask-IS, FID and LPIPS (training/features.py).
"""
from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import cv2
import numpy as np
from skimage.color import deltaE_ciede2000, rgb2lab
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from tqdm import tqdm

from pg2_server.atomic import write_bytes_atomic
from pg2_server.drawing import read_rgb, write_rgb
from pg2_server.keypoints import FLIP_PERMUTATION, INDEX
from pg2_server.pipeline import Pipeline
from pg2_server.pose import fit_frame, pose_mask

from .data import PAIR_SKIPS, PairSplit

if TYPE_CHECKING:
    from pg2_server.detection import PoseDetector

    from .features import PerceptualScores

METRICS = ("ssim_pg2", "ssim_patn", "mask_ssim", "psnr", "l1", "delta_e", "detail")
POSE_METRICS = ("pckh", "pckh_limbs", "detected", "pckh_limbs_agree", "turned")
HEADERS = {"ssim_pg2": "SSIM (PG2)", "ssim_patn": "SSIM (PATN)", "mask_ssim": "mask-SSIM",
           "psnr": "PSNR dB", "l1": "L1", "delta_e": "ΔE00", "detail": "detail",
           "pckh": "PCKh", "pckh_limbs": "limb PCKh", "detected": "detected",
           "pckh_limbs_agree": "limb PCKh vs the detected target", "turned": "turned",
           "is": "IS", "mask_is": "mask-IS", "fid": "FID (train)", "lpips": "LPIPS"}
SHOWN_KEPT = 256  # shown sources (--loose-sources, --frame-sources) kept for the pairs that follow
MASK_RADIUS = 4  # px at the image's own resolution, as PG2 draws its mask
HEAD_JOINTS = tuple(INDEX[n] for n in ("nose", "neck", "right_eye", "left_eye", "right_ear", "left_ear"))
LIMB_JOINTS = tuple(range(INDEX["right_shoulder"], INDEX["left_ankle"] + 1))
# Head box per torso length (shoulder midpoint to hip midpoint), the medians over the synthetic
# test set's annotations (width 0.27, height 0.44): the size used when the head is not annotated.
TORSO_HEAD = (0.27, 0.44)
_VIEW = re.compile(r"_\d+_?(front|side|back|full|additional|flat)\.[^.]+$")   # PATN's and In-shop's names


def ssim_pg2(generated: np.ndarray, target: np.ndarray) -> float:
    """PG2's SSIM: 7×7 uniform window over uint8 RGB."""
    return float(structural_similarity(generated, target, win_size=7, channel_axis=2, data_range=255))


def ssim_patn(generated: np.ndarray, target: np.ndarray) -> float:
    """PATN's SSIM: Gaussian σ 1.5, population covariance, data range of the generated image."""
    data_range = float(generated.max()) - float(generated.min())
    return float(structural_similarity(target, generated, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, channel_axis=2,
                                       data_range=data_range if data_range > 0 else 255))


def mask_ssim(generated: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """PG2's SSIM of both images multiplied by a {0, 1} mask (H, W); NaN for an empty mask (a
    target with no limb annotated at both ends), which would score two black images 1 whatever
    was generated, as ΔE00 and detail are NaN there."""
    if not (mask > 0).any():
        return math.nan
    m = (mask > 0).astype(np.uint8)[..., None]
    return ssim_pg2(generated * m, target * m)


def score(generated: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Every metric of one generated uint8 RGB image against its target."""
    return {"ssim_pg2": ssim_pg2(generated, target), "ssim_patn": ssim_patn(generated, target),
            "mask_ssim": mask_ssim(generated, target, mask),
            "psnr": _psnr(generated, target),
            "l1": float(np.abs(generated.astype(np.float64) - target.astype(np.float64)).mean() / 255.0),
            "delta_e": delta_e(generated, target, mask), "detail": detail(generated, mask)}


def delta_e(generated: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """Mean CIEDE2000 ΔE between two uint8 RGB images over the pixels where `mask` > 0 (NaN if none)."""
    inside = mask > 0
    if not inside.any():
        return math.nan
    a = rgb2lab(generated[inside][None].astype(np.float64) / 255.0)
    b = rgb2lab(target[inside][None].astype(np.float64) / 255.0)
    return float(deltaE_ciede2000(a, b).mean())


def detail(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean |Laplacian| (4-neighbour kernel, 8-bit grey levels) where `mask` > 0 (NaN if none)."""
    inside = mask > 0
    if not inside.any():
        return math.nan
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return float(np.abs(cv2.Laplacian(grey, cv2.CV_32F, ksize=1))[inside].mean())


def target_mask(keypoints: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The target pose mask at the target image's own (W, H), from its annotated keypoints."""
    return pose_mask(keypoints, size, MASK_RADIUS)


def head_size(truth: np.ndarray) -> tuple[float, float] | None:
    """PATN's PCKh normaliser: (width, height) of the box around the annotated head keypoints.

    Needs ≥ 2 of nose, neck, eyes and ears; otherwise TORSO_HEAD times the torso length (both
    shoulders and at least one hip annotated); None when neither is there.
    """
    head = truth[list(HEAD_JOINTS)]
    head = head[~np.isnan(head[:, 0])]
    if len(head) >= 2:
        w, h = head.max(axis=0) - head.min(axis=0)
        return float(w), float(h)
    shoulders = truth[[INDEX["right_shoulder"], INDEX["left_shoulder"]]]
    hips = truth[[INDEX["right_hip"], INDEX["left_hip"]]]
    hips = hips[~np.isnan(hips[:, 0])]
    if np.isnan(shoulders).any() or not len(hips):
        return None
    torso = float(np.linalg.norm(shoulders.mean(axis=0) - hips.mean(axis=0)))
    return TORSO_HEAD[0] * torso, TORSO_HEAD[1] * torso


def pckh_counts(predicted: np.ndarray | None, truth: np.ndarray, alpha: float = 0.5,
                joints=None) -> tuple[np.ndarray, np.ndarray] | None:
    """Per keypoint (18,): (right, annotated) as booleans, PATN's rule; None without a head size.

    `predicted` None (no person found) gets every annotated keypoint wrong. Side-aware: keypoint
    i is compared with keypoint i only. `joints` limits the count to those indices.
    """
    size = head_size(truth)
    if size is None:
        return None
    annotated = ~np.isnan(truth[:, 0])
    if predicted is None:
        right = np.zeros(len(truth), bool)
    else:
        with np.errstate(invalid="ignore"):
            error = np.abs(np.asarray(predicted, np.float64) - truth)
            right = annotated & (error[:, 0] < size[0] * alpha) & (error[:, 1] < size[1] * alpha)
    if joints is not None:
        keep = np.zeros(len(truth), bool)
        keep[list(joints)] = True
        right, annotated = right & keep, annotated & keep
    return right, annotated


def view_of(name: str) -> str | None:
    """DeepFashion's view from an image name (PATN's `…_1front.jpg`, In-shop's `…/02_1_front.jpg`
    → front), or None."""
    match = _VIEW.search(name)
    return match[1] if match else None


def _psnr(generated: np.ndarray, target: np.ndarray) -> float:
    """PSNR with data range 255; +inf for identical images (without numpy's divide warning)."""
    if np.array_equal(generated, target):
        return math.inf
    return float(peak_signal_noise_ratio(target, generated, data_range=255))


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else None  # PSNR of identical images is +inf


def _file_stem(source: str, target: str) -> str:
    """`SOURCE___TARGET` of a pair's file names without extensions; names in subfolders keep
    their folders, joined by `__`, so pairs from different folders get different files."""
    def flat(name: str) -> str:
        return "__".join(Path(name).with_suffix("").parts)
    return f"{flat(source)}___{flat(target)}"


def backdrop(image: np.ndarray) -> np.ndarray:
    """The backdrop colour of a photo: the median of its outermost pixels, uint8 RGB (3,)."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return np.median(border, axis=0).astype(np.uint8)


def canvas_round_trip(image: np.ndarray, canvas: tuple[int, int]) -> np.ndarray:
    """`image` fitted into a model canvas (W, H) as the pipeline fits a photo, and back to its size."""
    fit = fit_frame((image.shape[1], image.shape[0]), canvas)
    return fit.image_to_frame(fit.image_to_canvas(image))


def loose_shot(image: np.ndarray) -> np.ndarray:
    """A photo framed as a phone or a wide shot frames a person: the image's content at 60 % of
    the height of a 3:2 landscape photo, the backdrop going on around it (edge pixels repeated)."""
    h, w = image.shape[:2]
    height = int(h / 0.6)
    width = max(w, int(height * 1.5))   # a panorama keeps its width
    top, left = (height - h) // 2, (width - w) // 2
    return cv2.copyMakeBorder(image, top, height - h - top, left, width - w - left, cv2.BORDER_REPLICATE)


class PoseScores:
    """PCKh and detection counts per row (and per view), summed over pairs as PATN does.

    Besides PCKh against the annotations, limb PCKh against the keypoints the same detector finds
    in the real target image ("agreement"): where the detector itself goes wrong on the real
    image (BlazePose swaps or misplaces limbs in many back views: its limb PCKh on the bundled
    model's 410 held-out photo-like render pairs is 0.85 front and 0.58 back), a generated image
    that looks like the real one is wrong the same way, so this measure's ceiling is 1 for every
    view. Pairs whose target has no detected person are left out of it. And "turned": the share
    of images with a person found whose limbs fit the annotations better with left and right
    swapped, the person read as facing the other way.
    """

    def __init__(self):
        self.right: dict[tuple[str, str | None], np.ndarray] = {}
        self.annotated: dict[tuple[str, str | None], np.ndarray] = {}
        self.detected: dict[tuple[str, str | None], list[int]] = {}
        self.agree: dict[tuple[str, str | None], list[int]] = {}   # limbs right, limbs compared
        self.turned: dict[tuple[str, str | None], list[int]] = {}  # images read turned, images compared
        self.no_head = 0   # pairs whose target has neither a head box nor a torso: out of PCKh

    def add(self, row: str, view: str | None, predicted: np.ndarray | None, truth: np.ndarray,
            reference: np.ndarray | None = None) -> None:
        """One image of `row`: its detected keypoints (None: no person) against the target's
        annotations, and against `reference`, the keypoints detected in the real target."""
        counts = pckh_counts(predicted, truth)
        if counts is None and row == "target":
            self.no_head += 1
        agreement = pckh_counts(predicted, reference, joints=LIMB_JOINTS) if reference is not None else None
        turned = None
        if predicted is not None and counts is not None:   # do the limbs fit better with sides swapped?
            as_is = pckh_counts(predicted, truth, joints=LIMB_JOINTS)[0].sum()
            swapped = pckh_counts(np.asarray(predicted)[list(FLIP_PERMUTATION)], truth, joints=LIMB_JOINTS)[0].sum()
            turned = swapped > as_is
        for key in ((row, None),) + (((row, view),) if view else ()):
            found = self.detected.setdefault(key, [0, 0])
            found[0] += predicted is not None
            found[1] += 1
            if counts is not None:
                self.right[key] = self.right.get(key, 0) + counts[0]
                self.annotated[key] = self.annotated.get(key, 0) + counts[1]
            if turned is not None:
                count = self.turned.setdefault(key, [0, 0])
                count[0] += int(turned)
                count[1] += 1
            if agreement is not None:
                agree = self.agree.setdefault(key, [0, 0])
                agree[0] += int(agreement[0].sum())
                agree[1] += int(agreement[1].sum())

    def _values(self, key) -> dict[str, float | None]:
        found = self.detected[key]
        values: dict[str, float | None] = {"detected": found[0] / found[1] if found[1] else None}
        right, annotated = self.right.get(key), self.annotated.get(key)
        for metric, joints in (("pckh", slice(None)), ("pckh_limbs", list(LIMB_JOINTS))):
            total = None if annotated is None else annotated[joints].sum()
            values[metric] = float(right[joints].sum() / total) if total else None
        agree = self.agree.get(key)
        values["pckh_limbs_agree"] = agree[0] / agree[1] if agree and agree[1] else None
        turned = self.turned.get(key)
        values["turned"] = turned[0] / turned[1] if turned and turned[1] else None
        return values

    def rows(self) -> dict[str, dict[str, float | None]]:
        """{row: {pckh, pckh_limbs, detected}} over every pair."""
        return {row: self._values((row, view)) for row, view in self.detected if view is None}

    def views(self) -> dict[str, dict[str, dict]]:
        """{view: {row: {pckh, pckh_limbs, detected, images}}} where the image names carry views."""
        result: dict[str, dict[str, dict]] = {}
        for row, view in self.detected:
            if view is not None:
                result.setdefault(view, {})[row] = {**self._values((row, view)),
                                                    "images": self.detected[(row, view)][1]}
        return result

    def per_keypoint(self) -> dict[str, dict[str, float | None]]:
        """{row: {keypoint name: PCKh}}."""
        from pg2_server.keypoints import NAMES

        result = {}
        for (row, view), right in self.right.items():
            if view is None:
                annotated = self.annotated[(row, view)]
                result[row] = {name: (float(r / a) if a else None) for name, r, a in zip(NAMES, right, annotated)}
        return result


def evaluate(pipeline: Pipeline, split: PairSplit, out_dir: str | Path, batch_size: int = 16,
             save_images: bool = True, limit: int | None = None, workers: int = 2,
             progress: bool = True, perceptual: PerceptualScores | None = None,
             detector: PoseDetector | None = None, detections: dict | None = None,
             shown_source: Callable[[np.ndarray], np.ndarray] | None = None, shown_as: str = "") -> dict:
    """Generate every pair of `split`, save the images, score them; returns the metrics dict.

    With `perceptual`, the rows also get its IS / mask-IS / FID / LPIPS columns; with
    `detector` (pg2_server.detection.PoseDetector), PCKh, limb PCKh and the detection rate;
    `detections` keeps what it found in the images no model draws (sources, targets, their blank
    and canvas rows): pass the same dict to later calls on the same split and model canvas (as
    training's validation does) to detect those once.
    `shown_source` turns each source photo into what the model is given (e.g. loose_shot, or
    that then framed to its person), described by `shown_as` in the metrics' notes; the
    copy-source baseline keeps the photo as it is."""
    from pg2_server.detection import DetectionError

    if limit is not None and limit < 1:
        raise ValueError(f"the limit must be a positive number of pairs, got {limit}")
    out_dir = Path(out_dir)
    pairs = split.pairs[:limit] if limit is not None else split.pairs
    names = ["copy-source", "blank", "canvas", "g1"] + (["g1+g2"] if pipeline.g2 is not None else [])
    rows = {row: {m: [] for m in METRICS} for row in names}
    rows["target"] = {"detail": []}
    poses = PoseScores() if detector is not None else None
    cache = detections if detections is not None else {}   # detections of the images no model draws
    if save_images:
        for kind in ("final", "g1"):
            (out_dir / "images" / kind).mkdir(parents=True, exist_ok=True)

    def detect(image: np.ndarray, key: tuple | None = None) -> np.ndarray | None:
        if key is not None and key in cache:
            return cache[key]
        try:
            found = detector.detect(image).keypoints
        except DetectionError:
            found = None
        if key is not None:
            cache[key] = found
        return found

    def score_pair(item):
        (source_name, target_name), source, baseline, target, generation, keypoints = item
        mask = target_mask(keypoints, (target.shape[1], target.shape[0]))
        blank = np.empty_like(target)
        blank[:] = backdrop(source)
        images = {"copy-source": baseline, "blank": blank, "canvas": canvas_round_trip(target, pipeline.config.canvas),
                  "g1": generation.g1}
        if "g1+g2" in rows:
            images["g1+g2"] = generation.image
        result = {row: score(image, target, mask) for row, image in images.items()}
        result["target"] = {"detail": detail(target, mask)}
        found = None
        if detector is not None:
            keys = {"copy-source": ("source", source_name, target.shape), "target": ("target", target_name),
                    "blank": ("blank", source_name, target.shape), "canvas": ("canvas", target_name)}
            found = {row: detect(image, keys.get(row)) for row, image in {**images, "target": target}.items()}
        if save_images:
            stem = _file_stem(source_name, target_name)
            write_rgb(out_dir / "images" / "final" / f"{stem}.png", generation.image)
            write_rgb(out_dir / "images" / "g1" / f"{stem}.png", generation.g1)
        return result, found, keypoints, view_of(target_name)

    # The latest SHOWN_KEPT shown sources (a test set's pairs list each source's pairs together):
    # all of DeepFashion's would be gigabytes of enlarged photos.
    shown_sources: OrderedDict[str, np.ndarray] = OrderedDict()
    bar = tqdm(total=len(pairs), desc="eval", unit="pair", disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max(1, workers)) as pool:  # skimage's filters release the GIL
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            sources = [read_rgb(split.image_dir / s) for s, _ in chunk]
            targets = [read_rgb(split.image_dir / t) for _, t in chunk]
            keypoints = [split.keypoints[t] for _, t in chunk]
            sizes = [(t.shape[1], t.shape[0]) for t in targets]
            shown = sources
            if shown_source is not None:   # once per source photo: framing one detects its person
                shown = []
                for (name, _), source in zip(chunk, sources):
                    if name not in shown_sources:
                        shown_sources[name] = shown_source(source)
                        if len(shown_sources) > SHOWN_KEPT:
                            shown_sources.popitem(last=False)
                    shown_sources.move_to_end(name)
                    shown.append(shown_sources[name])
            generations = pipeline.generate(shown, keypoints, sizes, with_g1=True, batch_size=batch_size)
            baselines = [source if source.shape == target.shape else
                         cv2.resize(source, (target.shape[1], target.shape[0]), interpolation=cv2.INTER_AREA)
                         for source, target in zip(sources, targets)]
            scoring = pool.map(score_pair, zip(chunk, sources, baselines, targets, generations, keypoints))
            if perceptual is not None:  # on the model's device while the threads score SSIM
                masks = [target_mask(k, size) for k, size in zip(keypoints, sizes)]
                perceptual.add("copy-source", baselines, targets, masks)
                perceptual.add("g1", [g.g1 for g in generations], targets, masks)
                if "g1+g2" in rows:
                    perceptual.add("g1+g2", [g.image for g in generations], targets, masks)
            for result, found, truth, view in scoring:
                for row, values in result.items():
                    for metric, value in values.items():
                        rows[row][metric].append(value)
                if found is not None:
                    for row, predicted in found.items():
                        poses.add(row, view, predicted, truth, reference=found["target"])
            bar.update(len(chunk))
    bar.close()
    metrics = {
        "checkpoint": pipeline.name,
        "pairs": len(pairs),
        "inference": {"device": str(pipeline.device), "dtype": str(pipeline.dtype).removeprefix("torch."),
                      "backend": pipeline.backend},
        "skipped": {kind: len(v) for kind, v in split.report.problems.items() if kind in PAIR_SKIPS},
        "data_problems": {kind: len(v) for kind, v in split.report.problems.items() if kind not in PAIR_SKIPS},
        "rows": {row: {m: _mean(v) for m, v in values.items()} for row, values in rows.items()},
        "notes": "SSIM (PG2): skimage 7×7 uniform window on uint8 RGB; SSIM (PATN): Gaussian σ 1.5, "
                 "no sample covariance, generated image's data range; mask-SSIM uses the target pose "
                 "mask drawn at the image's own resolution (radius 4 px); PSNR data range 255 (identical "
                 "images excluded from the mean); L1 on [0, 1]; ΔE00: CIEDE2000 (skimage) inside the target "
                 "mask; detail: mean |Laplacian| (4-neighbour, 8-bit grey) inside the target mask; blank: a "
                 "flat image in the source's border colour; canvas: the real target scaled to the model's canvas "
                 "and back (roughly what the canvas keeps, not a bound: a canvas image fitted to the target scores "
                 "higher); target: the real image.",
    }
    if shown_as:
        metrics["notes"] += f" Sources shown to the model: {shown_as} (copy-source: the photo as it is)."
    if poses is not None:
        for row, values in poses.rows().items():
            metrics["rows"][row].update(values)
        metrics["views"] = poses.views()
        metrics["pckh_per_keypoint"] = poses.per_keypoint()
        metrics["pckh_pairs_left_out"] = poses.no_head
        metrics["notes"] += (" PCKh@0.5 (PATN's head-box rule; torso-based head size where the head is not "
                             "annotated), side-aware, keypoints detected with MediaPipe BlazePose "
                             f"(visibility ≥ {detector.visibility}); limb PCKh: shoulders to ankles; detected: "
                             "share of images in which a person is found; limb PCKh vs the detected target: "
                             "the same against the keypoints detected in the real target image (pairs whose "
                             "target has no detected person left out); turned: share of the images with a person "
                             "found whose limbs match the annotations better with left and right swapped (the "
                             "person reads as facing the other way, e.g. a back view drawn as a front view).")
    if perceptual is not None and pairs:
        for row, values in perceptual.results().items():
            metrics["rows"][row].update(values)
        metrics["perceptual"] = perceptual.describe()
        metrics["notes"] += (" IS / mask-IS: torchvision Inception-v3 softmax, 10 in-order splits (OpenAI's "
                             "formula), mask-IS on the generated image times the target pose mask; FID: "
                             "torchvision Inception-v3 pool features against the training images' statistics; "
                             "LPIPS v0.1 AlexNet. Not comparable with TF-Inception FID/IS of papers.")
    write_bytes_atomic(out_dir / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    write_bytes_atomic(out_dir / "metrics.md", markdown_table(metrics).encode())
    return metrics


def markdown_table(metrics: dict) -> str:
    """The metrics as a markdown table, one row per method (and one per view with PCKh)."""
    columns = [m for m in HEADERS if any(values.get(m) is not None for values in metrics["rows"].values())]
    header = "| method | " + " | ".join(HEADERS[m] for m in columns) + " |"
    inference = metrics.get("inference")
    heading = f"{metrics['pairs']} test pairs, checkpoint `{metrics['checkpoint']}`" + (
        f" ({inference['dtype']}, {inference['backend']} on {inference['device']})" if inference else "")
    if metrics.get("pckh_pairs_left_out"):
        heading += (f"; PCKh over {metrics['pairs'] - metrics['pckh_pairs_left_out']} pairs (targets with neither "
                    "head nor torso annotated left out)")
    lines = [heading, "", header,
             "|---" * (len(columns) + 1) + "|"]
    for row, values in metrics["rows"].items():
        cells = ["n/a" if values.get(m) is None else f"{values[m]:.4f}" for m in columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    if metrics.get("views"):
        lines += ["", "Per target view (PCKh, limb PCKh, detected, limb PCKh vs the detected target, turned):", "",
                  "| view | images | " + " | ".join(metrics["rows"]) + " |",
                  "|---" * (len(metrics["rows"]) + 2) + "|"]
        for view, by_row in sorted(metrics["views"].items()):
            cells = []
            for row in metrics["rows"]:
                v = by_row.get(row, {})
                cells.append(" / ".join("n/a" if v.get(m) is None else f"{v[m]:.2f}" for m in POSE_METRICS))
            images = next(iter(by_row.values()))["images"]
            lines.append(f"| {view} | {images} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
