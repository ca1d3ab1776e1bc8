"""The add-on benchmarks against real servers: a server still loading its model is waited for."""
from __future__ import annotations

import pytest

pytest.importorskip("bpy")
from blender_addon import bench  # noqa: E402
from pg2_server.wire.client import Client, ServerTimeout  # noqa: E402
from test_addon_operators import loading_server  # noqa: E402,F401  (a real pg2-server, loading)


def test_frames_waits_for_a_server_that_is_loading_its_model(loading_server, capsys):
    assert bench.main(["frames", "--frames", "1", "--rounds", "1", "--size", "44", "64",
                       "--endpoint", loading_server]) == 0
    out = capsys.readouterr().out
    assert "frames: 1 frames 44x64, model market-random canvas 64×128 (WxH)" in out, out
    assert "ratio add-on / server:" in out


def test_a_started_server_is_ready_with_its_model_and_stopped_after():
    with bench.ready_server(None, "tiny") as (endpoint, info):
        assert info["ready"] is True and info["models"][0]["name"] == "tiny-random"
    with Client(endpoint, timeout=0.5, retries=1) as client, pytest.raises(ServerTimeout):
        client.ping()  # stopped with the block
    with pytest.raises(SystemExit, match="(?s)the bench server exited: .*unknown preset 'nope'"):
        with bench.ready_server(None, "nope"):
            pass
