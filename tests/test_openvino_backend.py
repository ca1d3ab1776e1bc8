import numpy as np
import pytest
import torch

from pg2_server.checkpoint import save_checkpoint
from pg2_server.pipeline import FAST_PATH_TOLERANCE, FastPath, Pipeline, resolve_backend

ov = pytest.importorskip("openvino")


def _prepared(pipeline, count=3):
    rng = np.random.default_rng(0)
    points = [(float(rng.uniform(0, 29)), float(rng.uniform(0, 47))) for _ in range(18)]
    return [pipeline.prepare(rng.integers(0, 256, (48, 30, 3), dtype=np.uint8), points, (30, 48))
            for _ in range(count)]


@pytest.fixture(scope="module")
def reference():
    return Pipeline.random("tiny", seed=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_outputs_match_torch_within_the_stated_tolerance(reference, dtype):
    pipeline = Pipeline.random("tiny", seed=0, dtype=dtype, backend="openvino")
    assert pipeline.describe()["backend"] == "openvino"
    prepared = _prepared(reference)
    coarse_ref, final_ref = reference.run(prepared)
    coarse, final = pipeline.run(prepared)
    assert final.shape == final_ref.shape == (3, 3, 32, 16)
    assert np.abs(final - final_ref).max() <= FAST_PATH_TOLERANCE[dtype]
    assert np.abs(coarse - coarse_ref).max() <= FAST_PATH_TOLERANCE[dtype]
    # the same preparation and output code: finished images differ by rounding only
    ours = [g.image for g in pipeline.generate([np.zeros((48, 30, 3), np.uint8)], [[(5.0, 5.0)] * 18], [(30, 48)])]
    theirs = [g.image for g in reference.generate([np.zeros((48, 30, 3), np.uint8)], [[(5.0, 5.0)] * 18], [(30, 48)])]
    assert ours[0].shape == theirs[0].shape == (48, 30, 3)
    assert np.abs(ours[0].astype(int) - theirs[0].astype(int)).max() <= 255 * FAST_PATH_TOLERANCE[dtype]


def test_ce_embedding_passes_coordinates():
    torch_ce = Pipeline.random("tiny", seed=0, pose_embedding="ce")
    ov_ce = Pipeline.random("tiny", seed=0, pose_embedding="ce", dtype="float32", backend="openvino")
    prepared = _prepared(torch_ce, 2)
    assert np.abs(ov_ce.run(prepared)[1] - torch_ce.run(prepared)[1]).max() <= FAST_PATH_TOLERANCE["float32"]


def test_conversion_is_cached_next_to_the_checkpoint_and_redone_when_weights_change(tmp_path, reference, monkeypatch):
    from pg2_server import openvino_backend

    save_checkpoint(tmp_path / "model", reference.config, reference.g1, reference.g2)
    first = Pipeline.from_checkpoint(tmp_path / "model.json", dtype="float32", backend="openvino")
    cache = tmp_path / "model.openvino"
    assert sorted(p.name for p in cache.iterdir()) == ["key.json", "stages.bin", "stages.xml"]
    conversions = []
    real_convert = openvino_backend.OpenVinoStages._convert
    monkeypatch.setattr(openvino_backend.OpenVinoStages, "_convert",
                        lambda self, *a: conversions.append(1) or real_convert(self, *a))
    again = Pipeline.from_checkpoint(tmp_path / "model.json", dtype="float32", backend="openvino")
    assert conversions == []
    prepared = _prepared(reference, 2)
    assert np.array_equal(first.run(prepared)[1], again.run(prepared)[1])
    other = Pipeline.random("tiny", seed=5)
    save_checkpoint(tmp_path / "model", other.config, other.g1, other.g2)   # new weights, same name
    changed = Pipeline.from_checkpoint(tmp_path / "model.json", dtype="float32", backend="openvino")
    assert conversions == [1]
    assert np.abs(changed.run(prepared)[1] - other.run(prepared)[1]).max() <= FAST_PATH_TOLERANCE["float32"]


def test_auto_backend_keeps_whichever_is_measured_faster(monkeypatch):
    reference = Pipeline.random("tiny", seed=0, dtype="float32", backend="torch")
    prepared = _prepared(reference, 2)
    measured = Pipeline.random("tiny", seed=0, dtype="float32", backend="auto")
    times = measured.backend_times
    assert set(times) == {"openvino", "torch"} and all(t > 0 for t in times.values())
    assert measured.backend == min(times, key=times.get) == measured.describe()["backend"]
    assert measured.describe()["backend_ms_per_image"] == times
    assert np.abs(measured.run(prepared)[1] - reference.run(prepared)[1]).max() <= FAST_PATH_TOLERANCE["float32"]
    # Either outcome, with the timing decided: the pipeline runs on the one kept.
    for faster in ("openvino", "torch"):
        monkeypatch.setattr(Pipeline, "_ms_per_image",
                            lambda self, faster=faster: 1.0 if (self.openvino is not None) == (faster == "openvino") else 2.0)
        chosen = Pipeline.random("tiny", seed=0, dtype="float32", backend="auto")
        assert chosen.backend == faster and (chosen.openvino is not None) == (faster == "openvino")
        assert np.abs(chosen.run(prepared)[1] - reference.run(prepared)[1]).max() <= FAST_PATH_TOLERANCE["float32"]
    explicit = Pipeline.random("tiny", seed=0, dtype="float32", backend="openvino")
    assert explicit.backend == "openvino" and explicit.backend_times == {}


def test_auto_backend_is_openvino_on_the_cpu_but_torch_when_compiling():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, None) == "openvino"
    assert resolve_backend("auto", cpu, FastPath(compile=True)) == "torch"
    assert resolve_backend("torch", cpu, None) == "torch"
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_backend("openvino", torch.device("cuda"), None)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("onnx", cpu, None)


@pytest.mark.parametrize("embedding", ["heatmaps", "ce"])
def test_a_recurring_batch_size_gets_a_static_compile_with_the_same_outputs(embedding):
    from pg2_server import openvino_backend

    reference = Pipeline.random("tiny", seed=0, pose_embedding=embedding)
    pipeline = Pipeline.random("tiny", seed=0, pose_embedding=embedding, dtype="float32", backend="openvino")
    stages = pipeline.openvino
    prepared = _prepared(reference, 4)
    expected = {n: reference.run(prepared[:n])[1] for n in (1, 2, 3, 4)}
    for _ in range(openvino_backend.STATIC_AFTER - 1):     # a first sighting runs the dynamic model
        assert np.abs(pipeline.run(prepared[:3])[1] - expected[3]).max() <= FAST_PATH_TOLERANCE["float32"]
    assert list(stages.static) == []
    for n in (3, 3, 2, 2, 1, 1):                           # recurring sizes compile; the oldest is dropped
        assert np.abs(pipeline.run(prepared[:n])[1] - expected[n]).max() <= FAST_PATH_TOLERANCE["float32"]
    assert list(stages.static) == [2, 1][-openvino_backend.STATIC_KEEP:]
    static = stages.static[1]
    assert [list(port.get_partial_shape().to_shape()) for port in static.model_inputs][0] == [1, 3, 32, 16]
    assert np.abs(pipeline.run(prepared[:4])[1] - expected[4]).max() <= FAST_PATH_TOLERANCE["float32"]
    assert 4 not in stages.static and stages.static[1] is static
