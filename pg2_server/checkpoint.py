"""The checkpoint format: `NAME.safetensors` (weights) + `NAME.json` (config and provenance).

Loading never unpickles. Every failure names the file and what is wrong with it. Each save gives
both files one random `save_id` (in the weights' metadata and the JSON), so weights and a
description from different saves — a save killed between its two renames, a file copied over
from another run — are refused instead of served together.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .atomic import write_atomic, write_tensors_atomic
from .keypoints import NAMES
from .model import Generator1, Generator2, ModelConfig

FORMAT = "pg2-checkpoint"
FORMAT_VERSION = 2  # 2: the config's canvas is {"width", "height"}; 1 had a list [H, W]
READABLE_VERSIONS = (1, 2)
VALUE_RANGES = {"image": [-1.0, 1.0], "heatmap_disk": [-1.0, 1.0], "heatmap_gaussian": [0.0, 1.0],
                "pose_mask": [0, 1]}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or does not match the code."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt networks (on the CPU, fp32) and their description."""
    config: ModelConfig
    g1: Generator1
    g2: Generator2 | None
    provenance: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.path.name if self.path else self.config.preset

    @property
    def openvino_cache(self) -> Path | None:
        """Where the OpenVINO backend caches its conversion of these weights: `NAME.openvino/`."""
        return self.path.with_name(self.path.name + ".openvino") if self.path else None


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """(json, safetensors) for `dir/NAME`, `dir/NAME.json` or `dir/NAME.safetensors`."""
    path = Path(path)
    if path.suffix in (".json", ".safetensors"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".json"), path.with_name(path.name + ".safetensors")


def save_checkpoint(path: str | Path, config: ModelConfig, g1: torch.nn.Module,
                    g2: torch.nn.Module | None = None, *, provenance: dict | None = None,
                    metrics: dict | None = None, dtype: str = "float32") -> tuple[Path, Path]:
    """Write the weights to serve (G1, optionally G2) and their description; returns both paths."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    json_path, weights_path = checkpoint_paths(path)
    tensors = {}
    for prefix, module in (("g1.", g1), ("g2.", g2)):
        if module is None:
            continue
        state = getattr(module, "_orig_mod", module).state_dict()  # unwrap torch.compile
        for key, value in state.items():
            tensors[prefix + key] = value.detach().to("cpu", DTYPES[dtype]).contiguous()
            if tensors[prefix + key].is_floating_point() and not torch.isfinite(tensors[prefix + key]).all():
                hint = ("beyond float16's range (±65504): export as float32 or bfloat16"
                        if torch.isfinite(value).all() else "NaN or inf: the training diverged; export an earlier state")
                raise CheckpointError(f"{prefix + key} is not finite in {dtype}: {hint}")
    save_id = uuid.uuid4().hex
    description = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "stages": ["g1", "g2"] if g2 is not None else ["g1"],
        "dtype": dtype,
        "keypoints": list(NAMES),
        "value_ranges": VALUE_RANGES,
        "provenance": provenance or {},
        "metrics": metrics or {},
        "save_id": save_id,
    }
    write_tensors_atomic(weights_path, tensors, {"format": FORMAT, "save_id": save_id})
    write_atomic(json_path, lambda tmp: Path(tmp).write_text(json.dumps(description, indent=2) + "\n"))
    return json_path, weights_path


def _not_a_folder(path: str | Path) -> None:
    """A folder given as a checkpoint: say so, and name the descriptions inside it."""
    path = Path(path)
    if not path.is_dir():
        return
    inside = sorted(p.name for p in path.glob("*.json"))[:3]
    hint = f" (it holds {', '.join(inside)})" if inside else ""
    raise CheckpointError(f"{path} is a folder, not a checkpoint: pass the NAME.json inside it{hint}")


def read_description(json_path: Path) -> dict:
    """A checkpoint's NAME.json (config, provenance, metrics), checked, without its weights."""
    _not_a_folder(json_path)
    if not json_path.is_file():
        raise CheckpointError(f"checkpoint description {json_path} does not exist "
                              "(a checkpoint is NAME.json + NAME.safetensors)")
    try:
        description = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{json_path} is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise CheckpointError(f"{json_path} is not a PG2 checkpoint description "
                              f"(expected \"format\": \"{FORMAT}\")")
    if description.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{json_path} has format_version {description.get('format_version')!r}; "
                              f"this code reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    if description.get("keypoints", list(NAMES)) != list(NAMES):
        raise CheckpointError(f"{json_path} uses keypoint order {description.get('keypoints')}, "
                              f"not COCO-18 {list(NAMES)}")
    return description


def _load_module(module: torch.nn.Module, tensors: dict, prefix: str, weights_path: Path) -> None:
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path} does not match the architecture in its JSON: "
            f"missing {[prefix + k for k in missing[:5]]}{' …' if len(missing) > 5 else ''}, "
            f"unexpected {[prefix + k for k in unexpected[:5]]}{' …' if len(unexpected) > 5 else ''}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{weights_path}: tensor {prefix + key} has shape {tuple(value.shape)}, the config "
                f"builds {tuple(expected[key].shape)}; the JSON and weights do not belong together")
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{weights_path}: tensor {prefix + key} holds NaN or inf values")
    module.load_state_dict({k: v.float() for k, v in state.items()})


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load `path` (NAME, NAME.json or NAME.safetensors) into fp32 CPU networks in eval mode."""
    _not_a_folder(path)
    json_path, weights_path = checkpoint_paths(path)
    description = read_description(json_path)
    try:
        config = ModelConfig.from_dict(description["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{json_path}: invalid model config: {e}") from None
    if not weights_path.is_file():
        raise CheckpointError(f"weights file {weights_path} does not exist (next to {json_path.name})")
    try:
        tensors = load_file(str(weights_path))
        with safe_open(str(weights_path), "pt") as f:
            weights_save_id = (f.metadata() or {}).get("save_id")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file ({e}); "
                              "the file is corrupt or truncated") from None
    if "save_id" in description and weights_save_id != description["save_id"]:
        raise CheckpointError(
            f"{weights_path.name} and {json_path.name} come from different saves (save_id "
            f"{weights_save_id!r} against {description['save_id']!r}): a save was cut off between "
            "its two files, one was copied from another checkpoint, or the weights were rewritten without "
            "their metadata; export or copy both files again")
    stages = description.get("stages", ["g1", "g2"])
    g1 = Generator1(config)
    _load_module(g1, tensors, "g1.", weights_path)
    g2 = None
    if "g2" in stages:
        g2 = Generator2(config)
        _load_module(g2, tensors, "g2.", weights_path)
    elif any(k.startswith("g2.") for k in tensors):
        raise CheckpointError(f"{weights_path} holds G2 weights but {json_path.name} lists stages {stages}")
    return Checkpoint(config, g1.eval(), g2.eval() if g2 is not None else None,
                      description.get("provenance", {}), description.get("metrics", {}),
                      json_path.with_suffix(""))
