"""training/trainer.py and `pg2-train fit`: learning, resuming after a kill, SIGTERM, bad resumes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fixture_datasets import (  # noqa: F401 (one_torch_thread: an autouse fixture)
    break_after_header, one_torch_thread, sample_people_split, write_dataset)
from pg2_server.detection import available as detection_available
from pg2_server.model import preset
from training.cli import main
from training.data import PairDataset, load_split
from training.state import load_state, save_state
from training.trainer import Trainer, TrainConfig, load_run_state, state_path, train_config

TINY = preset("tiny")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def split(dataset):
    return load_split(dataset["images"], dataset["annotations"], dataset["pairs"])


def _fixed_batch(split, size=4):
    data = PairDataset(split, TINY)
    items = [data[(i, False)] for i in range(0, size * 5, 5)]
    return {k: torch.stack([item[k] for item in items]) for k in items[0]}


def _fit_args(dataset, out, stage, *extra):
    return ["fit", "--preset", "tiny", "--stage", str(stage), "--data-root", str(dataset["images"]),
            "--annotations", str(dataset["annotations"]), "--pairs", str(dataset["pairs"]), "--out", str(out),
            "--workers", "0", "--log-every", "1", *extra]


def test_official_defaults_per_preset():
    market = train_config("market", 1)
    assert (market.batch_size, market.steps, market.lr, market.beta1, market.beta2) == (16, 22_000, 2e-5, 0.5, 0.999)
    assert train_config("market", 2).steps == 38_000 and train_config("market", 2).lambda_l1 == 10
    deepfashion = train_config("deepfashion", 2)
    assert (deepfashion.batch_size, deepfashion.lambda_l1, deepfashion.d_layers) == (1, 50, 5)
    assert train_config("deepfashion", 1).steps + deepfashion.steps == 80_000
    assert train_config("tiny", 1, steps=7, lr=None).steps == 7
    with pytest.raises(ValueError, match="one_stage"):
        TrainConfig("tiny", 2, 1, 1, one_stage=True)
    with pytest.raises(ValueError, match="reconstruction"):
        train_config("tiny", 1, reconstruction="l2")
    with pytest.raises(ValueError, match="unknown preset"):
        train_config("huge", 1)


@pytest.mark.parametrize("stage, one_stage", [(1, False), (1, True), (2, False)])
def test_steps_lower_the_loss_on_a_fixed_batch(tmp_path, split, stage, one_stage):
    # G2 starts next to a zero difference map and moves slowly; 3e-4 keeps the GAN term tame.
    config = train_config("tiny", stage, lr=1e-3 if stage == 1 else 3e-4, one_stage=one_stage, seed=0)
    torch.manual_seed(0)
    g1_state = None
    if stage == 2:  # a G1 that has learned a little, as after stage 1
        first = Trainer(train_config("tiny", 1, lr=1e-3), TINY, tmp_path / "s1", split)
        for _ in range(30):
            first.train_step(_fixed_batch(split))
        g1_state = first.g1.state_dict()
    trainer = Trainer(config, TINY, tmp_path, split, g1_state=g1_state)
    batch = _fixed_batch(split)
    losses = [trainer.train_step(batch)["recon"].item() for _ in range(30)]
    assert losses[-1] < (0.8 if stage == 1 else 0.99) * losses[0], losses
    if stage == 2:
        assert all(torch.equal(a, b) for a, b in zip(trainer.g1.state_dict().values(), g1_state.values()))
    if config.adversarial:
        result = trainer.train_step(batch)
        assert {"g_adv", "d", "d_real", "d_fake"} <= set(result)


def _wait_for_state(path: Path, process: subprocess.Popen, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            return int(load_state(path)["step"])
        if process.poll() is not None:
            raise AssertionError(f"training ended early: {process.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError("no state was written")


def _start(dataset, out, steps, save_every, *extra, **popen):
    args = _fit_args(dataset, out, 1, "--steps", str(steps), "--save-every", str(save_every),
                     "--batch-size", "2", "--sample-every", "1000", *extra)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # as this process: same numbers
    return subprocess.Popen([sys.executable, "-m", "training.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_resume_after_kill_equals_an_uninterrupted_run(tmp_path, dataset):
    steps = 60
    killed = tmp_path / "killed"
    jitter = ("--color-jitter", "0.4")                 # its draws continue after a resume too
    process = _start(dataset, killed, steps, 4, *jitter)
    saved_at = _wait_for_state(state_path(killed, 1), process)
    process.kill()
    process.wait()
    assert 0 < saved_at < steps
    assert main(_fit_args(dataset, killed, 1, "--steps", str(steps), "--save-every", "4", "--batch-size", "2",
                          "--sample-every", "1000", "--resume", *jitter)) == 0
    straight = tmp_path / "straight"
    assert main(_fit_args(dataset, straight, 1, "--steps", str(steps), "--save-every", "1000", "--batch-size", "2",
                          "--sample-every", "1000", *jitter)) == 0
    resumed, reference = load_run_state(killed, 1), load_run_state(straight, 1)
    assert resumed["step"] == reference["step"] == steps
    for key, value in reference["g1"].items():
        torch.testing.assert_close(resumed["g1"][key], value, rtol=1e-5, atol=1e-6)
    curve = [json.loads(line) for line in (killed / "stage1-log.jsonl").read_text().splitlines()]
    reference_curve = [json.loads(line) for line in (straight / "stage1-log.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == list(range(1, steps + 1))     # one unbroken curve
    assert [c["recon"] for c in curve] == pytest.approx([c["recon"] for c in reference_curve], rel=1e-5)


def test_sigterm_saves_the_state_and_exits_143(tmp_path, dataset):
    out = tmp_path / "run"
    process = _start(dataset, out, 100_000, save_every=5)
    _wait_for_state(state_path(out, 1), process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143
    state = load_run_state(out, 1)
    last_logged = json.loads((out / "stage1-log.jsonl").read_text().splitlines()[-1])
    assert state["step"] == last_logged["step"] < 100_000
    assert "continue with --resume" in process.stderr.read()


def test_signal_to_the_whole_process_group_still_saves_the_state(tmp_path, dataset):
    # Ctrl-C in a terminal, `kill -- -PGID` and job schedulers signal the data workers too.
    out = tmp_path / "run"
    process = _start(dataset, out, 100_000, 5, "--workers", "2", start_new_session=True)
    _wait_for_state(state_path(out, 1), process)
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=60) == 143, process.stderr.read()
    state = load_run_state(out, 1)
    last_logged = json.loads((out / "stage1-log.jsonl").read_text().splitlines()[-1])
    assert state["step"] == last_logged["step"] < 100_000


def test_two_stages_write_logs_samples_and_tensorboard(tmp_path, dataset):
    out = tmp_path / "run"
    assert main(_fit_args(dataset, out, 1, "--steps", "4", "--sample-every", "2")) == 0
    assert main(_fit_args(dataset, out, 2, "--steps", "3", "--sample-every", "3", "--discriminator", "pair")) == 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "stage1-step0000002.png", "stage1-step0000004.png", "stage2-step0000003.png"]
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == ["stage1", "stage2"]
    assert list((out / "tensorboard" / "stage2").glob("events.out.tfevents.*"))
    stage2 = load_run_state(out, 2)
    assert stage2["step"] == 3 and {"g1", "g2", "d", "opt_g", "opt_d", "rng"} <= set(stage2)
    stage1 = load_run_state(out, 1)
    for key, value in stage1["g1"].items():   # G1 stayed frozen through stage 2
        assert torch.equal(stage2["g1"][key], value)
    assert stage2["train_config"]["discriminator"] == "pair"
    assert stage2["data"]["pairs_used"] == 48


def test_bad_runs_are_refused_with_a_reason(tmp_path, dataset, capsys):
    out = tmp_path / "run"
    assert main(_fit_args(dataset, out, 2, "--steps", "2")) == 2
    assert "no stage-1 state" in capsys.readouterr().err
    assert main(_fit_args(dataset, out, 1, "--steps", "2", "--resume")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(_fit_args(dataset, out, 1, "--steps", "2")) == 0
    capsys.readouterr()
    assert main(_fit_args(dataset, out, 1, "--steps", "4")) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(_fit_args(dataset, out, 1, "--steps", "4", "--resume", "--lr", "0.1")) == 2
    assert "different hyper-parameters ['lr']" in capsys.readouterr().err
    assert main(_fit_args(dataset, out, 1, "--steps", "4", "--resume", "--color-jitter", "0.3")) == 2
    assert "different hyper-parameters ['color_jitter']" in capsys.readouterr().err
    assert main(_fit_args(dataset, tmp_path / "x", 1, "--steps", "2", "--color-jitter", "2")) == 2
    assert "color_jitter is a strength in [0, 1]" in capsys.readouterr().err
    assert main(_fit_args(dataset, out, 1, "--steps", "4", "--resume", "--pose-embedding", "ce")) == 2
    assert "another model (pose_embedding heatmaps there, ce now)" in capsys.readouterr().err
    assert main(_fit_args(dataset, tmp_path / "other", 1, "--steps", "2", "--one-stage", "--loss", "l1",
                          "--pose-embedding", "hme")) == 0
    state = load_run_state(tmp_path / "other", 1)
    assert state["model_config"]["pose_embedding"] == "hme" and "d" in state


@pytest.mark.parametrize("units", ["avx512_bf16", None])
def test_cpu_trains_in_bf16_channels_last_only_with_bf16_units(tmp_path, split, monkeypatch, units):
    monkeypatch.setattr("pg2_server.pipeline.cpu_bf16_units", lambda: units)
    trainer = Trainer(train_config("tiny", 1, workers=0), TINY, tmp_path, split)
    batch = trainer._to_device(_fixed_batch(split, 2))
    coarse, _ = trainer.generate(batch)
    assert coarse.dtype == (torch.bfloat16 if units else torch.float32)
    expected = torch.channels_last if units else torch.contiguous_format
    assert trainer.memory_format == expected and batch["source"].is_contiguous(memory_format=expected)
    assert trainer.g1.encoder.stem.weight.dtype == torch.float32     # autocast: the master weights stay fp32
    losses = trainer.train_step(_fixed_batch(split, 2))
    assert torch.isfinite(losses["recon"])


def test_a_resume_on_other_hardware_records_and_warns_of_the_precision_change(tmp_path, dataset, monkeypatch,
                                                                             caplog):
    out = tmp_path / "run"
    monkeypatch.setattr("pg2_server.pipeline.cpu_bf16_units", lambda: None)
    assert main(_fit_args(dataset, out, 1, "--steps", "2")) == 0
    assert load_run_state(out, 1)["precisions"] == [[0, "float32"]]
    monkeypatch.setattr("pg2_server.pipeline.cpu_bf16_units", lambda: "amx_bf16")   # another machine
    with caplog.at_level("WARNING"):
        assert main(_fit_args(dataset, out, 1, "--steps", "3", "--resume")) == 0
    assert "trained in float32 up to step 2 and goes on in bfloat16" in caplog.text
    assert load_run_state(out, 1)["precisions"] == [[0, "float32"], [2, "bfloat16"]]
    caplog.clear()
    with caplog.at_level("WARNING"):   # the same machine again: nothing new
        assert main(_fit_args(dataset, out, 1, "--steps", "4", "--resume")) == 0
    assert "goes on in" not in caplog.text
    assert load_run_state(out, 1)["precisions"] == [[0, "float32"], [2, "bfloat16"]]
    assert main(["export", str(out), "--out", str(tmp_path / "model" / "pg2")]) == 0
    provenance = json.loads((tmp_path / "model" / "pg2.json").read_text())["provenance"]
    assert provenance["stages"]["stage1"]["precisions"] == [[0, "float32"], [2, "bfloat16"]]


def test_width_overrides_the_preset_and_is_saved_with_the_run(tmp_path, dataset):
    out = tmp_path / "wide"
    assert main(_fit_args(dataset, out, 1, "--steps", "1", "--width", "4", "--no-bf16")) == 0
    saved = load_run_state(out, 1)
    assert saved["model_config"]["base_width"] == 4 and saved["g1"]["encoder.stem.weight"].shape[0] == 4


def test_g2_levels_deepen_g2_over_a_trained_g1_and_stay_with_the_run(tmp_path, dataset, capsys):
    from pg2_server.checkpoint import load_checkpoint
    from training.export import export_run

    out = tmp_path / "deep"
    assert main(_fit_args(dataset, out, 1, "--steps", "1", "--no-bf16")) == 0
    assert load_run_state(out, 1)["model_config"]["g2_levels"] == 1                  # the tiny preset's
    assert main(_fit_args(dataset, out, 2, "--steps", "1", "--g2-levels", "3", "--no-bf16")) == 0
    state = load_run_state(out, 2)
    assert state["model_config"]["g2_levels"] == 3 and len(state["g2"]) > 0
    assert state["g2"]["encoder.2.0.weight"].shape[0] == 3 * 8                        # level 3: 3 × the width
    export_run(out, tmp_path / "model")
    model = load_checkpoint(tmp_path / "model.json")
    assert model.config.g2_levels == 3 and len(model.g2.encoder) == 3
    g1 = load_run_state(out, 1)["g1"]
    for key, value in model.g1.state_dict().items():                                  # G1 untouched by stage 2
        torch.testing.assert_close(value, g1[key], rtol=0, atol=0)
    # resuming with another depth than the run's is refused, with the way out
    assert main(_fit_args(dataset, out, 2, "--steps", "2", "--g2-levels", "2", "--resume", "--no-bf16")) == 2
    assert "G2 of 3 levels" in capsys.readouterr().err
    assert main(_fit_args(dataset, out, 2, "--steps", "2", "--resume", "--no-bf16")) == 0
    assert load_run_state(out, 2)["step"] == 2
    # a stage 1 fine-tuned from another run keeps the G2 depth asked for the stage 2 to come
    init = tmp_path / "init"
    assert main(_fit_args(dataset, init, 1, "--steps", "1", "--init", str(out), "--g2-levels", "2")) == 0
    assert load_run_state(init, 1)["model_config"]["g2_levels"] == 2


def test_init_fine_tunes_from_a_checkpoint_or_a_run(tmp_path, dataset, capsys):
    from pg2_server.checkpoint import load_checkpoint
    from training.export import export_run

    first = tmp_path / "first"
    assert main(_fit_args(dataset, first, 1, "--steps", "2", "--width", "4", "--lr", "1e-3", "--no-bf16")) == 0
    assert main(_fit_args(dataset, first, 2, "--steps", "2", "--lr", "1e-3", "--no-bf16")) == 0
    export_run(first, tmp_path / "model")
    model = load_checkpoint(tmp_path / "model.json")
    # stage 1 from the checkpoint's G1: its width comes with it; a step of lr 1e-12 leaves the weights as given
    tuned = tmp_path / "tuned"
    still = ("--steps", "1", "--lr", "1e-12", "--no-bf16")
    assert main(_fit_args(dataset, tuned, 1, "--init", str(tmp_path / "model.json"), *still)) == 0
    state = load_run_state(tuned, 1)
    assert state["model_config"]["base_width"] == 4 and state["data"]["init_from"].endswith("model.json")
    for key, value in model.g1.state_dict().items():
        torch.testing.assert_close(state["g1"][key], value, rtol=0, atol=1e-9)
    export_run(tuned, tmp_path / "g1only")
    assert main(_fit_args(dataset, tuned, 1, "--init", str(tmp_path / "model.json"), "--resume",
                          *still[:1], "2", *still[2:])) == 0     # the same command goes on after a stop
    assert load_run_state(tuned, 1)["step"] == 2
    # stage 2 from the first run's G2, with the tuned G1
    assert main(_fit_args(dataset, tuned, 2, "--init", str(first), *still)) == 0
    for key, value in load_run_state(first, 2)["g2"].items():
        torch.testing.assert_close(load_run_state(tuned, 2)["g2"][key], value, rtol=0, atol=1e-9)
    # refused: another width than the weights, a run without that stage, a checkpoint without G2
    assert main(_fit_args(dataset, tmp_path / "w", 1, "--steps", "1", "--init", str(first), "--width", "8")) == 2
    assert "width 4" in capsys.readouterr().err
    assert main(_fit_args(dataset, tmp_path / "e", 1, "--steps", "1", "--init", str(tmp_path / "nothing"))) == 2
    assert "no stage-1 state" in capsys.readouterr().err
    assert main(_fit_args(dataset, tmp_path / "s2", 2, "--steps", "1", "--init", str(tmp_path / "g1only.json"),
                          "--g1", str(tuned))) == 2
    assert "holds no G2" in capsys.readouterr().err


def _logged(out: Path, stage: int = 1) -> list[dict]:
    return [json.loads(line) for line in (out / f"stage{stage}-log.jsonl").read_text().splitlines()]


def _finish(process: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """(exit status, stderr) of a run started in its own session; a hung run is killed with its loader workers."""
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)   # the workers ignore SIGTERM
        _, stderr = process.communicate()
        pytest.fail(f"fit still running after {timeout} s: {stderr[-2000:]}")
    return process.returncode, stderr


@pytest.mark.timeout(180)
def test_an_undecodable_image_with_workers_is_skipped_and_counted(tmp_path):
    data = write_dataset(tmp_path / "data")
    break_after_header(data["images"] / data["names"][3][3])   # its header reads, its pixels do not
    out = tmp_path / "run"
    process = _start(data, out, 30, 1000, "--workers", "2", start_new_session=True)
    returncode, stderr = _finish(process, timeout=120)          # it used to wait forever for its workers
    assert returncode == 0, stderr
    curve = _logged(out)
    assert curve[-1]["step"] == 30 and curve[-1]["skipped_images"] > 0
    assert "skipping pair" in stderr and data["names"][3][3] in stderr
    assert load_run_state(out, 1)["skipped_images"] == curve[-1]["skipped_images"]


@pytest.mark.timeout(180)
def test_strict_stops_at_an_undecodable_image_and_saves_first(tmp_path):
    data = write_dataset(tmp_path / "data")
    break_after_header(data["images"] / data["names"][3][3])
    out = tmp_path / "run"
    process = _start(data, out, 100_000, 100_000, "--workers", "2", "--strict", start_new_session=True)
    returncode, stderr = _finish(process, timeout=120)
    assert returncode == 2, stderr
    assert "cannot read image" in stderr and data["names"][3][3] in stderr
    state = load_run_state(out, 1)     # saved on the way out, although --save-every was never reached
    curve = _logged(out)
    assert state["step"] == (curve[-1]["step"] if curve else 0) < 100_000
    assert "state saved" in stderr and "--resume" in stderr


def test_an_error_inside_an_update_keeps_the_last_whole_state(tmp_path, split, monkeypatch):
    trainer = Trainer(train_config("tiny", 1, steps=50, workers=0, save_every=3), TINY, tmp_path, split)
    calls = {"n": 0}
    step = torch.optim.Adam.step

    def failing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("out of memory (simulated)")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", failing_step)
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.fit()
    assert load_run_state(tmp_path, 1)["step"] == 3      # the periodic save, not half of step 5

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    other = Trainer(train_config("tiny", 1, steps=50, workers=0, sample_every=1), TINY, tmp_path / "b", split)
    monkeypatch.setattr(other, "sample_grid", lambda samples: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        other.fit()
    assert load_run_state(tmp_path / "b", 1)["step"] == 1   # failed after a whole step: saved


def test_a_run_removes_what_a_killed_save_left(tmp_path, dataset):
    out = tmp_path / "run"
    out.mkdir()
    leftover = out / ".stage1.safetensors.k2x9a1.tmp"
    leftover.write_bytes(b"\0" * 1000)
    os.utime(leftover, (time.time() - 3600, time.time() - 3600))   # the kill was an hour ago
    unrelated = out / "notes.tmp"
    unrelated.write_text("mine")
    assert main(_fit_args(dataset, out, 1, "--steps", "1")) == 0
    assert not leftover.exists() and unrelated.exists()


def test_resume_with_other_pairs_is_refused(tmp_path, dataset, capsys):
    out = tmp_path / "run"
    assert main(_fit_args(dataset, out, 1, "--steps", "2")) == 0
    fewer = tmp_path / "fewer-pairs.csv"
    fewer.write_text("".join(dataset["pairs"].read_text().splitlines(keepends=True)[:30]))
    args = _fit_args(dataset, out, 1, "--steps", "4", "--resume")
    args[args.index("--pairs") + 1] = str(fewer)
    capsys.readouterr()
    assert main(args) == 2
    assert "--resume with other pairs" in capsys.readouterr().err
    assert main(_fit_args(dataset, out, 1, "--steps", "4", "--resume")) == 0


def test_a_batch_larger_than_the_pairs_is_refused(tmp_path, dataset, capsys):
    assert main(_fit_args(dataset, tmp_path / "run", 1, "--steps", "2", "--batch-size", "64")) == 2
    assert "batch 64 is larger than the 48 pairs" in capsys.readouterr().err


def test_accumulated_micro_batches_make_the_step_of_the_whole_batch(tmp_path, split):
    batch = _fixed_batch(split)
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    whole = Trainer(train_config("tiny", 1, lr=1e-4, bf16=False), TINY, tmp_path / "a", split)
    accumulated = Trainer(train_config("tiny", 1, lr=1e-4, accumulate=2, bf16=False), TINY, tmp_path / "b", split)
    for _ in range(3):
        expected = whole.train_step(batch)
        got = accumulated.train_step(halves)
        assert float(got["recon"]) == pytest.approx(float(expected["recon"]), rel=1e-5)
    for key, value in whole.g1.state_dict().items():
        torch.testing.assert_close(accumulated.g1.state_dict()[key], value, rtol=0, atol=1e-6)
    out = tmp_path / "run"   # the data stream advances by accumulate × batch per step
    Trainer(train_config("tiny", 1, steps=2, batch_size=2, accumulate=3, workers=0), TINY, out, split).fit()
    assert load_run_state(out, 1)["samples_per_rank"] == 12


def test_a_state_from_before_a_setting_existed_resumes_with_its_default(tmp_path, dataset, capsys):
    out = tmp_path / "run"
    assert main(_fit_args(dataset, out, 1, "--steps", "2", "--batch-size", "2")) == 0
    state = load_state(state_path(out, 1))
    del state["train_config"]["color_jitter"]           # as a run saved by an older version
    save_state(state_path(out, 1), state)
    assert main(_fit_args(dataset, out, 1, "--steps", "3", "--batch-size", "2", "--resume")) == 0
    assert load_run_state(out, 1)["step"] == 3
    save_state(state_path(out, 1), state)               # back to the old step-2 state
    assert main(_fit_args(dataset, out, 1, "--steps", "3", "--batch-size", "2", "--resume", "--color-jitter", "0.2")) == 2
    assert "different hyper-parameters ['color_jitter']" in capsys.readouterr().err


def test_ema_is_kept_resumed_and_exported(tmp_path, dataset, split):
    from pg2_server.checkpoint import load_checkpoint
    from training.export import export_run

    trainer = Trainer(train_config("tiny", 1, lr=1e-3, ema=0.5), TINY, tmp_path, split)
    before = {k: v.clone() for k, v in trainer.g1.state_dict().items()}
    trainer.train_step(_fixed_batch(split))
    for key, value in trainer.g1.state_dict().items():   # one step: halfway between old and new weights
        torch.testing.assert_close(trainer.ema.state_dict()[key], 0.5 * before[key] + 0.5 * value)
    out = tmp_path / "run"
    assert main(_fit_args(dataset, out, 1, "--steps", "3", "--ema", "0.9")) == 0
    state = load_run_state(out, 1)
    assert not all(torch.equal(state["ema"][k], state["g1"][k]) for k in state["g1"])
    export_run(out, tmp_path / "model")
    exported = load_checkpoint(tmp_path / "model.json")
    assert exported.provenance["ema"] is True
    assert all(torch.equal(exported.g1.state_dict()[k], state["ema"][k]) for k in state["ema"])
    assert main(["export", str(out), "--out", str(tmp_path / "raw"), "--no-ema"]) == 0
    raw = load_checkpoint(tmp_path / "raw.json")
    assert all(torch.equal(raw.g1.state_dict()[k], state["g1"][k]) for k in state["g1"])
    assert main(_fit_args(dataset, out, 1, "--steps", "5", "--ema", "0.9", "--resume")) == 0
    assert main(_fit_args(dataset, out, 1, "--steps", "6", "--resume")) == 2      # EMA is part of the run
    assert main(_fit_args(dataset, out, 2, "--steps", "1")) == 0   # stage 2 starts from stage 1's average
    ema = load_run_state(out, 1)["ema"]
    assert all(torch.equal(load_run_state(out, 2)["g1"][k], ema[k]) for k in ema)


def test_validation_scores_the_held_out_split_and_keeps_the_best(tmp_path, dataset, capsys, caplog):
    from pg2_server.pipeline import Pipeline

    held_out = write_dataset(tmp_path / "val", split="test", identities=2, seed=1)
    out = tmp_path / "run"
    validation = ["--val-every", "2", "--val-data-root", str(held_out["images"]), "--val-annotations",
                  str(held_out["annotations"]), "--val-pairs", str(held_out["pairs"]), "--val-limit", "6"]
    assert main(_fit_args(dataset, out, 1, "--steps", "4", "--lr", "1e-3", *validation)) == 0
    records = [json.loads(line) for line in (out / "stage1-validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert {"ssim_pg2", "ssim_patn", "mask_ssim", "psnr", "l1"} <= set(records[0])
    best = max(records, key=lambda r: r["ssim_pg2"])
    state = load_run_state(out, 1)
    assert {k: state["best"][k] for k in ("step", "metric", "value")} == {
        "step": best["step"], "metric": "ssim_pg2", "value": best["ssim_pg2"]}
    pipeline = Pipeline.from_checkpoint(out / "best-stage1.json")
    assert pipeline.provenance["step"] == best["step"]
    assert pipeline.metrics["rows"]["g1"]["ssim_pg2"] == pytest.approx(best["ssim_pg2"])
    assert "best ssim_pg2" in capsys.readouterr().err
    assert main(_fit_args(dataset, tmp_path / "other", 1, "--steps", "2", "--val-every", "2")) == 2
    assert "held-out split" in capsys.readouterr().err
    # Scored on other pairs, the saved best does not compare: the next validation starts anew.
    validation[-1] = "3"
    assert main(_fit_args(dataset, out, 1, "--steps", "6", "--lr", "1e-3", *validation, "--resume")) == 0
    assert "the next validation starts a new best" in caplog.text
    assert load_run_state(out, 1)["best"]["step"] == 6
    assert Pipeline.from_checkpoint(out / "best-stage1.json").provenance["step"] == 6


def test_a_best_checkpoint_that_could_not_be_written_is_not_remembered(tmp_path, dataset, capsys):
    held_out = write_dataset(tmp_path / "val", split="test", identities=2, seed=1)
    out = tmp_path / "run"
    (out / "best-stage1.json").mkdir(parents=True)       # the write fails, as on a full disk
    validation = ["--val-every", "2", "--val-data-root", str(held_out["images"]), "--val-annotations",
                  str(held_out["annotations"]), "--val-pairs", str(held_out["pairs"]), "--val-limit", "4"]
    assert main(_fit_args(dataset, out, 1, "--steps", "2", *validation)) == 2
    assert "best-stage1.json" in capsys.readouterr().err
    assert "best" not in load_run_state(out, 1)


def test_a_log_line_cut_short_by_a_kill_neither_stops_resume_nor_export(tmp_path, dataset, caplog):
    out = tmp_path / "run"
    assert main(_fit_args(dataset, out, 1, "--steps", "2")) == 0
    with open(out / "stage1-log.jsonl", "a") as f:
        f.write('{"step": 3, "recon": 2.4')            # killed mid-write
    assert main(["export", str(out), "--out", str(tmp_path / "model")]) == 0
    assert main(_fit_args(dataset, out, 1, "--steps", "3", "--resume")) == 0
    assert "stage1-log.jsonl:3 is not a whole log entry" in caplog.text
    steps = [json.loads(line)["step"] for line in (out / "stage1-log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_resume_without_steps_continues_to_the_runs_own_target(tmp_path, dataset):
    out = tmp_path / "run"
    assert main(_fit_args(dataset, out, 1, "--steps", "2")) == 0
    assert main(_fit_args(dataset, out, 1, "--resume")) == 0     # not the preset's thousands of steps
    assert load_run_state(out, 1)["step"] == 2
    assert main(_fit_args(dataset, out, 1, "--resume", "--steps", "3")) == 0
    assert load_run_state(out, 1)["step"] == 3


def test_resume_auto_is_one_command_for_the_first_start_and_every_restart(tmp_path, dataset):
    out = tmp_path / "run"
    assert main(_fit_args(dataset, out, 1, "--steps", "2", "--resume", "auto")) == 0    # nothing saved: starts
    assert load_run_state(out, 1)["step"] == 2
    assert main(_fit_args(dataset, out, 1, "--steps", "3", "--resume", "auto")) == 0    # saved: continues
    assert load_run_state(out, 1)["step"] == 3
    assert main(_fit_args(dataset, out, 1, "--steps", "3", "--resume")) == 0           # plain --resume still works


def test_a_resumed_stage_two_refuses_another_g1_or_model(tmp_path, dataset, capsys):
    first, other = tmp_path / "first", tmp_path / "other"
    for run in (first, other):
        assert main(_fit_args(dataset, run, 1, "--steps", "1")) == 0
    assert main(_fit_args(dataset, first, 2, "--steps", "1")) == 0
    assert main(_fit_args(dataset, first, 2, "--steps", "2", "--resume", "--g1", str(other))) == 2
    assert "trains stage 2 over the G1 of" in capsys.readouterr().err
    assert main(_fit_args(dataset, first, 2, "--steps", "2", "--resume", "--width", "64")) == 2
    assert "a different --width" in capsys.readouterr().err
    assert main(_fit_args(dataset, first, 2, "--steps", "2", "--resume", "--g1", str(first))) == 0


@pytest.mark.skipif(not detection_available(), reason="the pose extra (mediapipe 0.10.14) is not installed")
def test_validation_by_limb_pckh_detects_the_generated_people(tmp_path):
    from pg2_server.pipeline import Pipeline, default_checkpoint

    images, annotations, pairs = sample_people_split(tmp_path / "people")
    split = ["--data-root", str(images), "--annotations", str(annotations), "--pairs", str(pairs)]
    out = tmp_path / "run"
    # the bundled model barely moved (lr 1e-6): people a detector finds, in the six sample poses
    assert main(["fit", "--preset", "demo", "--width", "32", "--stage", "1", "--init", str(default_checkpoint()),
                 *split, "--out", str(out), "--workers", "0", "--batch-size", "2", "--lr", "1e-6", "--steps", "2",
                 "--val-every", "1",
                 "--val-data-root", str(images), "--val-annotations", str(annotations), "--val-pairs", str(pairs),
                 "--val-metric", "pckh_limbs_agree"]) == 0
    records = [json.loads(line) for line in (out / "stage1-validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert record["detected"] >= 0.5 and 0 < record["pckh_limbs_agree"] <= 1
        assert 0 < record["pckh_limbs"] <= 1 and 0 < record["pckh"] <= 1 and record["ssim_pg2"] > 0.5
        assert 0 <= record["turned_back"] <= 1 and 0 <= record["pckh_limbs_agree_front"] <= 1   # per view too
    best = max(records, key=lambda r: r["pckh_limbs_agree"])
    assert {k: v for k, v in load_run_state(out, 1)["best"].items() if k != "scored_on"} == {
        "step": best["step"], "metric": "pckh_limbs_agree", "value": best["pckh_limbs_agree"]}
    kept = Pipeline.from_checkpoint(out / "best-stage1.json").metrics
    assert kept["rows"]["g1"]["pckh_limbs_agree"] == pytest.approx(best["pckh_limbs_agree"])
    assert kept["views"]["back"]["g1"]["images"] == 2     # scored per view as pg2-train eval --pckh
    config = train_config("demo", 1, val_pckh=False, val_metric="detected")
    assert config.validates_pose and train_config("demo", 1, val_pckh=True).validates_pose
    assert not train_config("demo", 1).validates_pose


def test_validation_by_pckh_without_the_pose_extra_stops_before_training(tmp_path, dataset, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mediapipe.python.solutions", None)   # import fails as if absent
    held_out = write_dataset(tmp_path / "val", split="test", identities=2, seed=1)
    out = tmp_path / "run"
    assert main(_fit_args(dataset, out, 1, "--steps", "2", "--val-every", "1", "--val-pckh",
                          "--val-data-root", str(held_out["images"]), "--val-annotations",
                          str(held_out["annotations"]), "--val-pairs", str(held_out["pairs"]))) == 2
    assert "pip install --no-deps mediapipe==0.10.14" in capsys.readouterr().err
    assert not state_path(out, 1).exists()


def test_log_line_has_peak_memory_and_flops(tmp_path, dataset):
    out = tmp_path / "run"
    assert main(_fit_args(dataset, out, 1, "--steps", "2")) == 0
    line = _logged(out)[-1]
    assert 0.05 < line["peak_rss_gib"] < 64 and line["tflops"] > 0
    assert "mfu" not in line     # no known peak for a CPU


def test_mfu_is_the_achieved_share_of_the_devices_peak(tmp_path, split, monkeypatch):
    import training.trainer

    monkeypatch.setattr(training.trainer, "peak_tflops", lambda device: 0.5)   # as a GPU the runtime knows
    trainer = Trainer(train_config("tiny", 1), TINY, tmp_path, split)
    trainer.flop_per_step = 2e9
    figures = trainer._machine_figures(steps_per_second=100.0)
    assert figures["tflops"] == pytest.approx(0.2) and figures["mfu"] == pytest.approx(0.4)


def test_config_file_with_flags_overriding_it_and_saved_in_the_run(tmp_path, dataset, capsys):
    config = tmp_path / "run.toml"
    config.write_text(f'preset = "tiny"\nstage = 1\ndata-root = "{dataset["images"]}"\n'
                      f'annotations = "{dataset["annotations"]}"\npairs = "{dataset["pairs"]}"\n'
                      f'steps = 3\nbatch_size = 2\nworkers = 0\nlr = 1e-3\nno-flip = true\n')
    out = tmp_path / "run"
    assert main(["fit", "--config", str(config), "--out", str(out), "--steps", "2"]) == 0
    state = load_run_state(out, 1)
    assert state["step"] == 2                                    # the flag won
    assert (state["train_config"]["batch_size"], state["train_config"]["lr"]) == (2, 1e-3)
    assert state["train_config"]["flip"] is False
    saved = out / "stage1-config.toml"
    assert main(["fit", "--config", str(saved), "--steps", "4", "--resume"]) == 0   # the run's own file
    assert load_run_state(out, 1)["step"] == 4
    config.write_text(config.read_text() + "batch = 3\n")
    assert main(["fit", "--config", str(config), "--out", str(tmp_path / "x")]) == 2
    assert "unknown setting 'batch'" in capsys.readouterr().err
    config.write_text('preset = "tiny"\nstage = "one"\n')
    assert main(["fit", "--config", str(config), "--out", str(tmp_path / "x")]) == 2
    assert "stage must be int" in capsys.readouterr().err
    assert main(["fit", "--preset", "tiny", "--out", str(tmp_path / "x")]) == 2
    assert "fit needs --stage, --data-root, --annotations, --pairs" in capsys.readouterr().err


def test_help_states_each_presets_learning_rate():
    from training.cli import build_parser
    from training.trainer import TRAINING_DEFAULTS

    fit = build_parser()._subparsers._group_actions[0].choices["fit"]
    helps = {a.dest: a.help or "" for a in fit._actions}
    assert "G1 alone" in helps["stage"] and "deepfashion" in helps["preset"]
    stated = {}   # "(default: the preset's: 2e-5 market, deepfashion, tiny; 2e-4 demo)"
    for part in helps["lr"].split("the preset's:")[1].rstrip(")").split(";"):
        value, names = part.split(maxsplit=1)
        stated.update({name.strip(): float(value) for name in names.split(",")})
    assert stated == {name: train_config(name, 1).lr for name in TRAINING_DEFAULTS}


def test_pg2_train_keeps_a_bugs_traceback(monkeypatch):
    import training.cli

    def broken(args):
        raise TypeError("a bug")

    monkeypatch.setattr(training.cli, "cmd_export", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["export", "run", "--out", "ckpt"])


def test_images_skipped_since_the_last_log_line_survive_a_stop_and_resume(tmp_path):
    """A stop between two log lines saves the skipped-image count with it: a resumed run ends
    with the same count as one that ran straight through."""
    data = write_dataset(tmp_path / "data")
    for group in list(data["names"].values())[:2]:
        break_after_header(data["images"] / group[0])        # their pairs are skipped when loaded
    split = load_split(data["images"], data["annotations"], data["pairs"])
    settings = dict(steps=12, batch_size=4, workers=0, log_every=4, sample_every=1000, save_every=1000)
    straight = Trainer(train_config("tiny", 1, **settings), preset("tiny"), tmp_path / "straight", split).fit()

    class StopsDuringStep6(Trainer):     # as SIGTERM arriving then would
        def train_step(self, batch):
            if self.step == 5:
                self.stop_requested = True
            return super().train_step(batch)
    StopsDuringStep6(train_config("tiny", 1, **settings), preset("tiny"), tmp_path / "halves", split).fit()
    assert load_run_state(tmp_path / "halves", 1)["step"] == 6
    resumed = Trainer(train_config("tiny", 1, **settings), preset("tiny"), tmp_path / "halves", split,
                      resume=True).fit()
    assert straight["skipped_images"] > 0 and resumed["skipped_images"] == straight["skipped_images"]
    assert resumed["recon"] == straight["recon"]
    assert sorted(p.name for p in (tmp_path / "halves" / "tensorboard").iterdir()) == ["stage1"]


def test_out_of_memory_saves_and_exits_with_status_2(tmp_path, dataset, monkeypatch, capsys):
    real = Trainer.train_step

    def step(self, batch):
        if self.step == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, batch)
    monkeypatch.setattr(Trainer, "train_step", step)
    out = tmp_path / "run"
    assert main(_fit_args(dataset, out, 1, "--steps", "5")) == 2
    assert "error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); lower --batch-size" \
        in capsys.readouterr().err
    assert load_run_state(out, 1)["step"] == 2


def test_a_resume_at_the_target_says_how_to_train_further(tmp_path, dataset, capsys):
    out = tmp_path / "run"
    assert main(_fit_args(dataset, out, 1, "--steps", "2")) == 0
    capsys.readouterr()
    assert main(_fit_args(dataset, out, 1, "--resume")) == 0
    err = capsys.readouterr().err
    assert "stage 1 was already at its 2 steps" in err and "--steps N with --resume trains further" in err
    assert load_run_state(out, 1)["step"] == 2


def test_after_running_out_of_memory_a_resume_may_split_each_step_into_micro_batches(tmp_path, dataset, capsys,
                                                                                   caplog):
    """The out-of-memory advice: --batch-size lower and --accumulate higher, the product kept."""
    same = ("--no-bf16", "--lr", "1e-3")
    straight, halved = tmp_path / "straight", tmp_path / "halved"
    assert main(_fit_args(dataset, straight, 1, "--steps", "4", "--batch-size", "4", *same)) == 0
    assert main(_fit_args(dataset, halved, 1, "--steps", "2", "--batch-size", "4", *same)) == 0
    capsys.readouterr()
    with caplog.at_level("INFO"):
        assert main(_fit_args(dataset, halved, 1, "--steps", "4", "--batch-size", "2", "--accumulate", "2",
                              "--resume", *same)) == 0
    assert "each step's 4 pairs per process now come as 2 micro-batch(es) of 2 (the run so far: 1 of 4); " \
           "the data order continues" in caplog.text
    resumed, reference = load_run_state(halved, 1), load_run_state(straight, 1)
    assert resumed["samples_per_rank"] == reference["samples_per_rank"] == 16
    for key, value in reference["g1"].items():      # the same pairs, in the same steps
        torch.testing.assert_close(resumed["g1"][key], value, rtol=1e-5, atol=1e-6)
    assert [e["recon"] for e in _logged(halved)] == pytest.approx([e["recon"] for e in _logged(straight)], rel=1e-5)
    # another number of pairs per step is refused, saying what to keep
    assert main(_fit_args(dataset, halved, 1, "--steps", "5", "--batch-size", "2", "--resume", *same)) == 2
    assert "--batch-size 2 × --accumulate 1 = 2 pairs per process and step, but the run takes 2 × 2 = 4: keep the " \
           "product (e.g. --batch-size 2 --accumulate 2)" in capsys.readouterr().err
    # stage 2: D's batch norm takes its statistics per micro-batch, so the steps change: a warning
    assert main(_fit_args(dataset, halved, 2, "--steps", "1", "--batch-size", "4", "--no-bf16")) == 0
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(_fit_args(dataset, halved, 2, "--steps", "2", "--batch-size", "2", "--accumulate", "2",
                              "--resume", "--no-bf16")) == 0
    assert "D's batch norm now takes its statistics over micro-batches of 2 instead of 4" in caplog.text
    assert load_run_state(halved, 2)["step"] == 2


def test_a_resume_writes_the_whole_runs_settings_for_config(tmp_path, dataset):
    out = tmp_path / "run"
    hyper = ("--batch-size", "2", "--lr", "1e-3", "--no-flip", "--seed", "5")
    assert main(_fit_args(dataset, out, 1, "--steps", "3", "--save-every", "2", "--sample-every", "3", *hyper)) == 0
    # a resume repeats what it must and changes how often it logs; its target stays the run's 3 steps
    assert main(_fit_args(dataset, out, 1, "--resume", "--log-every", "2", *hyper)) == 0
    settings = (out / "stage1-config.toml").read_text()
    assert "steps = 3\n" in settings and "save-every = 2\n" in settings and "log-every = 2\n" in settings
    again = tmp_path / "again"
    assert main(["fit", "--config", str(out / "stage1-config.toml"), "--out", str(again)]) == 0
    state, original = load_run_state(again, 1), load_run_state(out, 1)
    assert state["step"] == original["step"] == 3
    config = state["train_config"]
    assert (config["batch_size"], config["lr"], config["flip"], config["seed"], config["save_every"],
            config["sample_every"], config["log_every"]) == (2, 1e-3, False, 5, 2, 3, 2)
    for key, value in original["g1"].items():       # the same run again
        torch.testing.assert_close(state["g1"][key], value, rtol=1e-5, atol=1e-6)
    assert main(["fit", "--config", str(out / "stage1-config.toml"), "--resume", "--steps", "4"]) == 0
    assert load_run_state(out, 1)["step"] == 4


def test_a_changed_val_metric_sets_the_earlier_best_aside_and_says_so(tmp_path, dataset, caplog):
    held_out = write_dataset(tmp_path / "val", split="test", identities=2, seed=1)
    out = tmp_path / "run"
    validation = ["--val-every", "2", "--val-data-root", str(held_out["images"]), "--val-annotations",
                  str(held_out["annotations"]), "--val-pairs", str(held_out["pairs"]), "--val-limit", "4"]
    assert main(_fit_args(dataset, out, 1, "--steps", "2", *validation)) == 0
    assert load_run_state(out, 1)["best"]["metric"] == "ssim_pg2"
    with caplog.at_level("WARNING"):
        assert main(_fit_args(dataset, out, 1, "--steps", "4", "--resume", "--val-metric", "l1", *validation)) == 0
    assert "--val-metric changed from ssim_pg2 to l1: the best so far (step 2, ssim_pg2 " in caplog.text
    assert f"the next validation starts a new best by l1; the earlier best checkpoint is now " \
           f"{out / 'best-stage1-ssim_pg2.json'}" in caplog.text
    earlier = json.loads((out / "best-stage1-ssim_pg2.json").read_text())
    assert earlier["provenance"]["step"] == 2 and "ssim_pg2" in earlier["metrics"]["rows"]["g1"]
    assert (out / "best-stage1-ssim_pg2.safetensors").is_file()
    best = load_run_state(out, 1)["best"]
    assert (best["metric"], best["step"]) == ("l1", 4)
    assert json.loads((out / "best-stage1.json").read_text())["provenance"]["step"] == 4


@pytest.mark.parametrize("name", ["SIGHUP", "SIGUSR1"])
def test_hangup_and_usr1_save_the_state_and_exit_143(tmp_path, dataset, name):
    """A closed terminal or SSH session hangs up the whole process group (loader workers too);
    batch schedulers send SIGUSR1 ahead of a time limit."""
    if not hasattr(signal, name):
        pytest.skip(f"no {name} on this platform")
    out = tmp_path / "run"
    process = _start(dataset, out, 100_000, 5, "--workers", "1", start_new_session=True)
    _wait_for_state(state_path(out, 1), process)
    os.killpg(process.pid, getattr(signal, name))
    returncode, stderr = _finish(process, timeout=60)
    assert returncode == 143, stderr
    state = load_run_state(out, 1)
    assert state["step"] == _logged(out)[-1]["step"] < 100_000
    assert "continue with --resume" in stderr
