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
    assert metrics["pairs"] == 13 and metrics["skipped"] == {"missing images": 1} and metrics["data_problems"] == {}
    assert metrics["inference"] == {"device": "cpu", "dtype": "float32", "backend": "torch"}
    assert set(metrics["rows"]) == {"copy-source", "blank", "canvas", "g1", "g1+g2", "target"}
    canvas = metrics["rows"]["canvas"]       # the real target through the 16×32 canvas: close, not exact
    assert metrics["rows"]["g1+g2"]["ssim_pg2"] < canvas["ssim_pg2"] < 1 and 0 < canvas["delta_e"]
    assert canvas["detail"] < metrics["rows"]["target"]["detail"]
    assert len(list((tmp_path / "eval" / "images" / "final").glob("*.png"))) == 13
    assert len(list((tmp_path / "eval" / "images" / "g1").glob("*.png"))) == 13
    copy = metrics["rows"]["copy-source"]
    assert copy["ssim_pg2"] > metrics["rows"]["g1+g2"]["ssim_pg2"]      # random weights lose to copying
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == metrics
    table = (tmp_path / "eval" / "metrics.md").read_text()
    assert "| copy-source |" in table and "| g1+g2 |" in table and "SSIM (PATN)" in table
    assert table.startswith("13 test pairs, checkpoint `tiny-random` (float32, torch on cpu)")
    for limit in (0, -1):                                # not "all pairs" nor "all but the last"
        with pytest.raises(ValueError, match="positive number of pairs"):
            evaluate(pipeline, split, tmp_path / "none", limit=limit, progress=False)

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


def test_shown_sources_are_made_once_per_run_of_pairs_and_not_all_kept(tmp_path, monkeypatch):
    """--loose-sources / --frame-sources: each source is shown once while its pairs follow one
    another; only the latest SHOWN_KEPT are held, so a whole test set's do not pile up."""
    import training.evaluate as evaluation

    data = write_dataset(tmp_path, "market", identities=2, views=3)
    split = load_split(data["images"], data["annotations"], data["pairs"])
    a, b = sorted({s for s, _ in split.pairs})[:2]
    targets = [t for _, t in split.pairs][:3]
    split.pairs = [(a, targets[0]), (a, targets[1]), (b, targets[2]), (a, targets[2])]
    made = []

    def shown(image):
        made.append(image.shape)
        return image
    monkeypatch.setattr(evaluation, "SHOWN_KEPT", 1)
    evaluate(Pipeline.random("tiny", seed=1), split, tmp_path / "eval", batch_size=2, save_images=False,
             progress=False, shown_source=shown)
    assert len(made) == 3           # a, b, then a again: only the latest one was kept


def test_mask_ssim_uses_the_mask_drawn_at_the_images_own_resolution(tmp_path):
    from pg2_server.drawing import read_rgb
    from pg2_server.pose import fit_frame, pose_mask
    from training.evaluate import target_mask

    data = write_dataset(tmp_path, "deepfashion", identities=1, views=2)
    split = load_split(data["images"], data["annotations"], data["pairs"])
    split.pairs = split.pairs[:1]
    pipeline = Pipeline.random("tiny", seed=1)
    metrics = evaluate(pipeline, split, tmp_path / "eval", progress=False)
    source, target_name = split.pairs[0]
    target = read_rgb(split.image_dir / target_name)
    size = (target.shape[1], target.shape[0])
    generated = read_rgb(next((tmp_path / "eval" / "images" / "final").glob("*.png")))
    mask = pose_mask(split.keypoints[target_name], size, 4)
    assert np.array_equal(target_mask(split.keypoints[target_name], size), mask)
    assert metrics["rows"]["g1+g2"]["mask_ssim"] == pytest.approx(mask_ssim(generated, target, mask), abs=1e-9)
    # The model canvas's mask scaled up (what eval used before) covers far more of the image.
    fit = fit_frame(size, pipeline.config.canvas)
    canvas_mask = pose_mask(fit.keypoints_to_canvas(split.keypoints[target_name]), pipeline.config.canvas, 4)
    scaled_up = fit.image_to_frame(canvas_mask[..., None] * np.uint8(255))[..., 0] > 0
    assert scaled_up.mean() > 1.5 * mask.mean()
    assert metrics["rows"]["g1+g2"]["mask_ssim"] != pytest.approx(mask_ssim(generated, target, scaled_up), abs=1e-4)


def test_canvas_round_trip_is_what_the_canvas_keeps_of_an_image():
    from training.evaluate import canvas_round_trip

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (256, 176, 3), np.uint8)
    assert np.array_equal(canvas_round_trip(image, (176, 256)), image)       # the canvas is the frame
    flat = np.full((256, 176, 3), 200, np.uint8)
    assert np.array_equal(canvas_round_trip(flat, (88, 128)), flat)          # nothing fine to lose
    halved = canvas_round_trip(image, (88, 128))
    assert halved.shape == image.shape and np.abs(halved.astype(int) - image).mean() > 20   # noise is lost
    wide = rng.integers(0, 256, (100, 300, 3), np.uint8)                     # another aspect: padded, cropped back
    assert canvas_round_trip(wide, (88, 128)).shape == wide.shape


def test_delta_e_and_detail(images):
    from skimage.color import deltaE_ciede2000, rgb2lab

    from training.evaluate import delta_e, detail

    target, generated = images
    mask = np.zeros(target.shape[:2], np.uint8)
    mask[10:30, 5:25] = 1
    inside = mask > 0
    expected = deltaE_ciede2000(rgb2lab(generated), rgb2lab(target))[inside].mean()
    assert delta_e(generated, target, mask) == pytest.approx(expected, rel=1e-6)
    assert delta_e(target, target, mask) == pytest.approx(0.0, abs=1e-9)  # CIEDE2000 rounds to ~1e-15
    flat = np.full_like(target, 128)
    assert detail(flat, mask) == 0.0 and detail(target, mask) > 10
    assert math.isnan(delta_e(generated, target, np.zeros_like(mask)))


def test_a_target_without_a_limb_has_no_mask_ssim(images):
    """An empty mask would compare two black images (SSIM 1 whatever was generated): NaN, left
    out of the means as ΔE00 and detail are."""
    from training.evaluate import _mean, mask_ssim, score

    target, generated = images
    empty = np.zeros(target.shape[:2], np.uint8)
    assert math.isnan(mask_ssim(generated, target, empty))
    row = score(generated, target, empty)
    assert math.isnan(row["mask_ssim"]) and math.isnan(row["delta_e"]) and math.isfinite(row["ssim_pg2"])
    assert _mean([0.5, row["mask_ssim"]]) == 0.5


def test_saved_image_names_and_views_of_names_in_subfolders():
    from training.evaluate import _file_stem, view_of

    a = _file_stem("WOMEN/Dresses/id_00000002/02_1_front.jpg", "WOMEN/Dresses/id_00000002/02_2_side.jpg")
    b = _file_stem("MEN/Shirts/id_00000007/02_1_front.jpg", "MEN/Shirts/id_00000007/02_2_side.jpg")
    assert a != b and a == "WOMEN__Dresses__id_00000002__02_1_front___WOMEN__Dresses__id_00000002__02_2_side"
    assert _file_stem("fashionWOMENid01_1front.jpg", "fashionWOMENid01_2side.jpg") == \
        "fashionWOMENid01_1front___fashionWOMENid01_2side"         # PATN's flat names as before
    assert view_of("WOMEN/Dresses/id_00000002/02_4_full.jpg") == "full"
    assert view_of("fashionWOMENid01_7additional.jpg") == "additional" and view_of("0002_c1s1_000451_03.jpg") is None


def test_pckh_follows_patn_head_box_rule_side_aware():
    from training.evaluate import head_size, pckh_counts

    truth = np.full((18, 2), np.nan)
    truth[0] = (50, 20)        # nose
    truth[1] = (50, 40)        # neck: head box 10 wide (with the ears), 20 high
    truth[16] = (45, 22)
    truth[17] = (55, 22)
    truth[2], truth[5] = (40, 42), (60, 42)                     # right, left shoulder
    truth[8], truth[11] = (44, 90), (56, 90)
    assert head_size(truth) == (10.0, 20.0)
    predicted = truth.copy()
    predicted[0] += (4.9, 9.9)          # inside ½ head width and height: right
    predicted[1] += (5.1, 0)            # |dx| = 5.1 ≥ 5: wrong
    predicted[2], predicted[5] = truth[5], truth[2]             # sides swapped: both wrong
    right, annotated = pckh_counts(predicted, truth)
    assert annotated.sum() == 8 and right.sum() == 5
    assert not right[[1, 2, 5]].any()
    assert pckh_counts(None, truth)[0].sum() == 0                # no person: all wrong
    limbs, annotated_limbs = pckh_counts(truth, truth, joints=range(2, 14))
    assert annotated_limbs.sum() == 4 and limbs.sum() == 4
    headless = truth.copy()
    headless[[0, 1, 16, 17]] = np.nan   # no head: the torso (48 px) sets the size
    assert head_size(headless) == pytest.approx((0.27 * 48, 0.44 * 48))
    headless[[8, 11]] = np.nan
    assert head_size(headless) is None and pckh_counts(truth, headless) is None


def test_pose_scores_compare_with_the_annotations_and_with_the_real_targets_detection():
    from training.evaluate import PoseScores

    truth = np.full((18, 2), np.nan)
    truth[0], truth[1], truth[16], truth[17] = (50, 20), (50, 40), (45, 22), (55, 22)
    truth[2], truth[5], truth[8], truth[11] = (40, 42), (60, 42), (44, 90), (56, 90)
    swapped = truth.copy()                      # a back view the detector reads with sides swapped
    swapped[[2, 5, 8, 11]] = truth[[5, 2, 11, 8]]
    scores = PoseScores()
    scores.add("target", "back", swapped, truth, reference=swapped)
    scores.add("g1+g2", "back", swapped, truth, reference=swapped)   # looks like the real image
    scores.add("g1+g2", "front", truth, truth, reference=truth)
    scores.add("blank", "back", None, truth, reference=swapped)
    scores.add("g1", "back", truth, truth, reference=None)          # the target had no person found
    rows, views = scores.rows(), scores.views()
    assert views["back"]["target"]["pckh_limbs"] == 0.0 and views["back"]["target"]["pckh_limbs_agree"] == 1.0
    assert views["back"]["g1+g2"]["pckh_limbs"] == 0.0 and views["back"]["g1+g2"]["pckh_limbs_agree"] == 1.0
    assert rows["g1+g2"]["pckh_limbs"] == 0.5 and rows["g1+g2"]["pckh_limbs_agree"] == 1.0
    assert rows["blank"]["pckh_limbs_agree"] == 0.0 and rows["blank"]["detected"] == 0.0
    assert rows["g1"]["pckh_limbs"] == 1.0 and rows["g1"]["pckh_limbs_agree"] is None
    # turned: the back views read with sides swapped, not the front view, and nobody found is not counted
    assert views["back"]["target"]["turned"] == 1.0 and views["front"]["g1+g2"]["turned"] == 0.0
    assert rows["g1+g2"]["turned"] == 0.5 and rows["g1"]["turned"] == 0.0 and rows["blank"]["turned"] is None
    assert scores.no_head == 0
    limbs_only = truth.copy()
    limbs_only[[0, 1, 2, 5, 8, 11, 14, 15, 16, 17]] = np.nan   # neither head nor torso: no head size
    scores.add("target", "front", truth, limbs_only)
    scores.add("g1", "front", truth, limbs_only)
    assert scores.no_head == 1 and scores.rows()["target"]["detected"] == 1.0   # counted once per pair


# An upright person as fractions of the image's width and height, in the 18-keypoint order.
PERSON = np.array([(.5, .1), (.5, .2), (.4, .2), (.35, .35), (.33, .5), (.6, .2), (.65, .35), (.67, .5),
                   (.45, .55), (.45, .72), (.45, .9), (.55, .55), (.55, .72), (.55, .9),
                   (.48, .08), (.52, .08), (.46, .09), (.54, .09)])


class _ExactDetector:
    """Finds PERSON in any image, at that image's size: what a perfect detector would."""
    visibility = 0.5

    def detect(self, image):
        from types import SimpleNamespace
        return SimpleNamespace(keypoints=PERSON * (image.shape[1], image.shape[0]))


def test_copy_source_detections_are_kept_per_target_size(tmp_path):
    import cv2
    from pg2_server.keypoints import write_annotations

    rng = np.random.default_rng(0)
    sizes = {"source.jpg": (64, 128), "target.jpg": (64, 128), "target-large.jpg": (128, 256)}
    for name, (w, h) in sizes.items():
        cv2.imwrite(str(tmp_path / name), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    write_annotations(tmp_path / "annotations.csv", [(n, PERSON * s) for n, s in sizes.items()])
    (tmp_path / "pairs.csv").write_text("from,to\nsource.jpg,target.jpg\nsource.jpg,target-large.jpg\n")
    split = load_split(tmp_path, tmp_path / "annotations.csv", tmp_path / "pairs.csv")
    metrics = evaluate(Pipeline.random("tiny", seed=1), split, tmp_path / "eval", save_images=False,
                       progress=False, detector=_ExactDetector())
    # the source taken to each target's size is found where that target's person is, both times
    assert metrics["rows"]["copy-source"]["pckh"] == 1.0 and metrics["rows"]["target"]["pckh"] == 1.0


def test_loose_shot_sets_the_photo_in_a_wider_frame_and_keeps_a_panorama_whole():
    from training.evaluate import loose_shot

    photo = np.zeros((256, 176, 3), np.uint8)
    photo[100:110, 80:90] = 255
    wide = loose_shot(photo)
    assert wide.shape == (426, 639, 3)                       # the photo is 60 % of a 3:2 frame's height
    assert wide[185:195, 311:321].min() == 255 and wide.sum() == photo.sum()   # centred, backdrop repeated
    panorama = loose_shot(np.zeros((100, 300, 3), np.uint8))
    assert panorama.shape == (166, 300, 3)
