"""training/gpu_check.sh and training/gpu_data.py at tiny scale on the CPU: the same commands a
GPU machine runs, with the sizes turned down."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fixture_datasets import write_dataset
from pg2_server.checkpoint import load_checkpoint
from training import gpu_data

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "gpu_check.sh"


def synth_like(root: Path) -> Path:
    """A tiny set in `pg2-train synth`'s layout: 6 train and 2 test people of 4 images."""
    write_dataset(root, identities=6, views=4, split="train")
    write_dataset(root, identities=2, views=4, split="test", seed=1)
    return root


def test_gpu_data_takes_whole_people_within_the_budget(tmp_path):
    source = synth_like(tmp_path / "synth")
    person_bytes = sum(p.stat().st_size for p in (source / "train").glob("*id00000000*"))
    out = tmp_path / "carried"
    # room for 3.5 train people in 70 % of the budget, 1.5 test people in the rest
    budget_mib = 5 * person_bytes / 2 ** 20
    assert gpu_data.main([str(source), str(out), "--max-mib", str(budget_mib), "--test-share", "0.3"]) == 0
    train = sorted(p.name for p in (out / "train").iterdir())
    assert len(train) == 12 and {gpu_data.identity(n) for n in train} == {
        f"fashionWOMENTees_Tanksid{i:08d}" for i in range(3)}
    pairs = (out / "pairs-train.csv").read_text().splitlines()
    assert pairs[0] == "from,to" and len(pairs) - 1 == 3 * 4 * 3
    assert all(a in train and b in train for a, b in (line.split(",") for line in pairs[1:]))
    rows = (out / "annotation-train.csv").read_text().splitlines()
    assert rows[0].startswith("name:keypoints_y:keypoints_x") and len(rows) == 13
    assert sum(p.stat().st_size for p in (out / "train").iterdir()) <= 0.7 * budget_mib * 2 ** 20
    assert len(list((out / "test").iterdir())) == 4   # one whole test person


def test_gpu_data_refuses_a_budget_too_small_for_one_person(tmp_path, capsys):
    source = synth_like(tmp_path / "synth")
    assert gpu_data.main([str(source), str(tmp_path / "out"), "--max-mib", "0.0001"]) == 2
    assert "not even one person fits" in capsys.readouterr().err


def run_script(*args: str, env: dict) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "WHEELS": "no-wheels-here",
            "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=300)


def test_train_returns_a_checkpoint_and_its_metrics(tmp_path):
    data = tmp_path / "carried"
    assert gpu_data.main([str(synth_like(tmp_path / "synth")), str(data)]) == 0
    out = tmp_path / "out"
    result = run_script("train", env={
        "OUT": str(out), "DATA": str(data), "RUN": str(tmp_path / "run"), "PRESET": "tiny", "MAX_MIB": "0.3",
        "STAGE1_SECONDS": "120", "STAGE2_SECONDS": "120", "STEPS1": "3", "STEPS2": "2", "BATCH": "2", "WORKERS": "0", "EVAL_PAIRS": "8"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert {"pg2_gpu.json", "pg2_gpu.safetensors", "metrics.md", "train.txt", "machine.txt"} <= names
    assert len(names) <= 8  # what a GPU command can bring back
    checkpoint = load_checkpoint(out / "pg2_gpu.json")
    assert checkpoint.config.preset == "tiny" and checkpoint.config.base_width >= 8   # wider than the preset
    # the width is the largest that fits MAX_MIB in fp16
    assert (out / "pg2_gpu.safetensors").stat().st_size <= 0.3 * 2 ** 20 + 4096
    metrics = json.loads((out / "pg2_gpu.json").read_text())["metrics"]
    assert metrics and "stage 1" in (out / "train.txt").read_text()


def test_bench_writes_both_benchmarks(tmp_path):
    out = tmp_path / "out"
    result = run_script("bench", env={
        "OUT": str(out), "SWEEP_PRESETS": "tiny", "SWEEP_BATCHES": "1", "SERVE_PRESET": "tiny", "COMPILE": "none",
        "CLIENTS": "2", "REQUESTS": "8", "SWEEP_ROUNDS": "1", "TRAIN_BENCH_PRESET": "tiny", "TRAIN_BENCH_BATCH": "2",
        "TRAIN_BENCH_STEPS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    server = (out / "bench-server.txt").read_text()
    train = (out / "bench-train.txt").read_text()
    assert "| tiny | fp32 eager | torch | float32 | 1 |" in server and "served / raw:" in server
    assert "stage 1" in train and "stage 2" in train


def test_unknown_command_says_how_to_use_it(tmp_path):
    result = run_script("frobnicate", env={"OUT": str(tmp_path)})
    assert result.returncode == 2 and "usage" in result.stderr
