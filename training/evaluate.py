"""Score a checkpoint on test pairs the way the field does, next to the copy-the-source baseline.

Images come from the one inference pipeline (pg2_server.pipeline.Pipeline); metrics from
scikit-image. Columns:
- SSIM (PG2): skimage, 7×7 uniform window, uint8 RGB, data range 255.
- SSIM (PATN): Gaussian weights σ 1.5, no sample covariance, data range of the generated image.
- mask-SSIM: PG2's SSIM with both images multiplied by the *target* pose mask (as PATN; PG2's
  own script used the source mask).
- PSNR (data range 255) and L1 (mean absolute difference, images scaled to [0, 1]).
Rows: copy-source (the source image as the answer), G1 alone, G1 + G2.
Given local weight files, also IS / mask-IS, FID and LPIPS (training/features.py).
"""
from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from tqdm import tqdm

from pg2_server.drawing import read_rgb, write_rgb
from pg2_server.pipeline import Pipeline

from .data import PairSplit

if TYPE_CHECKING:
    from .features import PerceptualScores

METRICS = ("ssim_pg2", "ssim_patn", "mask_ssim", "psnr", "l1")
HEADERS = {"ssim_pg2": "SSIM (PG2)", "ssim_patn": "SSIM (PATN)", "mask_ssim": "mask-SSIM",
           "psnr": "PSNR dB", "l1": "L1", "is": "IS", "mask_is": "mask-IS", "fid": "FID (train)",
           "lpips": "LPIPS"}


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
    """PG2's SSIM of both images multiplied by a {0, 1} mask (H, W)."""
    m = (mask > 0).astype(np.uint8)[..., None]
    return ssim_pg2(generated * m, target * m)


def score(generated: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Every metric of one generated uint8 RGB image against its target."""
    return {"ssim_pg2": ssim_pg2(generated, target), "ssim_patn": ssim_patn(generated, target),
            "mask_ssim": mask_ssim(generated, target, mask),
            "psnr": _psnr(generated, target),
            "l1": float(np.abs(generated.astype(np.float64) - target.astype(np.float64)).mean() / 255.0)}


def _psnr(generated: np.ndarray, target: np.ndarray) -> float:
    """PSNR with data range 255; +inf for identical images (without numpy's divide warning)."""
    if np.array_equal(generated, target):
        return math.inf
    return float(peak_signal_noise_ratio(target, generated, data_range=255))


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else None  # PSNR of identical images is +inf


def _file_stem(source: str, target: str) -> str:
    return f"{Path(source).stem}___{Path(target).stem}"


def evaluate(pipeline: Pipeline, split: PairSplit, out_dir: str | Path, batch_size: int = 16,
             save_images: bool = True, limit: int | None = None, workers: int = 2,
             progress: bool = True, perceptual: PerceptualScores | None = None) -> dict:
    """Generate every pair of `split`, save the images, score them; returns the metrics dict.

    With `perceptual`, the rows also get its IS / mask-IS / FID / LPIPS columns."""
    out_dir = Path(out_dir)
    pairs = split.pairs[:limit] if limit else split.pairs
    rows = {"copy-source": {m: [] for m in METRICS}, "g1": {m: [] for m in METRICS}}
    if pipeline.g2 is not None:
        rows["g1+g2"] = {m: [] for m in METRICS}
    if save_images:
        for kind in ("final", "g1"):
            (out_dir / "images" / kind).mkdir(parents=True, exist_ok=True)

    def score_pair(item):
        (source_name, target_name), baseline, target, generation = item
        mask = generation.alpha
        result = {"copy-source": score(baseline, target, mask), "g1": score(generation.g1, target, mask)}
        if "g1+g2" in rows:
            result["g1+g2"] = score(generation.image, target, mask)
        if save_images:
            stem = _file_stem(source_name, target_name)
            write_rgb(out_dir / "images" / "final" / f"{stem}.png", generation.image)
            write_rgb(out_dir / "images" / "g1" / f"{stem}.png", generation.g1)
        return result

    bar = tqdm(total=len(pairs), desc="eval", unit="pair", disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max(1, workers)) as pool:  # skimage's filters release the GIL
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            sources = [read_rgb(split.image_dir / s) for s, _ in chunk]
            targets = [read_rgb(split.image_dir / t) for _, t in chunk]
            keypoints = [split.keypoints[t] for _, t in chunk]
            sizes = [(t.shape[1], t.shape[0]) for t in targets]
            generations = pipeline.generate(sources, keypoints, sizes, with_g1=True, with_alpha=True,
                                            batch_size=batch_size)
            baselines = [source if source.shape == target.shape else
                         cv2.resize(source, (target.shape[1], target.shape[0]), interpolation=cv2.INTER_AREA)
                         for source, target in zip(sources, targets)]
            scoring = pool.map(score_pair, zip(chunk, baselines, targets, generations))
            if perceptual is not None:  # on the model's device while the threads score SSIM
                masks = [g.alpha for g in generations]
                perceptual.add("copy-source", baselines, targets, masks)
                perceptual.add("g1", [g.g1 for g in generations], targets, masks)
                if "g1+g2" in rows:
                    perceptual.add("g1+g2", [g.image for g in generations], targets, masks)
            for result in scoring:
                for row, values in result.items():
                    for metric, value in values.items():
                        rows[row][metric].append(value)
            bar.update(len(chunk))
    bar.close()
    metrics = {
        "checkpoint": pipeline.name,
        "pairs": len(pairs),
        "skipped": {kind: len(v) for kind, v in split.report.problems.items()},
        "rows": {row: {m: _mean(values[m]) for m in METRICS} for row, values in rows.items()},
        "notes": "SSIM (PG2): skimage 7×7 uniform window on uint8 RGB; SSIM (PATN): Gaussian σ 1.5, "
                 "no sample covariance, generated image's data range; mask-SSIM uses the target pose "
                 "mask; PSNR data range 255 (identical images excluded from the mean); L1 on [0, 1].",
    }
    if perceptual is not None and pairs:
        for row, values in perceptual.results().items():
            metrics["rows"][row].update(values)
        metrics["perceptual"] = perceptual.describe()
        metrics["notes"] += (" IS / mask-IS: torchvision Inception-v3 softmax, 10 in-order splits (OpenAI's "
                             "formula), mask-IS on the generated image times the target pose mask; FID: "
                             "torchvision Inception-v3 pool features against the training images' statistics; "
                             "LPIPS v0.1 AlexNet. Not comparable with TF-Inception FID/IS of papers.")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out_dir / "metrics.md").write_text(markdown_table(metrics))
    return metrics


def markdown_table(metrics: dict) -> str:
    """The metrics as a markdown table, one row per method."""
    columns = [m for m in HEADERS if any(m in values for values in metrics["rows"].values())]
    header = "| method | " + " | ".join(HEADERS[m] for m in columns) + " |"
    lines = [f"{metrics['pairs']} test pairs, checkpoint `{metrics['checkpoint']}`", "", header,
             "|---" * (len(columns) + 1) + "|"]
    for row, values in metrics["rows"].items():
        cells = ["n/a" if values.get(m) is None else f"{values[m]:.4f}" for m in columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
