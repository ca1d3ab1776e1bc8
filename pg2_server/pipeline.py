"""The one inference pipeline: checkpoint → prepare inputs → G1 → G2 → images.

The server, the CLI and the evaluation all use this object; nobody else frames, encodes
poses or converts images for the model. The three steps (`prepare`, `run`, `finish`) are
public so the server can prepare and finish on a thread pool and batch `run` per device.
"""
from __future__ import annotations

import bisect
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from .checkpoint import DTYPES as CHECKPOINT_DTYPES, Checkpoint, load_checkpoint
from .keypoints import COUNT, as_array
from .errors import SetupError
from .model import Generator1, Generator2, ModelConfig, preset
from .pose import FrameFit, check_image, fit_frame, heatmaps, pose_coordinates, pose_mask, \
    to_uint8, to_unit_range

DTYPES = {**CHECKPOINT_DTYPES, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = ("auto", "torch", "openvino")
AUTO_BATCH_TEXTURE = 8   # the race's image: this many random pixels a side, smoothly enlarged to the canvas
AUTO_GAIN = 0.9   # "auto" takes OpenVINO only where it takes at most this share of torch's time per image

log = logging.getLogger("pg2_server.pipeline")


class NonFiniteOutput(SetupError):
    """The model gave NaN or inf: its weights, a cached conversion or the dtype is at fault, not the input."""


def _one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (OpenVINO's run over several), cut to `limit` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"


def cpu_bf16_units() -> str | None:
    """The CPU's bf16 matrix units ('amx_bf16' or 'avx512_bf16'), detected; None where it has none.

    Asks torch's own CPU capability query (what oneDNN will dispatch to), falling back to the
    kernel's /proc/cpuinfo flags where torch is too old to answer.
    """
    try:
        if torch.cpu._is_amx_tile_supported():
            return "amx_bf16"
        if torch.cpu._is_avx512_bf16_supported():
            return "avx512_bf16"
        return None
    except AttributeError:
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return None
    return next((unit for unit in ("amx_bf16", "avx512_bf16") if unit in flags), None)


def bf16_native(device: torch.device) -> bool:
    """Whether `device` runs bf16 natively (and so faster than fp32): CUDA with bf16, CPUs with bf16 units."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_bf16_units() is not None
    return False


@dataclass(frozen=True)
class FastPath:
    """Speed switches for serving on a GPU; numerics stay within FAST_PATH_TOLERANCE of fp32 eager.

    `compile` wraps G1+G2 in torch.compile (`max-autotune`; `reduce-overhead` adds CUDA graphs).
    Compiled code is specialised per batch shape, so batches are padded up to the next of
    `buckets` and the padding is dropped afterwards: a handful of shapes, compiled once each.
    """
    compile: bool = True
    compile_mode: str | None = "max-autotune"
    compile_backend: str = "inductor"   # "aot_eager" traces the same graph without codegen (tests)
    buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    channels_last: bool = True
    cudnn_benchmark: bool = True

    def bucket(self, size: int) -> int:
        """The smallest bucket ≥ size (sizes above the largest bucket run unpadded)."""
        index = bisect.bisect_left(self.buckets, size)
        return self.buckets[index] if index < len(self.buckets) else size


# Largest absolute difference from fp32 eager, on images in [-1, 1], that the fast path may
# introduce: bf16 keeps 8 bits of mantissa, so ~2^-8 relative error per layer accumulates.
# The bundled model on the bundled samples stays within 0.045 in bf16, torch or OpenVINO
# (tests/test_pipeline.py); 0.1 leaves room for larger presets' deeper accumulation.
FAST_PATH_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.05}


@dataclass
class Prepared:
    """One request's model inputs on the canvas, and how its target frame maps to the canvas."""
    source: np.ndarray       # float32 (3, H, W) in [-1, 1]
    heatmaps: np.ndarray     # float32 (18, H, W)
    coordinates: np.ndarray  # float32 (36,), for the CE embedding
    keypoints: np.ndarray    # float (18, 2): the target pose on the canvas, NaN = missing
    fit: FrameFit            # the target frame in the canvas
    mask_radius: int         # the pose mask's disk radius (the model's heat-map radius)

    @property
    def mask(self) -> np.ndarray:
        """uint8 (H, W) pose mask of the target pose on the canvas; made when asked for (only an
        alpha channel needs it)."""
        return pose_mask(self.keypoints, self.fit.canvas, self.mask_radius)


@dataclass
class Generation:
    """One result in the target frame's size: final image, optional G1 image and alpha."""
    image: np.ndarray               # uint8 (H, W, 3): G2's output (G1's if the model has no G2)
    g1: np.ndarray | None = None    # uint8 (H, W, 3)
    alpha: np.ndarray | None = None  # uint8 (H, W), 255 inside the target pose mask


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch.device for 'cpu', 'cuda', 'cuda:N' or 'mps', with a clear error if unavailable."""
    try:
        device = torch.device(device)
        if device.type not in ("cpu", "cuda", "mps"):
            raise RuntimeError(device.type)
    except RuntimeError:
        raise SetupError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"device {device} requested but CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SetupError(f"device {device} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SetupError("device mps requested but Metal is not available; use --device cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype, device: torch.device = torch.device("cpu")) -> torch.dtype:
    """A torch dtype for a name; "auto" is bf16 where `device` runs it natively, else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if bf16_native(device) else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16, got {dtype!r}")
    return DTYPES[dtype]


def resolve_backend(backend: str, device: torch.device, fast: "FastPath | None",
                    dtype: torch.dtype = torch.float32) -> str:
    """'torch' or 'openvino' for a --backend choice; "auto" is OpenVINO on the CPU when installed
    (a candidate: `Pipeline` then times both and keeps the faster).

    OpenVINO bf16 measured 6–11× fp32 eager torch and 1.3–2.1× torch bf16 on a 2-core AMX
    Xeon, within ±25 % of torch bf16 on an AVX-512-BF16 EPYC (docs/performance.md);
    torch.compile (`fast.compile`) is a torch choice, so it keeps torch.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "openvino" and device.type != "cpu":
        raise ValueError(f"the OpenVINO backend runs on the CPU, not {device}; use --backend torch")
    if backend == "openvino" and dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the OpenVINO backend runs float32 or bfloat16, not {dtype}; use --dtype bfloat16 "
                         "or --backend torch")
    if backend == "auto":
        from . import openvino_backend

        compiled = fast is not None and fast.compile
        return ("openvino" if device.type == "cpu" and not compiled and dtype in (torch.float32, torch.bfloat16)
                and openvino_backend.available() else "torch")
    return backend


def default_checkpoint() -> Path | None:
    """The bundled default model, if this installation has one."""
    path = Path(__file__).parent / "default" / "pg2_default.json"
    return path if path.is_file() else None


def _check_size(size, what: str = "size") -> tuple[int, int]:
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size)):
        raise ValueError(f"{what} must be (W, H) integers, got {size!r}")
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"{what} must be positive, got {tuple(size)}")
    return int(size[0]), int(size[1])


class Pipeline:
    """PG2 inference: `pipeline.generate(sources, keypoints, sizes)` → a Generation per request
    (`.image`: uint8 RGB of the target size)."""

    def __init__(self, config: ModelConfig, g1: Generator1, g2: Generator2 | None = None, *,
                 device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                 name: str | None = None, provenance: dict | None = None, metrics: dict | None = None,
                 fast: FastPath | None = None, backend: str = "torch", cache_dir: Path | None = None):
        """Takes ownership of `g1`/`g2`: they are moved, and on a bf16 CPU converted, in place."""
        self.config = config
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.name = name or config.preset
        self.provenance = provenance or {}
        self.metrics = metrics or {}
        self.fast = fast
        if self.device.type == "cpu" and self.dtype == torch.float16:
            # A float16 checkpoint loads in float32: only the compute dtype is refused here.
            raise ValueError("--dtype float16 on the CPU runs about 50× slower than float32 (the CPU has no "
                             "float16 kernels for these layers); use --dtype bfloat16 (fast on CPUs with bf16 "
                             "units), float32, or auto to pick")
        self.backend = resolve_backend(backend, self.device, fast, self.dtype)
        # On the CPU, bf16 weights are converted once here: autocast would recast every weight on
        # every call, which shows at small batches. bf16 convolutions only reach the matrix
        # units in channels_last.
        self.native_dtype = self.dtype == torch.bfloat16 and self.device.type == "cpu"
        channels_last = self.device.type == "cuda" or self.native_dtype or (fast is not None and fast.channels_last)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.g1 = g1.eval().requires_grad_(False)
        self.g2 = g2.eval().requires_grad_(False) if g2 is not None else None
        self._staging: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._stages_fn = self._stages
        self.openvino = None
        self.openvino_cache = cache_dir
        self.backend_times: dict[str, float] = {}  # "auto": ms per image of each backend, measured
        if self.backend == "openvino":
            self._setup_openvino(backend, fast, cache_dir)
            return
        self._setup_torch(fast)

    def _setup_openvino(self, backend: str, fast: FastPath | None, cache_dir: Path | None) -> None:
        """Convert and compile for OpenVINO; with "auto", time it against torch and keep OpenVINO only
        where it is clearly faster and gives torch's outputs."""
        torch_format, self.memory_format = self.memory_format, torch.contiguous_format
        try:
            from .openvino_backend import OpenVinoStages

            self.openvino = OpenVinoStages(self.config, self.g1, self.g2, self.dtype, cache_dir)
            if backend == "auto":
                self.openvino.static_enabled = False   # static compiles follow the traffic, not the timing
                openvino_ms, openvino_out = self._race()
                self.openvino.static_enabled = True
        except SetupError:
            raise
        except Exception as e:   # OpenVINO's conversion, compile or first run failed
            if backend != "auto":
                raise SetupError(f"cannot run the model on OpenVINO ({_one_line(e)}); use --backend torch") from e
            log.warning("backend auto: OpenVINO failed to start (%s); running on torch", _one_line(e))
            self.openvino, self.memory_format, self.backend = None, torch_format, "torch"
            self._setup_torch(fast)
            return
        if backend != "auto":
            return
        stages, self.openvino, self.memory_format = self.openvino, None, torch_format
        self._setup_torch(fast)
        torch_ms, torch_out = self._race()
        self.backend_times = {"openvino": round(openvino_ms, 3), "torch": round(torch_ms, 3)}
        dtype = str(self.dtype).replace("torch.", "")
        tolerance = FAST_PATH_TOLERANCE[dtype]
        difference = float(np.max([np.abs(a - b).max() for a, b in zip(openvino_out, torch_out)]))  # NaN stays
        times = (f"OpenVINO {openvino_ms:.2f} ms/image, torch {torch_ms:.2f} ms/image ({dtype}, batches of "
                 f"{self.AUTO_BATCH})")
        if not difference <= tolerance:   # NaN included
            log.warning("backend auto: OpenVINO's output differs from torch's by %.3g (%g allowed in %s): "
                        "running on torch; a damaged OpenVINO install or cache%s is the likely cause (%s)",
                        difference, tolerance, dtype, f" ({cache_dir})" if cache_dir is not None else "", times)
            self.backend = "torch"
        elif openvino_ms <= AUTO_GAIN * torch_ms:
            log.info("backend auto: %s; running on OpenVINO", times)
            self.openvino, self.memory_format = stages, torch.contiguous_format
        else:
            log.info("backend auto: %s; running on torch (OpenVINO is taken only when at least %d %% faster)",
                     times, round(100 * (1 - AUTO_GAIN)))
            self.backend = "torch"

    AUTO_BATCH = 4  # the batch "auto" times both backends at (and compares their outputs on)

    def _race_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """AUTO_BATCH fixed inputs like a request's: a smooth image and heat-maps of a pose on the canvas."""
        width, height = self.config.canvas
        rng = np.random.default_rng(0)
        coarse = rng.integers(0, 256, (AUTO_BATCH_TEXTURE, AUTO_BATCH_TEXTURE, 3), dtype=np.uint8)
        image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)
        points = np.stack([rng.uniform(0, width - 1, COUNT), rng.uniform(0, height - 1, COUNT)], 1)
        c = self.config
        sources = np.repeat(to_unit_range(image)[None], self.AUTO_BATCH, 0)
        maps = np.repeat(heatmaps(points, c.canvas, c.heatmap_radius, c.heatmap_kind, c.heatmap_sigma)[None],
                         self.AUTO_BATCH, 0)
        coordinates = np.repeat(pose_coordinates(points, c.canvas)[None], self.AUTO_BATCH, 0)
        return (torch.from_numpy(sources).contiguous(memory_format=self.memory_format),
                torch.from_numpy(np.ascontiguousarray(maps, np.float32)).contiguous(memory_format=self.memory_format),
                torch.from_numpy(np.ascontiguousarray(coordinates, np.float32))
                if self.config.pose_embedding == "ce" else None)

    def _race(self, rounds: int = 3) -> tuple[float, tuple[np.ndarray, np.ndarray]]:
        """Milliseconds per image of the current backend at AUTO_BATCH (best of `rounds`, after a
        warm-up run), and its (G1, final) outputs, on the same fixed inputs for every backend."""
        inputs = self._race_inputs()
        coarse, final = self.forward(*inputs)
        outputs = (coarse.cpu().numpy().copy(), final.cpu().numpy().copy())
        best = float("inf")
        for _ in range(rounds):
            started = time.perf_counter()
            self.forward(*inputs)
            best = min(best, time.perf_counter() - started)
        return best * 1000 / self.AUTO_BATCH, outputs

    def _setup_torch(self, fast: FastPath | None) -> None:
        """The networks on the device in the dtype and memory format they run in (in place)."""
        weights_dtype = self.dtype if self.native_dtype else torch.float32
        for module in (self.g1, self.g2):
            if module is not None:
                module.to(self.device, weights_dtype, memory_format=self.memory_format)
        if fast is not None:
            if self.device.type == "cuda" and fast.cudnn_benchmark:
                torch.backends.cudnn.benchmark = True   # fixed shapes per bucket: autotune once
            if fast.compile:
                mode = fast.compile_mode if fast.compile_backend == "inductor" else None
                if self.device.type == "cpu" and fast.compile_backend == "inductor":
                    import torch._inductor.config as inductor_config

                    # Weights are constants at inference: freezing folds them into the graph
                    # and lets oneDNN pre-pack them in its own blocked layout.
                    inductor_config.freezing = True
                self._stages_fn = torch.compile(self._stages, mode=mode, backend=fast.compile_backend,
                                                dynamic=False)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype = "float32", fast: FastPath | None = None,
                        backend: str = "torch") -> "Pipeline":
        """Load a `NAME.json` + `NAME.safetensors` checkpoint (no pickle); OpenVINO caches beside it."""
        checkpoint: Checkpoint = load_checkpoint(path)
        return cls(checkpoint.config, checkpoint.g1, checkpoint.g2, device=device, dtype=dtype,
                   name=checkpoint.name, provenance=checkpoint.provenance, metrics=checkpoint.metrics,
                   fast=fast, backend=backend, cache_dir=checkpoint.openvino_cache)

    @classmethod
    def random(cls, preset_name: str, seed: int = 0, device: str | torch.device = "cpu",
               dtype: str | torch.dtype = "float32", fast: FastPath | None = None, backend: str = "torch",
               **overrides) -> "Pipeline":
        """Random (Glorot) weights of a preset, for tests and benchmarks (OpenVINO converts uncached)."""
        config = preset(preset_name, **overrides)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            g1, g2 = Generator1(config), Generator2(config)
        finally:
            torch.random.set_rng_state(generator_state)
        return cls(config, g1, g2, device=device, dtype=dtype, name=f"{preset_name}-random", fast=fast,
                   backend=backend)

    def describe(self) -> dict:
        """What a client needs to know about the model (used by the server's `info`)."""
        canvas = self.config.canvas
        # "canvas" is [H, W] in protocol v1's info reply (clients read it with wire.protocol.info_canvas).
        return {"name": self.name, "preset": self.config.preset, "canvas": [canvas.height, canvas.width],
                "keypoints": list(self.config.keypoints),
                "stages": ["g1", "g2"] if self.g2 is not None else ["g1"],
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "backend": self.backend,
                **({"backend_ms_per_image": self.backend_times} if self.backend_times else {}),
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
        c = self.config
        return Prepared(
            source=to_unit_range(source_fit.image_to_canvas(source)),
            heatmaps=heatmaps(on_canvas, canvas, c.heatmap_radius, c.heatmap_kind, c.heatmap_sigma),
            coordinates=pose_coordinates(on_canvas, canvas),
            keypoints=on_canvas, fit=target_fit, mask_radius=c.heatmap_radius)

    def _stages(self, sources: torch.Tensor, heatmaps_: torch.Tensor,
                coordinates: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        coarse = self.g1(sources, heatmaps_, coordinates)
        final = coarse + self.g2(coarse, sources) if self.g2 is not None else coarse
        return coarse, final

    def forward(self, sources: torch.Tensor, heatmaps_: torch.Tensor,
                coordinates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched G1 then G2 on device tensors; returns (G1 image, final image), unclipped fp32."""
        if self.openvino is not None:
            coarse, final = self.openvino(sources.numpy(), heatmaps_.numpy(),
                                          coordinates.numpy() if coordinates is not None else None)
            return torch.from_numpy(coarse), torch.from_numpy(final)
        if self.native_dtype:
            autocast = contextlib.nullcontext()
            sources, heatmaps_ = sources.to(self.dtype), heatmaps_.to(self.dtype)
            coordinates = coordinates.to(self.dtype) if coordinates is not None else None
        elif self.dtype != torch.float32:
            autocast = torch.autocast(self.device.type, dtype=self.dtype)
        else:
            autocast = contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            coarse, final = self._stages_fn(sources, heatmaps_, coordinates)
        return coarse.float(), final.float()

    def _to_device(self, batch: Sequence[Prepared], rows: int) -> tuple[torch.Tensor, ...]:
        """Stack a batch (zero-padded to `rows`) into device tensors, via reused pinned buffers on CUDA."""
        width, height = self.config.canvas
        shapes = ((3, height, width), (len(batch[0].heatmaps), height, width), (len(batch[0].coordinates),))
        if self.device.type == "cpu":
            # numpy stacks straight into the arrays the model reads. torch's zero-fill and per-row
            # copies took 1.7 ms for a demo batch of 8 (20 ms where OpenMP threads spin) against 1.1.
            host = [np.zeros((rows, *s), np.float32) for s in shapes]
            for array, field in zip(host, ("source", "heatmaps", "coordinates")):
                np.stack([getattr(p, field) for p in batch], out=array[:len(batch)])
            sources, maps, coords = (torch.from_numpy(a) for a in host)
            return (sources.contiguous(memory_format=self.memory_format),
                    maps.contiguous(memory_format=self.memory_format), coords)
        if self.device.type == "cuda":
            if rows not in self._staging:
                self._staging[rows] = tuple(torch.zeros((rows, *s)).pin_memory() for s in shapes)
            host = self._staging[rows]
        else:
            host = tuple(torch.zeros((rows, *s)) for s in shapes)
        for i, p in enumerate(batch):
            host[0][i] = torch.from_numpy(p.source)
            host[1][i] = torch.from_numpy(p.heatmaps)
            host[2][i] = torch.from_numpy(p.coordinates)
        if len(batch) < rows:   # padding rows of a reused buffer must not carry old requests
            for tensor in host:
                tensor[len(batch):] = 0
        sources, maps, coords = (t.to(self.device, non_blocking=True) for t in host)
        return (sources.contiguous(memory_format=self.memory_format),
                maps.contiguous(memory_format=self.memory_format), coords)

    def run(self, batch: Sequence[Prepared]) -> tuple[np.ndarray, np.ndarray]:
        """Run G1 and G2 on prepared inputs; returns (G1, final) float32 (B, 3, H, W) arrays."""
        if not batch:
            raise ValueError("run needs at least one prepared input")
        if self.openvino is not None:
            rows = self.openvino.rows(len(batch))   # a static compile may run a padded batch faster
        else:
            rows = self.fast.bucket(len(batch)) if self.fast is not None else len(batch)
        coarse, final = self.forward(*self._to_device(batch, rows))
        # .cpu() synchronises, so the pinned buffers are free again when this returns.
        coarse, final = coarse[:len(batch)].cpu().numpy(), final[:len(batch)].cpu().numpy()
        if not (np.isfinite(final).all() and np.isfinite(coarse).all()):   # would turn into black pixels
            bad = int((~np.isfinite(final).reshape(len(batch), -1).all(1)
                       | ~np.isfinite(coarse).reshape(len(batch), -1).all(1)).sum())
            cause = (f"a damaged OpenVINO conversion (delete {self.openvino_cache} to convert again) or "
                     if self.openvino is not None and self.openvino_cache is not None else "")
            raise NonFiniteOutput(
                f"model {self.name} gave NaN or inf for {bad} of {len(batch)} images on {self.backend} "
                f"({str(self.dtype).replace('torch.', '')}): {cause}damaged weights or a dtype that overflows; "
                "try --dtype float32 or --backend torch")
        return coarse, final

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
