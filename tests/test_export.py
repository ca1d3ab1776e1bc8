"""training/export.py and `pg2-train export`: run directory → a checkpoint the pipeline serves."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fixture_datasets import one_torch_thread, write_dataset  # noqa: F401 (autouse fixture)
from pg2_server.drawing import read_rgb
from pg2_server.pipeline import Pipeline
from training.cli import main
from training.state import StateError
from training.trainer import load_run_state


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = write_dataset(root)
    common = ["--preset", "tiny", "--data-root", str(data["images"]), "--annotations", str(data["annotations"]),
              "--pairs", str(data["pairs"]), "--out", str(root / "run"), "--workers", "0", "--log-every", "1"]
    assert main(["fit", "--stage", "1", "--steps", "3", *common]) == 0
    return root, data


def test_stage_one_exports_g1_alone(run, tmp_path):
    root, data = run
    assert main(["export", str(root / "run"), "--out", str(tmp_path / "g1only")]) == 0
    description = json.loads((tmp_path / "g1only.json").read_text())
    assert description["stages"] == ["g1"]
    pipeline = Pipeline.from_checkpoint(tmp_path / "g1only.json")
    assert pipeline.g2 is None
    state = load_run_state(root / "run", 1)
    for key, value in pipeline.g1.state_dict().items():
        assert torch.equal(value, state["g1"][key])


def test_two_stage_export_serves_with_provenance(run, tmp_path):
    root, data = run
    common = ["--preset", "tiny", "--data-root", str(data["images"]), "--annotations", str(data["annotations"]),
              "--pairs", str(data["pairs"]), "--out", str(root / "run"), "--workers", "0", "--log-every", "1"]
    assert main(["fit", "--stage", "2", "--steps", "2", *common]) == 0
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"rows": {"g1+g2": {"ssim_pg2": 0.5}}}))
    assert main(["export", str(root / "run"), "--out", str(tmp_path / "ckpt"), "--dtype", "float16",
                 "--metrics", str(metrics)]) == 0
    description = json.loads((tmp_path / "ckpt.json").read_text())
    assert description["stages"] == ["g1", "g2"] and description["dtype"] == "float16"
    provenance = description["provenance"]
    assert provenance["steps"] == 5
    assert provenance["stages"]["stage1"]["steps"] == 3 and provenance["stages"]["stage2"]["steps"] == 2
    assert provenance["stages"]["stage2"]["train_config"]["lambda_l1"] == 10.0
    assert "recon" in provenance["stages"]["stage2"]["last_losses"]
    assert provenance["data"]["pairs_used"] == 48 and provenance["data"]["pairs"].endswith(".csv")
    assert description["metrics"]["rows"]["g1+g2"]["ssim_pg2"] == 0.5
    pipeline = Pipeline.from_checkpoint(tmp_path / "ckpt.json")
    state = load_run_state(root / "run", 2)
    for key, value in pipeline.g2.state_dict().items():
        torch.testing.assert_close(value, state["g2"][key], rtol=1e-3, atol=1e-3)   # fp16 weights
    name = data["names"][0][0]
    image = read_rgb(data["images"] / name)
    [result] = [g.image for g in pipeline.generate([image], [np.array([[10.0, 10.0]] * 18)], [(44, 80)])]
    assert result.shape == (80, 44, 3) and result.dtype == np.uint8


def test_stage_two_over_another_runs_g1_keeps_how_that_g1_was_trained(run, tmp_path):
    root, data = run
    assert main(["export", str(root / "run"), "--out", str(tmp_path / "g1only")]) == 0
    common = ["--preset", "tiny", "--data-root", str(data["images"]), "--annotations", str(data["annotations"]),
              "--pairs", str(data["pairs"]), "--workers", "0", "--steps", "2", "--stage", "2"]
    for name, g1 in (("from-checkpoint", tmp_path / "g1only.json"), ("from-run", root / "run")):
        assert main(["fit", *common, "--g1", str(g1), "--out", str(tmp_path / name)]) == 0
        assert main(["export", str(tmp_path / name), "--out", str(tmp_path / f"{name}-model")]) == 0
        provenance = json.loads((tmp_path / f"{name}-model.json").read_text())["provenance"]
        stage1 = provenance["stages"]["stage1"]
        assert stage1["steps"] == 3 and stage1["g1_from"] == str(g1.resolve())
        assert stage1["train_config"]["stage"] == 1 and provenance["steps"] == 5
        assert list(provenance["stages"]) == ["stage1", "stage2"]


def test_stage_one_resumed_after_stage_two_began_does_not_rewrite_the_frozen_g1s_record(run, tmp_path):
    """Stage 2 froze the G1 of stage 1's step 3; stage 1 going on in the same folder changes
    the folder's stage-1 state, not the G1 inside the exported model."""
    import shutil

    root, data = run
    shutil.copytree(root / "run", tmp_path / "run", ignore=shutil.ignore_patterns("stage2*"))
    common = ["--preset", "tiny", "--data-root", str(data["images"]), "--annotations", str(data["annotations"]),
              "--pairs", str(data["pairs"]), "--workers", "0", "--out", str(tmp_path / "run"), "--log-every", "1"]
    assert main(["fit", "--stage", "2", "--steps", "2", *common]) == 0
    assert main(["fit", "--stage", "1", "--steps", "5", "--resume", *common]) == 0
    assert load_run_state(tmp_path / "run", 1)["step"] == 5
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "model")]) == 0
    provenance = json.loads((tmp_path / "model.json").read_text())["provenance"]
    assert provenance["stages"]["stage1"]["steps"] == 3 and provenance["steps"] == 5
    assert list(provenance["stages"]) == ["stage1", "stage2"] and "g1_stage1" not in provenance["data"]


def test_a_fine_tuned_model_keeps_how_its_starting_weights_were_trained(run, tmp_path):
    root, data = run
    assert main(["export", str(root / "run"), "--out", str(tmp_path / "first")]) == 0
    common = ["--preset", "tiny", "--data-root", str(data["images"]), "--annotations", str(data["annotations"]),
              "--pairs", str(data["pairs"]), "--workers", "0", "--out", str(tmp_path / "more"),
              "--init", str(tmp_path / "first.json")]
    assert main(["fit", "--stage", "1", "--steps", "2", *common]) == 0
    assert main(["export", str(tmp_path / "more"), "--out", str(tmp_path / "second")]) == 0
    assert main(["fit", "--stage", "1", "--steps", "1", *common[:-2], "--out", str(tmp_path / "third"),
                 "--init", str(tmp_path / "second.json")]) == 0
    assert main(["export", str(tmp_path / "third"), "--out", str(tmp_path / "third-model")]) == 0
    provenance = json.loads((tmp_path / "third-model.json").read_text())["provenance"]
    assert provenance["steps"] == 1
    second = provenance["init"][str((tmp_path / "second.json").resolve())]
    first = second["init"][str((tmp_path / "first.json").resolve())]   # the chain back to the first run
    assert second["steps"] == 2 and first["stages"]["stage1"]["steps"] == 3 and first["steps"] >= 3
    assert first["data"]["pairs_used"] == 48


def test_export_of_a_folder_without_state_is_refused(tmp_path, capsys):
    with pytest.raises(StateError, match="no training state"):
        from training.export import export_run
        export_run(tmp_path, tmp_path / "x")
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "pg2-train fit" in capsys.readouterr().err
