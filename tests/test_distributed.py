"""training/distributed.py: two gloo processes under torchrun keep identical parameters."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

from fixture_datasets import write_dataset
from pg2_server.model import Generator1, preset
from training.distributed import Distributed, any_rank, init_distributed

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

    images, annotations, pairs, out = sys.argv[1:5]
    job = init_distributed("cpu")
    split = load_split(images, annotations, pairs)
    config = preset("tiny")
    stage1 = Trainer(train_config("tiny", 1, steps=3, workers=0, lr=1e-3), config, out, split, job)
    stage1.fit()
    stage2 = Trainer(train_config("tiny", 2, steps=3, workers=0, lr=1e-3), config, out, split, job,
                     g1_state=stage1.g1.state_dict())
    stage2.fit()
    tensors = {f"g1.{k}": v for k, v in stage1.g1.state_dict().items()}
    tensors.update({f"g2.{k}": v for k, v in stage2.g2.state_dict().items()})
    tensors.update({f"d.{k}": v.detach() for k, v in stage2.d.named_parameters()})
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
    script.write_text(WORKER)
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
    # (D's batch-norm running statistics are rank-local between DDP's broadcasts; training never
    # uses them, and rank 0's are the ones saved.) Only rank 0 wrote the run's files.
    torch.manual_seed(0)   # the trainer's initial G1 (seed 0): training moved it
    initial = Generator1(preset("tiny")).state_dict()
    assert not all(torch.equal(initial[k], rank0[f"g1.{k}"]) for k in initial)
    assert (out / "stage1.safetensors").is_file() and (out / "stage2.safetensors").is_file()
    assert len((out / "stage1-log.jsonl").read_text().splitlines()) == 1   # log_every 10 > 3 steps: the last
