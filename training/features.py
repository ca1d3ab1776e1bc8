"""Perceptual metrics from local weight files: IS / mask-IS and FID (Inception-v3), LPIPS (AlexNet).

Nothing is downloaded. The user brings torchvision's ImageNet weights (`inception_v3_google-0cc3c7bd.pth`,
`alexnet-owt-7be5be79.pth`, or the same tensors as .safetensors); LPIPS's linear layers ship inside
the `lpips` wheel. Needs `pip install 'pg2-blender[metrics]'` (torchvision matching your torch).
- IS: OpenAI's formula on Inception's softmax over 1000 classes, 10 splits in order (as PG2/PATN).
- FID: Fréchet distance between the 2048-d pool features of the generated images and statistics
  of the *training* images, cacheable as an .npz.
- LPIPS v0.1, AlexNet backbone, images in [-1, 1] at their own size.
These use torchvision's Inception, not the TF-FID graph of pytorch-fid: compare figures with runs of
this tool, not with published FIDs.
"""
from __future__ import annotations

import hashlib
import importlib
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pg2_server.atomic import write_atomic
from pg2_server.drawing import read_rgb

INSTALL_HINT = "pip install 'pg2-blender[metrics]' (a torchvision matching your torch, and lpips)"
INCEPTION_SIZE = 299
IS_SPLITS = 10
LPIPS_MIN_SIDE = 31  # AlexNet's second max-pool needs a 3-pixel input: 31 px at the image
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


class FeatureError(ValueError):
    """A weight or statistics file that cannot be used, or a missing package."""


def require(module: str, what: str):
    """Import `module` or explain how to install it."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # torchvision built for another torch fails with RuntimeError/OSError, not ImportError
        raise FeatureError(f"{what} needs the Python package {module!r}, which cannot be imported here "
                           f"({type(e).__name__}: {e}); {INSTALL_HINT}") from e


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a .pth/.pt state dict (loaded with weights_only: no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise FeatureError(f"weight file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        elif path.suffix in (".pth", ".pt", ".bin"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise FeatureError(f"weight file {path}: expected .safetensors or .pth/.pt, not {path.suffix!r}")
    except FeatureError:
        raise
    except Exception as e:
        raise FeatureError(f"cannot read weight file {path}: {e}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FeatureError(f"weight file {path} holds no state dict of tensors")
    return state


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Strict load with a message that names the file and what it should have been."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                 f"wrong shapes: {wrong[:3]}" if wrong else ""]
        raise FeatureError(f"{path} is not {what}: " + "; ".join(p for p in parts if p))
    model.load_state_dict(state)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _as_batch(images: list[np.ndarray], size: tuple[int, int] | None, device) -> torch.Tensor:
    """uint8 RGB (H, W, 3) images → float (B, 3, H, W) in [-1, 1], each resized (bilinear) to `size`."""
    tensors = []
    for image in images:
        x = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None].float()
        if size is not None and tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        tensors.append(x)
    return torch.cat(tensors) / 127.5 - 1.0


class Inception:
    """torchvision Inception-v3 with local ImageNet weights: 2048-d pool features and 1000 logits."""

    def __init__(self, weights: str | Path, device: str | torch.device = "cpu"):
        models = require("torchvision.models", "IS / FID (Inception-v3)")
        self.path = Path(weights)
        state = load_state_dict(self.path)
        # transform_input=False: torchvision's Google weights expect [-1, 1] inputs, which is what we feed.
        model = models.inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
        load_into(model, state, self.path, "a torchvision Inception-v3 state dict (inception_v3_google-*.pth)")
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self._pool: torch.Tensor | None = None
        self.model.avgpool.register_forward_hook(lambda _m, _i, out: setattr(self, "_pool", out))
        self.sha256 = file_sha256(self.path)

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(pool features (B, 2048) float64, logits (B, 1000) float64) of uint8 RGB images of any size."""
        logits = self.model(_as_batch(images, (INCEPTION_SIZE, INCEPTION_SIZE), self.device))
        pool = self._pool.flatten(1)
        return pool.double().cpu().numpy(), logits.double().cpu().numpy()


class FeatureMoments:
    """Running sum and sum of outer products of features: their mean and covariance.

    The features themselves are kept only while there are no more of them than dimensions (the
    memory of the outer products): then FID needs no d × d eigendecomposition (frechet_distance)."""

    def __init__(self, dim: int = 2048):
        self.count = 0
        self.total = np.zeros(dim)
        self.outer = np.zeros((dim, dim))
        self._kept: list[np.ndarray] | None = []

    def add(self, features: np.ndarray) -> None:
        self.count += len(features)
        self.total += features.sum(0)
        self.outer += features.T @ features
        if self._kept is not None:
            self._kept = [*self._kept, features] if self.count <= len(self.total) else None

    def samples(self) -> np.ndarray | None:
        """The features added, while they are at most as many as the dimensions; else None."""
        return np.concatenate(self._kept) if self._kept else None

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance (as numpy.cov)."""
        if self.count < 2:
            raise FeatureError(f"FID needs at least 2 images, got {self.count}")
        mu = self.total / self.count
        sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, sigma


@dataclass
class FidStatistics:
    """Mean and covariance of Inception pool features of a set of real images, with their provenance."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    inception_sha256: str
    source: str = ""
    _sqrt_sigma: np.ndarray | None = field(default=None, repr=False, compare=False)

    def save(self, path: str | Path) -> Path:
        """Write an .npz (plain arrays, no pickle)."""
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: numpy would append .npz to a path without it
                np.savez(f, mu=self.mu, sigma=self.sigma, count=np.int64(self.count),
                         inception_sha256=np.str_(self.inception_sha256), source=np.str_(self.source))

        return write_atomic(path, write)

    @classmethod
    def load(cls, path: str | Path, inception: Inception | None = None) -> "FidStatistics":
        """Read an .npz of `save`; with `inception`, refuse statistics made with other weights."""
        path = Path(path)
        if not path.is_file():
            raise FeatureError(f"FID statistics {path} do not exist; compute them with --fid-train-root")
        try:
            with np.load(path, allow_pickle=False) as data:
                stats = cls(mu=data["mu"].astype(np.float64), sigma=data["sigma"].astype(np.float64),
                            count=int(data["count"]), inception_sha256=str(data["inception_sha256"]),
                            source=str(data["source"]) if "source" in data else "")
        except Exception as e:
            raise FeatureError(f"{path} is not an .npz of FID statistics (mu, sigma, count, inception_sha256): "
                               f"{e}") from e
        if stats.mu.ndim != 1 or stats.sigma.shape != (len(stats.mu), len(stats.mu)):
            raise FeatureError(f"{path}: mu {stats.mu.shape} and sigma {stats.sigma.shape} do not match")
        if inception is not None and stats.inception_sha256 != inception.sha256:
            raise FeatureError(f"{path} was computed with other Inception weights (sha256 {stats.inception_sha256[:12]}…, "
                               f"{inception.path} is {inception.sha256[:12]}…); recompute with --fid-train-root")
        return stats

    def distance(self, moments: FeatureMoments) -> float:
        """FID of the features gathered in `moments` against these statistics."""
        mu, sigma = moments.statistics()
        samples = moments.samples()
        if samples is None and self._sqrt_sigma is None:  # one eigendecomposition for every row
            self._sqrt_sigma = psd_sqrt(self.sigma)
        return frechet_distance(self.mu, self.sigma, mu, sigma, self._sqrt_sigma, samples)


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance matrix (eigenvalues below 0 from rounding count as 0)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     sqrt_sigma1: np.ndarray | None = None, samples2: np.ndarray | None = None) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½).

    Tr (Σ1 Σ2)^½ is Σ √λ over the eigenvalues of the symmetric √Σ1 Σ2 √Σ1 (the same as Σ1 Σ2's):
    the value of pytorch-fid's scipy.linalg.sqrtm without its cost (53 s at 2048-d on a 2-core
    machine) or its imaginary parts when there are fewer images than dimensions. Given the n ≤ d
    samples behind μ2, Σ2, the nonzero λ are those of the n × n matrix Xc Σ1 Xcᵀ / (n − 1)."""
    if samples2 is not None and 1 < len(samples2) <= len(mu2):
        centered = samples2 - mu2
        gram = centered @ sigma1 @ centered.T / (len(samples2) - 1)
        eigenvalues = np.linalg.eigvalsh((gram + gram.T) / 2)
    else:
        root = psd_sqrt(sigma1) if sqrt_sigma1 is None else sqrt_sigma1
        eigenvalues = np.linalg.eigvalsh(root @ sigma2 @ root)
    trace_covmean = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
    """OpenAI's IS of (N, classes) logits: mean and std of exp(E KL(p(y|x) ‖ p(y))) over in-order splits."""
    if len(logits) == 0:
        raise FeatureError("IS of no images")
    splits = min(splits, len(logits))
    logits = np.asarray(logits, np.float64)
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    scores = []
    for i in range(splits):
        part = log_p[i * len(log_p) // splits:(i + 1) * len(log_p) // splits]
        p = np.exp(part)
        log_marginal = np.log(p.mean(0, keepdims=True))
        scores.append(math.exp((p * (part - log_marginal)).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


class LPIPS:
    """LPIPS v0.1 with the AlexNet backbone: linear layers from the `lpips` wheel, AlexNet from a local file."""

    def __init__(self, alexnet_weights: str | Path, device: str | torch.device = "cpu"):
        lpips = require("lpips", "LPIPS")
        models = require("torchvision.models", "LPIPS (AlexNet)")
        self.path = Path(alexnet_weights)
        alexnet = models.alexnet(weights=None)
        load_into(alexnet, load_state_dict(self.path), self.path,
                  "a torchvision AlexNet state dict (alexnet-owt-*.pth)")
        with warnings.catch_warnings():  # lpips passes torchvision's deprecated pretrained=False
            warnings.simplefilter("ignore")
            # pnet_rand: no backbone download; the linear layers load from the wheel's alex.pth.
            model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
        features = alexnet.features.state_dict()
        for block in model.net.children():  # slice1..5 keep torchvision's layer indices
            block.load_state_dict({k: features[k] for k in block.state_dict()})
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.sha256 = file_sha256(self.path)

    @torch.no_grad()
    def __call__(self, generated: list[np.ndarray], targets: list[np.ndarray]) -> np.ndarray:
        """Distance of each generated uint8 RGB image to its target of the same size."""
        distances = []
        for a, b in zip(generated, targets):
            if a.shape != b.shape:
                raise ValueError(f"LPIPS compares images of one size, got {a.shape} and {b.shape}")
            if min(a.shape[:2]) < LPIPS_MIN_SIDE:
                raise FeatureError(f"LPIPS (AlexNet) needs images of at least {LPIPS_MIN_SIDE}×{LPIPS_MIN_SIDE} px, "
                                   f"got {a.shape[1]}×{a.shape[0]}")
        shapes = {a.shape for a in generated}
        groups = [list(range(len(generated)))] if len(shapes) == 1 else [[i] for i in range(len(generated))]
        out = np.empty(len(generated))
        for index in groups:
            d = self.model(_as_batch([generated[i] for i in index], None, self.device),
                           _as_batch([targets[i] for i in index], None, self.device))
            out[index] = d.flatten().double().cpu().numpy()
        return out


def list_images(root: str | Path, annotations: str | Path | None = None) -> list[Path]:
    """The images of a folder, or only those an annotation CSV names (the usable training images)."""
    root = Path(root)
    if not root.is_dir():
        raise FeatureError(f"--fid-train-root {root} is not a folder")
    if annotations is None:
        paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        from pg2_server.keypoints import read_annotations
        names, _ = read_annotations(annotations, strict=False)
        paths = [root / name for name in sorted(names) if (root / name).is_file()]
    if len(paths) < 2:
        raise FeatureError(f"FID statistics need at least 2 images; {root} has {len(paths)}"
                           + (f" named in {annotations}" if annotations else ""))
    return paths


def training_statistics(inception: Inception, paths: list[Path], batch_size: int = 32,
                        progress: bool = True, source: str = "") -> FidStatistics:
    """FID statistics of real images (the training split), read and scored batch by batch."""
    moments = FeatureMoments()
    bar = tqdm(total=len(paths), desc="FID train statistics", unit="image", disable=not progress,
               dynamic_ncols=True)
    with ThreadPoolExecutor(2) as pool:  # decoding overlaps Inception
        for start in range(0, len(paths), batch_size):
            images = list(pool.map(read_rgb, paths[start:start + batch_size]))
            moments.add(inception(images)[0])
            bar.update(len(images))
    bar.close()
    mu, sigma = moments.statistics()
    return FidStatistics(mu, sigma, moments.count, inception.sha256, source)


class PerceptualScores:
    """IS / mask-IS / FID / LPIPS of each evaluated row (method), gathered batch by batch."""

    def __init__(self, inception: Inception | None = None, lpips: LPIPS | None = None,
                 fid_reference: FidStatistics | None = None):
        if fid_reference is not None and inception is None:
            raise FeatureError("FID needs the Inception weights (--inception-weights)")
        self.inception, self.lpips, self.fid_reference = inception, lpips, fid_reference
        self._logits: dict[str, list[np.ndarray]] = {}
        self._mask_logits: dict[str, list[np.ndarray]] = {}
        self._moments: dict[str, FeatureMoments] = {}
        self._lpips: dict[str, list[np.ndarray]] = {}

    @property
    def columns(self) -> list[str]:
        """Metric names these scores produce, in table order."""
        return ((["is", "mask_is"] if self.inception else []) + (["fid"] if self.fid_reference else [])
                + (["lpips"] if self.lpips else []))

    def add(self, row: str, generated: list[np.ndarray], targets: list[np.ndarray],
            masks: list[np.ndarray]) -> None:
        """Score one batch of a row: uint8 RGB images, their targets and target pose masks (H, W)."""
        if self.inception is not None:
            pool, logits = self.inception(generated)
            self._logits.setdefault(row, []).append(logits)
            # mask-IS: the generated image multiplied by the target pose mask, as PATN
            masked = [g * (m > 0).astype(np.uint8)[..., None] for g, m in zip(generated, masks)]
            self._mask_logits.setdefault(row, []).append(self.inception(masked)[1])
            if self.fid_reference is not None:
                self._moments.setdefault(row, FeatureMoments(pool.shape[1])).add(pool)
        if self.lpips is not None:
            self._lpips.setdefault(row, []).append(self.lpips(generated, targets))

    def results(self) -> dict[str, dict[str, float]]:
        """{row: {is, is_std, mask_is, mask_is_std, fid, lpips}} for the metrics that were asked for."""
        rows = {}
        for row in dict.fromkeys([*self._logits, *self._lpips]):
            values = {}
            if row in self._logits:
                values["is"], values["is_std"] = inception_score(np.concatenate(self._logits[row]))
                values["mask_is"], values["mask_is_std"] = inception_score(np.concatenate(self._mask_logits[row]))
            if row in self._moments:
                values["fid"] = self.fid_reference.distance(self._moments[row])
            if row in self._lpips:
                values["lpips"] = float(np.concatenate(self._lpips[row]).mean())
            rows[row] = values
        return rows

    def describe(self) -> dict:
        """Weight files and reference statistics behind the figures, for metrics.json."""
        out = {}
        if self.inception is not None:
            out["inception"] = {"weights": str(self.inception.path), "sha256": self.inception.sha256,
                                "input": f"{INCEPTION_SIZE}x{INCEPTION_SIZE} bilinear, [-1, 1]",
                                "is_splits": IS_SPLITS}
        if self.fid_reference is not None:
            out["fid_reference"] = {"images": self.fid_reference.count, "source": self.fid_reference.source}
        if self.lpips is not None:
            out["lpips"] = {"backbone": "alex", "version": "0.1", "weights": str(self.lpips.path),
                            "sha256": self.lpips.sha256}
        return out
