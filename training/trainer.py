"""PG2's two training stages, one process or many (see training/distributed.py).

Stage 1 trains G1 with the pose-mask L1. Stage 2 freezes G1 and trains G2 and D: per step
one G2 update (BCE(D(G2),1) + λ·pose-mask L1) and one D update (the source image as an
extra negative). `TrainConfig(one_stage=True)` is the paper's "G1 + D" ablation: stage 1
with the adversarial loss. A run directory holds, per stage, the resumable state
(`stageN.safetensors`), the loss log (`stageN-log.jsonl`), sample grids and TensorBoard logs.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pg2_server.atomic import write_atomic
from pg2_server.checkpoint import load_checkpoint, save_checkpoint
from pg2_server.drawing import draw_pose, image_grid, write_rgb
from pg2_server.model import Generator1, Generator2, ModelConfig
from pg2_server.pipeline import bf16_native
from pg2_server.pose import to_uint8
from pg2_server.throughput import peak_tflops

from .data import STOP_SIGNALS, BatchStream, PairDataset, PairSampler, PairSplit, make_loader
from .discriminator import Discriminator, DiscriminatorConfig, D_KINDS
from .distributed import Distributed, any_rank, barrier, mean_over_ranks, synchronize_batch_norm
from .losses import RECONSTRUCTION_LOSSES, discriminator_logits, discriminator_loss, \
    generator_adversarial_loss, reconstruction_loss
from .state import StateError, load_state, remove_partial_saves, rng_state, save_state, set_rng_state

logger = logging.getLogger(__name__)

# Validation metrics (training/evaluate.py's) and whether larger is better.
# Those that need the pose detector (the `pose` extra) on the generated images.
POSE_VALIDATION_METRICS = ("pckh", "pckh_limbs", "pckh_limbs_agree", "detected")
VALIDATION_METRICS = {"ssim_pg2": True, "ssim_patn": True, "mask_ssim": True, "psnr": True, "l1": False,
                      **dict.fromkeys(POSE_VALIDATION_METRICS, True)}
STATE_KIND = "pg2-train-state"
STATE_VERSION = 1


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one stage of a run; saved in the run state."""
    preset: str
    stage: int                      # 1: G1 alone (pose-mask L1); 2: G2 + D with G1 frozen
    steps: int                      # total optimiser steps of this stage
    batch_size: int                 # per process
    lr: float = 2e-5
    beta1: float = 0.5
    beta2: float = 0.999
    lambda_l1: float = 10.0         # weight of the reconstruction loss next to the GAN loss
    reconstruction: str = "pose-mask"   # or "l1" (paper ablation)
    one_stage: bool = False         # stage 1 with D as well (paper's "G1 + D" ablation)
    discriminator: str = "source-negative"  # or "pair" (the paper's conditioned D)
    d_layers: int = 4
    d_base_width: int = 64
    flip: bool = True
    color_jitter: float = 0.0       # the same random colour change on both images of a pair (0: off)
    seed: int = 0
    workers: int = 4
    log_every: int = 10
    sample_every: int = 500
    save_every: int = 1000
    accumulate: int = 1             # micro-batches of batch_size per optimiser step
    ema: float = 0.0                # decay of an exponential moving average of the trained generator (0: none)
    val_every: int = 0              # steps between validations on the held-out split (0: none)
    val_limit: int = 64             # pairs of the held-out split scored per validation
    val_metric: str = "ssim_pg2"    # the metric that picks the best checkpoint
    val_pckh: bool = False          # validation also detects the generated people (PCKh, detection rate)
    bf16: bool = True               # autocast where the device has bf16 units (CUDA, AMX/AVX-512-BF16 CPUs)
    channels_last: bool = True      # on CUDA, and on the CPU with bf16
    compile: bool = False

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.one_stage and self.stage != 1:
            raise ValueError("one_stage (G1 + D) is a stage-1 variant; use it with stage 1")
        if self.reconstruction not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"reconstruction must be one of {RECONSTRUCTION_LOSSES}, got {self.reconstruction!r}")
        if self.discriminator not in D_KINDS:
            raise ValueError(f"discriminator must be one of {D_KINDS}, got {self.discriminator!r}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema is a decay in [0, 1) (0: off), got {self.ema}")
        if self.val_metric not in VALIDATION_METRICS:
            raise ValueError(f"val_metric must be one of {list(VALIDATION_METRICS)}, got {self.val_metric!r}")
        if not 0.0 <= self.color_jitter <= 1.0:
            raise ValueError(f"color_jitter is a strength in [0, 1] (0: off), got {self.color_jitter}")
        if self.val_every < 0:
            raise ValueError(f"val_every must be ≥ 0 (0: no validation), got {self.val_every}")
        for name in ("steps", "batch_size", "accumulate", "val_limit", "log_every", "sample_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.workers < 0:
            raise ValueError("lr must be positive and workers ≥ 0")

    @property
    def validates_pose(self) -> bool:
        """Whether validation runs the pose detector: asked for, or the selecting metric needs it."""
        return self.val_pckh or self.val_metric in POSE_VALIDATION_METRICS

    @property
    def adversarial(self) -> bool:
        return self.stage == 2 or self.one_stage

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Official schedules (the released code): the code trains G1 alone for
# 22k steps, then G2 + D to 60k (Market, batch 16) or 80k (DeepFashion, batch 1) in all.
# demo and tiny are this project's: demo trains on a CPU in hours, with DCGAN's lr 2e-4 (on
# synthetic data its stage-1 loss after 150 steps is 0.19 against 0.36 with 2e-5); tiny is for tests.
TRAINING_DEFAULTS: dict[str, dict] = {
    "market": dict(batch_size=16, steps={1: 22_000, 2: 38_000}, lambda_l1=10.0, d_layers=4, d_base_width=64),
    "deepfashion": dict(batch_size=1, steps={1: 22_000, 2: 58_000}, lambda_l1=50.0, d_layers=5, d_base_width=64),
    "fashion": dict(batch_size=16, steps={1: 22_000, 2: 38_000}, lambda_l1=50.0, d_layers=5, d_base_width=64,
                    lr=2e-4),
    "demo": dict(batch_size=16, steps={1: 20_000, 2: 10_000}, lambda_l1=10.0, d_layers=4, d_base_width=32, lr=2e-4),
    "tiny": dict(batch_size=4, steps={1: 200, 2: 100}, lambda_l1=10.0, d_layers=4, d_base_width=8),
}


def train_config(preset: str, stage: int, **overrides) -> TrainConfig:
    """The official hyper-parameters of `preset` for `stage`, with fields replaced (None = default)."""
    if preset not in TRAINING_DEFAULTS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(TRAINING_DEFAULTS)}")
    defaults = dict(TRAINING_DEFAULTS[preset])
    defaults["steps"] = defaults["steps"][stage]
    defaults.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(preset=preset, stage=stage, **defaults)


def state_path(run_dir: str | Path, stage: int) -> Path:
    return Path(run_dir) / f"stage{stage}.safetensors"


def _differing(old: dict, new: dict) -> list[str]:
    """The keys whose values differ between two settings, sorted (missing counts as None)."""
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def load_run_state(run_dir: str | Path, stage: int) -> dict:
    """The stage's state from a run directory, checked to be a pg2-train state."""
    state = load_state(state_path(run_dir, stage))
    if state.get("kind") != STATE_KIND or state.get("version") != STATE_VERSION:
        raise StateError(f"{state_path(run_dir, stage)} is not a pg2-train run state of version {STATE_VERSION}")
    return state


def pretrained_g1(source: str | Path) -> tuple[ModelConfig, dict]:
    """G1 for stage 2: from a run directory's stage-1 state or from a checkpoint (.json)."""
    source = Path(source)
    if source.suffix not in (".json", ".safetensors"):  # a run directory
        if not state_path(source, 1).is_file():
            raise StateError(f"{source} has no stage-1 state ({state_path(source, 1).name}); "
                             "train stage 1 into it first, or pass --g1 CHECKPOINT.json")
        state = load_run_state(source, 1)   # the average when stage 1 kept one, as export serves it
        return ModelConfig.from_dict(state["model_config"]), state.get("ema", state["g1"])
    checkpoint = load_checkpoint(source)
    return checkpoint.config, checkpoint.g1.state_dict()


def initial_weights(source: str | Path, stage: int) -> tuple[ModelConfig, dict]:
    """Starting weights of the stage's generator (G1 for stage 1, G2 for stage 2) for fine-tuning:
    from a checkpoint (.json) or a run directory's state of that stage (its average when kept)."""
    source = Path(source)
    if source.suffix not in (".json", ".safetensors"):  # a run directory
        if not state_path(source, stage).is_file():
            raise StateError(f"{source} has no stage-{stage} state ({state_path(source, stage).name}) to start "
                             f"from; pass a run directory that trained stage {stage}, or a checkpoint .json")
        state = load_run_state(source, stage)
        return ModelConfig.from_dict(state["model_config"]), state.get("ema", state[f"g{stage}"])
    checkpoint = load_checkpoint(source)
    network = checkpoint.g1 if stage == 1 else checkpoint.g2
    if network is None:
        raise StateError(f"{source} holds no G2 to start stage 2 from; train stage 2 without --init")
    return checkpoint.config, network.state_dict()


class Trainer:
    """One stage of PG2 training over a pair split; `fit()` runs it to `config.steps`."""

    def __init__(self, config: TrainConfig, model_config: ModelConfig, run_dir: str | Path,
                 split: PairSplit | None, job: Distributed = Distributed(), *,
                 g1_state: dict | None = None, init_state: dict | None = None, resume: bool = False,
                 data_provenance: dict | None = None, validation: PairSplit | None = None):
        self.config, self.model_config, self.job = config, model_config, job
        self.run_dir = Path(run_dir)
        self.split = split
        self.validation = validation
        if config.val_every and validation is None:
            raise ValueError("val_every needs a held-out split (--val-data-root, --val-annotations, --val-pairs)")
        self.detector = None    # BlazePose for validation's PCKh (rank 0), made before any training step
        if config.val_every and config.validates_pose and job.is_main:
            from pg2_server.detection import PoseDetector

            self.detector = PoseDetector(several_people=False)
        self.detections: dict = {}   # what it found in the held-out images no model draws, kept across validations
        self.best: dict | None = None   # {"step", "metric", "value"} of the best validation so far
        self.flop_per_step: float | None = None
        self.device = job.device
        self.cuda = self.device.type == "cuda"
        self.data_provenance = dict(data_provenance or {})
        if split is not None:
            self.data_provenance["pairs_sha256"] = split.pairs_digest
        self.step = 0
        self.skipped_images = 0     # pairs passed over because an image could not be decoded, all ranks
        self.stop_requested = False
        self._updating = False      # between a step's first optimiser update and its end
        if job.is_main:
            for path in remove_partial_saves(self.run_dir):
                print(f"removed {path}, left by a save that was killed", file=sys.stderr)

        torch.manual_seed(config.seed)  # same initial weights on every rank
        self.g1 = Generator1(model_config)
        if g1_state is not None:
            self.g1.load_state_dict(g1_state)
        elif config.stage == 2 and not resume:
            raise ValueError("stage 2 needs a trained G1 (a stage-1 run or a checkpoint)")
        self.g2 = Generator2(model_config) if config.stage == 2 else None
        if init_state is not None:  # fine-tuning: the stage's generator starts from trained weights
            (self.g1 if config.stage == 1 else self.g2).load_state_dict(init_state)
        self.d = Discriminator(DiscriminatorConfig(model_config.canvas, config.d_layers, config.d_base_width,
                                                   config.discriminator)) if config.adversarial else None
        # bf16 reaches a CPU's matrix units only in channels_last; fp32 CPU runs keep NCHW.
        self.bf16 = config.bf16 and bf16_native(self.device)
        # [first step, precision] of each stretch of the run: `--bf16` asks for bf16 where the
        # device has the units, so a resume on other hardware can change it.
        self.precisions = [[0, self.precision]]
        channels_last = config.channels_last and (self.cuda or self.bf16)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if self.d is not None and job.enabled:  # batch statistics over all ranks, as one process
            synchronize_batch_norm(self.d)
        self.memory_format = memory_format
        for module in (self.g1, self.g2, self.d):
            if module is not None:
                module.to(self.device, memory_format=memory_format)
        self.generator = self.g1 if config.stage == 1 else self.g2
        if config.stage == 2:
            self.g1.eval().requires_grad_(False)
        betas = (config.beta1, config.beta2)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=config.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=config.lr, betas=betas) if self.d else None
        # The average of the trained generator's weights; what validation scores and export serves.
        self.ema = copy.deepcopy(self.generator).requires_grad_(False) if config.ema else None
        if resume:
            self._restore(load_run_state(self.run_dir, config.stage))

        # Wrapped forms used for training; the plain modules above are what is saved.
        self.train_g = self._wrap(self.generator)
        self.train_d = self._wrap(self.d) if self.d is not None else None
        self.frozen_g1 = torch.compile(self.g1) if (config.compile and config.stage == 2) else self.g1

    def _wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.job.enabled:
            module = DistributedDataParallel(module, device_ids=[self.device.index] if self.cuda else None)
        return torch.compile(module) if self.config.compile else module

    @property
    def precision(self) -> str:
        """What the steps compute in: "bfloat16" (autocast) or "float32"."""
        return "bfloat16" if self.bf16 else "float32"

    def _autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- one optimisation step ----------------------------------------------------------------

    def _to_device(self, batch: dict) -> dict:
        moved = {}
        for key, value in batch.items():
            value = value.to(self.device, non_blocking=True)
            if value.dim() == 4:
                value = value.contiguous(memory_format=self.memory_format)
            moved[key] = value
        return moved

    def generate(self, batch: dict, train_g=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(G1 image, final image) for a device batch; the final one carries gradients."""
        g = train_g or self.train_g
        with self._autocast():
            if self.config.stage == 1:
                coarse = g(batch["source"], batch["heatmaps"], batch["coordinates"])
                return coarse, coarse
            with torch.no_grad():
                coarse = self.frozen_g1(batch["source"], batch["heatmaps"], batch["coordinates"])
            return coarse, coarse + g(coarse, batch["source"])

    def _no_sync(self, module: torch.nn.Module, skip: bool):
        """DDP's no_sync while gradients of a step's earlier micro-batches accumulate."""
        no_sync = getattr(module, "no_sync", None) if skip else None
        return no_sync() if no_sync is not None else contextlib.nullcontext()

    def train_step(self, batch: dict | list[dict]) -> dict[str, torch.Tensor]:
        """One generator update (and one D update when adversarial) over one batch or a list of
        micro-batches whose gradients accumulate; returns the detached losses, averaged."""
        c = self.config
        micro = [self._to_device(b) for b in (batch if isinstance(batch, list) else [batch])]
        count = len(micro)
        losses: dict[str, torch.Tensor] = {}

        def record(name: str, value: torch.Tensor) -> None:
            losses[name] = losses.get(name, 0) + value.detach().float() / count

        # Generator update. With D: its plain module (not its DDP wrapper) with frozen weights, fed
        # the same one-batch mix of real target, real source and generated images as D's update.
        self.opt_g.zero_grad(set_to_none=True)
        if c.adversarial:
            self.d.requires_grad_(False)
        generated_images = []
        for i, b in enumerate(micro):
            with self._no_sync(self.train_g, i < count - 1):
                _, fake = self.generate(b)
                recon = reconstruction_loss(fake, b["target"], b["mask"], c.reconstruction)
                record("recon", recon)
                g_loss = recon
                if c.adversarial:
                    with self._autocast():
                        _, _, fake_logits = discriminator_logits(self.d, b["target"], b["source"], fake,
                                                                 c.discriminator)
                    adversarial = generator_adversarial_loss(fake_logits)
                    g_loss = adversarial + c.lambda_l1 * recon
                    record("g_adv", adversarial)
                    record("g_total", g_loss)
                    generated_images.append(fake.detach())
                (g_loss / count).backward()
        self._updating = True   # from here until the D update the networks are half a step on
        self.opt_g.step()
        if c.adversarial:
            # Discriminator update on the same generated images.
            self.d.requires_grad_(True)
            self.opt_d.zero_grad(set_to_none=True)
            for i, (b, fake) in enumerate(zip(micro, generated_images)):
                with self._no_sync(self.train_d, i < count - 1):
                    with self._autocast():
                        real, source, generated = discriminator_logits(
                            self.train_d, b["target"], b["source"], fake, c.discriminator)
                    d_loss = discriminator_loss(real, source, generated)
                    (d_loss / count).backward()
                record("d", d_loss)
                record("d_real", torch.sigmoid(real.float()).mean())
                record("d_fake", torch.sigmoid(generated.float()).mean())
            self.opt_d.step()
        if self.ema is not None:
            self._update_ema()
        self._updating = False
        return losses

    @torch.no_grad()
    def _update_ema(self) -> None:
        for average, current in zip(self.ema.parameters(), self.generator.parameters()):
            average.lerp_(current, 1.0 - self.config.ema)
        for average, current in zip(self.ema.buffers(), self.generator.buffers()):
            average.copy_(current)

    # -- state ---------------------------------------------------------------------------------

    def state(self) -> dict:
        """Everything needed to continue this stage exactly where it is."""
        state = {
            "kind": STATE_KIND, "version": STATE_VERSION,
            "stage": self.config.stage, "step": self.step,
            "samples_per_rank": self.step * self.config.batch_size * self.config.accumulate,
            "world_size": self.job.world_size, "skipped_images": self.skipped_images,
            "train_config": self.config.to_dict(), "model_config": self.model_config.to_dict(),
            "data": self.data_provenance,
            "g1": self.g1.state_dict(), "opt_g": self.opt_g.state_dict(),
            "rng": rng_state(), "precisions": self.precisions,
        }
        if self.g2 is not None:
            state["g2"] = self.g2.state_dict()
        if self.d is not None:
            state["d"] = self.d.state_dict()
            state["opt_d"] = self.opt_d.state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.best is not None:
            state["best"] = self.best
        return state

    def save(self) -> Path | None:
        """Write the state atomically (rank 0 only)."""
        if not self.job.is_main:
            return None
        return save_state(state_path(self.run_dir, self.config.stage), self.state())

    def _restore(self, state: dict) -> None:
        saved = ModelConfig.from_dict(state["model_config"])
        if saved != self.model_config:
            old, new = saved.to_dict(), self.model_config.to_dict()
            changed = ", ".join(f"{k} {old.get(k)} there, {new.get(k)} now" for k in _differing(old, new))
            raise StateError(f"the run state was trained with another model ({changed}); resume with the same "
                             "--preset and model switches")
        if state["world_size"] != self.job.world_size:
            raise StateError(f"the run state was written by {state['world_size']} processes; resume with "
                             f"the same number (now {self.job.world_size}) so the data order continues")
        ignored = {"steps", "workers", "log_every", "sample_every", "save_every", "compile",
                   "val_every", "val_limit", "val_metric", "val_pckh",
                   "batch_size", "accumulate"}   # their product is what counts, checked below
        # A setting the saved state predates had its default then.
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
        saved_config = {**defaults, **state["train_config"]}
        old = {k: v for k, v in saved_config.items() if k not in ignored}
        new = {k: v for k, v in self.config.to_dict().items() if k not in ignored}
        if old != new:
            changed = _differing(old, new)
            raise StateError(f"--resume with different hyper-parameters {changed}: "
                             f"saved {[old.get(k) for k in changed]}, given {[new.get(k) for k in changed]}")
        self._check_batch(saved_config, state)
        saved_data = state.get("data", {})
        if self.split is not None and saved_data.get("pairs_sha256") not in (None, self.split.pairs_digest):
            raise StateError(f"--resume with other pairs: the run was trained on {saved_data.get('pairs_used')} pairs "
                             f"from {saved_data.get('pairs')}, now {len(self.split.pairs)} pairs differ (file, order "
                             f"or skipped rows); resume with the same --pairs, --annotations and images")
        self.g1.load_state_dict(state["g1"])
        self.opt_g.load_state_dict(state["opt_g"])
        if self.g2 is not None:
            self.g2.load_state_dict(state["g2"])
        if self.d is not None:
            self.d.load_state_dict(state["d"])
            self.opt_d.load_state_dict(state["opt_d"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        best = state.get("best", {})
        if best and not self.config.val_every:   # no validation this time: kept for a later one
            self.best = best
        elif best.get("metric") == self.config.val_metric:
            if best.get("scored_on") in (None, self._scored_on()):
                self.best = best
            else:   # another validation set: its scores do not compare with the saved best
                logger.warning("the validation pairs or --val-limit changed since the best checkpoint (step %s, "
                               "%s %.4g): the next validation starts a new best", best.get("step"), best["metric"],
                               best["value"])
        elif best:   # another metric: the saved best is not the best by this one
            self._set_best_aside(best)
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.skipped_images = int(state.get("skipped_images", 0))
        self.data_provenance = {**self.data_provenance, **saved_data}
        self.precisions = [list(p) for p in state.get("precisions", [[0, None]])]
        if self.precisions[-1][1] != self.precision:
            if self.precisions[-1][1] is not None:
                logger.warning("the run trained in %s up to step %d and goes on in %s: this %s %s bf16 units "
                               "(--no-bf16 keeps float32 everywhere)", self.precisions[-1][1], self.step,
                               self.precision, self.device.type, "has" if bf16_native(self.device) else "lacks")
            self.precisions.append([self.step, self.precision])

    def _check_batch(self, saved_config: dict, state: dict) -> None:
        """A resume may split the step's pairs otherwise (--batch-size 8 --accumulate 2 for 16 × 1,
        after running out of memory): the data order continues where the pairs per step stay."""
        c = self.config
        old_batch, old_accumulate = saved_config["batch_size"], saved_config["accumulate"]
        if (old_batch, old_accumulate) == (c.batch_size, c.accumulate):
            return
        per_step = old_batch * old_accumulate
        if c.batch_size * c.accumulate != per_step:
            way = (f"--batch-size {c.batch_size} --accumulate {per_step // c.batch_size}"
                   if per_step % c.batch_size == 0 else f"a --batch-size that divides {per_step}")
            raise StateError(f"--resume with --batch-size {c.batch_size} × --accumulate {c.accumulate} = "
                             f"{c.batch_size * c.accumulate} pairs per process and step, but the run takes "
                             f"{old_batch} × {old_accumulate} = {per_step}: keep the product (e.g. {way}) so the "
                             "steps and the data order continue")
        consumed = state.get("samples_per_rank")
        if consumed is not None and consumed != int(state["step"]) * per_step:
            raise StateError(f"the run state's data position ({consumed} pairs per process) is not its "
                             f"{state['step']} steps × {per_step} pairs: the state is damaged; resume from another")
        if not self.job.is_main:
            return
        change = (f"each step's {per_step} pairs per process now come as {c.accumulate} micro-batch(es) of "
                  f"{c.batch_size} (the run so far: {old_accumulate} of {old_batch}); the data order continues")
        if c.adversarial:   # D's batch norm takes its statistics per micro-batch
            logger.warning("%s, but D's batch norm now takes its statistics over micro-batches of %d instead "
                           "of %d, so the adversarial steps differ from the run's so far", change, c.batch_size,
                           old_batch)
        else:
            logger.info("%s: the steps are those of the run so far, up to rounding", change)

    def _set_best_aside(self, best: dict) -> None:
        """The validation metric changed: keep the best checkpoint so far under its metric's name."""
        if not self.job.is_main:
            return
        stage, metric = self.config.stage, best.get("metric")
        current = self.run_dir / f"best-stage{stage}"
        target = self.run_dir / f"best-stage{stage}-{metric}"
        if target.with_suffix(".json").exists():   # set aside before: keep that one too
            target = self.run_dir / f"best-stage{stage}-{metric}-step{best.get('step')}"
        moved = None
        if current.with_suffix(".json").is_file():
            for suffix in (".json", ".safetensors"):   # the .json first: it is what names a checkpoint
                if current.with_suffix(suffix).is_file():
                    current.with_suffix(suffix).rename(target.with_suffix(suffix))
            moved = target.with_suffix(".json")
        logger.warning("--val-metric changed from %s to %s: the best so far (step %s, %s %.4g) is not judged "
                       "by %s, so the next validation starts a new best by %s%s", metric, self.config.val_metric,
                       best.get("step"), metric, best.get("value"), self.config.val_metric, self.config.val_metric,
                       f"; the earlier best checkpoint is now {moved}" if moved else "")

    # -- the loop ------------------------------------------------------------------------------

    def _request_stop(self, signum, frame) -> None:
        self.stop_requested = True

    def fit(self) -> dict[str, float]:
        """Train to `config.steps`, saving every `save_every` steps, on a stop signal (SIGTERM, SIGINT,
        SIGHUP, SIGUSR1: `STOP_SIGNALS`) and on failure.

        Returns the last logged losses, and `interrupted: 1.0` if a signal stopped the run. An
        exception (a data error with `--strict`, out of memory, ...) saves the state of the last
        whole step before it propagates.
        """
        c = self.config
        if self.split is None:
            raise ValueError("fit() needs a data split")
        dataset = PairDataset(self.split, self.model_config, c.color_jitter)
        sampler = PairSampler(len(dataset), c.seed, c.flip, self.job.rank, self.job.world_size,
                              start=self.step * c.batch_size * c.accumulate)
        loader = make_loader(dataset, c.batch_size, sampler, c.workers, pin_memory=self.cuda)
        # Signals can only be caught on the main thread; elsewhere (a notebook's worker thread)
        # the caller owns interruption.
        catch = threading.current_thread() is threading.main_thread()
        log = _LossLog(self.run_dir, c.stage, self.step, self.job.is_main)
        previous = {s: signal.signal(s, self._request_stop) for s in STOP_SIGNALS} if catch else {}
        bar = tqdm(total=c.steps, initial=self.step, desc=f"stage {c.stage}", unit="step",
                   disable=not self.job.is_main, dynamic_ncols=True)
        last: dict[str, float] = {}
        window_start, window_steps, window_skipped = time.perf_counter(), 0, 0
        batches = None
        try:
            samples = self._sample_batch(dataset) if self.job.is_main else None
            batches = BatchStream(loader)
            while self.step < c.steps:
                micro = [next(batches) for _ in range(c.accumulate)]
                window_skipped += sum(int(b.pop("skipped").sum()) for b in micro)
                if self.flop_per_step is None and not c.compile:
                    losses = self._counted_step(micro)
                else:
                    losses = self.train_step(micro)
                self.step += 1
                window_steps += 1
                bar.update(1)
                if self.step % c.log_every == 0 or self.step == c.steps:
                    elapsed = time.perf_counter() - window_start
                    rate = window_steps * c.batch_size * c.accumulate * self.job.world_size / max(elapsed, 1e-9)
                    last = self._logged(losses, window_skipped)
                    log.write(self.step, last, rate, self._machine_figures(window_steps / max(elapsed, 1e-9)))
                    bar.set_postfix({**{k: f"{v:.4f}" for k, v in last.items() if k in ("recon", "g_adv", "d")},
                                     "samples/s": f"{rate:.1f}"})
                    window_start, window_steps, window_skipped = time.perf_counter(), 0, 0
                if samples is not None and (self.step % c.sample_every == 0 or self.step == c.steps):
                    log.image(self.step, self.sample_grid(samples))
                if c.val_every and (self.step % c.val_every == 0 or self.step == c.steps):
                    began = time.perf_counter()
                    self.validate(log)
                    window_start += time.perf_counter() - began   # samples/s counts training only
                if self.step % c.save_every == 0 and self.step < c.steps:
                    window_skipped = self._count_skipped(window_skipped)
                    self.save()
                stop = self.stop_requested
                if self.job.enabled:
                    # All ranks stop at the same step, the one after the signal: torchrun kills its
                    # workers ~30 s after SIGTERM, sooner than --log-every steps may take. The check is
                    # one scalar all-reduce, beside the step's own gradient all-reduce.
                    stop = any_rank(stop, self.job)
                if stop:
                    last["interrupted"] = 1.0
                    break
            window_skipped = self._count_skipped(window_skipped)   # a stop between two log lines
            self.save()
            barrier(self.job)
        except Exception:
            self._save_after_failure()
            raise
        finally:
            if batches is not None:
                batches.close()
            bar.close()
            log.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return last

    def _counted_step(self, micro: list[dict]) -> dict[str, torch.Tensor]:
        """A training step whose FLOPs are counted (once per run, for the log's MFU)."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            losses = self.train_step(micro)
        self.flop_per_step = float(counter.get_total_flops())
        return losses

    def _machine_figures(self, steps_per_second: float) -> dict[str, float]:
        """Peak memory (GPU: allocated by torch; CPU: the process's peak RSS) and TFLOP/s, MFU on known GPUs."""
        figures = {}
        if self.cuda:
            figures["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        else:
            unit = 1 if sys.platform == "darwin" else 1024   # ru_maxrss: bytes on macOS, KiB on Linux
            figures["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2 ** 30
        if self.flop_per_step:
            achieved = self.flop_per_step * steps_per_second
            figures["tflops"] = achieved / 1e12
            peak = peak_tflops(self.device)
            if peak:
                figures["mfu"] = achieved / (peak * 1e12)
        return {k: round(v, 4) for k, v in figures.items()}

    # -- validation ----------------------------------------------------------------------------

    def serving_networks(self) -> tuple[Generator1, Generator2 | None]:
        """Copies of the generators as they would be served: the average when EMA is on."""
        trained = self.ema if self.ema is not None else self.generator
        if self.config.stage == 1:
            return copy.deepcopy(trained).cpu(), None
        return copy.deepcopy(self.g1).cpu(), copy.deepcopy(trained).cpu()

    def validate(self, log: "_LossLog") -> dict | None:
        """Score the held-out split with `pg2-train eval`'s metrics (rank 0); keep the best checkpoint."""
        if self.job.is_main:
            from pg2_server.pipeline import Pipeline

            from .evaluate import evaluate

            g1, g2 = self.serving_networks()
            pipeline = Pipeline(self.model_config, g1, g2, device=self.device,
                                name=f"stage{self.config.stage}-step{self.step}")
            folder = self.run_dir / "validation" / f"stage{self.config.stage}-step{self.step:07d}"
            metrics = evaluate(pipeline, self.validation, folder, save_images=False, limit=self.config.val_limit,
                               workers=1, progress=False, detector=self.detector,
                               detections=self.detections)
            name = "g1+g2" if self.config.stage == 2 else "g1"
            row = metrics["rows"][name]
            by_view = {f"{metric}_{view}": value for view, rows in sorted(metrics.get("views", {}).items())
                       for metric, value in rows.get(name, {}).items() if metric != "images"}
            log.validation(self.step, {**row, **by_view})   # e.g. turned_back: back views drawn as front ones
            value, metric = row[self.config.val_metric], self.config.val_metric
            larger = VALIDATION_METRICS[metric]
            if value is not None and (self.best is None or (value > self.best["value"] if larger
                                                            else value < self.best["value"])):
                save_checkpoint(self.run_dir / f"best-stage{self.config.stage}", self.model_config, g1, g2,
                                provenance={"trained_by": "pg2-train", "stage": self.config.stage, "step": self.step,
                                            "ema": self.ema is not None, "weights": self._weights(),
                                            "data": self.data_provenance,
                                            "train_config": self.config.to_dict()},
                                metrics=metrics)
                self.best = {"step": self.step, "metric": metric, "value": value,   # once it is on disk
                             "scored_on": self._scored_on()}
        barrier(self.job)
        return self.best

    def _weights(self) -> dict[str, str | None]:
        """What `serving_networks` gives, per network: the moving average or the last weights."""
        trained = "average" if self.ema is not None else "last"
        if self.config.stage == 1:
            return {"g1": trained}
        return {"g1": self.data_provenance.get("g1_weights"), "g2": trained}

    def _scored_on(self) -> str | None:
        """What validation scores: the held-out pairs' digest and how many are scored."""
        if self.validation is None:
            return None
        return f"{self.validation.pairs_digest}:{self.config.val_limit}"

    def _logged(self, losses: dict[str, torch.Tensor], skipped: int) -> dict[str, float]:
        """The step's losses averaged over the ranks, and the images skipped so far by all ranks."""
        names = list(losses)
        values = torch.stack([losses[k].float() for k in names] + [torch.tensor(float(skipped), device=self.device)])
        values = mean_over_ranks(values, self.job).tolist()
        self.skipped_images += round(values[-1] * self.job.world_size)
        return {**dict(zip(names, values[:-1])), "skipped_images": self.skipped_images}

    def _count_skipped(self, skipped: int) -> int:
        """Add the images skipped since the last log line (all ranks) to the run's count before a
        save, so a resume does not lose them; returns the window's new count, 0. Every rank
        calls it at the same step."""
        total = mean_over_ranks(torch.tensor([float(skipped)], device=self.device), self.job).item()
        self.skipped_images += round(total * self.job.world_size)
        return 0

    def _save_after_failure(self) -> None:
        if not self.job.is_main:
            return
        if self._updating:  # the networks are between two updates: the last save is the good one
            print(f"training failed inside step {self.step + 1}; the state was not saved (it would be half a "
                  f"step); {state_path(self.run_dir, self.config.stage)} holds the last save", file=sys.stderr)
            return
        try:
            where = self.save()
        except Exception as e:  # the original error matters more; say why nothing was saved
            print(f"training failed at step {self.step} and the state could not be saved: {e}", file=sys.stderr)
            return
        print(f"training failed after step {self.step}; state saved to {where}: fix the cause and continue "
              f"with --resume", file=sys.stderr)

    # -- pictures ------------------------------------------------------------------------------

    def _sample_batch(self, dataset: PairDataset, count: int = 4) -> dict:
        items = [dataset[(i, False)] for i in range(min(count, len(dataset)))]
        return {k: torch.stack([item[k] for item in items]) for k in items[0] if k != "skipped"}

    @torch.no_grad()
    def sample_grid(self, samples: dict) -> np.ndarray:
        """Rows of source | target pose | target | G1 | G2 for the fixed sample pairs."""
        batch = self._to_device(samples)
        coarse, final = self.generate(batch, train_g=self.generator)
        width, height = self.model_config.canvas
        rows = []
        for i in range(len(samples["source"])):
            row = [to_uint8(samples["source"][i].numpy()),
                   draw_pose(samples["keypoints"][i].numpy(), (width, height)),
                   to_uint8(samples["target"][i].numpy()),
                   to_uint8(coarse[i].float().cpu().numpy())]
            if self.config.stage == 2:
                row.append(to_uint8(final[i].float().cpu().numpy()))
            rows.append(row)
        header = ["source", "target pose", "target", "G1"] + (["G2"] if self.config.stage == 2 else [])
        return image_grid(rows, header)


def read_log(path: Path) -> list[dict]:
    """The entries of a JSONL log; a line cut short (a kill or a full disk mid-write) is left
    out with a warning rather than stopping a resume or an export."""
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if not isinstance(entry, dict):
            logger.warning("%s:%d is not a whole log entry (cut short?); left out", path, number)
            continue
        entries.append(entry)
    return entries


class _LossLog:
    """Rank 0's record of a stage: `stageN-log.jsonl`, TensorBoard scalars and sample grids.

    On resume, entries after the resumed step are dropped, so the curve continues unbroken.
    """

    def __init__(self, run_dir: Path, stage: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self.stage = stage
        self.writer = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.samples_dir = run_dir / "samples"
        self.path = run_dir / f"stage{stage}-log.jsonl"
        self.validation_path = run_dir / f"stage{stage}-validation.jsonl"
        for path in (self.path, self.validation_path):
            if path.exists():
                kept = [entry for entry in read_log(path) if entry.get("step", 0) <= start_step]
                write_atomic(path, lambda tmp, kept=kept: Path(tmp).write_text(
                    "".join(json.dumps(entry) + "\n" for entry in kept), encoding="utf-8"))
        self.file = open(self.path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
            # A folder per stage: a resume purges the events past its step, which in a shared
            # folder would cut the other stage's curves too; a restart from 0 purges a killed run's.
            self.writer = SummaryWriter(str(run_dir / "tensorboard" / f"stage{stage}"), purge_step=start_step + 1)
        except ImportError:  # TensorBoard is an optional extra; the JSONL log is always written
            self.writer = None

    def write(self, step: int, losses: dict[str, float], samples_per_second: float,
              figures: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **losses, "samples_per_s": round(samples_per_second, 3),
                                    **(figures or {})}) + "\n")
        self.file.flush()
        if self.writer:
            for name, value in losses.items():
                if math.isfinite(value):
                    self.writer.add_scalar(f"stage{self.stage}/{name}", value, step)
            self.writer.add_scalar(f"stage{self.stage}/samples_per_s", samples_per_second, step)

    def validation(self, step: int, metrics: dict[str, float | None]) -> None:
        """One line of `stageN-validation.jsonl` (and TensorBoard scalars `stageN/val_*`)."""
        if not self.enabled:
            return
        with open(self.validation_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer:
            for name, value in metrics.items():
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(f"stage{self.stage}/val_{name}", value, step)

    def image(self, step: int, grid: np.ndarray) -> None:
        if not self.enabled:
            return
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        write_rgb(self.samples_dir / f"stage{self.stage}-step{step:07d}.png", grid)
        if self.writer:
            self.writer.add_image(f"stage{self.stage}/samples", grid, step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer:
                self.writer.close()
