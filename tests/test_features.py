"""training/features.py and the perceptual columns of `pg2-train eval`, with randomly initialised
Inception-v3 / AlexNet weights that the tests save themselves (nothing is downloaded).

The formulas (IS, FID, feature moments) and the missing-package error run everywhere; the networks and
the eval columns run where torchvision and lpips import (`pip install 'pg2-blender[metrics]'`) and are
skipped elsewhere. The formulas are also checked against torchmetrics and pytorch-fid's scipy sqrtm where
those are installed.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest

import torch
from safetensors.torch import save_file

from fixture_datasets import one_torch_thread, write_dataset  # noqa: F401 (autouse fixture)
from pg2_server.checkpoint import save_checkpoint
from pg2_server.pipeline import Pipeline
from training.cli import main
from training.features import (LPIPS, FeatureError, FeatureMoments, FidStatistics, Inception,
                               PerceptualScores, frechet_distance, inception_score, psd_sqrt, require)

try:  # a torchvision built for another torch fails with RuntimeError/OSError, not ImportError
    import lpips  # noqa: F401
    import torchvision
    MISSING = None
except Exception as e:
    MISSING = f"perceptual networks need torchvision and lpips ({type(e).__name__}: {e})"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random Inception-v3 (.safetensors) and AlexNet (.pth) weights in torchvision's key layout."""
    if MISSING:
        pytest.skip(MISSING)
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    inception = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    save_file({k: v.contiguous() for k, v in inception.state_dict().items()}, str(root / "inception.safetensors"))
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), root / "alexnet.pth")
    return {"inception": root / "inception.safetensors", "alexnet": root / "alexnet.pth"}


@pytest.fixture(scope="module")
def inception(weights):
    return Inception(weights["inception"])


def picture_set(seed: int, count: int, bright: bool) -> list[np.ndarray]:
    """Smooth random pictures (64 × 32); `bright` sets are a different distribution."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (count, 8, 4, 3)).astype(np.uint8)
    images = [np.repeat(np.repeat(im, 8, 0), 8, 1) for im in low]
    return [np.clip(im // 4 + 190, 0, 255).astype(np.uint8) if bright else im for im in images]


# -- formulas --------------------------------------------------------------------------------

def test_inception_score_of_known_predictions():
    sure = np.full((20, 1000), -50.0)
    sure[:, 7] = 50.0                                          # every image: class 7, surely
    assert inception_score(sure) == pytest.approx((1.0, 0.0))
    spread = np.full((40, 1000), -50.0)
    spread[np.arange(40), np.arange(40) % 4] = 50.0            # 4 classes, evenly, within each split of 4
    mean, std = inception_score(spread, splits=10)
    assert mean == pytest.approx(4.0) and std == pytest.approx(0.0, abs=1e-9)
    assert inception_score(spread, splits=1)[0] == pytest.approx(4.0)
    uniform = np.zeros((10, 1000))                             # p(y|x) = p(y): no information
    assert inception_score(uniform)[0] == pytest.approx(1.0)


@pytest.mark.filterwarnings("ignore::UserWarning")             # torchmetrics: buffer size, std of one split
def test_inception_score_equals_torchmetrics_on_one_split():
    image_inception = pytest.importorskip("torchmetrics.image.inception")
    logits = np.random.default_rng(1).normal(0, 3, (50, 1000))
    metric = image_inception.InceptionScore(feature=torch.nn.Identity(), splits=1)
    metric.update(torch.from_numpy(logits))
    assert inception_score(logits, splits=1)[0] == pytest.approx(float(metric.compute()[0]), rel=1e-6)


def test_frechet_distance_of_known_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    # diagonal covariances: ‖μ1 − μ2‖² + Σ (√a − √b)²
    expected = 1 + 4 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected)
    assert frechet_distance(mu1, np.diag(var1), mu1, np.diag(var1)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_equals_pytorch_fid_sqrtm_and_torchmetrics():
    sqrtm = pytest.importorskip("scipy.linalg").sqrtm
    fid = pytest.importorskip("torchmetrics.image.fid")
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(200, 16)), rng.normal(0.3, 1.5, size=(200, 16)) @ rng.normal(size=(16, 16))
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    pytorch_fid = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(pytorch_fid, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(pytorch_fid, rel=1e-9)
    expected = float(fid._compute_fid(*(torch.from_numpy(x) for x in (mu1, s1, mu2, s2))))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    root = psd_sqrt(s1)
    np.testing.assert_allclose(root @ root, s1, atol=1e-12)
    assert frechet_distance(mu1, s1, mu2, s2, root) == frechet_distance(mu1, s1, mu2, s2)


def test_frechet_distance_from_fewer_samples_than_dimensions():
    rng = np.random.default_rng(6)
    reference = rng.normal(size=(100, 40))
    mu1, s1 = reference.mean(0), np.cov(reference, rowvar=False)
    moments = FeatureMoments(40)
    moments.add(rng.normal(0.5, 2, size=(7, 40)))
    moments.add(rng.normal(0.5, 2, size=(5, 40)))
    mu2, s2 = moments.statistics()
    assert moments.samples().shape == (12, 40)
    via_gram = frechet_distance(mu1, s1, mu2, s2, samples2=moments.samples())
    assert via_gram == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-7)  # rounding of the zero λ
    stats = FidStatistics(mu1, s1, 100, "")
    assert stats.distance(moments) == pytest.approx(via_gram, rel=1e-12) and stats._sqrt_sigma is None
    moments.add(rng.normal(0.5, 2, size=(30, 40)))             # now more samples than dimensions
    assert moments.samples() is None
    assert stats.distance(moments) == pytest.approx(frechet_distance(mu1, s1, *moments.statistics()), rel=1e-12)


def test_frechet_distance_of_few_samples_in_many_dimensions():
    features = np.random.default_rng(5).normal(size=(10, 300))   # covariance of rank 9 in 300-d
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-6 * np.trace(sigma))  # rounding


def test_feature_moments_equal_numpy():
    features = np.random.default_rng(3).normal(size=(30, 5))
    moments = FeatureMoments(5)
    moments.add(features[:7])
    moments.add(features[7:])
    mu, sigma = moments.statistics()
    np.testing.assert_allclose(mu, features.mean(0))
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False))
    with pytest.raises(FeatureError, match="at least 2 images"):
        FeatureMoments(5).statistics()


# -- networks --------------------------------------------------------------------------------

def test_inception_features_and_perceptual_scores_per_row(weights, inception):
    a, b = picture_set(0, 6, bright=False), picture_set(1, 6, bright=True)
    pool, logits = inception(a + [np.zeros((100, 70, 3), np.uint8)])    # any size goes to 299 × 299
    assert pool.shape == (7, 2048) and logits.shape == (7, 1000) and np.isfinite(pool).all()
    np.testing.assert_allclose(inception(a[:2])[0], pool[:2], rtol=1e-4, atol=1e-5)   # batch-independent
    moments = FeatureMoments()
    moments.add(pool[:6])
    reference = FidStatistics(*moments.statistics(), count=6, inception_sha256=inception.sha256)
    scores = PerceptualScores(inception, LPIPS(weights["alexnet"]), reference)
    masks = [np.ones(a[0].shape[:2], np.uint8)] * 6
    scores.add("same", a[:3], a[:3], masks[:3])
    scores.add("same", a[3:], a[3:], masks[3:])
    scores.add("other", b, a, masks)
    results = scores.results()
    assert set(results["same"]) == {"is", "is_std", "mask_is", "mask_is_std", "fid", "lpips"}
    assert results["other"]["fid"] > 0 and abs(results["same"]["fid"]) < 1e-3 * results["other"]["fid"]
    assert results["same"]["lpips"] == pytest.approx(0, abs=1e-6) and results["other"]["lpips"] > 0
    assert results["same"]["is"] == pytest.approx(inception_score(logits[:6])[0])
    assert results["same"]["mask_is"] == pytest.approx(results["same"]["is"], rel=1e-5)   # mask everywhere
    assert scores.columns == ["is", "mask_is", "fid", "lpips"]
    with pytest.raises(FeatureError, match="--inception-weights"):
        PerceptualScores(None, None, reference)


def test_lpips_is_zero_for_identical_images(weights):
    lpips = LPIPS(weights["alexnet"])
    a, b = picture_set(0, 3, bright=False), picture_set(1, 3, bright=True)
    assert lpips(a, [im.copy() for im in a]) == pytest.approx([0, 0, 0], abs=1e-6)
    distances = lpips(a, b)
    assert (distances > 0).all()
    mixed = lpips([a[0], np.zeros((40, 40, 3), np.uint8)], [b[0], np.full((40, 40, 3), 255, np.uint8)])
    assert mixed[0] == pytest.approx(distances[0], rel=1e-5)          # sizes mixed: scored one by one
    with pytest.raises(FeatureError, match="at least 31"):
        lpips([np.zeros((30, 64, 3), np.uint8)], [np.zeros((30, 64, 3), np.uint8)])
    with pytest.raises(ValueError, match="one size"):
        lpips([a[0]], [a[0][:32]])


# -- files and errors ------------------------------------------------------------------------

def test_statistics_round_trip_and_wrong_weights(tmp_path, inception, weights):
    rng = np.random.default_rng(4)
    stats = FidStatistics(rng.normal(size=3), np.eye(3), 10, inception.sha256, "train/")
    path = stats.save(tmp_path / "stats")                      # no suffix added by numpy
    loaded = FidStatistics.load(path, inception)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    assert (loaded.count, loaded.inception_sha256, loaded.source) == (10, inception.sha256, "train/")
    FidStatistics(stats.mu, stats.sigma, 10, "0" * 64).save(tmp_path / "other.npz")
    with pytest.raises(FeatureError, match="other Inception weights"):
        FidStatistics.load(tmp_path / "other.npz", inception)
    np.savez(tmp_path / "junk.npz", x=np.zeros(3))
    with pytest.raises(FeatureError, match="not an .npz of FID statistics"):
        FidStatistics.load(tmp_path / "junk.npz")
    with pytest.raises(FeatureError, match="do not exist"):
        FidStatistics.load(tmp_path / "missing.npz")


def test_bad_weight_files_say_what_is_wrong(tmp_path, weights):
    with pytest.raises(FeatureError, match="does not exist"):
        Inception(tmp_path / "nothing.pth")
    with pytest.raises(FeatureError, match="not a torchvision Inception-v3 state dict.*missing"):
        Inception(weights["alexnet"])                           # the wrong network's weights
    with pytest.raises(FeatureError, match="not a torchvision AlexNet state dict.*unexpected"):
        LPIPS(weights["inception"])
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FeatureError, match="cannot read weight file"):
        Inception(tmp_path / "garbage.pth")
    torch.save({"state_dict": {"x": torch.zeros(2)}, "code": argparse.Namespace(x=1)}, tmp_path / "obj.pth")
    with pytest.raises(FeatureError, match="cannot read weight file"):        # weights_only refuses objects
        LPIPS(tmp_path / "obj.pth")
    (tmp_path / "weights.h5").write_bytes(b"")
    with pytest.raises(FeatureError, match="expected .safetensors or .pth"):
        Inception(tmp_path / "weights.h5")
    state = torchvision.models.alexnet(weights=None).state_dict()
    state["classifier.6.weight"] = torch.zeros(10, 4096)       # a fine-tuned 10-class head
    torch.save(state, tmp_path / "alexnet10.pth")
    with pytest.raises(FeatureError, match=r"wrong shapes.*classifier\.6\.weight"):
        LPIPS(tmp_path / "alexnet10.pth")


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)            # import lpips now raises ImportError
    with pytest.raises(FeatureError, match=r"pip install 'pg2-blender\[metrics\]'"):
        require("lpips", "LPIPS")


# -- pg2-train eval ---------------------------------------------------------------------------

def test_eval_cli_writes_perceptual_columns(tmp_path, weights, capsys):
    train = write_dataset(tmp_path, "deepfashion", identities=2, views=3, split="train", seed=1)
    test = write_dataset(tmp_path, "deepfashion", identities=2, views=2, split="test", seed=2)
    pipeline = Pipeline.random("tiny", seed=1)
    checkpoint = tmp_path / "ckpt"
    save_checkpoint(checkpoint, pipeline.config, pipeline.g1, pipeline.g2)
    common = ["eval", "--checkpoint", f"{checkpoint}.json", "--data-root", str(test["images"]),
              "--annotations", str(test["annotations"]), "--pairs", str(test["pairs"]), "--no-images",
              "--device", "cpu", "--limit", "2", "--inception-weights", str(weights["inception"])]
    assert main(common + ["--out", str(tmp_path / "a"), "--fid-train-root", str(train["images"]),
                          "--fid-train-annotations", str(train["annotations"]),
                          "--lpips-weights", str(weights["alexnet"])]) == 0
    printed = capsys.readouterr()
    assert "| IS | mask-IS | FID (train) | LPIPS |" in printed.out
    assert "FID statistics of 6 training images" in printed.err
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    for row in ("copy-source", "g1", "g1+g2"):
        values = metrics["rows"][row]
        assert values["is"] >= 1 and values["mask_is"] >= 1 and values["fid"] > 0 and values["lpips"] > 0
        assert values["ssim_pg2"] is not None                              # the old columns stay
    assert metrics["perceptual"]["fid_reference"]["images"] == 6
    assert "FID (train)" in (tmp_path / "a" / "metrics.md").read_text()

    stats = tmp_path / "a" / "fid-train-stats.npz"             # reused: same FID, no recomputation
    save_checkpoint(checkpoint, pipeline.config, pipeline.g1, None)          # G1 alone now
    assert main(common + ["--out", str(tmp_path / "b"), "--fid-train-stats", str(stats)]) == 0
    again = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert set(again["rows"]) == {"copy-source", "g1"}
    for row in again["rows"]:
        assert again["rows"][row]["fid"] == pytest.approx(metrics["rows"][row]["fid"], rel=1e-6)
    assert "lpips" not in again["rows"]["g1"] and "LPIPS" not in capsys.readouterr().out

    assert main(common[:-2] + ["--out", str(tmp_path / "c"), "--fid-train-stats", str(stats)]) == 2
    assert "FID needs --inception-weights" in capsys.readouterr().err
    assert main(common[:-1] + [str(weights["alexnet"]), "--out", str(tmp_path / "d")]) == 2
    assert "not a torchvision Inception-v3 state dict" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()                        # failed before generating anything
