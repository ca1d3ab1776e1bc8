"""Pose export without a server: OpenPose JSON and skeleton images, and the operator."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")

from blender_addon import openpose  # noqa: E402
from blender_addon.generation import render_pixels  # noqa: E402
from pg2_server import keypoints as schema  # noqa: E402

from test_addon_operators import HEIGHT, WIDTH, addon, png_size, shot  # noqa: E402,F401


def pose(n=18):
    points = [(20.0 + 4 * i, 30.0 + 6 * i) for i in range(n)]
    points[4] = None
    return points


def test_json_is_openpose_and_reads_back():
    data = openpose.pose_json([pose()], (120, 160))
    assert data["canvas_width"] == 120 and data["canvas_height"] == 160
    flat = data["people"][0]["pose_keypoints_2d"]
    assert len(flat) == 54 and flat[:3] == [20.0, 30.0, 1.0] and flat[12:15] == [0.0, 0.0, 0.0]
    size, points = schema.parse_pose(json.loads(openpose.pose_json_bytes([pose()], (120, 160))))
    assert size == (120, 160)
    assert np.isnan(points[4]).all() and tuple(points[3]) == (32.0, 48.0)
    assert openpose.pose_json([], (8, 8))["people"] == []


def test_skeleton_uses_openpose_colours():
    keypoints = [None] * 18
    keypoints[1], keypoints[2] = (30.0, 40.0), (70.0, 40.0)  # neck, right shoulder: limb 0
    keypoints[14] = (10.0, 10.0)  # right eye alone: a joint, no limb
    image = openpose.draw_skeleton([keypoints], (100, 60))
    assert image.shape == (60, 100, 3)
    assert tuple(image[10, 10]) == schema.COLORS[14]
    assert tuple(image[40, 50]) == tuple(round(0.6 * c) for c in schema.COLORS[0])  # limb over black
    assert tuple(image[40, 30]) == tuple(round(0.4 * a + 0.6 * b) for a, b in zip(schema.COLORS[1], schema.COLORS[0]))
    assert tuple(image[30, 50]) == (0, 0, 0) and tuple(image[55, 95]) == (0, 0, 0)
    assert (openpose.draw_skeleton([[None] * 18], (5, 4)) == 0).all()


def test_export_poses_operator_writes_json_and_images(shot, tmp_path):
    settings = shot.pg2
    settings.pose_output_path = str(tmp_path / "poses" / "pose_####.png")
    assert bpy.ops.pg2.export_poses(frames="RANGE") == {"FINISHED"}
    folder = tmp_path / "poses"
    assert sorted(p.name for p in folder.glob("*.png")) == [f"pose_{i:04d}.png" for i in range(1, 6)]
    for i in range(1, 6):
        size, points = schema.load_pose_file(folder / f"pose_{i:04d}_keypoints.json")
        assert size == (WIDTH, HEIGHT) and not np.isnan(points).any()
        assert png_size(folder / f"pose_{i:04d}.png") == (WIDTH, HEIGHT)
    # The image has each joint's colour at its keypoint.
    image = render_pixels(str(folder / "pose_0003.png"))
    size, points = schema.load_pose_file(folder / "pose_0003_keypoints.json")
    x, y = (int(round(v)) for v in points[schema.NAMES.index("right_ankle")])
    assert tuple(image[y, x, :3]) == schema.COLORS[schema.NAMES.index("right_ankle")]
    shot.frame_current = 2
    settings.pose_output_path = str(tmp_path / "one" / "p_##")
    assert bpy.ops.pg2.export_poses(frames="CURRENT") == {"FINISHED"}
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["p_02.png", "p_02_keypoints.json"]


def test_export_poses_keeps_existing_files_unless_overwrite(shot, tmp_path):
    settings = shot.pg2
    settings.pose_output_path = str(tmp_path / "poses" / "pose_####.png")
    folder = tmp_path / "poses"
    folder.mkdir()
    (folder / "pose_0002.png").write_bytes(b"kept")           # e.g. a pose edited by hand
    (folder / "pose_0002_keypoints.json").write_text("{}")
    assert bpy.ops.pg2.export_poses(frames="RANGE") == {"FINISHED"}
    assert (folder / "pose_0002.png").read_bytes() == b"kept"
    assert (folder / "pose_0002_keypoints.json").read_text() == "{}"
    assert png_size(folder / "pose_0003.png") == (WIDTH, HEIGHT)
    settings.overwrite = True
    assert bpy.ops.pg2.export_poses(frames="RANGE") == {"FINISHED"}
    assert png_size(folder / "pose_0002.png") == (WIDTH, HEIGHT)
    settings.overwrite = False


def test_output_that_is_the_scenes_renders_is_refused(shot, tmp_path):
    """The PG2 output path set to the render output: refused before anything is written."""
    settings = shot.pg2
    shot.render.filepath = str(tmp_path / "render" / "r_####")
    settings.pose_output_path = str(tmp_path / "render" / "r_####.png")
    with pytest.raises(RuntimeError, match="is the scene's render of frame 1: choose another output path"):
        bpy.ops.pg2.export_poses(frames="RANGE")
    assert not (tmp_path / "render").exists()


def test_export_poses_lists_every_person_in_view(shot, tmp_path):
    from blender_addon import rig
    settings = shot.pg2
    second = rig.create_pose_rig(shot.collection, bpy.context.view_layer)
    second.location.x = 0.8                      # beside the first, in view
    third = rig.create_pose_rig(shot.collection, bpy.context.view_layer)
    third.location.x = 40.0                      # far out of view: not in the file
    for body in (second, third):
        settings.people.add().armature = body    # no photo needed to export poses
    bpy.context.view_layer.update()
    settings.pose_output_path = str(tmp_path / "poses" / "pose_####.png")
    shot.frame_current = 1
    assert bpy.ops.pg2.export_poses(frames="CURRENT") == {"FINISHED"}
    data = json.loads((tmp_path / "poses" / "pose_0001_keypoints.json").read_text())
    assert len(data["people"]) == 2
    necks = [person["pose_keypoints_2d"][3] for person in data["people"]]
    assert necks[1] - necks[0] > 10              # the main armature first, then the row to its right
