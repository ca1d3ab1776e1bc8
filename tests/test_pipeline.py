import os

import numpy as np
import pytest
import torch

from pg2_server.errors import SetupError
from pg2_server.keypoints import KeypointError
from pg2_server.pipeline import FAST_PATH_TOLERANCE, FastPath, Pipeline
from pg2_server.pose import pose_mask


@pytest.fixture(scope="module")
def tiny():
    return Pipeline.random("tiny", seed=0)


def _pose(width, height):
    rng = np.random.default_rng(width * 7 + height)
    points = [(float(rng.uniform(0, width - 1)), float(rng.uniform(0, height - 1))) for _ in range(18)]
    points[15] = None
    return points


def _image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_odd_sizes_come_back_at_the_requested_size(tiny):
    sources = [_image(300, 50), _image(1080, 1920, 1), _image(32, 16, 2)]
    sizes = [(1920, 1080), (50, 300), (17, 33)]
    images = [g.image for g in tiny.generate(sources, [_pose(*s) for s in sizes], sizes)]
    assert [im.shape for im in images] == [(1080, 1920, 3), (300, 50, 3), (33, 17, 3)]
    assert all(im.dtype == np.uint8 for im in images)


def test_deterministic_and_batch_independent(tiny):
    sources = [_image(64, 40, i) for i in range(3)]
    poses = [_pose(40, 64) for _ in range(3)]
    sizes = [(40, 64)] * 3
    batched = [g.image for g in tiny.generate(sources, poses, sizes)]
    again = [g.image for g in tiny.generate(sources, poses, sizes)]
    alone = [tiny.generate([s], [p], [z])[0].image for s, p, z in zip(sources, poses, sizes)]
    for a, b, c in zip(batched, again, alone):
        assert np.array_equal(a, b)
        assert np.abs(a.astype(int) - c.astype(int)).max() <= 1   # batching changes nothing visible


def test_random_weights_depend_on_seed_only():
    source, pose = [_image(32, 16)], [_pose(16, 32)]
    a = Pipeline.random("tiny", seed=0).generate(source, pose, [(16, 32)])[0].image
    torch.manual_seed(123)   # the global RNG must not matter
    b = Pipeline.random("tiny", seed=0).generate(source, pose, [(16, 32)])[0].image
    c = Pipeline.random("tiny", seed=1).generate(source, pose, [(16, 32)])[0].image
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_generate_returns_g1_and_alpha(tiny):
    size = (88, 128)
    [result] = tiny.generate([_image(128, 88)], [_pose(*size)], [size], with_g1=True, with_alpha=True)
    assert result.image.shape == (128, 88, 3) and result.g1.shape == (128, 88, 3)
    assert result.alpha.shape == (128, 88) and set(np.unique(result.alpha)) <= {0, 255}
    assert result.alpha.any()
    # G2 adds a difference map, so the final image differs from G1's.
    assert not np.array_equal(result.image, result.g1)


def test_final_is_g1_plus_difference(tiny):
    prepared = [tiny.prepare(_image(32, 16), _pose(16, 32), (16, 32))]
    coarse, final = tiny.run(prepared)
    with torch.inference_mode():
        source = torch.from_numpy(prepared[0].source[None])
        diff = tiny.g2(torch.from_numpy(coarse), source).numpy()
    assert np.allclose(final, coarse + diff, atol=1e-5)


def test_alpha_marks_the_target_pose(tiny):
    points = [None] * 18
    points[1], points[2] = (8.0, 10.0), (8.0, 22.0)      # neck and right shoulder
    [result] = tiny.generate([_image(32, 16)], [points], [(16, 32)], with_alpha=True)
    assert result.alpha[16, 8] == 255 and result.alpha[0, 0] == 0
    assert tuple(tiny.config.canvas) == (16, 32)   # the frame is the canvas: alpha is the mask itself
    expected = pose_mask(points, (16, 32), tiny.config.heatmap_radius) * 255
    assert np.array_equal(result.alpha, expected)


@pytest.mark.parametrize("source, points, size, error, message", [
    (_image(32, 16), [(1, 1)] * 17, (16, 32), KeypointError, "expected 18 keypoints"),
    (_image(32, 16), [(float("nan"), 1)] * 18, (16, 32), KeypointError, "non-finite"),
    (np.zeros((32, 16, 3), np.float32), [(1, 1)] * 18, (16, 32), TypeError, "uint8"),
    (np.zeros((0, 16, 3), np.uint8), [(1, 1)] * 18, (16, 32), ValueError, "non-empty"),
    (np.zeros((32, 16), np.uint8), [(1, 1)] * 18, (16, 32), ValueError, "3 channels"),
    (_image(32, 16), [(1, 1)] * 18, (0, 32), ValueError, "target size must be positive"),
    (_image(32, 16), [(1, 1)] * 18, (16.0, 32), ValueError, "target size must be \\(W, H\\) integers"),
])
def test_bad_inputs_say_what_is_wrong(tiny, source, points, size, error, message):
    with pytest.raises(error, match=message):
        tiny.generate([source], [points], [size])


def test_mismatched_list_lengths(tiny):
    with pytest.raises(ValueError, match="equal lengths"):
        tiny.generate([_image(32, 16)], [], [(16, 32)])


def test_unavailable_device_is_explained():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        Pipeline.random("tiny", device="cuda")
    with pytest.raises(ValueError, match="dtype must be one of"):
        Pipeline.random("tiny", dtype="int8")
    for name in ("gpu", "CPU", "xpu", "cuda,cpu"):
        with pytest.raises(SetupError, match=f"unknown device .{name}.; use cpu, cuda, cuda:N or mps"):
            Pipeline.random("tiny", device=name)


def test_describe(tiny):
    info = tiny.describe()
    assert info["preset"] == "tiny" and info["canvas"] == [32, 16] and info["stages"] == ["g1", "g2"]
    assert info["keypoints"][2] == "right_shoulder"


# -- fast path: the parts a CPU can check -----------------------------------------


def test_buckets_pad_up_to_the_next_size():
    fast = FastPath(buckets=(1, 2, 4, 8))
    assert [fast.bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 9]


def _batch(pipeline, count):
    return [pipeline.prepare(_image(48, 30, i), _pose(30, 48), (30, 48)) for i in range(count)]


def test_fast_path_without_compile_matches_eager_and_drops_padding(tiny):
    fast = Pipeline.random("tiny", seed=0, fast=FastPath(compile=False, buckets=(4, 8)))
    assert fast.memory_format == torch.channels_last
    prepared = _batch(tiny, 3)
    coarse_ref, final_ref = tiny.run(prepared)
    coarse, final = fast.run(prepared)            # 3 requests padded to 4, padding dropped
    assert final.shape == final_ref.shape == (3, 3, 32, 16)
    assert np.abs(final - final_ref).max() <= FAST_PATH_TOLERANCE["float32"]
    assert np.abs(coarse - coarse_ref).max() <= FAST_PATH_TOLERANCE["float32"]


def test_compiled_graph_with_buckets_matches_eager(tiny):
    # aot_eager traces G1+G2 through dynamo exactly as inductor would, without C++ codegen
    # (inductor on this 2-core CPU costs ~80 s per bucket; see the slow test below).
    fast = Pipeline.random("tiny", seed=0, fast=FastPath(compile_backend="aot_eager", buckets=(2, 4)))
    for count in (3, 1, 4):
        prepared = _batch(tiny, count)
        _, final_ref = tiny.run(prepared)
        _, final = fast.run(prepared)
        assert final.shape[0] == count
        assert np.abs(final - final_ref).max() <= FAST_PATH_TOLERANCE["float32"]


@pytest.mark.skipif(not os.environ.get("PG2_SLOW_TESTS"), reason="inductor codegen takes minutes on CPU; "
                    "set PG2_SLOW_TESTS=1")
def test_inductor_compiled_pipeline_matches_eager(tiny):
    fast = Pipeline.random("tiny", seed=0, fast=FastPath(compile_mode="default", buckets=(4,)))
    prepared = _batch(tiny, 3)
    _, final_ref = tiny.run(prepared)
    _, final = fast.run(prepared)
    assert np.abs(final - final_ref).max() <= FAST_PATH_TOLERANCE["float32"]


@pytest.mark.parametrize("dtype, device", [
    ("bfloat16", "cpu"),
    pytest.param("float16", "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
])
def test_reduced_precision_within_stated_tolerance(tiny, dtype, device):
    low = Pipeline.random("tiny", seed=0, dtype=dtype, device=device, fast=FastPath(compile=False))
    prepared = _batch(tiny, 2)
    _, reference = tiny.run(prepared)
    _, final = low.run(prepared)
    assert np.abs(final - reference).max() <= FAST_PATH_TOLERANCE[dtype]


def test_float16_compute_is_refused_on_the_cpu_but_a_float16_checkpoint_loads(tmp_path):
    from pg2_server.checkpoint import save_checkpoint
    from pg2_server.model import Generator1, Generator2, preset
    from pg2_server.pipeline import default_checkpoint

    for dtype in ("float16", "fp16", torch.float16):
        with pytest.raises(ValueError, match="^--dtype float16 on the CPU runs about 50× slower than float32 .*"
                                             "use --dtype bfloat16 .*float32, or auto to pick$"):
            Pipeline.random("tiny", seed=0, dtype=dtype)
    # the bundled model is stored in float16: it loads, and computes in float32 or bfloat16
    assert '"dtype": "float16"' in default_checkpoint().read_text()
    bundled = Pipeline.from_checkpoint(default_checkpoint(), dtype="auto", backend="torch")
    assert bundled.dtype in (torch.float32, torch.bfloat16)
    config = preset("tiny")
    save_checkpoint(tmp_path / "half", config, Generator1(config), Generator2(config), dtype="float16")
    loaded = Pipeline.from_checkpoint(tmp_path / "half.json", dtype="float32")
    assert loaded.dtype == torch.float32 and next(loaded.g1.parameters()).dtype == torch.float32


def test_non_finite_model_output_is_refused_not_turned_into_black_pixels(tiny, monkeypatch):
    prepared = _batch(tiny, 2)
    real_forward = Pipeline.forward

    def damaged(self, *inputs):
        coarse, final = real_forward(self, *inputs)
        final = final.clone()
        final[-1, :, 4:6] = float("nan")
        return coarse, final

    monkeypatch.setattr(Pipeline, "forward", damaged)
    with pytest.raises(SetupError, match="^model tiny-random gave NaN or inf for 1 of 2 images on torch "
                                         "\\(float32\\): damaged weights or a dtype that overflows; "
                                         "try --dtype float32 or --backend torch$"):
        tiny.run(prepared)
    with pytest.raises(SetupError, match="gave NaN or inf"):
        tiny.generate([_image(48, 30)], [_pose(30, 48)], [(30, 48)])


# -- dtype auto: bf16 where the device has bf16 units ------------------------------------------


def test_auto_dtype_without_bf16_units_keeps_fp32(monkeypatch):
    monkeypatch.setattr("pg2_server.pipeline.cpu_bf16_units", lambda: None)
    pipeline = Pipeline.random("tiny", seed=0, dtype="auto")
    assert pipeline.dtype == torch.float32 and pipeline.memory_format == torch.contiguous_format
    assert next(pipeline.g1.parameters()).dtype == torch.float32
    assert pipeline.describe()["dtype"] == "float32"


def test_auto_dtype_with_bf16_units_converts_the_weights_once(monkeypatch, tiny):
    monkeypatch.setattr("pg2_server.pipeline.cpu_bf16_units", lambda: "avx512_bf16")
    pipeline = Pipeline.random("tiny", seed=0, dtype="auto")
    assert pipeline.dtype == torch.bfloat16 and pipeline.memory_format == torch.channels_last
    weight = pipeline.g1.encoder.stem.weight
    assert weight.dtype == torch.bfloat16 and weight.is_contiguous(memory_format=torch.channels_last)
    prepared = _batch(tiny, 2)
    _, reference = tiny.run(prepared)
    _, final = pipeline.run(prepared)
    assert final.dtype == np.float32 and np.abs(final - reference).max() <= FAST_PATH_TOLERANCE["bfloat16"]


def test_bf16_units_are_detected_from_the_cpu(monkeypatch):
    from pg2_server import pipeline as module

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert module.cpu_bf16_units() == "avx512_bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert module.cpu_bf16_units() is None
    assert not module.bf16_native(torch.device("cpu"))


def test_cpu_batches_are_zero_padded_and_keep_the_models_layout(tiny):
    prepared = _batch(tiny, 3)
    sources, maps, coordinates = tiny._to_device(prepared, 4)
    assert sources.dtype == maps.dtype == torch.float32 and sources.shape[0] == maps.shape[0] == 4
    assert np.array_equal(maps[1].numpy(), prepared[1].heatmaps)
    assert np.array_equal(coordinates[2].numpy(), prepared[2].coordinates)
    assert not sources[3].any() and not maps[3].any() and not coordinates[3].any()
    assert sources.is_contiguous(memory_format=tiny.memory_format)


def test_bundled_model_in_bf16_within_stated_tolerance_on_the_bundled_samples():
    from pg2_server.pipeline import default_checkpoint
    from pg2_server.samples import load_samples

    samples = load_samples()
    reference = Pipeline.from_checkpoint(default_checkpoint())
    low = Pipeline.from_checkpoint(default_checkpoint(), dtype="bfloat16")
    prepared = [reference.prepare(s.source, s.keypoints, s.size) for s in samples]
    coarse_ref, final_ref = reference.run(prepared)
    coarse, final = low.run(prepared)
    # measured 0.039 (final) and 0.019 (G1) on this CPU; the stated bound is 0.1
    assert np.abs(final - final_ref).max() <= FAST_PATH_TOLERANCE["bfloat16"]
    assert np.abs(coarse - coarse_ref).max() <= FAST_PATH_TOLERANCE["bfloat16"]
    assert np.abs(final - final_ref).mean() < 0.01
