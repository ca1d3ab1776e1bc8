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
    # An upgrade of the code that builds the networks converts again: same weights.
    from pg2_server import model
    monkeypatch.setattr(model, "__file__", str(tmp_path / "model_upgraded.py"))
    (tmp_path / "model_upgraded.py").write_text("# the networks, changed\n")
    Pipeline.from_checkpoint(tmp_path / "model.json", dtype="float32", backend="openvino")
    assert conversions == [1, 1]


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
    assert resolve_backend("auto", cpu, None, torch.float16) == "torch"   # OpenVINO has no fp16 on the CPU
    with pytest.raises(ValueError, match="not torch.float16; use --dtype bfloat16 or --backend torch"):
        resolve_backend("openvino", cpu, None, torch.float16)
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_backend("openvino", torch.device("cuda"), None)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("onnx", cpu, None)


def _scripted_timings(monkeypatch, stages, static_ms_per_row: float, dynamic_ms_per_row: float = 10.0):
    """Run inferences for real but report scripted times: `…_per_row` ms per row of the batch."""
    from pg2_server import openvino_backend

    real = openvino_backend.OpenVinoStages._infer

    def infer(request, inputs):
        real(request, inputs)
        is_static = request is not stages.request
        return len(inputs[0]) * (static_ms_per_row if is_static else dynamic_ms_per_row)

    monkeypatch.setattr(stages, "_infer", infer)


@pytest.mark.parametrize("embedding", ["heatmaps", "ce"])
def test_a_recurring_batch_size_gets_a_static_compile_with_the_same_outputs(embedding, monkeypatch):
    from pg2_server import openvino_backend

    reference = Pipeline.random("tiny", seed=0, pose_embedding=embedding)
    pipeline = Pipeline.random("tiny", seed=0, pose_embedding=embedding, dtype="float32", backend="openvino")
    stages = pipeline.openvino
    _scripted_timings(monkeypatch, stages, static_ms_per_row=8.0)   # too slow to pad 2 rows onto 3
    prepared = _prepared(reference, 4)
    expected = {n: reference.run(prepared[:n])[1] for n in (1, 2, 3, 4)}

    def check(n):
        assert np.abs(pipeline.run(prepared[:n])[1] - expected[n]).max() <= FAST_PATH_TOLERANCE["float32"]

    for _ in range(openvino_backend.STATIC_AFTER - 1):     # the first sightings run the dynamic model
        check(3)
    assert list(stages.static) == [] and stages.dynamic_ms == {3: 30.0}
    for n in (3, 1, 1, 1, 2, 2, 2):                        # recurring sizes compile; the oldest is dropped
        check(n)
    assert list(stages.static) == [1, 2][-openvino_backend.STATIC_KEEP:]
    static = stages.static[1]
    assert [list(port.get_partial_shape().to_shape()) for port in static.request.model_inputs][0] == [1, 3, 32, 16]
    assert static.runs == stages.static[2].runs == 0   # the run that compiled it is not timed
    check(4)
    assert 4 not in stages.static and stages.static[1] is static
    check(1)
    assert static.runs == 1 and static.best_ms == 8.0


def test_a_static_compile_runs_smaller_batches_padded_where_that_is_measured_faster(monkeypatch):
    from pg2_server import openvino_backend

    reference = Pipeline.random("tiny", seed=0)
    pipeline = Pipeline.random("tiny", seed=0, dtype="float32", backend="openvino")
    stages = pipeline.openvino
    _scripted_timings(monkeypatch, stages, static_ms_per_row=6.0)   # static: 0.6 of the dynamic time
    prepared = _prepared(reference, 4)
    expected = {n: reference.run(prepared[:n])[1] for n in (1, 2, 3, 4)}
    for _ in range(openvino_backend.STATIC_AFTER):
        pipeline.run(prepared)
    assert list(stages.static) == [4] and stages.rows(3) == 3   # its first run does not count
    pipeline.run(prepared)
    # 3 rows padded to 4 take 24 ms static against 30 dynamic; 2 rows would take 24 against 20.
    assert (stages.rows(3), stages.rows(2), stages.rows(4), stages.rows(5)) == (4, 2, 4, 5)
    coarse, final = pipeline.run(prepared[:3])
    assert final.shape == (3, 3, 32, 16)
    assert np.abs(final - expected[3]).max() <= FAST_PATH_TOLERANCE["float32"]
    assert stages.static[4].runs == 2 and 3 not in stages.dynamic_ms and stages._seen[3] == 0
    assert np.abs(pipeline.run(prepared[:2])[1] - expected[2]).max() <= FAST_PATH_TOLERANCE["float32"]
    assert stages.dynamic_ms[2] == 20.0
    # a size measured dynamically is compared with its own time
    stages.dynamic_ms[3] = 23.0
    assert stages.rows(3) == 3


def test_a_static_compile_no_faster_than_the_dynamic_model_is_dropped_for_good(monkeypatch):
    from pg2_server import openvino_backend

    reference = Pipeline.random("tiny", seed=0)
    pipeline = Pipeline.random("tiny", seed=0, dtype="float32", backend="openvino")
    stages = pipeline.openvino
    _scripted_timings(monkeypatch, stages, static_ms_per_row=9.8)   # within GAIN of the dynamic time
    prepared = _prepared(reference, 2)
    expected = reference.run(prepared)[1]
    for _ in range(openvino_backend.STATIC_AFTER + openvino_backend.JUDGE_RUNS - 1):
        assert np.abs(pipeline.run(prepared)[1] - expected).max() <= FAST_PATH_TOLERANCE["float32"]
    assert list(stages.static) == [2] and stages.no_gain == set()
    pipeline.run(prepared)
    assert list(stages.static) == [] and stages.no_gain == {2}
    for _ in range(2 * openvino_backend.STATIC_AFTER):    # never compiled again
        pipeline.run(prepared)
    assert list(stages.static) == [] and stages.rows(1) == 1


def test_padded_rows_picks_the_smallest_static_size_that_beats_the_dynamic_model():
    from pg2_server.openvino_backend import padded_rows

    static = {16: 30.0, 32: 58.0}
    assert padded_rows(15, static, {16: 37.0}) == 16           # 37 × 15/16 = 34.7 > 30
    assert padded_rows(12, static, {16: 37.0}) == 12           # 27.75 < 30; 32 has no dynamic time to compare
    assert padded_rows(12, static, {16: 37.0, 32: 80.0}) == 12  # 30 < 58
    assert padded_rows(13, static, {16: 37.0}) == 16           # 30.06 > 30
    assert padded_rows(20, static, {16: 37.0, 32: 74.0}) == 20  # 46.25 < 58
    assert padded_rows(28, static, {32: 74.0}) == 32           # 64.75 > 58
    assert padded_rows(15, static, {15: 29.0, 16: 37.0}) == 15  # its own measured time wins
    assert padded_rows(15, {}, {16: 37.0}) == 15
    assert padded_rows(15, static, {}) == 15                   # nothing measured: run as it is
