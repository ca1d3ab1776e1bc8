"""training/data.py: reading PATN splits, the pair tensors on the canvas, the resumable sampler."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from fixture_datasets import break_after_header, one_torch_thread, write_dataset  # noqa: F401 (autouse fixture)
from pg2_server.keypoints import INDEX, format_annotation_row
from pg2_server.model import preset
from pg2_server.pose import pose_mask
from pg2_server.drawing import read_rgb
from training.data import DataError, DataReport, PairDataset, PairSampler, encode_pair, jitter_colors, load_split, \
    make_loader, read_annotation_file, read_pairs

TINY = preset("tiny")  # canvas 16 × 32, fixture frames 32 × 64 (both W × H): scale ½


@pytest.mark.parametrize("style", ["deepfashion", "market"])
def test_load_split_reads_both_csv_styles(tmp_path, style):
    data = write_dataset(tmp_path, style)
    split = load_split(data["images"], data["annotations"], data["pairs"])
    assert len(split.pairs) == 4 * 4 * 3
    assert len(split.keypoints) == 16
    assert split.report.total == 0
    name = data["names"][0][0]
    assert split.keypoints[name].shape == (18, 2)
    assert not np.isnan(split.keypoints[name]).any()


def test_bad_rows_and_missing_files_are_counted_and_skipped(tmp_path):
    data = write_dataset(tmp_path)
    names = data["names"]
    (data["images"] / names[0][0]).unlink()                       # 6 pairs lose an image
    with open(data["annotations"], "a") as f:
        f.write("broken-row-without-lists\n")                      # malformed annotation
        f.write("x.jpg: [1, 2]: [3, 4]\n")                         # wrong count
    text = data["annotations"].read_text().splitlines()
    dropped = names[1][0]
    data["annotations"].write_text("\n".join(l for l in text if not l.startswith(dropped)) + "\n")
    with open(data["pairs"], "a") as f:
        f.write("only-one-column\n")
        f.write(f"{names[2][0]},{names[2][1]},extra\n")
    split = load_split(data["images"], data["annotations"], data["pairs"])
    assert split.report.count("malformed annotation rows") == 2
    assert split.report.count("malformed pair rows") == 2
    assert split.report.count("missing images") == 6
    assert split.report.count("pairs without annotation") == 6
    assert len(split.pairs) == 48 - 12
    assert "skipped:" in split.report.summary() and "6 missing images" in split.report.summary()
    with pytest.raises(DataError):
        load_split(data["images"], data["annotations"], data["pairs"], strict=True)


def test_missing_files_say_which(tmp_path):
    data = write_dataset(tmp_path)
    with pytest.raises(DataError, match="annotation file .*nope.csv does not exist"):
        load_split(data["images"], tmp_path / "nope.csv", data["pairs"])
    with pytest.raises(DataError, match="pairs file"):
        load_split(data["images"], data["annotations"], tmp_path / "nope.csv")
    with pytest.raises(DataError, match="image folder"):
        load_split(tmp_path / "nowhere", data["annotations"], data["pairs"])
    data["pairs"].write_text("from,to\n")
    with pytest.raises(DataError, match="lists no pairs: `pg2-train pairs` makes them"):
        load_split(data["images"], data["annotations"], data["pairs"])


def test_heatmap_at_the_framed_pixel_and_flipped(tmp_path):
    data = write_dataset(tmp_path)
    split = load_split(data["images"], data["annotations"], data["pairs"])
    dataset = PairDataset(split, TINY)
    index = 0
    target_name = split.pairs[index][1]
    wrist = INDEX["right_wrist"]
    x, y = split.keypoints[target_name][wrist]
    item = dataset[(index, False)]
    # Frame 32×64 → canvas 16×32: pixel centres map as (v + 0.5) · ½ − 0.5.
    cx, cy = round((x + 0.5) * 0.5 - 0.5), round((y + 0.5) * 0.5 - 0.5)
    assert item["heatmaps"].shape == (18, 32, 16)
    assert item["heatmaps"][wrist, cy, cx] == 1.0
    assert item["heatmaps"][wrist].min() == -1.0
    flipped = dataset[(index, True)]
    # Mirrored in the 32-px-wide frame, and the right wrist becomes the left wrist.
    fx = round(((31 - x) + 0.5) * 0.5 - 0.5)
    assert flipped["heatmaps"][INDEX["left_wrist"], cy, fx] == 1.0
    assert torch.equal(flipped["target"], item["target"].flip(-1))
    assert torch.equal(flipped["source"], item["source"].flip(-1))
    on_canvas = item["keypoints"].numpy()
    assert on_canvas[wrist] == pytest.approx([(x + 0.5) * 0.5 - 0.5, (y + 0.5) * 0.5 - 0.5])
    assert np.array_equal(item["mask"][0].numpy(), pose_mask(on_canvas, (16, 32)))
    assert item["source"].min() >= -1 and item["source"].max() <= 1
    assert item["coordinates"].shape == (36,)


def test_sampler_is_seeded_restartable_and_splits_ranks():
    full = PairSampler(10, seed=3)
    stream = iter(full)
    first = [next(stream) for _ in range(25)]        # crosses two epoch boundaries
    assert sorted(i for i, _, _ in first[:10]) == list(range(10))
    assert len({salt for _, _, salt in first}) == 25                  # a fresh colour draw per item
    assert first == [next(s) for s in [iter(PairSampler(10, seed=3))] for _ in range(25)]
    restarted = iter(PairSampler(10, seed=3, start=13))
    assert [next(restarted) for _ in range(12)] == first[13:25]
    assert first != [next(s) for s in [iter(PairSampler(10, seed=4))] for _ in range(25)]
    assert not any(f for _, f, _ in [next(s) for s in [iter(PairSampler(10, flip=False))] for _ in range(10)])
    rank0 = iter(PairSampler(10, seed=3, rank=0, world_size=2))
    rank1 = iter(PairSampler(10, seed=3, rank=1, world_size=2))
    a = [next(rank0)[0] for _ in range(5)]
    b = [next(rank1)[0] for _ in range(5)]
    assert sorted(a + b) == list(range(10))


def test_sampler_order_and_flips_do_not_depend_on_the_colour_draws():
    # The order and flips are the first two draws of each epoch's generator, as before the salts.
    generator = torch.Generator().manual_seed(3 * 1_000_003)
    order = torch.randperm(10, generator=generator).tolist()
    flips = (torch.rand(10, generator=generator) < 0.5).tolist()
    stream = iter(PairSampler(10, seed=3))
    assert [next(stream)[:2] for _ in range(10)] == list(zip(order, flips))


def test_color_jitter_changes_both_images_alike():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)
    b[:2] = a[:2]                                           # a garment seen in both images
    b[-1] = (250, 250, 250)                                 # studio white
    b[-2] = (128, 128, 128)                                 # grey
    ja, jb = jitter_colors([a, b], 0.8, salt=11)
    assert np.array_equal(ja[:2], jb[:2])                   # the same colour stays the same colour
    assert np.array_equal(jitter_colors([b], 0.8, salt=11)[0], jb)   # per image, not per pair position
    assert np.array_equal(jitter_colors([a], 0.8, salt=11)[0], ja)   # and the same salt draws the same
    assert not np.array_equal(jitter_colors([a], 0.8, salt=12)[0], ja)
    assert np.abs(ja.astype(int) - a).mean() > 10           # the colours really move
    for row in (jb[-1], jb[-2]):                            # no hue appears on white and grey
        assert np.ptp(row.astype(int), axis=-1).max() <= 1
    assert abs(int(jb[-2, 0, 0]) - 128) <= 128 * (np.exp(0.2) - 1) + 1   # brightness at most e^(±strength/4)
    assert all(np.array_equal(x, y) for x, y in zip(jitter_colors([a, b], 0.0, salt=11), (a, b)))
    red = np.zeros((1, 1, 3), np.uint8)
    red[..., 0] = 200
    hues = {round(float(cv2.cvtColor(jitter_colors([red], 1.0, s)[0], cv2.COLOR_RGB2HSV_FULL)[0, 0, 0]))
            for s in range(40)}
    assert len(hues) > 20                                   # at full strength, hues all round the wheel


def test_dataset_jitters_source_and_target_with_the_item_salt(tmp_path):
    data = write_dataset(tmp_path)
    split = load_split(data["images"], data["annotations"], data["pairs"])
    plain, jittered = PairDataset(split, TINY), PairDataset(split, TINY, color_jitter=0.5)
    assert torch.equal(plain[(3, False, 5)]["source"], plain[(3, False)]["source"])   # off: the salt is unused
    item = jittered[(3, False, 5)]
    source_name, target_name = split.pairs[3]
    source, target = jitter_colors([read_rgb(split.image_dir / source_name), read_rgb(split.image_dir / target_name)],
                                   0.5, 5)
    expected = encode_pair(source, target, split.keypoints[target_name], TINY)
    for key in ("source", "target", "heatmaps", "mask"):
        assert torch.equal(item[key], expected[key])
    assert not torch.equal(item["source"], plain[(3, False)]["source"])
    assert not torch.equal(item["source"], jittered[(3, False, 6)]["source"])
    with pytest.raises(DataError, match=r"strength in \[0, 1\]"):
        PairDataset(split, TINY, color_jitter=1.5)


@pytest.mark.timeout(120)
def test_workers_start_after_the_parent_used_opencv_threads(tmp_path):
    # A parent that ran a parallel OpenCV op before forking used to hang its workers forever.
    cv2.setNumThreads(2)
    cv2.resize(np.zeros((1500, 1500, 3), np.uint8), (700, 700))
    data = write_dataset(tmp_path)
    dataset = PairDataset(load_split(data["images"], data["annotations"], data["pairs"]), TINY)
    batch = next(iter(make_loader(dataset, 5, PairSampler(len(dataset)), workers=2)))
    assert batch["source"].shape == (5, 3, 32, 16)


def test_loader_batches_full_and_identical_with_workers(tmp_path):
    data = write_dataset(tmp_path)
    split = load_split(data["images"], data["annotations"], data["pairs"])
    dataset = PairDataset(split, TINY)
    plain = next(iter(make_loader(dataset, 5, PairSampler(len(dataset)), workers=0)))
    parallel = next(iter(make_loader(dataset, 5, PairSampler(len(dataset)), workers=2)))
    assert plain["source"].shape == (5, 3, 32, 16)
    assert plain["mask"].shape == (5, 1, 32, 16)
    for key in plain:
        assert torch.equal(plain[key].nan_to_num(-7), parallel[key].nan_to_num(-7)), key


def test_annotation_header_says_which_list_is_x(tmp_path):
    data = write_dataset(tmp_path)
    reference = read_annotation_file(data["annotations"], DataReport())
    swapped = tmp_path / "x-first.csv"   # the same keypoints, written x list first
    swapped.write_text("name: keypoints_x: keypoints_y\n" + "".join(
        format_annotation_row(name, points[:, ::-1]) + "\n" for name, points in reference.items()))
    rows = read_annotation_file(swapped, DataReport())
    assert rows.keys() == reference.keys()
    for name in rows:
        np.testing.assert_array_equal(rows[name], reference[name])
    headerless = tmp_path / "no-header.csv"   # PATN's order
    headerless.write_text("".join(line + "\n" for line in data["annotations"].read_text().splitlines()[1:]))
    np.testing.assert_array_equal(read_annotation_file(headerless, DataReport())[name], reference[name])
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("name:x:y\n" + data["annotations"].read_text().split("\n", 1)[1])
    with pytest.raises(DataError, match="not an annotation header.*name:keypoints_y:keypoints_x"):
        read_annotation_file(unknown, DataReport())


def test_pairs_header_says_which_column_is_the_source(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("to,from\nb.jpg,a.jpg\nd.jpg,c.jpg\n")
    assert read_pairs(path, DataReport()) == [("a.jpg", "b.jpg"), ("c.jpg", "d.jpg")]
    path.write_text("from,to\na.jpg,b.jpg\n")
    assert read_pairs(path, DataReport()) == [("a.jpg", "b.jpg")]
    path.write_text("a.jpg,b.jpg\n")          # no header
    assert read_pairs(path, DataReport()) == [("a.jpg", "b.jpg")]
    path.write_text("source,target\na.jpg,b.jpg\n")
    with pytest.raises(DataError, match="not a pairs header.*from,to"):
        read_pairs(path, DataReport())


def test_keypoints_outside_the_image_are_dropped_and_counted(tmp_path):
    data = write_dataset(tmp_path)
    name = data["names"][0][1]
    text = data["annotations"].read_text().splitlines()
    rows = {line.split(":", 1)[0]: line for line in text[1:]}
    points = read_annotation_file(data["annotations"], DataReport())[name]
    points[INDEX["right_wrist"]] = (40, 20)     # the frames are 32 px wide
    points[INDEX["left_wrist"]] = (10, -3)
    rows[name] = format_annotation_row(name, points).replace(": ", ":").replace(", ", ",")
    data["annotations"].write_text("\n".join([text[0], *rows.values()]) + "\n")
    split = load_split(data["images"], data["annotations"], data["pairs"])
    assert split.report.count("keypoints outside the image") == 1
    assert np.isnan(split.keypoints[name][[INDEX["right_wrist"], INDEX["left_wrist"]]]).all()
    assert not np.isnan(split.keypoints[name][INDEX["right_elbow"]]).any()
    assert len(split.pairs) == 48                     # the joints go, not the image
    with pytest.raises(DataError, match="outside the 32×64 image"):
        load_split(data["images"], data["annotations"], data["pairs"], strict=True)


def test_an_image_that_cannot_be_read_is_skipped_at_load(tmp_path):
    data = write_dataset(tmp_path)
    (data["images"] / data["names"][1][2]).write_bytes(b"not an image")
    split = load_split(data["images"], data["annotations"], data["pairs"])
    assert split.report.count("unreadable images") == 6 and len(split.pairs) == 42
    with pytest.raises(DataError, match="unreadable images"):
        load_split(data["images"], data["annotations"], data["pairs"], strict=True)


def test_an_image_broken_after_loading_is_replaced_and_counted(tmp_path):
    data = write_dataset(tmp_path)
    split = load_split(data["images"], data["annotations"], data["pairs"])
    dataset = PairDataset(split, TINY)
    index = next(i for i, (_, target) in enumerate(split.pairs) if target == data["names"][2][0])
    expected_next = dataset[(index + 1, False)]
    break_after_header(data["images"] / data["names"][2][0])
    item = dataset[(index, False)]
    assert int(item["skipped"]) == 1
    assert torch.equal(item["target"], expected_next["target"])    # the next pair, deterministically
    assert int(dataset[(0, False)]["skipped"]) == 0
    split.strict = True
    with pytest.raises(DataError, match="cannot read image"):
        dataset[(index, False)]


def test_a_batch_larger_than_the_split_is_refused(tmp_path):
    data = write_dataset(tmp_path)
    dataset = PairDataset(load_split(data["images"], data["annotations"], data["pairs"]), TINY)
    with pytest.raises(DataError, match="batch 49 is larger than the 48 pairs of the split"):
        make_loader(dataset, 49, PairSampler(len(dataset)), workers=0)
    with pytest.raises(DataError, match="24 pairs each of 2 processes"):
        make_loader(dataset, 25, PairSampler(len(dataset), world_size=2), workers=0)
    assert len(next(iter(make_loader(dataset, 48, PairSampler(len(dataset)), workers=0)))["source"]) == 48


def test_headers_after_blank_lines_or_a_byte_order_mark_are_read_as_headers(tmp_path):
    data = write_dataset(tmp_path)
    reference = read_annotation_file(data["annotations"], DataReport())
    swapped = tmp_path / "x-first.csv"   # as Excel saves it: a byte-order mark, then a blank line
    swapped.write_text("\nName:Keypoints_X:Keypoints_Y\n" + "".join(
        format_annotation_row(name, points[:, ::-1]) + "\n" for name, points in reference.items()),
        encoding="utf-8-sig")
    report = DataReport()
    rows = read_annotation_file(swapped, report)
    assert report.total == 0 and rows.keys() == reference.keys()
    for name in rows:
        np.testing.assert_array_equal(rows[name], reference[name])
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("to,from\nb.jpg,a.jpg\n", encoding="utf-8-sig")
    assert read_pairs(pairs, DataReport()) == [("a.jpg", "b.jpg")]
    for blank in ("\n", "\r\n", " \n\n"):   # the header is the first non-blank line
        pairs.write_bytes(f"{blank}to,from\r\nb.jpg,a.jpg\r\n".encode())
        report = DataReport()
        assert read_pairs(pairs, report) == [("a.jpg", "b.jpg")] and report.total == 0


def test_csvs_in_another_encoding_are_named(tmp_path):
    annotations = tmp_path / "fasion-resize-annotation-train.csv"
    pairs = tmp_path / "fasion-resize-pairs-train.csv"
    annotations.write_bytes("name:keypoints_y:keypoints_x\nJosé_01.jpg: [1]: [2]\n".encode("latin-1"))
    pairs.write_bytes("from,to\nJosé_01.jpg,José_02.jpg\n".encode("latin-1"))
    for read, path in ((read_annotation_file, annotations), (read_pairs, pairs)):
        with pytest.raises(DataError, match=f"{path.name} is not UTF-8 text .*0xe9.*save it as UTF-8"):
            read(path, DataReport())


def test_image_names_may_reach_into_subfolders(tmp_path):
    data = write_dataset(tmp_path, identities=2, views=2)
    (data["images"] / "WOMEN").mkdir()
    moved = {}
    for name in [n for group in data["names"].values() for n in group]:
        (data["images"] / name).rename(data["images"] / "WOMEN" / name)
        moved[name] = f"WOMEN/{name}"
    for path in (data["annotations"], data["pairs"]):
        text = path.read_text()
        for name, inside in moved.items():
            text = text.replace(name, inside)
        path.write_text(text)
    split = load_split(data["images"], data["annotations"], data["pairs"], strict=True)
    assert len(split.pairs) == 4 and all(a.startswith("WOMEN/") for a, _ in split.pairs)


def test_a_sideways_phone_photo_is_measured_upright(tmp_path):
    from PIL import Image

    data = write_dataset(tmp_path, identities=1, views=2)
    name = data["names"][0][0]
    upright = read_rgb(data["images"] / name)                  # 32 wide, 64 high
    stored = Image.fromarray(np.rot90(upright, 1))              # kept sideways: 64 wide, 32 high
    exif = Image.Exif()
    exif[0x0112] = 6                                            # "rotate 90° clockwise to show"
    stored.save(data["images"] / name, exif=exif, quality=95)
    assert read_rgb(data["images"] / name).shape == upright.shape
    split = load_split(data["images"], data["annotations"], data["pairs"], strict=True)
    assert split.report.total == 0                             # no keypoint falls outside a 64×32 frame
    assert not np.isnan(split.keypoints[name][INDEX["right_ankle"]]).any()

