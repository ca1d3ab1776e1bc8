from pathlib import Path

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


def _scripted_race(monkeypatch, openvino_ms: float, torch_ms: float = 1.0):
    """The "auto" race runs for real (outputs compared) but reports these times per image."""
    real = Pipeline._race
    monkeypatch.setattr(Pipeline, "_race", lambda self: (
        openvino_ms if self.openvino is not None else torch_ms, real(self)[1]))


def test_auto_backend_keeps_openvino_only_where_clearly_faster(monkeypatch, caplog):
    from pg2_server.pipeline import AUTO_GAIN

    reference = Pipeline.random("tiny", seed=0, dtype="float32", backend="torch")
    prepared = _prepared(reference, 2)
    measured = Pipeline.random("tiny", seed=0, dtype="float32", backend="auto")
    times = measured.backend_times
    assert set(times) == {"openvino", "torch"} and all(t > 0 for t in times.values())
    assert measured.backend == ("openvino" if times["openvino"] <= AUTO_GAIN * times["torch"] else "torch")
    assert measured.describe()["backend"] == measured.backend
    assert measured.describe()["backend_ms_per_image"] == times
    assert np.abs(measured.run(prepared)[1] - reference.run(prepared)[1]).max() <= FAST_PATH_TOLERANCE["float32"]
    # Either outcome, with the timing decided: the pipeline runs on the one kept, and says why.
    for openvino_ms, kept, said in ((0.5, "openvino", "running on OpenVINO"),
                                    (0.95, "torch", "running on torch (OpenVINO is taken only when at least 10 % faster)"),
                                    (2.0, "torch", "running on torch")):
        _scripted_race(monkeypatch, openvino_ms)
        caplog.clear()
        with caplog.at_level("INFO"):
            chosen = Pipeline.random("tiny", seed=0, dtype="float32", backend="auto")
        assert chosen.backend == kept and (chosen.openvino is not None) == (kept == "openvino")
        assert chosen.backend_times == {"openvino": openvino_ms, "torch": 1.0}
        assert (f"backend auto: OpenVINO {openvino_ms:.2f} ms/image, torch 1.00 ms/image (float32, batches of 4); "
                f"{said}") in caplog.text
        # the race runs the dynamic model only: no static compile is made (or logged) for it
        assert "compiling OpenVINO" not in caplog.text
        if chosen.openvino is not None:
            assert list(chosen.openvino.static) == [] and chosen.openvino.static_enabled
        assert np.abs(chosen.run(prepared)[1] - reference.run(prepared)[1]).max() <= FAST_PATH_TOLERANCE["float32"]
    explicit = Pipeline.random("tiny", seed=0, dtype="float32", backend="openvino")
    assert explicit.backend == "openvino" and explicit.backend_times == {}


@pytest.mark.parametrize("damage", [np.nan, 0.5])
def test_auto_backend_keeps_torch_when_openvino_gives_other_outputs(monkeypatch, caplog, damage):
    from pg2_server import openvino_backend

    real = openvino_backend.OpenVinoStages.__call__

    def damaged(self, *inputs):
        coarse, final = real(self, *inputs)
        final[:, :, 3:5] += damage   # a few wrong rows, as damaged weights give
        return coarse, final

    monkeypatch.setattr(openvino_backend.OpenVinoStages, "__call__", damaged)
    _scripted_race(monkeypatch, 0.1)   # OpenVINO measured far faster
    with caplog.at_level("WARNING"):
        chosen = Pipeline.random("tiny", seed=0, dtype="float32", backend="auto")
    assert chosen.backend == "torch" and chosen.openvino is None
    assert f"OpenVINO's output differs from torch's by {damage:.3g} (0.001 allowed in float32): running on torch" \
        in caplog.text
    reference = Pipeline.random("tiny", seed=0)
    prepared = _prepared(reference, 2)
    assert np.array_equal(chosen.run(prepared)[1], reference.run(prepared)[1])


@pytest.mark.parametrize("step", ["convert_model", "compile_model"])
def test_openvino_that_fails_to_start_falls_back_to_torch_on_auto_and_is_a_setup_error_when_asked_for(
        monkeypatch, caplog, step):
    from pg2_server.errors import SetupError

    def broken(*args, **kwargs):
        raise RuntimeError("Exception from src/frontends/pytorch/src/frontend.cpp:\nModel wasn't fully converted")

    monkeypatch.setattr(*((ov, "convert_model") if step == "convert_model" else (ov.Core, "compile_model")), broken)
    with caplog.at_level("WARNING"):
        chosen = Pipeline.random("tiny", seed=0, dtype="float32", backend="auto")
    assert chosen.backend == "torch" and chosen.openvino is None
    assert ("backend auto: OpenVINO failed to start (Exception from src/frontends/pytorch/src/frontend.cpp: "
            "Model wasn't fully converted); running on torch") in caplog.text
    reference = Pipeline.random("tiny", seed=0)
    prepared = _prepared(reference, 2)
    assert np.array_equal(chosen.run(prepared)[1], reference.run(prepared)[1])
    with pytest.raises(SetupError, match="^cannot run the model on OpenVINO \\(Exception from .*Model wasn't fully "
                                         "converted\\); use --backend torch$"):
        Pipeline.random("tiny", seed=0, dtype="float32", backend="openvino")


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


# -- the conversion cache: damaged, older, written by two processes, or on a full disk --------


def _cached_checkpoint(tmp_path, reference):
    save_checkpoint(tmp_path / "model", reference.config, reference.g1, reference.g2)
    Pipeline.from_checkpoint(tmp_path / "model.json", dtype="float32", backend="openvino")
    return tmp_path / "model.openvino"


def _count_conversions(monkeypatch) -> list:
    from pg2_server import openvino_backend

    conversions = []
    real_convert = openvino_backend.OpenVinoStages._convert
    monkeypatch.setattr(openvino_backend.OpenVinoStages, "_convert",
                        lambda self, *a: conversions.append(1) or real_convert(self, *a))
    return conversions


@pytest.mark.parametrize("damage", ["garbled", "truncated", "xml emptied", "no checksums"])
def test_a_damaged_cache_is_converted_again_not_served(tmp_path, reference, monkeypatch, caplog, damage):
    import json

    cache = _cached_checkpoint(tmp_path, reference)
    weights = cache / "stages.bin"
    if damage == "garbled":            # same size, some weights overwritten: read without complaint before
        data = bytearray(weights.read_bytes())
        data[1000:1400] = b"\x7f" * 400
        weights.write_bytes(bytes(data))
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    elif damage == "xml emptied":
        (cache / "stages.xml").write_text("")
    else:                              # a cache written before key.json held checksums
        key = json.loads((cache / "key.json").read_text())
        del key["sha256"]
        (cache / "key.json").write_text(json.dumps(key))
    conversions = _count_conversions(monkeypatch)
    with caplog.at_level("INFO"):
        pipeline = Pipeline.from_checkpoint(tmp_path / "model.json", dtype="float32", backend="openvino")
    assert conversions == [1]
    if damage == "no checksums":
        assert "has no checksums of its files (an older cache); converting again" in caplog.text
    else:
        damaged = "stages.xml" if damage == "xml emptied" else "stages.bin"
        assert (f"the cached OpenVINO model in {cache} is damaged ({damaged} differs from the checksum in "
                "key.json); converting again") in caplog.text
    prepared = _prepared(reference, 2)
    assert np.abs(pipeline.run(prepared)[1] - reference.run(prepared)[1]).max() <= FAST_PATH_TOLERANCE["float32"]
    # the cache was written again, whole: the next start reads it
    assert sorted(p.name for p in cache.iterdir()) == ["key.json", "stages.bin", "stages.xml"]
    Pipeline.from_checkpoint(tmp_path / "model.json", dtype="float32", backend="openvino")
    assert conversions == [1]


def test_the_cache_is_replaced_as_a_whole_folder_even_when_two_processes_write_it(tmp_path, reference, monkeypatch):
    from pg2_server import openvino_backend

    cache = tmp_path / "model.openvino"
    cache.mkdir()
    (cache / "stages.bin").write_bytes(b"stale")              # left by an earlier version
    (cache / ".tmp-abc").mkdir()                               # a staging folder of a killed writer
    save_checkpoint(tmp_path / "model", reference.config, reference.g1, reference.g2)
    real_save = ov.save_model
    other_writes = []

    def save_while_another_process_writes(model, path, **kwargs):
        real_save(model, path, **kwargs)
        if not other_writes:          # another process finishes its own cache in the meantime
            other_writes.append(1)
            openvino_backend.OpenVinoStages._store(ov, model, cache, key)

    key = openvino_backend.weights_key(reference.config, reference.g1, reference.g2)
    monkeypatch.setattr(ov, "save_model", save_while_another_process_writes)
    Pipeline.from_checkpoint(tmp_path / "model.json", dtype="float32", backend="openvino")
    assert other_writes == [1]
    assert sorted(p.name for p in cache.iterdir()) == ["key.json", "stages.bin", "stages.xml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.openvino", "model.safetensors"]
    conversions = _count_conversions(monkeypatch)
    Pipeline.from_checkpoint(tmp_path / "model.json", dtype="float32", backend="openvino")
    assert conversions == []   # one whole cache, checksums matching


def test_a_cache_that_cannot_be_written_only_costs_a_conversion(tmp_path, reference, monkeypatch, caplog):
    save_checkpoint(tmp_path / "model", reference.config, reference.g1, reference.g2)

    def full_disk(model, path, **kwargs):
        with open(Path(path).with_suffix(".bin"), "wb") as f:
            f.write(b"\0" * 100)   # part of the weights written before the disk filled
        raise RuntimeError("Exception from src/core/src/pass/serialize.cpp: No space left on device")

    monkeypatch.setattr(ov, "save_model", full_disk)
    with caplog.at_level("WARNING"):
        pipeline = Pipeline.from_checkpoint(tmp_path / "model.json", dtype="float32", backend="openvino")
    assert pipeline.backend == "openvino"
    assert f"cannot cache the OpenVINO model in {tmp_path / 'model.openvino'} (Exception from" in caplog.text
    assert "No space left on device); it will be converted again next time" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]   # no staging left
    prepared = _prepared(reference, 2)
    assert np.abs(pipeline.run(prepared)[1] - reference.run(prepared)[1]).max() <= FAST_PATH_TOLERANCE["float32"]


# -- static compiles: a failed one, and batch sizes that vary ------------------------------------


def test_a_static_compile_that_fails_leaves_its_size_on_the_dynamic_model(monkeypatch, caplog):
    from pg2_server import openvino_backend

    reference = Pipeline.random("tiny", seed=0)
    pipeline = Pipeline.random("tiny", seed=0, dtype="float32", backend="openvino")
    stages = pipeline.openvino
    real_core = stages.core

    class FailingCore:
        def compile_model(self, *args, **kwargs):
            raise RuntimeError("Exception from src/inference/src/cpp/core.cpp: [CPU] out of memory")

    stages.core = FailingCore()
    prepared = _prepared(reference, 3)
    expected = reference.run(prepared)[1]
    with caplog.at_level("WARNING"):
        for _ in range(openvino_backend.STATIC_AFTER + 3):
            assert np.abs(pipeline.run(prepared)[1] - expected).max() <= FAST_PATH_TOLERANCE["float32"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["cannot compile OpenVINO for batches of 3 (Exception from src/inference/src/cpp/core.cpp: "
                        "[CPU] out of memory); they run on the dynamic model"]
    assert list(stages.static) == [] and stages.no_gain == {3}
    stages.core = real_core   # other sizes still get theirs
    for _ in range(openvino_backend.STATIC_AFTER):
        pipeline.run(prepared[:2])
    assert list(stages.static) == [2]


def test_batch_sizes_that_vary_stop_getting_static_compiles(monkeypatch, caplog):
    from pg2_server import openvino_backend

    pipeline = Pipeline.random("tiny", seed=0, dtype="float32", backend="openvino")
    stages = pipeline.openvino
    _scripted_timings(monkeypatch, stages, static_ms_per_row=9.0)   # every static compile pays, none pads
    prepared = _prepared(pipeline, 5)
    with caplog.at_level("INFO"):
        for i in range(100):
            pipeline.run(prepared[:1 + i % 5])
    compiles = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compiling OpenVINO")]
    assert len(compiles) == openvino_backend.STATIC_KEEP + openvino_backend.STATIC_EVICTIONS
    assert len(stages.static) == openvino_backend.STATIC_KEEP
    said = [r.getMessage() for r in caplog.records if "vary" in r.getMessage()]
    assert said == [f"OpenVINO: batch sizes vary more than {openvino_backend.STATIC_KEEP} static compiles can "
                    f"follow ({openvino_backend.STATIC_EVICTIONS} dropped); new sizes run on the dynamic model"]
    # the sizes kept still run on their static compiles
    kept = list(stages.static)
    runs = {size: stages.static[size].runs for size in kept}
    for size in kept:
        pipeline.run(prepared[:size])
    assert {size: stages.static[size].runs for size in kept} == {size: runs[size] + 1 for size in kept}
