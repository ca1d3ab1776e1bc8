"""training/state.py: nested state round trips through one safetensors file, atomically, no pickle."""
from __future__ import annotations

import os
import random
import time

import numpy as np
import pytest
import torch

from training.state import StateError, load_state, rng_state, save_state, set_rng_state


def test_optimiser_and_network_state_round_trip(tmp_path):
    net = torch.nn.Linear(3, 2)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.ones(1, 3)).sum().backward()
    optimiser.step()
    state = {"step": 7, "name": "run", "ratio": 0.5, "none": None, "flags": [True, 2],
             "net": net.state_dict(), "opt": optimiser.state_dict()}
    path = save_state(tmp_path / "s.safetensors", state)
    loaded = load_state(path)
    assert loaded["step"] == 7 and loaded["name"] == "run" and loaded["none"] is None and loaded["flags"] == [True, 2]
    assert set(loaded["opt"]["state"]) == {0, 1}          # integer keys survive JSON
    again = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    again.load_state_dict(loaded["opt"])
    torch.testing.assert_close(again.state_dict()["state"][0]["exp_avg"], optimiser.state_dict()["state"][0]["exp_avg"])
    for key, value in net.state_dict().items():
        assert torch.equal(loaded["net"][key], value)
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]    # no temporary file left


def test_rng_states_restore_every_generator(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    save_state(tmp_path / "rng.safetensors", {"rng": rng_state()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    set_rng_state(load_state(tmp_path / "rng.safetensors")["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_bad_files_are_named(tmp_path):
    with pytest.raises(StateError, match="does not exist"):
        load_state(tmp_path / "none.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 20)
    with pytest.raises(StateError, match="corrupt"):
        load_state(broken)
    with pytest.raises(TypeError, match="cannot store"):
        save_state(tmp_path / "x.safetensors", {"bad": object()})


def test_partial_saves_are_removed_and_nothing_else(tmp_path):
    from training.state import remove_partial_saves

    save_state(tmp_path / "stage1.safetensors", {"step": 1})
    partial = tmp_path / ".stage1.safetensors.abc123.tmp"     # the name save_state's temporary file has
    partial.write_bytes(b"\0" * 100)
    an_hour_ago = time.time() - 3600
    os.utime(partial, (an_hour_ago, an_hour_ago))               # left by a kill long ago
    writing = tmp_path / ".stage2.safetensors.def456.tmp"     # another run's save, being written now
    writing.write_bytes(b"\0" * 100)
    others = [tmp_path / "notes.tmp", tmp_path / ".hidden.tmp", tmp_path / "stage1.safetensors", writing]
    others[0].write_text("x"), others[1].write_text("x")
    assert remove_partial_saves(tmp_path) == [partial]
    assert all(p.exists() for p in others) and not partial.exists()
    assert remove_partial_saves(tmp_path / "absent") == []
