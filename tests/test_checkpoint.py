import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import pg2_server
from pg2_server.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pg2_server.model import Generator1, Generator2, preset
from pg2_server.pipeline import Pipeline
from pg2_server.wire.protocol import Size


def _save(tmp_path, name="model", **kwargs):
    torch.manual_seed(3)
    config = preset("tiny")
    g1, g2 = Generator1(config), Generator2(config)
    paths = save_checkpoint(tmp_path / name, config, g1, g2, provenance={"data": "unit test"}, **kwargs)
    return config, g1, g2, paths


def test_save_writes_weights_and_description(tmp_path):
    config, g1, _, (json_path, weights_path) = _save(tmp_path)
    assert json_path.name == "model.json" and weights_path.name == "model.safetensors"
    description = json.loads(json_path.read_text())
    assert description["format"] == "pg2-checkpoint" and description["stages"] == ["g1", "g2"]
    assert description["format_version"] == 2
    assert description["config"]["canvas"] == {"width": 16, "height": 32} and description["keypoints"][0] == "nose"
    assert description["value_ranges"]["image"] == [-1.0, 1.0]
    assert description["provenance"] == {"data": "unit test"}
    loaded = load_checkpoint(weights_path)     # either file name works
    assert loaded.config == config
    for a, b in zip(g1.state_dict().values(), loaded.g1.state_dict().values()):
        assert torch.equal(a, b)


def test_a_format_version_1_checkpoint_still_loads(tmp_path):
    """Version 1 wrote the canvas as a list [height, width]."""
    config, g1, _, (json_path, _) = _save(tmp_path)
    description = json.loads(json_path.read_text())
    description["format_version"] = 1
    description["config"]["canvas"] = [32, 16]
    json_path.write_text(json.dumps(description))
    loaded = load_checkpoint(json_path)
    assert loaded.config == config and loaded.config.canvas == Size(width=16, height=32)
    for a, b in zip(g1.state_dict().values(), loaded.g1.state_dict().values()):
        assert torch.equal(a, b)
    description["format_version"] = 3
    json_path.write_text(json.dumps(description))
    with pytest.raises(CheckpointError, match="format_version 3; this code reads versions 1, 2"):
        load_checkpoint(json_path)
    bundled = json.loads(Path(pg2_server.__file__).with_name("default").joinpath("pg2_default.json").read_text())
    assert bundled["format_version"] == 2 and bundled["config"]["canvas"] == {"width": 88, "height": 128}
    assert load_checkpoint(Path(pg2_server.__file__).with_name("default") / "pg2_default").config.canvas == (88, 128)


def test_saved_files_are_readable_by_others(tmp_path):
    _, _, _, paths = _save(tmp_path)
    for path in paths:
        assert path.stat().st_mode & 0o777 == 0o644
    assert list(tmp_path.glob(".*.tmp")) == []         # no temporary file left behind


def test_save_load_gives_identical_pipeline_outputs(tmp_path):
    _save(tmp_path)
    reference = Pipeline.random("tiny", seed=3)      # same seed → same weights as _save
    loaded = Pipeline.from_checkpoint(tmp_path / "model.json")
    rng = np.random.default_rng(0)
    source = rng.integers(0, 255, (64, 40, 3), dtype=np.uint8)
    points = [(20 + i, 10 + 2 * i) for i in range(18)]
    [a] = [g.image for g in reference.generate([source], [points], [(40, 64)])]
    [b] = [g.image for g in loaded.generate([source], [points], [(40, 64)])]
    assert np.array_equal(a, b)


def test_fp16_checkpoint_loads_close(tmp_path):
    _, g1, _, _ = _save(tmp_path, dtype="float16")
    loaded = load_checkpoint(tmp_path / "model")
    for a, b in zip(g1.state_dict().values(), loaded.g1.state_dict().values()):
        assert b.dtype == torch.float32 and torch.allclose(a, b, atol=1e-3)


def test_g1_only_checkpoint(tmp_path):
    config = preset("tiny")
    save_checkpoint(tmp_path / "g1only", config, Generator1(config))
    loaded = load_checkpoint(tmp_path / "g1only")
    assert loaded.g2 is None
    assert Pipeline.from_checkpoint(tmp_path / "g1only").describe()["stages"] == ["g1"]


def test_missing_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="nothing.json does not exist"):
        load_checkpoint(tmp_path / "nothing")
    _save(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors does not exist"):
        load_checkpoint(tmp_path / "model")


def test_a_folder_given_as_the_checkpoint_is_named_as_a_folder(tmp_path):
    _save(tmp_path)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(tmp_path))} is a folder, not a checkpoint: pass the NAME.json "
                                              "inside it \\(it holds model.json\\)$"):
        load_checkpoint(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty is a folder, not a checkpoint: pass the NAME.json inside it$"):
        Pipeline.from_checkpoint(tmp_path / "empty")


@pytest.mark.parametrize("field, value, message", [
    ("base_width", None, "model config lacks \\['base_width'\\]"),
    ("base_width", "8", "base_width must be an integer, got '8'"),
    ("heatmap_radius", "4", "heatmap_radius must be an integer, got '4'"),
    ("heatmap_radius", 0, "heatmap_radius must be ≥ 1, got 0"),
    ("heatmap_sigma", 0, "heatmap_sigma must be a positive number, got 0"),
])
def test_a_bad_config_field_is_named_not_blamed_on_the_weights(tmp_path, field, value, message):
    _save(tmp_path)
    path = tmp_path / "model.json"
    description = json.loads(path.read_text())
    if value is None:
        del description["config"][field]
    else:
        description["config"][field] = value
    path.write_text(json.dumps(description))
    with pytest.raises(CheckpointError, match=f"model.json: invalid model config: {message}"):
        load_checkpoint(tmp_path / "model")


def test_corrupt_weights_are_named(tmp_path):
    _save(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        load_checkpoint(tmp_path / "model")


def test_pickle_file_is_refused_without_unpickling(tmp_path):
    _save(tmp_path)
    torch.save({"g1.x": torch.zeros(1)}, tmp_path / "model.safetensors")   # a pickle in disguise
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "model")


def test_corrupt_json(tmp_path):
    _save(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model.json is not valid JSON"):
        load_checkpoint(tmp_path / "model")
    (tmp_path / "model.json").write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="not a PG2 checkpoint"):
        load_checkpoint(tmp_path / "model")


def test_mismatched_config_and_weights(tmp_path):
    _save(tmp_path)
    path = tmp_path / "model.json"
    description = json.loads(path.read_text())
    description["config"]["base_width"] = 16
    path.write_text(json.dumps(description))
    with pytest.raises(CheckpointError, match="has shape .* the config builds"):
        load_checkpoint(tmp_path / "model")
    description["config"]["base_width"] = 8
    description["config"]["g1_levels"] = 2
    path.write_text(json.dumps(description))
    with pytest.raises(CheckpointError, match="does not match the architecture"):
        load_checkpoint(tmp_path / "model")
    description["config"]["g1_levels"] = 3
    description["config"]["wings"] = 2
    path.write_text(json.dumps(description))
    with pytest.raises(CheckpointError, match="invalid model config: unknown model config keys"):
        load_checkpoint(tmp_path / "model")


def test_weights_and_description_from_different_saves_are_refused(tmp_path, monkeypatch):
    """A kill between the weights' rename and the JSON's leaves new weights beside the old JSON."""
    import pg2_server.checkpoint as checkpoint

    _save(tmp_path)
    old_json = (tmp_path / "model.json").read_text()
    _save(tmp_path)                                   # the next save, finished
    assert load_checkpoint(tmp_path / "model").config == preset("tiny")
    (tmp_path / "model.json").write_text(old_json)    # as if cut off before its JSON landed
    with pytest.raises(CheckpointError, match="come from different saves"):
        load_checkpoint(tmp_path / "model")

    def killed(path, write):
        raise KeyboardInterrupt
    _save(tmp_path)
    monkeypatch.setattr(checkpoint, "write_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path)                               # weights replaced, JSON not
    with pytest.raises(CheckpointError, match="model.safetensors and model.json come from different saves"):
        load_checkpoint(tmp_path / "model")


def test_a_checkpoint_saved_before_save_ids_still_loads(tmp_path):
    _, _, _, (json_path, _) = _save(tmp_path)
    description = json.loads(json_path.read_text())
    del description["save_id"]
    json_path.write_text(json.dumps(description))
    assert load_checkpoint(tmp_path / "model").g2 is not None


def test_non_finite_weights_are_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    config = preset("tiny")
    save_checkpoint(tmp_path / "nan", config, Generator1(config))
    tensors = load_file(tmp_path / "nan.safetensors")          # spoilt after it was written
    tensors["g1.out.bias"][0] = float("nan")
    with safe_open(tmp_path / "nan.safetensors", "pt") as f:
        metadata = f.metadata()
    save_file(tensors, tmp_path / "nan.safetensors", metadata=metadata)
    with pytest.raises(CheckpointError, match="NaN or inf"):
        load_checkpoint(tmp_path / "nan")


def test_weights_that_do_not_fit_the_export_dtype_are_refused(tmp_path):
    config = preset("tiny")
    g1 = Generator1(config)
    with torch.no_grad():
        next(g1.parameters()).view(-1)[0] = 70000.0          # beyond float16
    with pytest.raises(CheckpointError, match="not finite in float16: beyond float16's range"):
        save_checkpoint(tmp_path / "big", config, g1, dtype="float16")
    save_checkpoint(tmp_path / "big", config, g1, dtype="bfloat16")   # bfloat16 holds it
    with torch.no_grad():
        next(g1.parameters()).view(-1)[0] = float("nan")      # a diverged run
    with pytest.raises(CheckpointError, match="NaN or inf: the training diverged"):
        save_checkpoint(tmp_path / "nan", config, g1)
    assert not (tmp_path / "nan.safetensors").exists() and not (tmp_path / "nan.json").exists()


def test_a_failed_write_is_an_os_error_naming_the_file(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(File too large)")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    config = preset("tiny")
    with pytest.raises(OSError, match="could not write .*model.safetensors: .*File too large"):
        save_checkpoint(tmp_path / "model", config, Generator1(config))
