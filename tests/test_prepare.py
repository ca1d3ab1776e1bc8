"""training/prepare.py: raw DeepFashion In-shop and Market-1501 folders → PATN's layout."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pg2_server.detection import available as detection_available
from pg2_server.drawing import read_rgb
from training.cli import main
from training.data import DataError, DataReport, read_annotation_file, read_pairs
from training.prepare import flatten_deepfashion_name, prepare_deepfashion, prepare_market, split_of

RAW_DF = {  # raw path under img/ → flattened name, split
    "WOMEN/Tees_Tanks/id_00005085/45_1_front.jpg": ("fashionWOMENTees_Tanksid0000508545_1front.jpg", "train"),
    "WOMEN/Tees_Tanks/id_00005085/45_2_side.jpg": ("fashionWOMENTees_Tanksid0000508545_2side.jpg", "train"),
    "MEN/Denim/id_00000080/01_1_front.jpg": ("fashionMENDenimid0000008001_1front.jpg", "test"),
    "MEN/Denim/id_00000080/01_7_additional.jpg": ("fashionMENDenimid0000008001_7additional.jpg", "test"),
}


def test_flattened_names_follow_patn():
    for raw, (name, _) in RAW_DF.items():
        assert flatten_deepfashion_name(Path(raw)) == name
    with pytest.raises(DataError, match="GENDER/CATEGORY"):
        flatten_deepfashion_name(Path("loose.jpg"))
    assert split_of("fasion-resize-pairs-test.csv") == "test"
    assert split_of("market-annotation-train.csv") == "train"
    with pytest.raises(DataError, match="split"):
        split_of("annotations.csv")


def _raw_deepfashion(root: Path) -> tuple[Path, Path, Path, Path]:
    for relative in RAW_DF:
        path = root / "img" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        image = np.full((256, 256, 3), 200, np.uint8)
        image[100:110, 95:105] = (0, 0, 255)   # a red block (BGR) centred at x = 100
        cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 100])
    ys = "[40, 85, 90, 147, 210, 82, 141, 199, 205, -1, -1, 205, -1, -1, 34, 34, 39, 40]"
    xs = "[88, 89, 56, 49, 35, 124, 129, 111, 58, -1, -1, 98, -1, -1, 81, 96, 72, 105]"
    bad_xs = xs.replace("129", "180")   # outside the 176-px crop, as a few published rows are
    train_names = [n for n, s in RAW_DF.values() if s == "train"]
    test_names = [n for n, s in RAW_DF.values() if s == "test"]
    annotations_train = root / "fasion-resize-annotation-train.csv"
    annotations_train.write_text("name:keypoints_y:keypoints_x\n" + f"{train_names[0]}:{ys}:{xs}\n"
                                 + f"{train_names[1]}:{ys}:{bad_xs}\n" + f"fashionMISSINGid0000000101_1front.jpg:{ys}:{xs}\n")
    annotations_test = root / "fasion-resize-annotation-test.csv"
    annotations_test.write_text("name:keypoints_y:keypoints_x\n" + "".join(f"{n}: {ys}: {xs}\n" for n in test_names)
                                + "garbage row\n")
    pairs_train = root / "fasion-resize-pairs-train.csv"
    pairs_train.write_text(f"from,to\n{train_names[0]},{train_names[1]}\n{train_names[0]},fashionMISSINGid0000000101_1front.jpg\n")
    pairs_test = root / "fasion-resize-pairs-test.csv"
    pairs_test.write_text(f"from,to\n{test_names[0]},{test_names[1]}\n")
    return annotations_train, annotations_test, pairs_train, pairs_test


def test_deepfashion_patn_crop(tmp_path):
    raw = tmp_path / "raw"
    csvs = _raw_deepfashion(raw)
    counts, report = prepare_deepfashion(raw, tmp_path / "out", "256x176", csvs[:2], csvs[2:])
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(n for n, s in RAW_DF.values() if s == "train")
    assert len(list((out / "test").iterdir())) == 2
    image = read_rgb(out / "train" / "fashionWOMENTees_Tanksid0000508545_1front.jpg")
    assert image.shape == (256, 176, 3)
    assert image[105, 60, 0] > 200 and image[105, 60, 1] < 60        # the red block moved 40 px left
    assert report.count("annotated images missing") == 1
    assert report.count("keypoints outside the image") == 1
    assert report.count("malformed annotation rows") == 1
    assert report.count("pairs with a missing image") == 1
    rows = read_annotation_file(out / "fasion-resize-annotation-train.csv", DataReport())
    assert rows["fashionWOMENTees_Tanksid0000508545_1front.jpg"][5].tolist() == [124, 82]
    assert np.isnan(rows["fashionWOMENTees_Tanksid0000508545_2side.jpg"][6]).all()   # x 180 dropped
    assert len(read_pairs(out / "fasion-resize-pairs-train.csv", DataReport())) == 1
    assert counts["train images"] == 2 and counts["test images"] == 2


def test_deepfashion_square_shifts_keypoints_and_strict_stops(tmp_path):
    raw = tmp_path / "raw"
    csvs = _raw_deepfashion(raw)
    _, report = prepare_deepfashion(raw, tmp_path / "out", "256x256", csvs[:2], csvs[2:])
    out = tmp_path / "out"
    assert read_rgb(out / "test" / "fashionMENDenimid0000008001_1front.jpg").shape == (256, 256, 3)
    rows = read_annotation_file(out / "fasion-resize-annotation-train.csv", DataReport())
    assert rows["fashionWOMENTees_Tanksid0000508545_1front.jpg"][5].tolist() == [164, 82]
    assert report.count("keypoints outside the image") == 0     # 180 + 40 fits in 256
    with pytest.raises(DataError):
        prepare_deepfashion(raw, tmp_path / "strict", "256x176", csvs[:2], csvs[2:], strict=True)
    with pytest.raises(DataError, match="is not a folder"):
        prepare_deepfashion(tmp_path / "nothing", tmp_path / "x")


def test_market_drops_junk_and_distractors(tmp_path, capsys):
    raw = tmp_path / "Market-1501-v15.09.15"
    names = {"bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg", "-1_c1s1_000401_03.jpg"],
             "bounding_box_test": ["0001_c1s1_001051_00.jpg", "0000_c1s1_000151_01.jpg", "0001_c2s1_000301_00.jpg"]}
    for folder, files in names.items():
        (raw / folder).mkdir(parents=True)
        for name in files:
            cv2.imwrite(str(raw / folder / name), np.full((128, 64, 3), 90, np.uint8))
    annotations = tmp_path / "market-annotation-test.csv"
    lists = ("[14, 28, 29, 50, 65, 28, 41, 27, 68, 96, 112, 67, 93, 119, 12, -1, 14, -1]: "
             "[45, 30, 20, 18, 31, 40, 54, 48, 26, 20, 2, 44, 51, 53, 41, -1, 30, -1]")
    # PATN's test annotations list the distractors too
    annotations.write_text(f"name:keypoints_y:keypoints_x\n0001_c1s1_001051_00.jpg: {lists}\n"
                           f"0000_c1s1_000151_01.jpg: {lists}\n")
    pairs = tmp_path / "market-pairs-test.csv"
    pairs.write_text("from,to\n0001_c1s1_001051_00.jpg,0001_c2s1_000301_00.jpg\n")
    out = tmp_path / "out"
    assert main(["prepare", "market", "--raw", str(raw), "--out", str(out), "--annotations", str(annotations),
                 "--pairs", str(pairs), "--strict"]) == 0
    assert (out / "market-annotation-test.csv").read_text().count(".jpg") == 1
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(names["bounding_box_train"][:2])
    assert sorted(p.name for p in (out / "test").iterdir()) == ["0001_c1s1_001051_00.jpg", "0001_c2s1_000301_00.jpg"]
    printed = capsys.readouterr().out
    assert "2 junk or distractor images dropped" in printed and "no problems" in printed
    assert (out / "market-pairs-test.csv").read_text() == pairs.read_text()
    counts, _ = prepare_market(raw, tmp_path / "again")
    assert counts["train images"] == 2
    assert main(["prepare", "market", "--raw", str(tmp_path), "--out", str(out)]) == 2
    assert "bounding_box_train" in capsys.readouterr().err


def test_without_csvs_the_release_partition_decides_the_split(tmp_path):
    raw = tmp_path / "raw"
    _raw_deepfashion(raw)
    (raw / "Eval").mkdir()
    (raw / "Eval" / "list_eval_partition.txt").write_text(
        "4\nimage_name item_id evaluation_status\n"
        "img/WOMEN/Tees_Tanks/id_00005085/45_1_front.jpg   id_00005085 train\n"
        "img/WOMEN/Tees_Tanks/id_00005085/45_2_side.jpg    id_00005085 train\n"
        "img/MEN/Denim/id_00000080/01_1_front.jpg          id_00000080 query\n")
    counts, _ = prepare_deepfashion(raw, tmp_path / "out")
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(n for n, s in RAW_DF.values() if s == "train")
    assert [p.name for p in (out / "test").iterdir()] == ["fashionMENDenimid0000008001_1front.jpg"]
    assert counts["images not in the partition file"] == 1       # 01_7_additional is not listed
    (raw / "Eval" / "list_eval_partition.txt").write_text("4\nimage_name item_id evaluation_status\nnonsense\n")
    with pytest.raises(DataError, match="list_eval_partition.txt:3"):
        prepare_deepfashion(raw, tmp_path / "again")


def test_the_release_unpacked_in_place_is_found_from_its_root_or_its_img_folder(tmp_path, capsys):
    """In-shop ships Img/img.zip beside Eval/: unpacked in place, the images are in Img/img/."""
    release = tmp_path / "In-shop Clothes Retrieval Benchmark"
    _raw_deepfashion(tmp_path / "unpacked")
    (release / "Img").mkdir(parents=True)
    (tmp_path / "unpacked" / "img").rename(release / "Img" / "img")
    (release / "Eval").mkdir()
    (release / "Eval" / "list_eval_partition.txt").write_text(
        "2\nimage_name item_id evaluation_status\n"
        "img/WOMEN/Tees_Tanks/id_00005085/45_1_front.jpg   id_00005085 train\n"
        "img/MEN/Denim/id_00000080/01_1_front.jpg          id_00000080 gallery\n")
    # The blank test images have no person for the detector to annotate: that fails the command.
    failed = 2 if detection_available() else 0
    for raw in (release, release / "Img"):
        out = tmp_path / ("out-" + raw.name.split()[0])
        assert main(["prepare", "deepfashion", "--raw", str(raw), "--out", str(out)]) == failed
        err = capsys.readouterr().err
        assert "Eval/list_eval_partition.txt" in err and (not failed or "no person found" in err)
        assert [p.name for p in (out / "train").iterdir()] == ["fashionWOMENTees_Tanksid0000508545_1front.jpg"]
        assert [p.name for p in (out / "test").iterdir()] == ["fashionMENDenimid0000008001_1front.jpg"]
    (release / "Eval" / "list_eval_partition.txt").unlink()
    assert main(["prepare", "deepfashion", "--raw", str(release), "--out", str(tmp_path / "all")]) == failed
    assert "every image goes to train/" in capsys.readouterr().err
    empty = tmp_path / "empty" / "img" / "WOMEN"
    empty.mkdir(parents=True)
    assert main(["prepare", "deepfashion", "--raw", str(empty.parent.parent), "--out", str(tmp_path / "none")]) == 2
    assert "no image was prepared" in capsys.readouterr().err


def test_an_image_annotated_in_both_splits_stays_in_test_only(tmp_path):
    raw = tmp_path / "raw"
    annotations_train, annotations_test, pairs_train, pairs_test = _raw_deepfashion(raw)
    leaked = next(n for n, s in RAW_DF.values() if s == "test")
    row = next(line for line in annotations_test.read_text().splitlines() if line.startswith(leaked))
    annotations_train.write_text(annotations_train.read_text() + row + "\n")
    first_train = next(n for n, s in RAW_DF.values() if s == "train")
    pairs_train.write_text(pairs_train.read_text() + f"{first_train},{leaked}\n")
    counts, report = prepare_deepfashion(raw, tmp_path / "out", "256x176", [annotations_train, annotations_test],
                                         [pairs_train, pairs_test])
    out = tmp_path / "out"
    assert report.count("images annotated in both splits (kept in test only)") == 1
    assert (out / "test" / leaked).exists() and not (out / "train" / leaked).exists()
    assert leaked not in read_annotation_file(out / annotations_train.name, DataReport())
    assert all(leaked not in pair for pair in read_pairs(out / pairs_train.name, DataReport()))
    assert leaked in read_annotation_file(out / annotations_test.name, DataReport())


def test_published_csvs_are_never_overwritten_by_their_prepared_copies(tmp_path, capsys):
    raw = tmp_path / "raw"
    csvs = _raw_deepfashion(raw)
    before = [p.read_bytes() for p in csvs]
    args = ["prepare", "deepfashion", "--raw", str(raw), "--out", str(raw), "--size", "256x256",
            "--annotations", *map(str, csvs[:2]), "--pairs", *map(str, csvs[2:])]
    assert main(args) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert [p.read_bytes() for p in csvs] == before and not (raw / "train").exists()


def test_a_non_square_image_keeps_its_aspect_ratio(tmp_path):
    path = tmp_path / "raw" / "img" / "WOMEN/Dresses/id_00000002/02_1_front.jpg"
    path.parent.mkdir(parents=True)
    image = np.full((1100, 550, 3), 120, np.uint8)            # H × W: a high-resolution portrait
    cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 100])
    for size, white in (("256x176", 24), ("256x256", 64)):     # 550 wide → 128 at 256 high, padded white
        prepare_deepfashion(tmp_path / "raw", tmp_path / size, size)
        result = read_rgb(tmp_path / size / "train" / "fashionWOMENDressesid0000000202_1front.jpg")
        assert result.shape == (256, int(size[4:]), 3)
        assert (result[:, :white - 2] > 245).all() and (result[:, -(white - 2):] > 245).all()
        assert (np.abs(result[:, white + 2:-(white + 2)].astype(int) - 120) < 6).all()


def test_a_square_image_kept_square_is_copied_unchanged(tmp_path):
    raw = tmp_path / "raw"
    _raw_deepfashion(raw)
    counts, _ = prepare_deepfashion(raw, tmp_path / "out", "256x256")
    for relative, (name, _) in RAW_DF.items():
        written = next((tmp_path / "out").glob(f"*/{name}"))
        assert written.read_bytes() == (raw / "img" / relative).read_bytes()
    assert counts["images copied unchanged"] == 4
