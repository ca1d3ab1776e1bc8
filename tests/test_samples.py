import json

import cv2
import numpy as np
import pytest

from pg2_server.pipeline import Pipeline
from pg2_server.samples import load_samples, sample_grid, write_sample_grid


def _sample_set(folder, count=2, with_target=True):
    rng = np.random.default_rng(0)
    entries = []
    for i in range(count):
        cv2.imwrite(str(folder / f"src{i}.png"), rng.integers(0, 255, (256, 176, 3), dtype=np.uint8))
        if with_target:
            cv2.imwrite(str(folder / f"tgt{i}.png"), rng.integers(0, 255, (256, 176, 3), dtype=np.uint8))
        points = [[40 + 5 * k, 20 + 12 * k] for k in range(18)]
        (folder / f"pose{i}.json").write_text(json.dumps({"size": [176, 256], "keypoints": points}))
        entries.append({"source": f"src{i}.png", "pose": f"pose{i}.json",
                        "target": f"tgt{i}.png" if with_target else None})
    (folder / "samples.json").write_text(json.dumps(entries))


def test_grid_has_a_row_per_sample_and_five_columns(tmp_path):
    _sample_set(tmp_path, count=3)
    samples = load_samples(tmp_path)
    assert len(samples) == 3 and samples[0].size == (176, 256)
    grid = sample_grid(Pipeline.random("tiny"), samples)
    # 3 rows of 256-px cells + header + gaps; 5 cells of 176 px + gaps.
    assert grid.shape == (18 + 3 * 256 + 4 * 2, 5 * 176 + 6 * 2, 3)


def test_grid_without_targets_has_four_columns(tmp_path):
    _sample_set(tmp_path, count=1, with_target=False)
    out = write_sample_grid(Pipeline.random("tiny"), tmp_path / "out" / "grid.png", tmp_path)
    assert cv2.imread(str(out)).shape == (18 + 256 + 4, 4 * 176 + 5 * 2, 3)


def test_bad_sample_sets_are_named(tmp_path):
    with pytest.raises(ValueError, match="samples.json is missing"):
        load_samples(tmp_path)
    (tmp_path / "samples.json").write_text("[]")
    with pytest.raises(ValueError, match="non-empty list"):
        load_samples(tmp_path)
    (tmp_path / "samples.json").write_text('[{"source": "a.jpg"}]')
    with pytest.raises(ValueError, match="entry 1 must name its .source. and .pose. files"):
        load_samples(tmp_path)
