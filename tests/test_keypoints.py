import json
import math
import re

import numpy as np
import pytest

from pg2_server import keypoints as kp


def test_schema_order_and_flip_pairs():
    assert kp.COUNT == 18
    assert kp.NAMES[:5] == ("nose", "neck", "right_shoulder", "right_elbow", "right_wrist")
    assert kp.NAMES[14:] == ("right_eye", "left_eye", "right_ear", "left_ear")
    # Every right joint swaps with its left twin; nose and neck stay.
    for a, b in kp.FLIP_PAIRS:
        assert kp.NAMES[a].replace("right", "left") == kp.NAMES[b]
    assert kp.FLIP_PERMUTATION[0] == 0 and kp.FLIP_PERMUTATION[1] == 1
    assert kp.FLIP_PERMUTATION[2] == 5 and kp.FLIP_PERMUTATION[5] == 2
    assert sorted(kp.FLIP_PERMUTATION) == list(range(18))


def test_mask_limbs_are_the_original_23_zero_indexed():
    assert len(kp.MASK_LIMBS) == 23
    assert kp.MASK_LIMBS[0] == (1, 2)        # [2,3]: neck - right shoulder
    assert kp.MASK_LIMBS[12] == (1, 0)       # [2,1]: neck - nose
    assert kp.MASK_LIMBS[-1] == (16, 17)     # [17,18]: ears


def test_flip_keypoints_mirrors_x_and_swaps_sides():
    points = [None] * 18
    points[2] = (10.0, 20.0)   # right shoulder
    points[0] = (5.0, 1.0)
    flipped = kp.flip_keypoints(points, width=64)
    assert np.allclose(flipped[5], (53.0, 20.0))   # becomes the left shoulder, mirrored
    assert np.isnan(flipped[2]).all()
    assert np.allclose(flipped[0], (58.0, 1.0))
    # Flipping twice is the identity.
    assert np.allclose(np.nan_to_num(kp.flip_keypoints(flipped, 64), nan=-7),
                       np.nan_to_num(kp.as_array(points), nan=-7))


MARKET_ROW = ("0364_c2s1_084546_01.jpg: [14, 28, 29, 50, 65, 28, 41, 27, 68, 96, 112, 67, 93, 119, 12, -1, 14, -1]:"
              " [45, 30, 20, 18, 31, 40, 54, 48, 26, 20, 2, 44, 51, 53, 41, -1, 30, -1]")
FASHION_ROW = ("fashionWOMENTees_Tanksid0000508545_1front.jpg:[40, 85, 90, 147, 210, 82, 141, 199, 205, -1, -1, 205,"
               " -1, -1, 34, 34, 39, 40]:[88, 89, 56, 49, 35, 124, 129, 111, 58, -1, -1, 98, -1, -1, 81, 96, 72, 105]")


@pytest.mark.parametrize("row, name, first, missing", [
    (MARKET_ROW, "0364_c2s1_084546_01.jpg", (45, 14), [15, 17]),
    (FASHION_ROW, "fashionWOMENTees_Tanksid0000508545_1front.jpg", (88, 40), [9, 10, 12, 13]),
])
def test_parse_annotation_rows_in_both_spacing_styles(row, name, first, missing):
    parsed_name, points = kp.parse_annotation_row(row)
    assert parsed_name == name
    assert tuple(points[0]) == first               # x from the second list, y from the first
    assert [i for i in range(18) if np.isnan(points[i]).any()] == missing


def test_fractional_coordinates_round_to_the_nearest_pixel_and_numpy_scalars_read():
    _, points = kp.parse_annotation_row(MARKET_ROW.replace("[14,", "[14.7,", 1))
    assert points[0, 1] == 15
    name, reference = kp.parse_annotation_row(MARKET_ROW)
    lists = MARKET_ROW.split(":", 1)[1]
    numpy2 = re.sub(r"-?\d+", lambda m: f"np.int64({m[0]})", lists)   # `print(list(array))` under numpy 2
    _, points = kp.parse_annotation_row(name + ":" + numpy2)
    np.testing.assert_array_equal(points, reference)


def test_annotation_row_round_trip_and_file(tmp_path):
    name, points = kp.parse_annotation_row(MARKET_ROW)
    assert kp.format_annotation_row(name, points) == MARKET_ROW
    path = tmp_path / "market-annotation-test.csv"
    kp.write_annotations(path, [(name, points)])
    assert path.read_text().splitlines()[0] == "name:keypoints_y:keypoints_x"
    rows, problems = kp.read_annotations(path)
    assert problems == [] and list(rows) == [name]
    assert np.array_equal(np.nan_to_num(rows[name], nan=-1), np.nan_to_num(points, nan=-1))
    with pytest.raises(kp.KeypointError):    # a bad row half-way: the old file stays, whole
        kp.write_annotations(path, [("b.jpg", points), ("c.jpg", points[:17])])
    assert kp.read_annotations(path)[0].keys() == {name} and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_malformed_rows_are_reported_or_raised(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("name:keypoints_y:keypoints_x\n" + MARKET_ROW + "\nbroken row\n"
                    "a.jpg: [1, 2]: [3, 4]\n")
    rows, problems = kp.read_annotations(path, strict=False)
    assert len(rows) == 1 and len(problems) == 2
    assert "bad.csv:3" in problems[0] and "has 2 values, expected 18" in problems[1]
    with pytest.raises(kp.AnnotationError, match="bad.csv:3"):
        kp.read_annotations(path, strict=True)


def test_header_byte_order_mark_and_a_name_annotated_twice(tmp_path):
    name, points = kp.parse_annotation_row(MARKET_ROW)
    other = MARKET_ROW.replace(name, "other.jpg").replace("[14,", "[15,", 1)
    path = tmp_path / "excel.csv"
    path.write_text("\n" + "Name:Keypoints_Y:Keypoints_X\n" + MARKET_ROW + "\n" + other + "\n",
                    encoding="utf-8-sig")
    rows, problems = kp.read_annotations(path)
    assert problems == [] and list(rows) == [name, "other.jpg"] and rows["other.jpg"][0, 1] == 15
    assert kp.first_line(path) == "Name:Keypoints_Y:Keypoints_X"
    path.write_text(MARKET_ROW + "\n" + MARKET_ROW.replace("[14,", "[99,", 1) + "\n")
    rows, problems = kp.read_annotations(path, strict=False)
    assert rows[name][0, 1] == 14 and len(problems) == 1 and "annotated twice" in problems[0]
    with pytest.raises(kp.AnnotationError, match="excel.csv:2: .* annotated twice"):
        kp.read_annotations(path)


@pytest.mark.parametrize("bad, message", [
    ([(1, 2)] * 17, "expected 18 keypoints"),
    ([(1, 2)] * 17 + [(float("nan"), 2)], "non-finite"),
    ([(1, 2)] * 17 + [(math.inf, 2)], "non-finite"),
    ([(1, 2)] * 17 + [("1", 2)], "non-numeric"),
    ([(1, 2)] * 17 + [(1, 2, 3)], "must be \\[x, y\\] or None"),
    ("not a list", "must be a list"),
    (np.zeros((17, 2)), "shape \\(18, 2\\)"),
])
def test_bad_keypoints_say_what_is_wrong(bad, message):
    with pytest.raises(kp.KeypointError, match=message):
        kp.as_array(bad)


def test_pose_files_both_formats(tmp_path):
    ours = tmp_path / "pose.json"
    points = [[10, 20]] + [None] * 17
    ours.write_text(json.dumps({"size": [176, 256], "keypoints": points}))
    size, array = kp.load_pose_file(ours)
    assert size == (176, 256) and tuple(array[0]) == (10, 20) and np.isnan(array[1]).all()

    flat = []
    for i in range(18):
        flat += [i * 2.0, i * 3.0, 0.0 if i == 4 else 0.9]
    openpose = tmp_path / "openpose.json"
    openpose.write_text(json.dumps({"canvas_width": 640, "canvas_height": 480,
                                    "people": [{"pose_keypoints_2d": flat}]}))
    size, array = kp.load_pose_file(openpose)
    assert size == (640, 480)
    assert tuple(array[3]) == (6.0, 9.0) and np.isnan(array[4]).all()


def test_openpose_files_as_openpose_writes_them(tmp_path):
    """BODY_25 (OpenPose's default model), several people in no order, no canvas size (OpenPose
    writes none: the frame comes from the caller), a byte-order mark."""
    def body25(scale: float, offset: float) -> list:
        flat = []
        for i in range(25):
            flat += [offset + i * scale, offset + i * 2 * scale, 0.0 if i == 4 else 0.8]
        return flat
    path = tmp_path / "frame_000000000000_keypoints.json"
    path.write_text(json.dumps({"version": 1.3, "people": [{"pose_keypoints_2d": body25(1.0, 5.0)},     # a bystander
                                                          {"pose_keypoints_2d": body25(10.0, 50.0)}]}),
                    encoding="utf-8-sig")
    with pytest.raises(kp.PoseFileError, match="without canvas_width and canvas_height.*generate --size W H"):
        kp.load_pose_file(path)
    size, array = kp.load_pose_file(path, frame=(640, 480))
    assert size == (640, 480)
    assert tuple(array[1]) == (60.0, 70.0)                    # neck: BODY_25's 1
    assert tuple(array[8]) == (140.0, 230.0)                  # right hip: BODY_25's 9 (8 is MidHip)
    assert tuple(array[17]) == (230.0, 410.0) and np.isnan(array[4]).all()   # left ear: 18; 4 missing


def test_normalised_coordinates_are_refused(tmp_path):
    path = tmp_path / "pose.json"
    path.write_text(json.dumps({"size": [176, 256], "keypoints": [[0.4, 0.2], [0.5, 0.3]] + [None] * 16}))
    with pytest.raises(kp.PoseFileError, match="look like normalised coordinates .OpenPose --keypoint_scale"):
        kp.load_pose_file(path)


@pytest.mark.parametrize("content, message", [
    ("{", "not valid JSON"),
    ('{"size": [10, 10]}', "expected"),
    ('{"size": [0, 10], "keypoints": []}', "size must be positive"),
    ('{"size": [10.5, 10], "keypoints": []}', "integers"),
    ('{"size": [10, 10], "keypoints": [[1, 2]]}', "expected 18 keypoints"),
    ('{"people": [], "canvas_width": 1, "canvas_height": 1}', "no people"),
    ('{"people": {"pose_keypoints_2d": []}}', "must be a list"),
    ('{"people": ["nobody"]}', "must hold 54 numbers .COCO-18 × x, y, confidence. or 75 .BODY_25."),
    ('{"people": [{"pose_keypoints_2d": ' + json.dumps(["a"] * 54) + '}]}', "must hold numbers only"),
    (b'{"size": [10, 10], "keypoints": "\xb0"}', "is not UTF-8 text"),
])
def test_bad_pose_files(tmp_path, content, message):
    path = tmp_path / "pose.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(kp.PoseFileError, match=message):
        kp.load_pose_file(path)
    with pytest.raises(kp.PoseFileError, match="does not exist"):
        kp.load_pose_file(tmp_path / "missing.json")
