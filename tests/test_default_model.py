"""The bundled default model (pg2_server/default/) and the README's main job."""
import json
import subprocess
import sys

import cv2
import numpy as np

from pg2_server.pipeline import default_checkpoint
from pg2_server.pipeline import Pipeline
from pg2_server.samples import load_samples


def test_default_checkpoint_is_bundled_small_and_described():
    path = default_checkpoint()
    assert path is not None and path.name == "pg2_default.json"
    description = json.loads(path.read_text())
    assert description["config"]["preset"] == "demo" and description["stages"] == ["g1", "g2"]
    assert description["provenance"]["stages"]["stage1"]["steps"] > 0
    assert description["provenance"]["stages"]["stage2"]["steps"] > 0
    assert path.with_suffix(".safetensors").stat().st_size < 25 * 2 ** 20


def test_default_model_generates_the_requested_size_and_beats_copying():
    pipeline = Pipeline.from_checkpoint(default_checkpoint())
    samples = load_samples()
    results = pipeline.generate([s.source for s in samples], [s.keypoints for s in samples],
                                [s.size for s in samples], with_g1=True)
    for sample, result in zip(samples, results):
        assert result.image.shape == (sample.size[1], sample.size[0], 3)
    # A trained model puts the person where the target pose is: closer to the real target
    # than the source photo is, averaged over the held-out samples.
    def l1(a, b):
        return np.abs(a.astype(np.float32) - b.astype(np.float32)).mean()
    generated = np.mean([l1(r.image, s.target) for r, s in zip(results, samples)])
    copied = np.mean([l1(s.source, s.target) for s in samples])
    assert generated < copied


def test_main_job_writes_the_sample_grid(tmp_path):
    out = tmp_path / "sample_grid.png"
    result = subprocess.run([sys.executable, "-m", "pg2_server.cli", "demo", "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pg2_default" in result.stdout
    grid = cv2.imread(str(out))
    rows = len(load_samples())
    assert grid.shape[0] == 18 + rows * 256 + (rows + 1) * 2       # one 256-px row per sample
