"""`pg2-server presets` and `pg2-server generate --local`, run as real commands."""
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest


def _run(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "pg2_server.cli", *args], capture_output=True, text=True,
                            timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def test_presets_json_lists_counts_and_gflops():
    rows = {r["name"]: r for r in json.loads(_run("presets", "--json").stdout)}
    assert set(rows) >= {"market", "deepfashion", "demo", "tiny"}
    assert rows["market"]["canvas"] == [128, 64]
    assert rows["market"]["g1_params"] == 70_795_075 and rows["market"]["g2_params"] == 6_058_883
    assert rows["deepfashion"]["g1_params"] == 122_103_235 and rows["deepfashion"]["g2_params"] == 12_696_067
    assert rows["deepfashion"]["gflops"] == pytest.approx(806.28, abs=0.01)
    assert rows["market"]["gflops"] == pytest.approx(95.15, abs=0.01)


def test_presets_table():
    out = _run("presets").stdout
    assert "market" in out and "70.80M" in out and "806.28" in out


@pytest.fixture
def inputs(tmp_path):
    source = tmp_path / "person.png"
    cv2.imwrite(str(source), np.random.default_rng(0).integers(0, 255, (300, 50, 3), dtype=np.uint8))
    pose = tmp_path / "pose.json"
    points = [[960 + 10 * i, 200 + 40 * i] for i in range(18)]
    points[3] = None
    pose.write_text(json.dumps({"size": [1920, 1080], "keypoints": points}))
    return source, pose


def test_generate_local_writes_an_image_of_the_requested_size(tmp_path, inputs):
    source, pose = inputs
    out = tmp_path / "out" / "result.png"
    result = _run("generate", "--local", "--preset", "tiny", "--random-weights",
                  "--source", str(source), "--pose", str(pose), "--out", str(out))
    assert "1920×1080" in result.stdout
    assert cv2.imread(str(out)).shape == (1080, 1920, 3)


def test_generate_local_alpha_is_the_target_pose_mask(tmp_path, inputs):
    source, pose = inputs
    out = tmp_path / "cut-out.png"
    _run("generate", "--local", "--preset", "tiny", "--random-weights", "--source", str(source),
         "--pose", str(pose), "--out", str(out), "--alpha")
    image = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert image.shape == (1080, 1920, 4)
    alpha = image[..., 3]
    assert set(np.unique(alpha)) == {0, 255}
    assert alpha[200, 960] == 255 and alpha[1000, 100] == 0      # on the neck; far from the person
    refused = _run("generate", "--local", "--preset", "tiny", "--random-weights", "--source", str(source),
                   "--pose", str(pose), "--out", str(tmp_path / "cut-out.jpg"), "--alpha", check=False)
    assert refused.returncode == 2 and "--alpha needs PNG" in refused.stderr and "cut-out.png" in refused.stderr


def test_generate_local_grid(tmp_path, inputs):
    source, pose = inputs
    out = tmp_path / "grid.png"
    _run("generate", "--local", "--preset", "tiny", "--random-weights", "--source", str(source),
         "--pose", str(pose), "--out", str(out), "--grid")
    grid = cv2.imread(str(out))
    # Four cells (source | pose | G1 | G2) side by side: much wider than one 1920×1080 frame scaled.
    assert grid.shape[1] > 3 * grid.shape[0]


def test_generate_local_errors_are_one_clear_line(tmp_path, inputs):
    source, pose = inputs
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"size": [10, 10], "keypoints": [[1, 2]] * 17}))
    result = _run("generate", "--local", "--preset", "tiny", "--random-weights", "--source", str(source),
                  "--pose", str(bad), "--out", str(tmp_path / "x.png"), check=False)
    assert result.returncode == 2 and "expected 18 keypoints" in result.stderr
    assert "Traceback" not in result.stderr
    result = _run("generate", "--local", "--preset", "tiny", "--random-weights", "--source",
                  str(tmp_path / "missing.png"), "--pose", str(pose), "--out", str(tmp_path / "x.png"), check=False)
    assert result.returncode == 2 and "cannot read image" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_fast_path_flag_gives_the_same_image(tmp_path, inputs):
    source, pose = inputs
    common = ["generate", "--local", "--preset", "tiny", "--random-weights", "--source", str(source), "--pose",
              str(pose)]
    _run(*common, "--out", str(tmp_path / "eager.png"))
    _run(*common, "--out", str(tmp_path / "fast.png"), "--fast")
    eager, fast = cv2.imread(str(tmp_path / "eager.png")), cv2.imread(str(tmp_path / "fast.png"))
    assert np.abs(eager.astype(int) - fast.astype(int)).max() <= 1
    result = _run(*common, "--out", str(tmp_path / "x.png"), "--compile", "default", check=False)
    assert result.returncode != 0 and "--compile needs --fast" in result.stderr


def test_demo_writes_the_sample_grid(tmp_path):
    out = tmp_path / "grid.png"
    result = _run("demo", "--preset", "tiny", "--random-weights", "--out", str(out))
    assert "wrote" in result.stdout
    grid = cv2.imread(str(out))
    assert grid is not None and grid.shape[1] > 4 * 176     # at least source | pose | G1 | G2 columns


def test_a_bug_keeps_its_traceback_and_a_setup_error_is_one_line(monkeypatch, capsys):
    from pg2_server import cli
    from pg2_server.errors import SetupError

    def broken(args):
        raise TypeError("a bug")

    def no_device(args):
        raise SetupError("device cuda requested but CUDA is not available; use --device cpu")

    monkeypatch.setattr(cli, "cmd_presets", broken)
    with pytest.raises(TypeError, match="a bug"):
        cli.main(["presets"])
    monkeypatch.setattr(cli, "cmd_presets", no_device)
    assert cli.main(["presets"]) == 2
    assert capsys.readouterr().err == "error: device cuda requested but CUDA is not available; use --device cpu\n"


def test_model_threads_sets_the_models_cpu_threads():
    import torch

    from pg2_server.cli import build_parser, load_pipeline

    before = torch.get_num_threads()
    try:
        args = build_parser().parse_args(["serve", "--preset", "tiny", "--random-weights", "--backend", "torch",
                                          "--model-threads", "1"])
        load_pipeline(args)
        assert torch.get_num_threads() == 1
        with pytest.raises(SystemExit, match="--model-threads must be at least 1"):
            load_pipeline(build_parser().parse_args(["serve", "--model-threads", "-1"]))
    finally:
        torch.set_num_threads(before)


def test_serving_flags_default_to_the_configs_and_the_configs_check_values():
    from pg2_server.broker import BrokerConfig
    from pg2_server.cli import build_parser
    from pg2_server.peers import ReplyBudget
    from pg2_server.wire.protocol import MIB, Limits
    from pg2_server.worker import WorkerConfig

    serve = build_parser().parse_args(["serve"])
    worker, limits, budget = WorkerConfig(), Limits(), ReplyBudget()
    assert (serve.max_batch, serve.max_delay_ms, serve.max_queue, serve.threads, serve.source_cache_mb) == \
        (worker.max_batch, worker.max_delay_ms, worker.max_queue, worker.threads, worker.source_cache_mb)
    assert serve.max_message_mb * MIB == limits.max_message_bytes and serve.max_image_side == limits.max_image_side
    assert serve.max_unread_mb * MIB == budget.per_client and serve.max_unread_total_mb * MIB == budget.total
    broker = build_parser().parse_args(["broker"])
    defaults = BrokerConfig()
    assert broker.max_queue == defaults.max_queue and broker.heartbeat_ms == defaults.heartbeat_s * 1000
    assert broker.max_message_mb * MIB == defaults.max_message_bytes == limits.max_message_bytes
    with pytest.raises(ValueError, match="max_batch must be at least 1, got 0"):
        WorkerConfig(max_batch=0)
    with pytest.raises(ValueError, match="max_image_side must be at least 16"):
        Limits(max_image_side=8)
    with pytest.raises(ValueError, match="max_queue must be at least 1"):
        BrokerConfig(max_queue=0)
    with pytest.raises(SystemExit, match="error: max_batch must be at least 1, got 0"):
        from pg2_server.cli import build_worker
        build_worker(build_parser().parse_args(["serve", "--max-batch", "0"]), "serve")


def test_generate_local_batch_of_poses_as_exports_and_openpose_leave_them(tmp_path, inputs):
    """A pose folder as the tools leave it: `pose --openpose` pairs (NAME.json + NAME_keypoints.json,
    generated once), an add-on export's blank frame (no people: left out, said), macOS's hidden
    `._` files, OpenPose's own files without a canvas size (--size gives it)."""
    source, pose = inputs
    poses = tmp_path / "poses"
    poses.mkdir()
    ours = json.loads(pose.read_text())
    (poses / "a.json").write_text(json.dumps(ours))
    flat = [v for p in ours["keypoints"] for v in ((p[0], p[1], 0.9) if p else (0, 0, 0))]
    (poses / "a_keypoints.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": flat}],
                                                        "canvas_width": 1920, "canvas_height": 1080}))
    (poses / "b_keypoints.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": flat}]}))
    (poses / "c_keypoints.json").write_text(json.dumps({"people": [], "canvas_width": 1920, "canvas_height": 1080}))
    (poses / "._a.json").write_bytes(b"\x00\x05\x16\x07\xb0 AppleDouble")
    common = ["generate", "--local", "--preset", "tiny", "--random-weights", "--source", str(source),
              "--pose", str(poses), "--out", str(tmp_path / "frames")]
    result = _run(*common, check=False)
    assert result.returncode == 2 and "b_keypoints.json: OpenPose file without canvas_width" in result.stderr
    result = _run(*common, "--size", "1920", "1080")
    assert "1 pose file(s) with no person left out: c_keypoints.json" in result.stderr
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == ["a.png", "b_keypoints.png"]
    assert cv2.imread(str(tmp_path / "frames" / "b_keypoints.png")).shape == (1080, 1920, 3)


def test_a_frame_over_the_servers_side_limit_is_refused_locally_too(tmp_path, inputs):
    source, _ = inputs
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps({"size": [60000, 60000], "keypoints": [[100 + i, 200 + 9 * i] for i in range(18)]}))
    result = _run("generate", "--local", "--preset", "tiny", "--random-weights", "--source", str(source),
                  "--pose", str(huge), "--out", str(tmp_path / "x.png"), check=False)
    assert result.returncode == 2 and "60000×60000 is over 4096 px a side" in result.stderr


@pytest.mark.parametrize("out", ["result", "result.gif", "folder"])
def test_an_output_that_is_not_an_image_file_is_refused_before_the_model_runs(tmp_path, inputs, out):
    source, pose = inputs
    (tmp_path / "folder").mkdir()
    result = _run("generate", "--local", "--preset", "tiny", "--random-weights", "--source", str(source),
                  "--pose", str(pose), "--out", str(tmp_path / out), check=False)
    assert result.returncode == 2 and "must name an image file (.png, .jpg" in result.stderr
    assert "Traceback" not in result.stderr
