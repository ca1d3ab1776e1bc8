"""The viewport overlay: OpenPose colours per limb and joint, never registered headless."""
from __future__ import annotations

import pytest

bpy = pytest.importorskip("bpy")
import addon_utils  # noqa: E402

from blender_addon import overlay  # noqa: E402


def test_geometry_uses_openpose_colours_and_greys_hidden_joints():
    points = [(float(i), 0.0, 0.0) for i in range(18)]
    points[4] = None  # right wrist unmapped: its limb and joint are skipped
    visible = [True] * 18
    visible[9] = False  # right knee outside the camera
    lines, line_colors, joints, joint_colors = overlay.skeleton_geometry(points, visible)
    assert len(lines) == 2 * 16 and len(joints) == 17
    assert line_colors[0] == (1.0, 0.0, 0.0, 1.0)  # limb 0, neck-right shoulder: red
    limb = overlay.SKELETON.index((8, 9))
    drawn = [l for l in range(17) if l != overlay.SKELETON.index((3, 4))]
    assert line_colors[2 * drawn.index(limb)] == overlay.HIDDEN
    assert joint_colors[9 - 1] == overlay.HIDDEN  # index shifted by the skipped wrist
    assert joint_colors[0] == (1.0, 0.0, 0.0, 1.0)


def test_not_registered_in_background_mode():
    assert bpy.app.background
    addon_utils.enable("blender_addon", default_set=True, handle_error=None)
    try:
        assert overlay._handle is None
    finally:
        addon_utils.disable("blender_addon", default_set=True, handle_error=None)
