"""Resumable run state: one safetensors file holding tensors, with the rest as JSON metadata.

A state is a nested tree of dicts/lists of tensors, numbers and strings (network and optimiser
state dicts, RNG states as uint8 tensors, step counters). It is written to a temporary file
and renamed over the old one, so a kill at any moment leaves either the old or the new state.
Never pickled.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pg2_server.atomic import write_tensors_atomic

_TENSOR = "__tensor__"
_META_KEY = "pg2_train_state"


class StateError(ValueError):
    """A run state file that is missing, corrupt or from another kind of run."""


def _flatten(tree, prefix: str, tensors: dict) -> object:
    """Replace every tensor in `tree` by a reference, collecting the tensors by key."""
    if isinstance(tree, torch.Tensor):
        tensors[prefix] = tree.detach().to("cpu").contiguous().clone()
        return {_TENSOR: prefix}
    if isinstance(tree, dict):
        for key in tree:
            if not isinstance(key, (str, int)):
                raise TypeError(f"state keys must be str or int, got {key!r} at {prefix!r}")
        # JSON keys are strings: remember which were ints (optimiser state is keyed by index).
        return {"__dict__": [[key, _flatten(value, f"{prefix}.{key}", tensors)] for key, value in tree.items()]}
    if isinstance(tree, (list, tuple)):
        return [_flatten(value, f"{prefix}.{i}", tensors) for i, value in enumerate(tree)]
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(f"cannot store {type(tree).__name__} at {prefix!r} in a run state")


def _unflatten(tree, tensors: dict) -> object:
    if isinstance(tree, dict):
        if _TENSOR in tree:
            return tensors[tree[_TENSOR]]
        return {key: _unflatten(value, tensors) for key, value in tree["__dict__"]}
    if isinstance(tree, list):
        return [_unflatten(value, tensors) for value in tree]
    return tree


def save_state(path: str | Path, state: dict) -> Path:
    """Write `state` atomically to `path` (a .safetensors file)."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "s", tensors)
    return write_tensors_atomic(path, tensors, {_META_KEY: json.dumps(skeleton)})


PARTIAL_AGE_S = 600.0   # a save writes its temporary file in seconds: one this old was left by a kill


def remove_partial_saves(folder: str | Path, older_than: float = PARTIAL_AGE_S) -> list[Path]:
    """Delete temporary files that a save killed mid-write left in `folder`; returns them.

    Only names `save_state` makes (`.NAME.safetensors.XXXX.tmp`, from `write_atomic`) are touched,
    and only those not written to for `older_than` seconds: another run in the same folder (stage 1
    resumed while stage 2 trains) may be writing its own right now.
    """
    import time

    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.glob(".*.safetensors.*.tmp"):
        try:
            if time.time() - path.stat().st_mtime < older_than:
                continue
        except FileNotFoundError:   # its save just finished and renamed it
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def load_state(path: str | Path) -> dict:
    """Read a state written by `save_state`."""
    path = Path(path)
    if not path.is_file():
        raise StateError(f"run state {path} does not exist")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise StateError(f"{path} is not a readable run state ({e}); the file is corrupt") from None
    if _META_KEY not in metadata:
        raise StateError(f"{path} is a safetensors file but not a pg2-train run state")
    return _unflatten(json.loads(metadata[_META_KEY]), tensors)


def rng_state() -> dict:
    """Every random generator the training touches, as storable values."""
    state = {"torch": torch.random.get_rng_state(),
             "numpy": json.dumps(_numpy_state()),
             "python": json.dumps(_python_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.random.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = json.loads(state["numpy"])
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _numpy_state() -> list:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _python_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]
