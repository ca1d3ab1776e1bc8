"""training/distributed.py: two gloo processes under torchrun keep identical parameters."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixture_datasets import write_dataset
from pg2_server.model import Generator1, preset
from training.data import load_split
from training.distributed import Distributed, any_rank, init_distributed
from training.trainer import Trainer, load_run_state, train_config

STEPS = 4

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent('''
    import sys
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    from pg2_server.model import preset
    from training.data import load_split
    from training.distributed import init_distributed, shutdown
    from training.trainer import Trainer, train_config, load_run_state
    SETTINGS = dict(steps=STEPS, batch_size=2, workers=0, lr=1e-4, log_every=1, bf16=False)

    images, annotations, pairs, out = sys.argv[1:5]
    job = init_distributed("cpu")
    split = load_split(images, annotations, pairs)
    config = preset("tiny")
    stage1 = Trainer(train_config("tiny", 1, **SETTINGS), config, out, split, job)
    stage1.fit()
    stage2 = Trainer(train_config("tiny", 2, **SETTINGS), config, out, split, job,
                     g1_state=stage1.g1.state_dict())
    stage2.fit()
    tensors = {f"g1.{k}": v for k, v in stage1.g1.state_dict().items()}
    tensors.update({f"g2.{k}": v for k, v in stage2.g2.state_dict().items()})
    tensors.update({f"d.{k}": v.detach() for k, v in stage2.d.state_dict().items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out}/rank{job.rank}.safetensors")
    shutdown(job)
''')


def test_one_process_needs_no_process_group():
    job = init_distributed("cpu")
    assert job == Distributed(0, 1, 0, torch.device("cpu")) and job.is_main and not job.enabled
    assert any_rank(True, job) and not any_rank(False, job)


def test_two_gloo_processes_keep_parameters_identical(tmp_path):
    data = write_dataset(tmp_path)
    script = tmp_path / "worker.py"
    script.write_text(WORKER.replace("STEPS", str(STEPS)))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(data["images"]), str(data["annotations"]), str(data["pairs"]), str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # D's batch norm is synchronised, so its running statistics agree too. Only rank 0 wrote files.
    assert any(k.endswith("running_var") for k in rank0)
    torch.manual_seed(0)   # the trainer's initial G1 (seed 0): training moved it
    initial = Generator1(preset("tiny")).state_dict()
    assert not all(torch.equal(initial[k], rank0[f"g1.{k}"]) for k in initial)
    assert (out / "stage1.safetensors").is_file() and (out / "stage2.safetensors").is_file()
    assert len((out / "stage1-log.jsonl").read_text().splitlines()) == STEPS

    # Two processes of batch 2 take the step of one process of batch 4: the same pairs and flips,
    # gradients averaged, D's batch statistics over all 4 samples, losses averaged for the log.
    split = load_split(data["images"], data["annotations"], data["pairs"])
    single = tmp_path / "single"
    settings = dict(steps=STEPS, batch_size=4, workers=0, lr=1e-4, log_every=1, bf16=False)  # fp32: bf16 rounding differs with the batch split
    stage1 = Trainer(train_config("tiny", 1, **settings), preset("tiny"), single, split)
    stage1.fit()
    Trainer(train_config("tiny", 2, **settings), preset("tiny"), single, split, g1_state=stage1.g1.state_dict()).fit()
    for stage, names in ((1, ["recon"]), (2, ["recon", "g_adv", "d", "d_real", "d_fake"])):
        ddp = [json.loads(line) for line in (out / f"stage{stage}-log.jsonl").read_text().splitlines()]
        one = [json.loads(line) for line in (single / f"stage{stage}-log.jsonl").read_text().splitlines()]
        for name in names:
            assert [r[name] for r in ddp] == pytest.approx([r[name] for r in one], rel=2e-4, abs=1e-5), (stage, name)
    reference = load_run_state(single, 2)   # G1 as stage 1 left it, G2 and D as stage 2 did
    for net in ("g1", "g2", "d"):
        for key, value in reference[net].items():
            # A conv bias before batch norm changes nothing (the norm subtracts it): its gradient is
            # rounding noise, which Adam scales up to lr-sized steps; the running mean carries it.
            conv = re.fullmatch(r"(\w+)\.(\d+)\.bias", key)
            ignored = key.endswith("running_mean") or (
                conv is not None and f"{conv[1]}.{int(conv[2]) + 1}.running_mean" in reference[net])
            if value.is_floating_point() and not ignored:
                torch.testing.assert_close(rank0[f"{net}.{key}"], value, rtol=0, atol=1e-5, msg=f"{net}.{key}")


def test_synchronised_batch_norm_is_plain_batch_norm_in_one_process():
    from pg2_server.wire.protocol import Size
    from training.discriminator import Discriminator, DiscriminatorConfig
    from training.distributed import SynchronizedBatchNorm2d, synchronize_batch_norm

    torch.manual_seed(0)
    plain = Discriminator(DiscriminatorConfig(Size(16, 32), 4, 8))
    synced = synchronize_batch_norm(Discriminator(DiscriminatorConfig(Size(16, 32), 4, 8)))
    synced.load_state_dict(plain.state_dict())
    assert sum(isinstance(m, SynchronizedBatchNorm2d) for m in synced.modules()) == 3
    x = torch.randn(6, 3, 32, 16)
    torch.testing.assert_close(synced(x), plain(x))
    assert synced.state_dict().keys() == plain.state_dict().keys()


@pytest.mark.timeout(240)
def test_sigterm_under_torchrun_saves_before_torchrun_gives_up(tmp_path):
    """torchrun forwards SIGTERM to its workers and kills them soon after: every rank stops at
    the next step and the state is saved, however far off the next log line is."""
    import signal
    import time

    data = write_dataset(tmp_path)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "training.cli", "fit", "--stage", "1", "--preset", "tiny", "--steps", "100000", "--log-every", "100000",
         "--save-every", "100000", "--workers", "0", "--threads", "1", "--device", "cpu",
         "--data-root", str(data["images"]), "--annotations", str(data["annotations"]),
         "--pairs", str(data["pairs"]), "--out", str(out)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "tensorboard").exists():      # training has begun on rank 0
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "fit did not start"
            time.sleep(0.2)
        time.sleep(2.0)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    state = load_run_state(out, 1)
    assert 0 < state["step"] < 100_000, stderr[-3000:]
    assert "interrupted at step" in stderr


NODE = textwrap.dedent('''
    import os
    import sys
    from training.cli import main
    os.chdir(sys.argv[1].split(",")[int(os.environ["RANK"])])   # each node in its own folder: local disks
    sys.exit(main(sys.argv[2:]))
''')


@pytest.mark.timeout(300)
def test_nodes_that_see_other_pairs_or_another_run_state_are_stopped_naming_the_ranks(tmp_path, monkeypatch):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    write_dataset(nodes[0] / "data")
    write_dataset(nodes[1] / "data", identities=3)      # an older copy of the data: 36 pairs, not 48
    script = tmp_path / "node.py"
    script.write_text(NODE)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    fit = ["fit", "--stage", "1", "--preset", "tiny", "--steps", "4", "--workers", "0", "--threads", "1",
           "--device", "cpu", "--data-root", "data/train", "--annotations", "data/fasion-resize-annotation-train.csv",
           "--pairs", "data/fasion-resize-pairs-train.csv", "--out", "run"]

    def torchrun(*extra):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(script), ",".join(map(str, nodes)), *fit, *extra],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)

    result = torchrun()
    assert result.returncode != 0
    assert "error: the 2 processes disagree: rank 0 sees 48 pairs (sha256 " in result.stderr, result.stderr[-3000:]
    assert "rank 1 sees 36 pairs (sha256 " in result.stderr
    assert "--data-root, --annotations, --pairs and --out must be the same files on every node" in result.stderr
    assert not (nodes[0] / "run").exists() and not (nodes[1] / "run").exists()

    # The same data, but only node 0's --out holds the run: `--resume auto` is rank 0's decision.
    write_dataset(nodes[1] / "data")
    from training.cli import main
    monkeypatch.chdir(nodes[0])
    assert main([*fit, "--steps", "2"]) == 0      # the last --steps wins
    monkeypatch.chdir(tmp_path)
    result = torchrun("--resume", "auto")
    assert result.returncode != 0
    assert (f"rank 0 resumes {Path('run') / 'stage1.safetensors'} at step 2, rank 1 finds no "
            f"{Path('run') / 'stage1.safetensors'} to resume") in result.stderr, result.stderr[-3000:]
    assert load_run_state(nodes[0] / "run", 1)["step"] == 2 and not (nodes[1] / "run").exists()
