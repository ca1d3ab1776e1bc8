"""Projection into render-frame pixels against independent pinhole math, and the person crop."""
from __future__ import annotations

import math

import pytest

bpy = pytest.importorskip("bpy")
from mathutils import Euler, Vector  # noqa: E402

from blender_addon import rig  # noqa: E402
from blender_addon.mapping import INDEX, NAMES  # noqa: E402
from blender_addon.projection import (Crop, ProjectionError, frame_size, person_crop,  # noqa: E402
                                      project_armature, project_points)

POINTS = [Vector(p) for p in [(0, 0, 1.0), (0.3, 0.1, 1.5), (-0.4, 0.2, 0.2), (0.1, -0.3, 1.8),
                              (-0.2, 0.4, 0.9), (0.5, 0.0, 1.2)]]


@pytest.fixture(scope="module")
def scene():
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    data = bpy.data.cameras.new("cam")
    camera = bpy.data.objects.new("cam", data)
    scene.collection.objects.link(camera)
    scene.camera = camera
    return scene


def pinhole(camera, width, height, point):
    """Pixel of `point` by hand: camera space, focal length in pixels, sensor fit, shift."""
    data = camera.data
    x, y, z = camera.matrix_world.inverted() @ point
    fit = data.sensor_fit
    if fit == "AUTO":
        fit, sensor = ("HORIZONTAL" if width >= height else "VERTICAL"), data.sensor_width
    else:
        sensor = data.sensor_width if fit == "HORIZONTAL" else data.sensor_height
    side = width if fit == "HORIZONTAL" else height
    focal = data.lens / sensor * side
    u = width / 2 + focal * x / -z - data.shift_x * side
    v = height / 2 - (focal * y / -z - data.shift_y * side)
    return u, v


CAMERAS = [
    # lens, sensor fit, sensor w/h, shift x/y, resolution, percentage
    (50, "AUTO", 36, 24, 0.0, 0.0, (1920, 1080), 100),
    (35, "AUTO", 36, 24, 0.1, -0.05, (1080, 1920), 50),
    (85, "HORIZONTAL", 36, 24, -0.2, 0.1, (800, 600), 75),
    (28, "VERTICAL", 36, 24, 0.05, 0.15, (640, 960), 100),
    (50, "VERTICAL", 30, 20, 0.0, -0.1, (1280, 720), 33),
    (24, "AUTO", 36, 24, 0.0, 0.0, (176, 256), 100),
]


@pytest.mark.parametrize("lens,fit,sw,sh,shift_x,shift_y,resolution,percentage", CAMERAS)
def test_projection_matches_pinhole_math(scene, lens, fit, sw, sh, shift_x, shift_y, resolution, percentage):
    camera = scene.camera
    camera.data.lens, camera.data.sensor_fit = lens, fit
    camera.data.sensor_width, camera.data.sensor_height = sw, sh
    camera.data.shift_x, camera.data.shift_y = shift_x, shift_y
    camera.location = (0.3, -6.0, 1.1)
    camera.rotation_euler = Euler((math.radians(88), 0.0, math.radians(4)))
    scene.render.resolution_x, scene.render.resolution_y = resolution
    scene.render.resolution_percentage = percentage
    bpy.context.view_layer.update()
    width, height = frame_size(scene)
    assert (width, height) == (int(resolution[0] * percentage / 100), int(resolution[1] * percentage / 100))
    projected = project_points(scene, camera, POINTS, keep_outside=True)
    for point, got in zip(POINTS, projected):
        u, v = pinhole(camera, width, height, point)
        assert got is not None
        assert abs(got[0] - u) < 0.5 and abs(got[1] - v) < 0.5, (got, (u, v))


def test_behind_camera_and_off_frame_are_none(scene):
    camera = scene.camera
    camera.data.lens, camera.data.sensor_fit = 50, "AUTO"
    camera.data.shift_x = camera.data.shift_y = 0.0
    camera.location, camera.rotation_euler = (0.0, -5.0, 1.0), Euler((math.radians(90), 0, 0))
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 400, 300, 100
    bpy.context.view_layer.update()
    centre, behind, far_right = Vector((0, 0, 1)), Vector((0, -7, 1)), Vector((30, 0, 1))
    got = project_points(scene, camera, [centre, behind, far_right, None])
    assert got[0] == pytest.approx((200, 150), abs=0.5)
    assert got[1] is None and got[2] is None and got[3] is None
    kept = project_points(scene, camera, [behind, far_right], keep_outside=True)
    assert kept[0] is None  # behind the camera is never kept
    assert kept[1][0] > 400


def test_project_armature_uses_the_scene_camera(scene):
    arm = rig.create_pose_rig(scene.collection, bpy.context.view_layer)
    camera = scene.camera
    camera.location, camera.rotation_euler = (0.0, -6.0, 0.9), Euler((math.radians(90), 0, 0))
    bpy.context.view_layer.update()
    points = project_armature(scene, arm)
    assert all(p is not None for p in points)
    assert points[INDEX["right_shoulder"]][0] < points[INDEX["left_shoulder"]][0]  # facing the camera
    assert points[INDEX["nose"]][1] < points[INDEX["neck"]][1] < points[INDEX["right_hip"]][1]
    # Walk the rig behind the camera: every joint is gone.
    arm.location = (0, -8, 0)
    bpy.context.view_layer.update()
    assert project_armature(scene, arm) == [None] * len(NAMES)
    arm.location = (0, 0, 0)
    saved, scene.camera = scene.camera, None
    try:
        with pytest.raises(ProjectionError, match="no camera"):
            project_armature(scene, arm)
    finally:
        scene.camera = saved


def test_person_crop_has_the_model_aspect_and_holds_the_pose():
    keypoints = [(100.0, 50.0), (110.0, 300.0), None, (60.0, 120.0)] + [None] * 14
    crop = person_crop(keypoints, aspect=88 / 128, margin=0.1)
    assert crop.width / crop.height == pytest.approx(88 / 128, abs=0.01)
    assert crop.height == pytest.approx(250 * 1.2, abs=1)
    for p in keypoints:
        if p is not None:
            assert crop.x <= p[0] <= crop.x + crop.width and crop.y <= p[1] <= crop.y + crop.height
    shifted = crop.shift(keypoints)
    assert shifted[0] == (100.0 - crop.x, 50.0 - crop.y) and shifted[2] is None
    wide = person_crop([(0.0, 0.0), (1000.0, 10.0)] + [None] * 16, aspect=1.0, margin=0.0)
    assert (wide.width, wide.height) == (1000, 1000)
    with pytest.raises(ProjectionError, match="fewer than two"):
        person_crop([(1.0, 1.0)] + [None] * 17, aspect=1.0)
    assert Crop(5, 6, 10, 10).shift([None, (5.0, 6.0)]) == [None, (0.0, 0.0)]
