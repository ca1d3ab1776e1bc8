"""`pg2-train`: prepare data, train PG2's two stages, export weights to serve, evaluate.

    pg2-train prepare deepfashion|market --raw DIR --out DIR [--annotations CSV ...] [--pairs CSV ...]
    pg2-train pairs --images DIR --annotations CSV --out PAIRS.csv [--seed S]
    pg2-train fit --preset P --data-root DIR --annotations CSV --pairs CSV --stage 1|2 --out RUN [--resume]
    torchrun --standalone --nproc_per_node N -m training.cli fit ...   # DDP, see training/distributed.py
    pg2-train export RUN --out CKPT [--dtype float16] [--stage 1|2] [--no-ema]
    pg2-train eval --checkpoint CKPT --data-root DIR --annotations CSV --pairs CSV --out DIR
                   [--pckh] [--inception-weights PTH --fid-train-root DIR | --fid-train-stats NPZ] [--lpips-weights PTH]
    pg2-train annotate --images DIR --out ANNOTATIONS.csv [--truth CSV]   # keypoints from photos (pose extra)
    pg2-train bench --preset P [--batch-size B] [--stage 1|2] | bench --data --data-root ...
    pg2-train samples --data-root DIR --annotations CSV --pair SRC TGT [--pair ...] --out DIR   # a demo sample set

Each subcommand is a function `cmd_NAME(args)`, here or in its own module (prepare, pairs, bench,
synth, sample_set), which also registers its flags with `add_parser`; `build_parser` wires them.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pg2_server.atomic import write_bytes_atomic
from pg2_server.checkpoint import CheckpointError
from pg2_server.errors import SetupError
from pg2_server.keypoints import KeypointError

from . import bench, pairs, prepare, sample_set, synth
from .data import DataError
from .state import StateError
from .trainer import VALIDATION_METRICS

log = logging.getLogger("training")

EXIT_INTERRUPTED = 143  # 128 + SIGTERM, after any stop signal: the state was saved; run again with --resume


def _add_data_arguments(parser: argparse.ArgumentParser, images_help: str, required: bool = True) -> None:
    parser.add_argument("--data-root", required=required, help=images_help)
    parser.add_argument("--annotations", required=required, help="annotation CSV (name:keypoints_y:keypoints_x)")
    parser.add_argument("--pairs", required=required, help="pairs CSV (from,to)")
    parser.add_argument("--strict", action="store_true", default=None if not required else False,
                        help="stop at the first malformed row, missing or undecodable image or annotation "
                             "(default: skip and count)")


def _load_split(args: argparse.Namespace, quiet: bool = False):
    from .data import load_split

    split = load_split(args.data_root, args.annotations, args.pairs, strict=args.strict)
    if not quiet:
        print(f"data: {len(split.pairs)} pairs of {len(split.names)} images from {args.data_root}; "
              f"{split.report.summary()}", file=sys.stderr)
        if split.report.total:
            print(split.report.details(), file=sys.stderr)
    return split


# -- fit --------------------------------------------------------------------------------------

def _check_ranks_agree(job, split, resume: bool, existing: Path, saved_step: int | None) -> None:
    """Stop every rank when they loaded different pairs or see different run states.

    Each node reads --data-root, --annotations, --pairs and --out itself: on local disks that
    differ, ranks would train on other pairs, or some resume while others start afresh.
    """
    from .distributed import gather_from_ranks

    views = gather_from_ranks({"pairs": len(split.pairs), "sha256": split.pairs_digest, "resume": resume,
                               "state": existing.is_file(), "step": saved_step}, job)
    problems = []
    data = [f"{v['pairs']} pairs (sha256 {v['sha256'][:12]})" for v in views]
    if len(set(data)) > 1:
        problems.append(_by_rank([(f"sees {d}", f"see {d}") for d in data]))
    runs = []
    for v in views:
        if v["resume"] and v["state"]:
            runs.append((f"resumes {existing} at step {v['step']}", f"resume {existing} at step {v['step']}"))
        elif v["resume"]:
            runs.append((f"finds no {existing} to resume", f"find no {existing} to resume"))
        elif v["state"]:
            runs.append((f"starts a new run over an existing {existing}",
                         f"start a new run over an existing {existing}"))
        else:
            runs.append(("starts a new run", "start a new run"))
    if len(set(runs)) > 1:
        problems.append(_by_rank(runs))
    if problems:
        raise ValueError(f"the {job.world_size} processes disagree: " + "; ".join(problems)
                         + ": --data-root, --annotations, --pairs and --out must be the same files on every node "
                           "(a shared filesystem), and every node must get the same command")


def _by_rank(descriptions: list[tuple[str, str]]) -> str:
    """"rank 1 sees X, ranks 0, 2 see Y": ranks grouped by what they report, (singular, plural)."""
    groups: dict[tuple[str, str], list[int]] = {}
    for rank, description in enumerate(descriptions):
        groups.setdefault(description, []).append(rank)
    return ", ".join(f"rank {ranks[0]} {one}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))} {many}"
                     for (one, many), ranks in groups.items())


def cmd_fit(args: argparse.Namespace) -> int:
    from pg2_server.model import ModelConfig, preset

    from .distributed import from_main, init_distributed, shutdown
    from .trainer import Trainer, initial_weights, load_run_state, pretrained_g1, state_path, train_config

    settings = fit_settings(args)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    job = init_distributed(args.device)
    try:
        run_dir = Path(args.out)
        existing = state_path(run_dir, args.stage)
        # Rank 0 decides `--resume auto` for every rank: all continue the run, or all start it.
        main_has_state = from_main(existing.is_file(), job)
        args.resume = main_has_state if args.resume == "auto" else args.resume == "yes"
        saved = None   # the resumed run's settings (its weights are the trainer's to load)
        saved_step = None
        if args.resume and existing.is_file():
            state = load_run_state(run_dir, args.stage)
            saved = {k: state.get(k, {}) for k in ("train_config", "model_config", "data")}
            saved_step = int(state["step"])
            del state
        split = _load_split(args, quiet=not job.is_main)
        _check_ranks_agree(job, split, args.resume, existing, saved_step)
        # `--resume` alone goes on to the run's own target, not the preset's
        steps = saved["train_config"]["steps"] if args.steps is None and saved is not None else args.steps
        config = train_config(
            args.preset, args.stage, steps=steps, batch_size=args.batch_size, lr=args.lr,
            lambda_l1=args.lambda_l1, reconstruction=args.loss, one_stage=args.one_stage,
            discriminator=args.discriminator, flip=not args.no_flip, color_jitter=args.color_jitter,
            seed=args.seed, workers=args.workers,
            log_every=args.log_every, sample_every=args.sample_every, save_every=args.save_every,
            bf16=not args.no_bf16, compile=args.compile, accumulate=args.accumulate, ema=args.ema,
            val_every=args.val_every, val_limit=args.val_limit, val_metric=args.val_metric,
            val_pckh=args.val_pckh)
        if existing.is_file() and not args.resume:
            raise StateError(f"{existing} exists: pass --resume to continue that run, or choose another --out")
        if args.resume and not existing.is_file():
            raise StateError(f"--resume: {existing} does not exist; start without --resume")
        g1_state = None
        model_overrides = {k: v for k, v in (("pose_embedding", args.pose_embedding),
                                             ("heatmap_kind", args.heatmap_kind),
                                             ("base_width", args.width)) if v is not None}
        g2_levels = {"g2_levels": args.g2_levels} if args.g2_levels is not None else {}
        model_config = preset(args.preset, **model_overrides, **g2_levels)
        if args.stage == 2 and not args.resume:
            g1_config, g1_state = pretrained_g1(args.g1 or run_dir)
            if model_overrides and any(getattr(g1_config, k) != v for k, v in model_overrides.items()):
                raise ValueError(f"stage 2 takes its model config from the stage-1 G1 ({g1_config.pose_embedding}, "
                                 f"{g1_config.heatmap_kind}, width {g1_config.base_width}); do not pass different "
                                 "--pose-embedding/--heatmap-kind/--width")
            if g1_config.preset != args.preset:
                raise ValueError(f"G1 was trained with preset {g1_config.preset!r}, not {args.preset!r}")
            model_config = g1_config.replace(**g2_levels)   # G2's depth is stage 2's own choice
        elif args.stage == 2:  # resuming stage 2: the model is the one saved, with its G1
            model_config = ModelConfig.from_dict(saved["model_config"])
            if g2_levels and model_config.g2_levels != args.g2_levels:
                raise ValueError(f"{run_dir} trains a G2 of {model_config.g2_levels} levels; resume it without "
                                 f"--g2-levels {args.g2_levels}, or start a new run with another --out")
            changed = sorted(k for k, v in model_overrides.items() if getattr(model_config, k) != v)
            if changed:
                raise ValueError(f"{run_dir} trains stage 2 over a G1 with {model_config.pose_embedding}, "
                                 f"{model_config.heatmap_kind}, width {model_config.base_width}; resume it without "
                                 f"a different {', '.join(FLAG_OF[k] for k in changed)}")
            g1_from = saved.get("data", {}).get("g1_from")
            if args.g1 and g1_from and Path(args.g1).resolve() != Path(g1_from):
                raise ValueError(f"{run_dir} trains stage 2 over the G1 of {g1_from}; resume it without --g1 "
                                 f"{args.g1}, or start a new run with another --out")
        init_state = None
        if args.init:   # its config also when resuming; its weights only at the start
            init_config, weights = initial_weights(args.init, args.stage)
            init_state = None if args.resume else weights   # a resumed run continues from its own state
            if args.stage == 1:
                if model_overrides and any(getattr(init_config, k) != v for k, v in model_overrides.items()):
                    raise ValueError(f"--init {args.init} has model config ({init_config.pose_embedding}, "
                                     f"{init_config.heatmap_kind}, width {init_config.base_width}); do not pass "
                                     "different --pose-embedding/--heatmap-kind/--width")
                if init_config.preset != args.preset:
                    raise ValueError(f"--init {args.init} was trained with preset {init_config.preset!r}, "
                                     f"not {args.preset!r}")
                model_config = init_config.replace(**g2_levels)   # a G2 depth for the stage 2 to come
            elif init_config != model_config:
                raise ValueError(f"--init {args.init} has model config {init_config.to_dict()}, but G1 has "
                                 f"{model_config.to_dict()}: stage 2 starts from a G2 made for the same G1 config")
        provenance = {"data_root": str(Path(args.data_root).resolve()),
                      "annotations": str(Path(args.annotations).resolve()),
                      "pairs": str(Path(args.pairs).resolve()),
                      "pairs_used": len(split.pairs), "images": len(split.names),
                      "skipped": {k: len(v) for k, v in split.report.problems.items()}}
        if g1_state is not None:
            from .export import g1_weights, stage1_history
            provenance["g1_from"] = str(Path(args.g1 or run_dir).resolve())
            # How this G1 was trained, now: stage 1 may be resumed in its folder after this starts.
            if record := stage1_history(provenance["g1_from"]):
                provenance["g1_stage1"] = record
            if kind := g1_weights(provenance["g1_from"], record):   # its average, or its last weights
                provenance["g1_weights"] = kind
        if init_state is not None:
            provenance["init_from"] = str(Path(args.init).resolve())
        validation = None
        if args.val_data_root:
            from .data import load_split
            validation = load_split(args.val_data_root, args.val_annotations, args.val_pairs, strict=args.strict)
            if job.is_main:
                print(f"validation: {len(validation.pairs)} pairs from {args.val_data_root}, first "
                      f"{config.val_limit} scored every {config.val_every or '—'} steps; {validation.report.summary()}",
                      file=sys.stderr)
        trainer = Trainer(config, model_config, run_dir, split, job, g1_state=g1_state, init_state=init_state,
                          resume=args.resume, data_provenance=provenance, validation=validation)
        if job.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            where = run_dir / f"stage{config.stage}-config.toml"
            if args.resume:   # the whole run's settings, not only the flags given this time
                settings = resumed_settings(settings, where, saved, config, model_config, args.fit_parser)
            write_bytes_atomic(where, settings_toml(settings).encode())
            print(f"stage {config.stage}: preset {config.preset}, {config.steps} steps, batch {config.batch_size} × "
                  f"{job.world_size} process(es) on {job.device}, from step {trainer.step}", file=sys.stderr)
        losses = trainer.fit()
        if job.is_main:
            where = state_path(run_dir, args.stage)
            if losses.get("interrupted"):
                print(f"interrupted at step {trainer.step}; state saved to {where}; continue with --resume",
                      file=sys.stderr)
                return EXIT_INTERRUPTED
            best = f"; best {trainer.best['metric']} {trainer.best['value']:.4f} at step {trainer.best['step']} " \
                   f"in {run_dir / f'best-stage{config.stage}.json'}" if trainer.best else ""
            if not losses:   # resumed at its target: no step to take
                print(f"stage {config.stage} was already at its {config.steps} steps; state {where}{best} "
                      "(--steps N with --resume trains further)", file=sys.stderr)
                return 0
            print(f"stage {config.stage} done at step {trainer.step}: "
                  + ", ".join(f"{k} {v:.4f}" if k != "skipped_images" else f"{k} {v:.0f}" for k, v in losses.items())
                  + f"; state {where}{best}", file=sys.stderr)
        return 0
    finally:
        shutdown(job)


FIT_REQUIRED = ("preset", "stage", "data_root", "annotations", "pairs", "out")
FIT_UNSAVED = ("config", "resume", "func", "command", "verbose", "fit_parser")  # not part of a run's settings


def fit_settings(args: argparse.Namespace) -> dict:
    """Merge `--config FILE.toml` into `args` (flags given on the command line win) and check it.

    TOML keys are the flag names without dashes (`batch-size = 8` or `batch_size = 8`); returns
    the run's settings, as written to RUN/stageN-config.toml.
    """
    import tomllib

    actions = {a.dest: a for a in args.fit_parser._actions if a.dest not in FIT_UNSAVED + ("help",)}
    if args.config:
        try:
            with open(args.config, "rb") as f:
                values = tomllib.load(f)
        except FileNotFoundError:
            raise ValueError(f"--config {args.config} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--config {args.config} is not valid TOML: {e}") from None
        for key, value in values.items():
            dest = key.replace("-", "_")
            action = actions.get(dest)
            if action is None:
                raise ValueError(f"--config {args.config}: unknown setting {key!r}; settings are the fit flags: "
                                 + ", ".join(sorted(a.replace("_", "-") for a in actions)))
            wanted = action.type or (bool if action.nargs == 0 else str)
            if wanted is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
                raise ValueError(f"--config {args.config}: {key} must be {wanted.__name__}, got {value!r}")
            if action.choices is not None and value not in action.choices:
                raise ValueError(f"--config {args.config}: {key} must be one of {list(action.choices)}, got {value!r}")
            if getattr(args, dest) is None:
                setattr(args, dest, value)
    for dest, action in actions.items():
        if action.nargs == 0 and getattr(args, dest) is None:   # a switch given nowhere
            setattr(args, dest, False)
    if args.device is None:
        args.device = "auto"
    missing = [f"--{d.replace('_', '-')}" for d in FIT_REQUIRED if getattr(args, d) is None]
    if missing:
        raise ValueError(f"fit needs {', '.join(missing)} (as flags or in --config)")
    validation = [args.val_data_root, args.val_annotations, args.val_pairs]
    if any(validation) and not all(validation):
        raise ValueError("validation needs all of --val-data-root, --val-annotations and --val-pairs")
    if args.val_every and not all(validation):
        raise ValueError("--val-every needs a held-out split: --val-data-root, --val-annotations, --val-pairs")
    if all(validation) and not args.val_every:
        raise ValueError("a held-out split was given without --val-every N (steps between validations)")
    return {dest: getattr(args, dest) for dest in actions if getattr(args, dest) is not None}


PER_INVOCATION = ("workers", "log_every", "sample_every", "save_every", "compile")   # a resume may change them


def resumed_settings(settings: dict, previous: Path, saved: dict, config, model_config, parser) -> dict:
    """The settings of a resumed run as a whole: those written when it last ran (`previous`,
    RUN/stageN-config.toml), the saved state's, then what this resume trains with and was given.

    A resume need not repeat every flag (`--steps`, `--save-every`, ... keep the run's), so the
    flags given this time alone would describe another run.
    """
    import tomllib

    known = [a.dest for a in parser._actions if a.dest not in FIT_UNSAVED + ("help",)]
    merged: dict = {}
    try:
        with open(previous, "rb") as f:
            merged.update({k.replace("-", "_"): v for k, v in tomllib.load(f).items()})
    except (OSError, tomllib.TOMLDecodeError):   # none yet, or not readable: the state has the rest
        pass
    merged.update({k: v for k, v in saved["train_config"].items() if k in PER_INVOCATION})
    trained = {"preset": config.preset, "stage": config.stage, "steps": config.steps,
               "batch_size": config.batch_size, "accumulate": config.accumulate, "lr": config.lr,
               "lambda_l1": config.lambda_l1, "loss": config.reconstruction, "one_stage": config.one_stage,
               "discriminator": config.discriminator, "no_flip": not config.flip,
               "color_jitter": config.color_jitter, "seed": config.seed, "no_bf16": not config.bf16,
               "ema": config.ema or None, "pose_embedding": model_config.pose_embedding,
               "heatmap_kind": model_config.heatmap_kind, "width": model_config.base_width,
               "g2_levels": model_config.g2_levels, "g1": saved["data"].get("g1_from"),
               "init": saved["data"].get("init_from")}
    merged.update({k: v for k, v in trained.items() if v is not None})
    merged.update(settings)
    return {k: merged[k] for k in known if merged.get(k) is not None}


def settings_toml(settings: dict) -> str:
    """The settings as a TOML file that `--config` reads back."""
    lines = ["# pg2-train fit settings of this run; rerun with --config THIS_FILE (flags override it)"]
    for dest, value in settings.items():
        key = dest.replace("_", "-")
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{key} = {value!r}")
        else:
            lines.append(f"{key} = {json.dumps(str(value))}")   # a JSON string is a TOML basic string
    return "\n".join(lines) + "\n"


def _add_fit(sub) -> None:
    from .trainer import TRAINING_DEFAULTS

    p = sub.add_parser("fit", help="train stage 1 (G1) or stage 2 (G2 + D) of PG2",
                       description="Train one stage of PG2. Every flag can also come from --config FILE.toml "
                                   "(keys are the flag names, e.g. batch-size = 8); flags override the file. "
                                   "The run directory keeps the settings used as stageN-config.toml.")
    p.add_argument("--config", metavar="TOML", help="settings file (keys: flag names); command-line flags override it")
    p.add_argument("--preset", choices=list(TRAINING_DEFAULTS),
                   help="model and official schedule, canvas W×H: market (64×128, batch 16), deepfashion (256×256, batch "
                        "1, D of 5 layers, λ 50), fashion (176×256, batch 16, D of 5 layers, λ 50, lr 2e-4), "
                        "demo (88×128, for a CPU, lr 2e-4), tiny (16×32, tests); required")
    p.add_argument("--stage", type=int, choices=[1, 2],
                   help="1: G1 alone with the pose-mask L1; 2: G2 + D with G1 frozen (from --out's stage 1 or "
                        "--g1); required")
    _add_data_arguments(p, "image folder of the training split (required)", required=False)
    p.add_argument("--out", help="run directory (state, logs, samples); required")
    p.add_argument("--resume", nargs="?", const="yes", choices=["yes", "auto"],
                   help="continue the stage from the run directory's state; `--resume auto` continues it when "
                        "there is one and starts otherwise (one command for a scheduler that requeues or "
                        "torchrun --max-restarts)")
    p.add_argument("--g1", help="stage 2: G1 from this run directory or checkpoint (default: --out's stage 1)")
    p.add_argument("--init", metavar="RUN_OR_CHECKPOINT",
                   help="fine-tune: start the stage's generator (G1 in stage 1, G2 in stage 2) from this checkpoint "
                        ".json or run directory instead of random weights; the model config is taken from it")
    p.add_argument("--steps", type=int, help="total steps of this stage (default: the preset's official count)")
    p.add_argument("--batch-size", type=int, help="per process and micro-batch (default: the preset's official batch)")
    p.add_argument("--accumulate", type=int, help="micro-batches per optimiser step: a step sees "
                                                  "accumulate × batch-size × processes pairs (default 1)")
    p.add_argument("--lr", type=float, help="Adam learning rate, betas 0.5/0.999 (default: the preset's: "
                                            "2e-5 market, deepfashion, tiny; 2e-4 fashion, demo)")
    p.add_argument("--lambda-l1", type=float, help="weight of the L1 term in stage 2 (market 10, deepfashion 50)")
    p.add_argument("--loss", choices=["pose-mask", "l1"], help="reconstruction loss (ablation: plain l1)")
    p.add_argument("--one-stage", action="store_true", default=None,
                   help="ablation: stage 1 with the adversarial loss (G1 + D)")
    p.add_argument("--discriminator", choices=["source-negative", "pair"],
                   help="code's D with the source as extra negative (default) or the paper's pair-conditioned D")
    p.add_argument("--pose-embedding", choices=["heatmaps", "ce", "hme"], help="ablation (stage 1)")
    p.add_argument("--heatmap-kind", choices=["disk", "gaussian"], help="PG2 disks (default) or PATN Gaussians")
    p.add_argument("--no-flip", action="store_true", default=None, help="no left-right flip augmentation")
    p.add_argument("--color-jitter", type=float, metavar="S",
                   help="turn hue, saturation and brightness of both images of a pair alike, at random (0–1; "
                        "default 0: off; e.g. 0.3): the model learns to copy the source's colours rather than "
                        "remember the training set's palette")
    p.add_argument("--ema", type=float, metavar="DECAY", help="keep an exponential moving average of the trained "
                                                              "generator (e.g. 0.999); validated and exported")
    p.add_argument("--seed", type=int, help="seed of weights, data order and flips (default 0)")
    p.add_argument("--workers", type=int, help="data-loader processes per training process (default 4)")
    p.add_argument("--log-every", type=int, help="steps between loss records (default 10)")
    p.add_argument("--sample-every", type=int, help="steps between sample grids (default 500)")
    p.add_argument("--save-every", type=int, help="steps between state saves (default 1000)")
    v = p.add_argument_group("validation on a held-out split (pg2-train eval's metrics; the best is kept as "
                             "RUN/best-stageN.json)")
    v.add_argument("--val-every", type=int, metavar="N", help="steps between validations")
    v.add_argument("--val-data-root", metavar="DIR", help="image folder of the held-out split")
    v.add_argument("--val-annotations", metavar="CSV", help="its annotation CSV")
    v.add_argument("--val-pairs", metavar="CSV", help="its pairs CSV")
    v.add_argument("--val-limit", type=int, metavar="N", help="score the first N pairs (default 64)")
    v.add_argument("--val-metric", choices=list(VALIDATION_METRICS),
                   help="the metric that picks the best checkpoint (default ssim_pg2; l1: lower is better; the "
                        "pose metrics, e.g. pckh_limbs_agree, detect the generated person as --val-pckh does)")
    v.add_argument("--val-pckh", action="store_true", default=None,
                   help="also detect the person in each validation image with BlazePose (the pose extra): PCKh, "
                        "limb PCKh, limb PCKh vs the detected target and the detection rate, as pg2-train eval "
                        "--pckh (a few seconds per validation)")
    p.add_argument("--device", help="auto (default), cpu, cuda (torchrun: each process its LOCAL_RANK GPU)")
    p.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's choice; on a small shared "
                                               "CPU machine 1 avoids OpenMP threads fighting over cores)")
    p.add_argument("--width", type=int, help="channels of the first level instead of the preset's (a larger or "
                                             "smaller model; saved in the checkpoint's config)")
    p.add_argument("--g2-levels", type=int, metavar="N",
                   help="levels of G2's U-Net instead of the preset's (the paper's G1 levels − 2); a deeper G2 "
                        "sees farther across the image; saved in the checkpoint's config")
    p.add_argument("--no-bf16", action="store_true", default=None,
                   help="fp32 throughout (default: bf16 autocast where the device has bf16 units: CUDA, "
                        "AMX or AVX-512-BF16 CPUs)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the networks")
    p.set_defaults(func=cmd_fit, fit_parser=p)


# -- export -----------------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run

    metrics = {}
    if args.metrics:
        metrics = json.loads(Path(args.metrics).read_text())
    json_path, weights_path = export_run(args.run_dir, args.out, dtype=args.dtype, metrics=metrics,
                                         ema=not args.no_ema, stage=args.stage)
    weights = json.loads(json_path.read_text())["provenance"]["weights"]
    print(f"wrote {json_path} and {weights_path} ("
          + ", ".join(f"{name.upper()} {kind or 'of unknown kind'}" for name, kind in weights.items()) + ")")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a run's weights as a server checkpoint (NAME.json + NAME.safetensors)")
    p.add_argument("run_dir", help="the --out of pg2-train fit")
    p.add_argument("--out", required=True, help="checkpoint path without extension, e.g. models/market")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--metrics", help="metrics.json of pg2-train eval to record in the checkpoint")
    p.add_argument("--stage", type=int, choices=[1, 2],
                   help="the stage to export (default: the newest): 1 is G1 alone, also once stage 2 has begun; "
                        "2 is G1 + G2")
    p.add_argument("--no-ema", action="store_true",
                   help="a run trained with --ema: export the stage's last weights, not the moving average (stage "
                        "2's G1 stays the one G2 was trained over)")
    p.set_defaults(func=cmd_export)


# -- eval -------------------------------------------------------------------------------------

def cmd_eval(args: argparse.Namespace) -> int:
    from pg2_server.pipeline import Pipeline

    from .evaluate import evaluate, markdown_table

    if args.device == "auto":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    perceptual = _perceptual_scores(args)  # first: a wrong weight file fails before any generation
    detector = None
    if args.pckh:  # also before any generation: a missing extra is said at once
        from pg2_server.detection import PoseDetector
        detector = PoseDetector(visibility=args.visibility, several_people=False)
    framer = None
    if args.frame_sources:
        from pg2_server.detection import PoseDetector
        framer = PoseDetector()
    pipeline = Pipeline.from_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype,
                                        backend=args.backend)
    split = _load_split(args)
    shown, shown_as = _shown_source(args.loose_sources, framer, pipeline.config.canvas)
    metrics = evaluate(pipeline, split, args.out, batch_size=args.batch_size, save_images=not args.no_images,
                       limit=args.limit, workers=args.workers, perceptual=perceptual, detector=detector,
                       shown_source=shown, shown_as=shown_as)
    print(markdown_table(metrics))
    print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'metrics.md'}")
    return 0


def _shown_source(loose: bool, framer, canvas) -> tuple:
    """What eval's --loose-sources / --frame-sources do to each source photo, and its description."""
    from pg2_server.detection import frame_person

    from .evaluate import loose_shot

    if not (loose or framer):
        return None, ""

    def shown(image):
        image = loose_shot(image) if loose else image
        return frame_person(image, framer, canvas[0] / canvas[1])[0] if framer is not None else image
    described = ["loose shots (the photo at 60 % of the height of a 3:2 landscape frame)"] if loose else []
    described += ["cropped to the detected person as serve --frame-sources does"] if framer else []
    return shown, ", then ".join(described)


def _perceptual_scores(args: argparse.Namespace):
    """IS / FID / LPIPS scorers for the weight files given, or None when none is given."""
    fid = args.fid_train_root or args.fid_train_stats
    if not (args.inception_weights or args.lpips_weights or fid):
        return None
    from .features import LPIPS, FeatureError, FidStatistics, Inception, PerceptualScores, list_images, \
        training_statistics

    if fid and not args.inception_weights:
        raise FeatureError("FID needs --inception-weights (torchvision's inception_v3_google-*.pth)")
    if args.fid_train_annotations and not args.fid_train_root:
        raise FeatureError("--fid-train-annotations goes with --fid-train-root")
    inception = Inception(args.inception_weights, args.device) if args.inception_weights else None
    lpips = LPIPS(args.lpips_weights, args.device) if args.lpips_weights else None
    reference = None
    if args.fid_train_root:
        paths = list_images(args.fid_train_root, args.fid_train_annotations)
        reference = training_statistics(inception, paths, batch_size=args.batch_size,
                                        source=str(Path(args.fid_train_root).resolve()))
        where = reference.save(args.fid_train_stats or Path(args.out) / "fid-train-stats.npz")
        print(f"FID statistics of {reference.count} training images written to {where} "
              f"(reuse them with --fid-train-stats)", file=sys.stderr)
    elif args.fid_train_stats:
        reference = FidStatistics.load(args.fid_train_stats, inception)
    return PerceptualScores(inception, lpips, reference)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="generate every test pair and score it (SSIM, mask-SSIM, PSNR, L1; "
                                    "IS, FID, LPIPS given local weight files)")
    p.add_argument("--checkpoint", required=True, help="NAME.json of pg2-train export")
    _add_data_arguments(p, "image folder of the test split")
    p.add_argument("--out", required=True, help="folder for images/, metrics.json and metrics.md")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, help="only the first N pairs")
    p.add_argument("--no-images", action="store_true", help="score without saving the generated images")
    p.add_argument("--workers", type=int, default=2, help="threads scoring images")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto (default): bfloat16 where the device has bf16 units, else float32")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "openvino"],
                   help="auto (default): OpenVINO on the CPU when installed, else torch")
    p.add_argument("--pckh", action="store_true",
                   help="also PCKh@0.5, limb PCKh and the detection rate, keypoints detected in every image with "
                        "MediaPipe BlazePose (the pose extra, see docs/pose-detection.md)")
    p.add_argument("--loose-sources", action="store_true",
                   help="show the model each source as a loosely framed shot (the photo at 60 %% of the height of a "
                        "3:2 landscape frame, the backdrop around it): how a phone photo or a wide shot does")
    p.add_argument("--frame-sources", action="store_true",
                   help="crop each source to its person first, as `pg2-server serve --frame-sources` does "
                        "(MediaPipe BlazePose, the pose extra)")
    p.add_argument("--visibility", type=float, default=0.5,
                   help="with --pckh: BlazePose visibility below which a keypoint counts as not found (default 0.5)")
    g = p.add_argument_group("perceptual metrics (pip install 'pg2-blender[metrics]'; local weight files, "
                             "nothing is downloaded)")
    g.add_argument("--inception-weights", metavar="FILE",
                   help="torchvision Inception-v3 ImageNet weights (.pth or .safetensors): adds IS and mask-IS")
    g.add_argument("--fid-train-root", metavar="DIR",
                   help="training-split image folder: adds FID against its statistics, written to "
                        "--fid-train-stats (default OUT/fid-train-stats.npz)")
    g.add_argument("--fid-train-annotations", metavar="CSV",
                   help="with --fid-train-root: only the images this annotation CSV names")
    g.add_argument("--fid-train-stats", metavar="NPZ",
                   help="FID statistics of the training images written earlier: adds FID without recomputing")
    g.add_argument("--lpips-weights", metavar="FILE",
                   help="torchvision AlexNet ImageNet weights (.pth or .safetensors): adds LPIPS (v0.1, alex)")
    p.set_defaults(func=cmd_eval)


# -- annotate ---------------------------------------------------------------------------------

def cmd_annotate(args: argparse.Namespace) -> int:
    from .annotate import annotate_folder

    return annotate_folder(args.images, args.out, visibility=args.visibility, truth=args.truth,
                           several_people=not args.one_person)


def _add_annotate(sub) -> None:
    p = sub.add_parser("annotate", help="detect COCO-18 keypoints in a folder of photos (MediaPipe BlazePose) and "
                                        "write PATN's annotation CSV, for `pairs` and `fit` on your own photos")
    p.add_argument("--images", required=True, help="folder of photos (PNG/JPEG/BMP/WebP; not recursive)")
    p.add_argument("--out", required=True, help="annotation CSV to write (name:keypoints_y:keypoints_x, -1 missing)")
    p.add_argument("--visibility", type=float, default=0.5,
                   help="BlazePose visibility below which a keypoint is written as missing (default 0.5)")
    p.add_argument("--one-person", action="store_true",
                   help="skip the search for further people (faster when each photo shows one person)")
    p.add_argument("--truth", metavar="CSV",
                   help="an annotation CSV of the same images: print the detector's PCKh@0.5 against it, per "
                        "keypoint and per view")
    p.set_defaults(func=cmd_annotate)


# -- wiring -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pg2-train", description="PG2 training: data, two-stage training, "
                                                                   "export, evaluation, benchmarks")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    prepare.add_parser(sub)
    pairs.add_parser(sub)
    _add_fit(sub)
    _add_export(sub)
    _add_eval(sub)
    _add_annotate(sub)
    bench.add_parser(sub)
    synth.add_parser(sub)
    sample_set.add_parser(sub)
    return parser


FLAG_OF = {"pose_embedding": "--pose-embedding", "heatmap_kind": "--heatmap-kind", "base_width": "--width"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (DataError, StateError, CheckpointError, KeypointError, ValueError, OSError, SetupError) as e:
        # What the user can fix; anything else is a bug and keeps its traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        import torch
        if not isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)):
            raise
        # The run's state was saved before this reached here.
        print(f"error: out of memory ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
              "lower --batch-size (with --accumulate to keep the batch) or --workers, then --resume",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
