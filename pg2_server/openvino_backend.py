"""G1+G2 on OpenVINO's CPU runtime: the `--backend openvino` of `Pipeline` (optional extra `openvino`).

The torch networks are converted once with `openvino.convert_model` (batch left dynamic) and
the converted model is cached next to the checkpoint as `NAME.openvino/stages.xml` + `.bin`,
with `key.json` holding a hash of the weights and config, the network and conversion code and the
torch and OpenVINO versions: new weights or an upgrade get a fresh conversion. `key.json` also
holds the SHA-256 of the cached files, checked on every load: a damaged cache is converted again,
not served. The cache is written into a staging folder that is renamed into place, so a reader
(or a second process writing at the same time) sees a whole cache or none.
Inference precision is bf16 where the CPU has bf16 units, else fp32.
`Pipeline` keeps the preparation and output code; only `forward` runs here.

A batch size that keeps coming back (a server's full batch, a render's batch) gets a copy of
the model compiled for that static shape, which runs faster than the dynamic one for small
models (measured in docs/performance.md); a few such copies are kept, the least recently used
dropped first. Every run is timed: a static copy measured no faster than the dynamic model at
its size is dropped (and that size never compiled again), and a smaller batch runs padded on a
static copy when that is measured faster than running it dynamically (`rows`). Where batch sizes
vary more than the copies kept, copies would be compiled and dropped without end: after
STATIC_EVICTIONS drops no new sizes are compiled. A static compile is only a speed-up: one that
fails leaves its size on the dynamic model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import SetupError
from .keypoints import COUNT

log = logging.getLogger("pg2_server.openvino")

PRECISIONS = {torch.float32: "f32", torch.bfloat16: "bf16"}
STATIC_AFTER = 3   # a batch size seen this often gets its own static-shape compile (two dynamic runs timed)
STATIC_KEEP = 2    # static compiles kept (each holds its own weights and buffers: ~170 MiB for market)
JUDGE_RUNS = 8     # timed runs of a static compile (after its first) before it is judged against the dynamic model
GAIN = 0.95        # a static compile is kept only when its best run takes at most this share of the dynamic's
STATIC_EVICTIONS = 4   # static compiles dropped for another size before no new sizes are compiled
CACHED_FILES = ("stages.xml", "stages.bin")


def available() -> bool:
    """Whether the `openvino` package can be imported here."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _require():
    try:
        import openvino
    except ImportError:
        raise SetupError("--backend openvino needs the openvino package: pip install 'pg2-blender[openvino]'") \
            from None
    return openvino


class _Stages(torch.nn.Module):
    """G1 then G2 as one graph with the Pipeline's inputs and outputs (coarse, final)."""

    def __init__(self, g1, g2, with_coordinates: bool):
        super().__init__()
        self.g1, self.g2, self.with_coordinates = g1, g2, with_coordinates

    def forward(self, sources, heatmaps, coordinates=None):
        coarse = self.g1(sources, heatmaps, coordinates if self.with_coordinates else None)
        final = coarse + self.g2(coarse, sources) if self.g2 is not None else coarse
        return coarse, final


def weights_key(config, g1, g2) -> str:
    """A hash of the model config, every weight and the code that builds the networks: the
    cache's validity key (an upgrade that changes the networks converts again)."""
    from . import model

    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for source in (model.__file__, __file__):   # the networks, and how they are converted
        digest.update(Path(source).read_bytes())
    digest.update(torch.__version__.encode())
    for prefix, module in (("g1.", g1), ("g2.", g2)):
        if module is None:
            continue
        for name, tensor in sorted(module.state_dict().items()):
            digest.update((prefix + name).encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class _Static:
    """A static-shape compile: its infer request and its best run time so far (the first run,
    which allocates its buffers, not counted)."""
    request: object
    best_ms: float = float("inf")
    runs: int = -1


def _rename_folder(staging: Path, target: Path) -> None:
    """Put the folder `staging` in `target`'s place by renames: a reader finds the old folder, none
    or the new one, never a mix. Of two processes doing this at once, one's folder stays."""
    try:
        os.rename(staging, target)
        return
    except OSError:
        if not target.exists() and not target.is_symlink():
            raise
    old = staging.with_name(staging.name + ".old")
    try:
        os.rename(target, old)
    except FileNotFoundError:
        pass   # another process moved it first
    try:
        os.rename(staging, target)
    except OSError:
        if not target.is_dir():
            raise   # otherwise another process's whole folder got there first: it stays
    finally:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        elif old.exists() or old.is_symlink():
            old.unlink()


def padded_rows(batch: int, static_ms: dict[int, float], dynamic_ms: dict[int, float]) -> int:
    """The rows to run `batch` inputs as: the smallest static size above it whose measured time
    beats the dynamic model's at `batch` (measured, or scaled down from the static size's own
    dynamic time), else `batch` itself."""
    for size in sorted(s for s in static_ms if s > batch):
        if size not in dynamic_ms and batch not in dynamic_ms:
            continue
        dynamic = dynamic_ms.get(batch, dynamic_ms.get(size, 0.0) * batch / size)
        if static_ms[size] <= dynamic:
            return size
    return batch


class OpenVinoStages:
    """A compiled OpenVINO model of G1+G2: `(sources, heatmaps, coordinates)` arrays → (coarse, final)."""

    def __init__(self, config, g1, g2, dtype: torch.dtype, cache_dir: Path | None = None,
                 threads: int | None = None):
        ov = _require()
        if dtype not in PRECISIONS:
            raise ValueError(f"the OpenVINO backend runs float32 or bfloat16, not {dtype}")
        self.config = config
        self.with_coordinates = config.pose_embedding == "ce"
        self.precision = PRECISIONS[dtype]
        key = weights_key(config, g1, g2)
        model = self._cached(ov, cache_dir, key) if cache_dir is not None else None
        if model is None:
            model = self._convert(ov, g1, g2)
            if cache_dir is not None:
                self._store(ov, model, cache_dir, key)
        self.properties = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY",
                           # the server batches requests itself: one stream, all of torch's threads
                           "INFERENCE_NUM_THREADS": threads or torch.get_num_threads()}
        self.model, self.core = model, ov.Core()
        self.request = self.core.compile_model(model, "CPU", self.properties).create_infer_request()
        self.static: OrderedDict[int, _Static] = OrderedDict()   # batch size -> its static compile
        self.dynamic_ms: dict[int, float] = {}   # best dynamic run per batch size
        self.no_gain: set[int] = set()           # sizes whose static compile was measured no faster, or failed
        self.static_enabled = True               # off: every batch runs the dynamic model (e.g. while timed)
        self.evictions = 0                       # static compiles dropped to make room for another size
        self._seen: Counter[int] = Counter()
        self._lock = threading.Lock()

    def rows(self, batch: int) -> int:
        """How many rows to run a batch of `batch` as: more (zero padding) where a static compile
        of that size is measured to run them faster than the dynamic model would."""
        with self._lock:
            if batch in self.static:
                return batch
            timed = {size: static.best_ms for size, static in self.static.items() if static.runs > 0}
            return padded_rows(batch, timed, self.dynamic_ms)

    def _static_for(self, batch: int) -> _Static | None:
        """The static compile for this batch size, made once the size has recurred; None: run dynamic."""
        if batch in self.static:
            self.static.move_to_end(batch)
            return self.static[batch]
        if batch in self.no_gain or not self.static_enabled:
            return None
        self._seen[batch] += 1
        if self._seen[batch] < STATIC_AFTER:
            return None
        if len(self.static) >= STATIC_KEEP and self.evictions >= STATIC_EVICTIONS:
            if self.evictions == STATIC_EVICTIONS:
                log.info("OpenVINO: batch sizes vary more than %d static compiles can follow (%d dropped); "
                         "new sizes run on the dynamic model", STATIC_KEEP, self.evictions)
                self.evictions += 1   # said once
            return None
        try:
            model = self.model.clone()
            shapes = {port: port.get_partial_shape() for port in model.inputs}
            for shape in shapes.values():
                shape[0] = batch
            model.reshape(shapes)
            log.info("compiling OpenVINO for batches of %d", batch)
            static = _Static(self.core.compile_model(model, "CPU", self.properties).create_infer_request())
        except Exception as e:   # a static compile is only a speed-up: it never fails a batch
            log.warning("cannot compile OpenVINO for batches of %d (%s); they run on the dynamic model", batch, e)
            self.no_gain.add(batch)
            return None
        self.static[batch] = static
        if len(self.static) > STATIC_KEEP:
            dropped, _ = self.static.popitem(last=False)
            self._seen[dropped] = 0   # it has to recur again before it is compiled again
            self.evictions += 1
        return static

    def _judge(self, batch: int, static: _Static) -> None:
        """Drop a static compile that is not measurably faster than the dynamic model at its size."""
        if static.runs < JUDGE_RUNS or batch not in self.dynamic_ms:
            return
        if static.best_ms > GAIN * self.dynamic_ms[batch]:
            log.info("OpenVINO static batches of %d: %.1f ms against %.1f ms dynamic; dropped", batch,
                     static.best_ms, self.dynamic_ms[batch])
            del self.static[batch]
            self.no_gain.add(batch)

    @staticmethod
    def _infer(request, inputs: list[np.ndarray]) -> float:
        """Run one inference; returns its wall time in ms (the inputs are read in place, not copied)."""
        started = time.perf_counter()
        request.infer(inputs, share_inputs=True)
        return (time.perf_counter() - started) * 1000

    def _convert(self, ov, g1, g2):
        width, height = self.config.canvas
        example = [torch.zeros(1, 3, height, width), torch.zeros(1, COUNT, height, width)]
        shapes = [ov.PartialShape([-1, 3, height, width]), ov.PartialShape([-1, COUNT, height, width])]
        if self.with_coordinates:
            example.append(torch.zeros(1, 2 * COUNT))
            shapes.append(ov.PartialShape([-1, 2 * COUNT]))
        stages = _Stages(g1, g2, self.with_coordinates).eval()
        log.info("converting %s to OpenVINO (once per weights)", self.config.preset)
        with torch.no_grad():
            return ov.convert_model(stages, example_input=tuple(example), input=shapes)

    @staticmethod
    def _cached(ov, cache_dir: Path, key: str):
        """The cached conversion for `key`, or None (absent, stale or damaged: converted again)."""
        try:
            stored = json.loads((cache_dir / "key.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(stored, dict) or stored.get("weights") != key \
                or stored.get("openvino") != ov.get_version():
            log.info("%s was converted from other weights or another OpenVINO; converting again", cache_dir)
            return None
        expected = stored.get("sha256")
        if not isinstance(expected, dict):
            log.info("%s has no checksums of its files (an older cache); converting again", cache_dir)
            return None
        try:
            # Read once and check what was read: the model is built from these bytes, not the files.
            data = {name: (cache_dir / name).read_bytes() for name in CACHED_FILES}
        except OSError as e:
            log.warning("cannot read the cached OpenVINO model in %s (%s); converting again", cache_dir, e)
            return None
        damaged = [name for name in CACHED_FILES if hashlib.sha256(data[name]).hexdigest() != expected.get(name)]
        if damaged:
            log.warning("the cached OpenVINO model in %s is damaged (%s differs from the checksum in key.json); "
                        "converting again", cache_dir, ", ".join(damaged))
            return None
        try:
            return ov.Core().read_model(data["stages.xml"], data["stages.bin"])
        except RuntimeError as e:
            log.warning("cannot read the cached OpenVINO model in %s (%s); converting again", cache_dir, e)
            return None

    @staticmethod
    def _store(ov, model, cache_dir: Path, key: str) -> None:
        """Write the converted model; a read-only install directory or a full disk only costs a
        conversion per start. Written whole into a staging folder beside `cache_dir`, then renamed
        into its place."""
        staging = None
        try:
            staging = Path(tempfile.mkdtemp(dir=cache_dir.parent, prefix=f".{cache_dir.name}.tmp-"))
            ov.save_model(model, str(staging / "stages.xml"), compress_to_fp16=False)
            sums = {name: hashlib.sha256((staging / name).read_bytes()).hexdigest() for name in CACHED_FILES}
            (staging / "key.json").write_text(
                json.dumps({"weights": key, "openvino": ov.get_version(), "sha256": sums}) + "\n")
            for name in CACHED_FILES + ("key.json",):
                os.chmod(staging / name, 0o644)
            os.chmod(staging, 0o755)
            _rename_folder(staging, cache_dir)
        except (OSError, RuntimeError) as e:   # ov.save_model raises RuntimeError on a full disk
            log.warning("cannot cache the OpenVINO model in %s (%s); it will be converted again next time",
                        cache_dir, e)
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)

    def __call__(self, sources: np.ndarray, heatmaps: np.ndarray,
                 coordinates: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Float32 (B, C, H, W) inputs → (G1 image, final image) float32 arrays, unclipped."""
        inputs = [np.ascontiguousarray(a, np.float32)
                  for a in [sources, heatmaps] + ([coordinates] if self.with_coordinates else [])]
        batch = len(sources)
        with self._lock:   # one request at a time; copies leave it free for the next batch
            static = self._static_for(batch)
            request = static.request if static is not None else self.request
            ms = self._infer(request, inputs)
            if static is None:
                self.dynamic_ms[batch] = min(ms, self.dynamic_ms.get(batch, ms))
            else:
                if static.runs >= 0:
                    static.best_ms = min(ms, static.best_ms)
                static.runs += 1
                self._judge(batch, static)
            outputs = [request.get_output_tensor(i).data.copy() for i in range(2)]
        return outputs[0], outputs[1]
