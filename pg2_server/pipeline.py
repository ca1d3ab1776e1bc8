"""The one inference pipeline: checkpoint → prepare inputs → G1 → G2 → images.

The server, the CLI and the evaluation all use this object; nobody else frames, encodes
poses or converts images for the model. The three steps (`prepare`, `run`, `finish`) are
public so the server can prepare and finish on a thread pool and batch `run` per device.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from .checkpoint import Checkpoint, load_checkpoint
from .keypoints import as_array
from .model import Generator1, Generator2, ModelConfig, preset
from .pose import FrameFit, check_image, fit_frame, heatmaps, pose_coordinates, pose_mask, \
    to_uint8, to_unit_range

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class Prepared:
    """One request's model inputs on the canvas, and how its target frame maps to the canvas."""
    source: np.ndarray       # float32 (3, H, W) in [-1, 1]
    heatmaps: np.ndarray     # float32 (18, H, W)
    coordinates: np.ndarray  # float32 (36,), for the CE embedding
    mask: np.ndarray         # uint8 (H, W) pose mask of the target pose
    fit: FrameFit            # the target frame in the canvas


@dataclass
class Generation:
    """One result in the target frame's size: final image, optional G1 image and alpha."""
    image: np.ndarray               # uint8 (H, W, 3): G2's output (G1's if the model has no G2)
    g1: np.ndarray | None = None    # uint8 (H, W, 3)
    alpha: np.ndarray | None = None  # uint8 (H, W), 255 inside the target pose mask


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch.device for 'cpu', 'cuda', 'cuda:N' or 'mps', with a clear error if unavailable."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} requested but CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(f"device {device} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device mps requested but Metal is not available; use --device cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of float32, bfloat16, float16, got {dtype!r}")
    return DTYPES[dtype]


def _check_size(size, what: str = "size") -> tuple[int, int]:
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size)):
        raise ValueError(f"{what} must be (W, H) integers, got {size!r}")
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"{what} must be positive, got {tuple(size)}")
    return int(size[0]), int(size[1])


class Pipeline:
    """PG2 inference: `pipeline(sources, keypoints, sizes)` → list of uint8 RGB images."""

    def __init__(self, config: ModelConfig, g1: Generator1, g2: Generator2 | None = None, *,
                 device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                 name: str | None = None, provenance: dict | None = None, metrics: dict | None = None):
        self.config = config
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.name = name or config.preset
        self.provenance = provenance or {}
        self.metrics = metrics or {}
        memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        self.memory_format = memory_format
        self.g1 = g1.eval().to(self.device, memory_format=memory_format).requires_grad_(False)
        self.g2 = g2.eval().to(self.device, memory_format=memory_format).requires_grad_(False) \
            if g2 is not None else None

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype = "float32") -> "Pipeline":
        """Load a `NAME.json` + `NAME.safetensors` checkpoint (no pickle)."""
        checkpoint: Checkpoint = load_checkpoint(path)
        return cls(checkpoint.config, checkpoint.g1, checkpoint.g2, device=device, dtype=dtype,
                   name=checkpoint.name, provenance=checkpoint.provenance, metrics=checkpoint.metrics)

    @classmethod
    def random(cls, preset_name: str, seed: int = 0, device: str | torch.device = "cpu",
               dtype: str | torch.dtype = "float32", **overrides) -> "Pipeline":
        """Random (Glorot) weights of a preset, for tests and benchmarks."""
        config = preset(preset_name, **overrides)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            g1, g2 = Generator1(config), Generator2(config)
        finally:
            torch.random.set_rng_state(generator_state)
        return cls(config, g1, g2, device=device, dtype=dtype, name=f"{preset_name}-random")

    def describe(self) -> dict:
        """What a client needs to know about the model (used by the server's `info`)."""
        return {"name": self.name, "preset": self.config.preset, "canvas": list(self.config.canvas),
                "keypoints": list(self.config.keypoints),
                "stages": ["g1", "g2"] if self.g2 is not None else ["g1"],
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "provenance": self.provenance, "metrics": self.metrics}

    # -- the three steps ----------------------------------------------------------------------

    def prepare(self, source: np.ndarray, keypoints, size: Sequence[int]) -> Prepared:
        """Frame the source and the target pose onto the canvas; validates every input."""
        check_image(source, "source image")
        points = as_array(keypoints)
        size = _check_size(size, "target size")
        canvas = self.config.canvas
        source_fit = fit_frame((source.shape[1], source.shape[0]), canvas)
        target_fit = fit_frame(size, canvas)
        on_canvas = target_fit.keypoints_to_canvas(points)
        height, width = canvas
        c = self.config
        return Prepared(
            source=to_unit_range(source_fit.image_to_canvas(source)),
            heatmaps=heatmaps(on_canvas, height, width, c.heatmap_radius, c.heatmap_kind, c.heatmap_sigma),
            coordinates=pose_coordinates(on_canvas, height, width),
            mask=pose_mask(on_canvas, height, width, c.heatmap_radius),
            fit=target_fit)

    def forward(self, sources: torch.Tensor, heatmaps_: torch.Tensor,
                coordinates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched G1 then G2 on device tensors; returns (G1 image, final image), unclipped."""
        autocast = torch.autocast(self.device.type, dtype=self.dtype) \
            if self.dtype != torch.float32 else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            coarse = self.g1(sources, heatmaps_, coordinates)
            final = coarse + self.g2(coarse, sources) if self.g2 is not None else coarse
        return coarse.float(), final.float()

    def run(self, batch: Sequence[Prepared]) -> tuple[np.ndarray, np.ndarray]:
        """Run G1 and G2 on prepared inputs; returns (G1, final) float32 (B, 3, H, W) arrays."""
        def stack(arrays):
            tensor = torch.from_numpy(np.stack(arrays))
            if self.device.type == "cuda":
                tensor = tensor.pin_memory()
            return tensor.to(self.device, non_blocking=True)

        sources = stack([p.source for p in batch]).contiguous(memory_format=self.memory_format)
        maps = stack([p.heatmaps for p in batch]).contiguous(memory_format=self.memory_format)
        coords = stack([p.coordinates for p in batch])
        coarse, final = self.forward(sources, maps, coords)
        return coarse.cpu().numpy(), final.cpu().numpy()

    def finish(self, prepared: Prepared, coarse: np.ndarray, final: np.ndarray,
               with_g1: bool = False, with_alpha: bool = False) -> Generation:
        """Clip, convert to uint8 and map one result from the canvas back to its target frame."""
        fit = prepared.fit
        image = fit.image_to_frame(to_uint8(final))
        g1 = fit.image_to_frame(to_uint8(coarse)) if with_g1 else None
        alpha = fit.image_to_frame(prepared.mask * np.uint8(255), cv2.INTER_NEAREST) if with_alpha else None
        return Generation(image, g1, alpha)

    # -- convenience --------------------------------------------------------------------------

    def generate(self, sources: Sequence[np.ndarray], keypoints: Sequence, sizes: Sequence,
                 with_g1: bool = False, with_alpha: bool = False, batch_size: int = 32) -> list[Generation]:
        """All three steps for a list of requests, `batch_size` at a time."""
        if not (len(sources) == len(keypoints) == len(sizes)):
            raise ValueError(f"sources, keypoints and sizes must have equal lengths, got "
                             f"{len(sources)}, {len(keypoints)}, {len(sizes)}")
        prepared = [self.prepare(s, k, z) for s, k, z in zip(sources, keypoints, sizes)]
        results: list[Generation] = []
        for start in range(0, len(prepared), batch_size):
            chunk = prepared[start:start + batch_size]
            coarse, final = self.run(chunk)
            results.extend(self.finish(p, c, f, with_g1, with_alpha) for p, c, f in zip(chunk, coarse, final))
        return results

    def __call__(self, sources: Sequence[np.ndarray], keypoints: Sequence, sizes: Sequence) -> list[np.ndarray]:
        """Generate the person of each source in each target pose; images of the given sizes."""
        return [g.image for g in self.generate(sources, keypoints, sizes)]
