"""Weights to serve from a run directory: the server's checkpoint format with provenance.

The newest stage is exported unless `stage` names one: stage 2 exports G1 + G2, stage 1 G1 alone
(the pipeline then serves G1's image), also once stage 2 has begun. Optimisers and D are left
behind. A run trained with `--ema` exports the moving average of the stage's generator
(`ema=False`: the last weights); stage 2's G1 is always the one it froze. The provenance's
`weights` says which each network is.
"""
from __future__ import annotations

import datetime
from pathlib import Path

from pg2_server.checkpoint import read_description, save_checkpoint
from pg2_server.model import Generator1, Generator2, ModelConfig

from .state import StateError
from .trainer import load_run_state, read_log, state_path


def _last_logged(run_dir: Path, stage: int, step: int) -> dict:
    """The stage's last log entry at or before `step` (its state's): a kill after a log line and
    before the next save leaves lines past the state, which the next resume drops."""
    log = run_dir / f"stage{stage}-log.jsonl"
    if not log.is_file():
        return {}
    entries = [e for e in read_log(log) if isinstance(e.get("step"), (int, float)) and e["step"] <= step]
    return entries[-1] if entries else {}


def _stage_record(run_dir: Path, stage: int, state: dict) -> dict:
    """What the checkpoint's provenance keeps of one trained stage."""
    step = int(state["step"])
    last = _last_logged(run_dir, stage, step)
    return {"steps": step, "processes": int(state["world_size"]),
            "train_config": state["train_config"], "precisions": state.get("precisions"),
            "last_losses": {k: v for k, v in last.items() if k != "step"},
            **({"last_losses_step": last["step"]} if last else {})}


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


def g1_weights(g1_from: str | None, stage1: dict | None) -> str | None:
    """Whether the G1 a stage 2 takes from `g1_from` is stage 1's moving average ("average") or its
    last weights ("last"); None where that is not known. `stage1`: that G1's stage-1 record."""
    if not g1_from:
        return None
    path = Path(g1_from)
    if path.suffix in (".json", ".safetensors"):   # a checkpoint holds what its export chose
        description = path.with_suffix(".json")
        if not description.is_file():
            return None
        provenance = read_description(description).get("provenance", {})
        if "weights" in provenance:
            return provenance["weights"].get("g1")
        if "ema" in provenance and "stage2" not in provenance.get("stages", {}):   # a G1-only export
            return "average" if provenance["ema"] else "last"
        return None
    ema = (stage1 or {}).get("train_config", {}).get("ema")   # a run directory: its average when kept
    return None if ema is None else ("average" if ema else "last")


def export_run(run_dir: str | Path, out: str | Path, dtype: str = "float32",
               metrics: dict | None = None, ema: bool = True, stage: int | None = None) -> tuple[Path, Path]:
    """Write `out`.json + `out`.safetensors from the run's stage `stage` (default: the newest);
    returns both paths."""
    run_dir = Path(run_dir)
    stages = [s for s in (1, 2) if state_path(run_dir, s).is_file()]
    if not stages:
        raise StateError(f"{run_dir} holds no training state (stage1.safetensors / stage2.safetensors); "
                         "is it the --out of a `pg2-train fit` run?")
    stage = stages[-1] if stage is None else stage
    if stage not in stages:
        raise StateError(f"{run_dir} holds no stage-{stage} state ({state_path(run_dir, stage).name}); "
                         + ("train stage 2 into it first, or export stage 1" if stage == 2 else
                            "its stage 2 took G1 from elsewhere (--g1): export that run's stage 1, or stage 2"))
    newest = load_run_state(run_dir, stage)
    config = ModelConfig.from_dict(newest["model_config"])
    average = newest.get("ema") if ema else None
    trained = "average" if average is not None else "last"
    g1 = Generator1(config)
    g1.load_state_dict(average if average is not None and stage == 1 else newest["g1"])
    g2 = None
    if stage == 2:
        g2 = Generator2(config)
        g2.load_state_dict(average if average is not None else newest["g2"])
    history, started_from = {}, {}
    for n in (s for s in stages if s <= stage):
        state = newest if n == stage else load_run_state(run_dir, n)
        history[f"stage{n}"] = _stage_record(run_dir, n, state)
        init_from = state.get("data", {}).get("init_from")
        if init_from and init_from not in started_from:   # fine-tuned: keep how its start was trained
            started_from[init_from] = _history_of(init_from)
    weights = {"g1": trained}
    data = newest.get("data", {})
    if stage == 2:   # how the G1 that stage 2 froze was trained, as it was when stage 2 began
        g1_history = data.get("g1_stage1") or (
            history.get("stage1") or stage1_history(data.get("g1_from")))   # runs before the record
        if g1_history:
            history = {"stage1": g1_history, **{k: v for k, v in history.items() if k != "stage1"}}
        # G1 is always the one G2 was trained over: `ema=False` chooses G2's weights only.
        weights = {"g1": data.get("g1_weights") or g1_weights(data.get("g1_from"), g1_history), "g2": trained}
    provenance = {
        "trained_by": "pg2-train",
        "run_dir": str(run_dir.resolve()),
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "stage": stage,
        "data": {k: v for k, v in data.items() if k != "g1_stage1"},   # in "stages"
        "steps": sum(h["steps"] for h in history.values()),
        "ema": average is not None,   # the exported stage's generator is its moving average
        "weights": weights,           # per network: "average" or "last" (null: not known)
        "stages": history,
        **({"init": started_from} if started_from else {}),
    }
    return save_checkpoint(out, config, g1, g2, provenance=provenance, metrics=metrics or {}, dtype=dtype)
