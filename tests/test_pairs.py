"""training/pairs.py: the identity rule and same-person pairs with shoulders and hips."""
from __future__ import annotations

import csv

import pytest

import numpy as np

from fixture_datasets import one_torch_thread, STANDING, annotation_row, write_dataset  # noqa: F401 (autouse fixture)
from pg2_server.keypoints import INDEX, format_annotation_row, parse_annotation_row
from training.cli import main
from training.data import DataError
from training.pairs import build_pairs, identity


@pytest.mark.parametrize("name, person", [
    ("fashionWOMENTees_Tanksid0000508545_1front.jpg", "fashionWOMENTees_Tanksid00005085"),
    ("fashionMENDenimid0000008001_1front.jpg", "fashionMENDenimid00000080"),
    ("0364_c2s1_084546_01.jpg", "0364"),
    ("-1_c1s1_000401_03.jpg", None),        # Market junk
    ("0000_c1s1_000151_01.jpg", None),      # Market distractor
    ("bounding_box_test/0364_c2s1_084546_01.jpg", "0364"),   # names with a subfolder
    ("bounding_box_test/-1_c1s1_000401_03.jpg", None),
    ("bounding_box_test/0000_c1s1_000151_01.jpg", None),
    ("alice_01.png", "alice"),
    ("noidentity.png", None),
])
def test_identity_rule(name, person):
    assert identity(name) == person


def _read(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["from", "to"]
    return [tuple(r) for r in rows[1:]]


def test_pairs_are_same_person_with_torso(tmp_path):
    data = write_dataset(tmp_path, "market")
    names = data["names"]
    # Person 1 loses a hip in one image; a keypoint of another lies outside its image.
    no_hip, outside = names[1][0], names[2][0]
    rows = dict(parse_annotation_row(line) for line in data["annotations"].read_text().splitlines()[1:])
    rows[no_hip][INDEX["right_hip"]] = np.nan
    rows[outside][INDEX["right_wrist"], 0] = 500
    data["annotations"].write_text("name:keypoints_y:keypoints_x\n" + "\n".join(
        format_annotation_row(name, points) for name, points in rows.items()) + "\n")
    # A junk image that is annotated must not take part.
    junk = "-1_c1s1_000401_03.jpg"
    (data["images"] / junk).write_bytes((data["images"] / names[0][0]).read_bytes())
    with open(data["annotations"], "a") as f:
        f.write(annotation_row(junk, STANDING, space=True) + "\n")
    pairs, report, counts = build_pairs(data["images"], data["annotations"])
    assert counts["no identity"] == 1
    assert counts["no shoulders and hips"] == 1
    assert report.count("keypoints outside the image") == 1
    assert counts["identities"] == 4
    assert len(pairs) == 3 * 12 + 3 * 2                             # person 1 keeps 3 images
    assert all(identity(a) == identity(b) and a != b for a, b in pairs)
    assert not any(no_hip in pair or junk in pair for pair in pairs)
    assert any(outside in pair for pair in pairs)                  # the wrist is dropped, not the image
    with pytest.raises(DataError, match="outside"):
        build_pairs(data["images"], data["annotations"], strict=True)


def test_sampling_is_seeded(tmp_path):
    data = write_dataset(tmp_path)
    a, _, _ = build_pairs(data["images"], data["annotations"], seed=1, per_identity=5)
    b, _, _ = build_pairs(data["images"], data["annotations"], seed=1, per_identity=5)
    c, _, _ = build_pairs(data["images"], data["annotations"], seed=2, per_identity=5)
    assert a == b and a != c and len(a) == 20
    capped, _, counts = build_pairs(data["images"], data["annotations"], max_pairs=7)
    assert len(capped) == 7 == counts["pairs"]


def test_missing_images_reported_and_cli_writes_patn_csv(tmp_path, capsys):
    data = write_dataset(tmp_path)
    (data["images"] / data["names"][3][0]).unlink()
    out = tmp_path / "pairs.csv"
    assert main(["pairs", "--images", str(data["images"]), "--annotations", str(data["annotations"]),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "42 pairs of 15 images, 4 identities" in printed and "1 missing images" in printed
    assert len(_read(out)) == 42
    assert main(["pairs", "--images", str(data["images"]), "--annotations", str(data["annotations"]),
                 "--out", str(out), "--strict"]) == 2
    assert "missing" in capsys.readouterr().err
