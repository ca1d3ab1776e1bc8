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


def test_losses_logged_after_the_last_save_are_not_the_exported_ones(run, tmp_path):
    """A kill after a log line and before the next save: the log runs past the state."""
    import shutil

    root, data = run
    shutil.copytree(root / "run", tmp_path / "run", ignore=shutil.ignore_patterns("stage2*"))
    log = tmp_path / "run" / "stage1-log.jsonl"
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    with open(log, "a") as f:
        f.write(json.dumps({"step": 4, "recon": 99.0, "skipped_images": 0}) + "\n")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "model")]) == 0
    stage1 = json.loads((tmp_path / "model.json").read_text())["provenance"]["stages"]["stage1"]
    assert stage1["steps"] == 3 and stage1["last_losses_step"] == 3
    assert stage1["last_losses"]["recon"] == logged[2]["recon"] != 99.0
    # the record a stage 2 keeps of its G1 is taken the same way
    assert main(["fit", "--stage", "2", "--steps", "1", "--preset", "tiny", "--data-root", str(data["images"]),
                 "--annotations", str(data["annotations"]), "--pairs", str(data["pairs"]), "--workers", "0",
                 "--g1", str(tmp_path / "run"), "--out", str(tmp_path / "over")]) == 0
    assert main(["export", str(tmp_path / "over"), "--out", str(tmp_path / "both")]) == 0
    stage1 = json.loads((tmp_path / "both.json").read_text())["provenance"]["stages"]["stage1"]
    assert (stage1["last_losses_step"], stage1["last_losses"]["recon"]) == (3, logged[2]["recon"])


def test_either_stage_exports_and_the_provenance_says_which_weights_each_network_has(run, tmp_path):
    from pg2_server.checkpoint import load_checkpoint
    from training.state import save_state
    from training.trainer import state_path

    root, data = run
    common = ["--preset", "tiny", "--data-root", str(data["images"]), "--annotations", str(data["annotations"]),
              "--pairs", str(data["pairs"]), "--out", str(tmp_path / "run"), "--workers", "0", "--ema", "0.9"]
    assert main(["fit", "--stage", "1", "--steps", "2", *common]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "none"), "--stage", "2"]) == 2
    assert main(["fit", "--stage", "2", "--steps", "1", *common]) == 0
    stage1, stage2 = load_run_state(tmp_path / "run", 1), load_run_state(tmp_path / "run", 2)

    def exported(name, *flags):
        assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / name), *flags]) == 0
        model = load_checkpoint(tmp_path / f"{name}.json")
        return model, model.provenance

    def same(network, weights):
        return all(torch.equal(network.state_dict()[k], v) for k, v in weights.items())

    model, provenance = exported("newest")                      # stage 2, both averages
    assert (provenance["stage"], provenance["weights"], provenance["ema"]) == (2, {"g1": "average", "g2": "average"},
                                                                               True)
    assert same(model.g2, stage2["ema"]) and same(model.g1, stage1["ema"])
    model, provenance = exported("last", "--no-ema")            # G2's last weights over the G1 it was trained with
    assert (provenance["weights"], provenance["ema"]) == ({"g1": "average", "g2": "last"}, False)
    assert same(model.g2, stage2["g2"]) and same(model.g1, stage2["g1"])
    model, provenance = exported("g1", "--stage", "1")          # stage 1 alone, once stage 2 has begun
    assert model.g2 is None and same(model.g1, stage1["ema"])
    assert (provenance["stage"], provenance["weights"], provenance["ema"], list(provenance["stages"]),
            provenance["steps"]) == (1, {"g1": "average"}, True, ["stage1"], 2)
    model, provenance = exported("g1-last", "--stage", "1", "--no-ema")
    assert same(model.g1, stage1["g1"]) and provenance["weights"] == {"g1": "last"}
    # a stage-2 state from before the record: what G1 is comes from stage 1's record
    del stage2["data"]["g1_weights"]
    save_state(state_path(tmp_path / "run", 2), stage2)
    assert exported("older")[1]["weights"] == {"g1": "average", "g2": "average"}
