"""training/evaluate.py and `pg2-train eval`: metrics equal scikit-image; the table has all rows."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from fixture_datasets import one_torch_thread, write_dataset  # noqa: F401 (autouse fixture)
from pg2_server.checkpoint import save_checkpoint
from pg2_server.pipeline import Pipeline
from training.cli import main
from training.data import load_split
from training.evaluate import evaluate, mask_ssim, score, ssim_patn, ssim_pg2


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 256, (48, 32, 3), dtype=np.uint8)
    noisy = np.clip(target.astype(int) + rng.integers(-40, 41, target.shape), 0, 255).astype(np.uint8)
    return target, noisy


def test_metrics_equal_scikit_image(images):
    target, generated = images
    assert ssim_pg2(generated, target) == structural_similarity(generated, target, win_size=7, channel_axis=2,
                                                                data_range=255)
    expected_patn = structural_similarity(target, generated, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False, channel_axis=2,
                                          data_range=float(generated.max()) - float(generated.min()))
    assert ssim_patn(generated, target) == pytest.approx(expected_patn, abs=1e-12)
    mask = np.zeros(target.shape[:2], np.uint8)
    mask[10:30, 5:25] = 1
    expected_mask = structural_similarity(generated * mask[..., None], target * mask[..., None], win_size=7,
                                          channel_axis=2, data_range=255)
    assert mask_ssim(generated, target, mask * 255) == pytest.approx(expected_mask, abs=1e-12)
    scores = score(generated, target, mask)
    assert scores["psnr"] == pytest.approx(peak_signal_noise_ratio(target, generated, data_range=255))
    assert scores["l1"] == pytest.approx(np.abs(generated.astype(float) - target).mean() / 255)
    assert 0 < scores["ssim_pg2"] < 1


def test_identical_images_score_perfectly(images):
    target, _ = images
    scores = score(target.copy(), target, np.ones(target.shape[:2], np.uint8))
    assert scores["ssim_pg2"] == pytest.approx(1.0)
    assert scores["ssim_patn"] == pytest.approx(1.0)
    assert scores["mask_ssim"] == pytest.approx(1.0)
    assert scores["l1"] == 0.0 and math.isinf(scores["psnr"])


def test_eval_writes_images_metrics_and_table(tmp_path, capsys):
    data = write_dataset(tmp_path, "market", identities=2, views=3)
    name = data["names"][0][0]
    with open(data["pairs"], "a") as f:
        f.write(f"{name},{name}\n")                       # copy-source is exact on this pair
        f.write(f"{name},missing.jpg\n")
    pipeline = Pipeline.random("tiny", seed=1)
    split = load_split(data["images"], data["annotations"], data["pairs"])
    metrics = evaluate(pipeline, split, tmp_path / "eval", batch_size=4, progress=False)
    assert metrics["pairs"] == 13 and metrics["skipped"] == {"missing images": 1}
    assert set(metrics["rows"]) == {"copy-source", "blank", "g1", "g1+g2", "target"}
    assert len(list((tmp_path / "eval" / "images" / "final").glob("*.png"))) == 13
    assert len(list((tmp_path / "eval" / "images" / "g1").glob("*.png"))) == 13
    copy = metrics["rows"]["copy-source"]
    assert copy["ssim_pg2"] > metrics["rows"]["g1+g2"]["ssim_pg2"]      # random weights lose to copying
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == metrics
    table = (tmp_path / "eval" / "metrics.md").read_text()
    assert "| copy-source |" in table and "| g1+g2 |" in table and "SSIM (PATN)" in table

    one = load_split(data["images"], data["annotations"], data["pairs"])
    one.pairs = [(name, name)]
    exact = evaluate(pipeline, one, tmp_path / "one", save_images=False, progress=False)
    assert exact["rows"]["copy-source"]["ssim_pg2"] == pytest.approx(1.0)
    assert exact["rows"]["copy-source"]["psnr"] is None             # +inf is left out of the mean

    checkpoint = tmp_path / "ckpt"
    save_checkpoint(checkpoint, pipeline.config, pipeline.g1, None)
    assert main(["eval", "--checkpoint", f"{checkpoint}.json", "--data-root", str(data["images"]),
                 "--annotations", str(data["annotations"]), "--pairs", str(data["pairs"]),
                 "--out", str(tmp_path / "cli"), "--no-images", "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    assert "| g1 |" in printed.out and "g1+g2" not in printed.out        # a G1-only checkpoint
    assert "1 missing images" in printed.err
    assert not (tmp_path / "cli" / "images").exists()
