"""pg2-train samples: chosen test pairs copied into a sample set that pg2-server demo reads."""
import json
import subprocess
import sys

import numpy as np
import pytest

from pg2_server.keypoints import read_annotations
from pg2_server.samples import load_samples
from training.sample_set import SampleSetError, write_sample_set

from fixture_datasets import write_dataset


def test_pairs_become_a_sample_set_with_the_targets_pose(tmp_path):
    data = write_dataset(tmp_path / "data", identities=2, views=3, split="test")
    (a, b, _), (c, d, _) = data["names"][0], data["names"][1]
    entries = write_sample_set(tmp_path / "set", data["images"], data["annotations"], [(a, b), (d, c)])

    assert [e["dataset_pair"] for e in entries] == [[a, b], [d, c]]
    assert (tmp_path / "set" / "person1_source.jpg").read_bytes() == (data["images"] / d).read_bytes()
    samples = load_samples(tmp_path / "set")
    rows, _ = read_annotations(data["annotations"])
    assert samples[0].size == (32, 64)
    np.testing.assert_array_equal(samples[0].keypoints, rows[b])
    np.testing.assert_array_equal(samples[1].keypoints, rows[c])
    assert samples[1].target.shape == (64, 32, 3)


def test_a_new_set_replaces_the_old_one_only_when_asked(tmp_path):
    data = write_dataset(tmp_path / "data", identities=1, views=3, split="test")
    a, b, c = data["names"][0]
    out = tmp_path / "set"
    write_sample_set(out, data["images"], data["annotations"], [(a, b), (b, c)])
    with pytest.raises(SampleSetError, match="--replace"):
        write_sample_set(out, data["images"], data["annotations"], [(c, a)])
    write_sample_set(out, data["images"], data["annotations"], [(c, a)], replace=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "person0_pose.json", "person0_source.jpg", "person0_target.jpg", "samples.json"]


def test_unknown_images_and_poses_are_named(tmp_path):
    data = write_dataset(tmp_path / "data", identities=1, views=2, split="test")
    a, b = data["names"][0]
    with pytest.raises(SampleSetError, match="missing.jpg does not exist"):
        write_sample_set(tmp_path / "set", data["images"], data["annotations"], [(a, "missing.jpg")])
    (data["images"] / "extra.jpg").write_bytes((data["images"] / b).read_bytes())
    with pytest.raises(SampleSetError, match="extra.jpg has no row"):
        write_sample_set(tmp_path / "set", data["images"], data["annotations"], [(a, "extra.jpg")])
    assert not (tmp_path / "set").exists() or not any((tmp_path / "set").iterdir())


def test_command_line(tmp_path):
    data = write_dataset(tmp_path / "data", identities=1, views=2, split="test")
    a, b = data["names"][0]
    command = [sys.executable, "-m", "training.cli", "samples", "--data-root", str(data["images"]),
               "--annotations", str(data["annotations"]), "--out", str(tmp_path / "set")]
    done = subprocess.run(command + ["--pair", a, b], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "set" / "samples.json").read_text())[0]["dataset_pair"] == [a, b]
    done = subprocess.run(command + ["--pair", a, "nope.jpg"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "error: " in done.stderr and "nope.jpg" in done.stderr


def test_poses_are_read_as_training_reads_them(tmp_path):
    """An x-first header and a sideways phone photo: the sample's pose is training's."""
    from PIL import Image

    from pg2_server.drawing import read_rgb
    from training.data import DataReport, read_annotation_file

    data = write_dataset(tmp_path / "data", identities=1, views=2, split="test")
    a, b = data["names"][0]
    lines = data["annotations"].read_text().splitlines()
    swapped = ["name:keypoints_x:keypoints_y"] + [":".join([n, xs, ys]) for n, ys, xs in
                                                 (line.split(":") for line in lines[1:])]
    data["annotations"].write_text("\n".join(swapped) + "\n")
    stored = Image.fromarray(np.rot90(read_rgb(data["images"] / b), 1))   # kept sideways: 64 wide, 32 high
    exif = Image.Exif()
    exif[0x0112] = 6                                                     # "rotate 90° clockwise to show"
    stored.save(data["images"] / b, exif=exif, quality=95)
    write_sample_set(tmp_path / "set", data["images"], data["annotations"], [(a, b)])
    sample = load_samples(tmp_path / "set")[0]
    assert sample.size == (32, 64)
    np.testing.assert_array_equal(sample.keypoints, read_annotation_file(data["annotations"], DataReport())[b])
    rows, _ = read_annotations(data["annotations"])   # the file as written: y first would be wrong
    assert not np.array_equal(sample.keypoints, rows[b], equal_nan=True)
