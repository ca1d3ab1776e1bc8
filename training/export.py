"""Weights to serve from a run directory: the server's checkpoint format with provenance.

The newest stage wins: a run with a stage-2 state exports G1 + G2, a stage-1-only run
exports G1 alone (the pipeline then serves G1's image). Optimisers and D are left behind. A
run trained with `--ema` exports the moving average of the stage's generator (`ema=False`: the
last weights).
"""
from __future__ import annotations

import datetime
from pathlib import Path

from pg2_server.checkpoint import read_description, save_checkpoint
from pg2_server.model import Generator1, Generator2, ModelConfig

from .state import StateError
from .trainer import load_run_state, read_log, state_path


def _last_logged(run_dir: Path, stage: int) -> dict:
    log = run_dir / f"stage{stage}-log.jsonl"
    if not log.is_file():
        return {}
    entries = read_log(log)
    return entries[-1] if entries else {}


def _stage_record(run_dir: Path, stage: int, state: dict) -> dict:
    """What the checkpoint's provenance keeps of one trained stage."""
    return {"steps": int(state["step"]), "processes": int(state["world_size"]),
            "train_config": state["train_config"], "precisions": state.get("precisions"),
            "last_losses": {k: v for k, v in _last_logged(run_dir, stage).items() if k != "step"}}


def _history_of(source: str, stages: tuple[int, ...] = (1, 2)) -> dict:
    """How the weights in `source` were trained: a checkpoint's own provenance (its steps, stages,
    data and `init`) or a run directory's records of `stages`; {} when it is gone."""
    path = Path(source)
    if path.suffix in (".json", ".safetensors"):
        description = path.with_suffix(".json")
        if not description.is_file():
            return {}
        provenance = read_description(description).get("provenance", {})
        return {k: provenance[k] for k in ("steps", "stages", "data", "init") if k in provenance}
    records = {f"stage{n}": _stage_record(path, n, load_run_state(path, n))
               for n in stages if state_path(path, n).is_file()}
    return {"steps": sum(h["steps"] for h in records.values()), "stages": records} if records else {}


def stage1_history(g1_from: str | None) -> dict:
    """Stage 1's record from where a stage-2 run takes its G1 (a checkpoint or a run directory),
    with `g1_from` naming it; {} when that is gone or holds no record of stage 1. A stage-2 run
    keeps it from its start (`data.g1_stage1`): stage 1 may go on training afterwards."""
    if not g1_from:
        return {}
    stage1 = _history_of(g1_from, stages=(1,)).get("stages", {}).get("stage1")
    return {**stage1, "g1_from": str(Path(g1_from))} if stage1 else {}


def export_run(run_dir: str | Path, out: str | Path, dtype: str = "float32",
               metrics: dict | None = None, ema: bool = True) -> tuple[Path, Path]:
    """Write `out`.json + `out`.safetensors from the run's newest stage; returns both paths."""
    run_dir = Path(run_dir)
    stages = [s for s in (1, 2) if state_path(run_dir, s).is_file()]
    if not stages:
        raise StateError(f"{run_dir} holds no training state (stage1.safetensors / stage2.safetensors); "
                         "is it the --out of a `pg2-train fit` run?")
    newest = load_run_state(run_dir, stages[-1])
    config = ModelConfig.from_dict(newest["model_config"])
    average = newest.get("ema") if ema else None
    g1 = Generator1(config)
    g1.load_state_dict(average if average is not None and "g2" not in newest else newest["g1"])
    g2 = None
    if "g2" in newest:
        g2 = Generator2(config)
        g2.load_state_dict(average if average is not None else newest["g2"])
    history, started_from = {}, {}
    for stage in stages:
        state = newest if stage == stages[-1] else load_run_state(run_dir, stage)
        history[f"stage{stage}"] = _stage_record(run_dir, stage, state)
        init_from = state.get("data", {}).get("init_from")
        if init_from and init_from not in started_from:   # fine-tuned: keep how its start was trained
            started_from[init_from] = _history_of(init_from)
    if "g2" in newest:   # how the G1 that stage 2 froze was trained, as it was when stage 2 began
        g1_history = newest.get("data", {}).get("g1_stage1") or (
            history.get("stage1") or stage1_history(newest.get("data", {}).get("g1_from")))   # runs before the record
        if g1_history:
            history = {"stage1": g1_history, **{k: v for k, v in history.items() if k != "stage1"}}
    provenance = {
        "trained_by": "pg2-train",
        "run_dir": str(run_dir.resolve()),
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "data": {k: v for k, v in newest.get("data", {}).items() if k != "g1_stage1"},   # in "stages"
        "steps": sum(h["steps"] for h in history.values()),
        "ema": average is not None,
        "stages": history,
        **({"init": started_from} if started_from else {}),
    }
    return save_checkpoint(out, config, g1, g2, provenance=provenance, metrics=metrics or {}, dtype=dtype)
