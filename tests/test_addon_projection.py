"""Projection into render-frame pixels against independent pinhole math, and the person crop."""
from __future__ import annotations

import math

import pytest

bpy = pytest.importorskip("bpy")
from mathutils import Euler, Vector  # noqa: E402

from blender_addon import rig  # noqa: E402
from blender_addon.mapping import INDEX, NAMES  # noqa: E402
from blender_addon.projection import (Crop, ProjectionError, frame_region, frame_size,  # noqa: E402
                                      person_crop, project_armature, project_points)

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
    assert (width, height) == (resolution[0] * percentage // 100, resolution[1] * percentage // 100)
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


def _render_spots(scene, points, path):
    """Render small glowing spheres at `points` with Cycles; the spot centres in the written file."""
    import bmesh
    import cv2
    import numpy as np

    material = bpy.data.materials.new("glow")
    nodes = material.node_tree.nodes
    nodes.remove(nodes["Principled BSDF"])
    emission = nodes.new("ShaderNodeEmission")
    material.node_tree.links.new(emission.outputs[0], nodes["Material Output"].inputs[0])
    spheres = []
    for point in points:
        mesh = bpy.data.meshes.new("spot")
        bm = bmesh.new()
        bmesh.ops.create_uvsphere(bm, u_segments=16, v_segments=8, radius=0.04)
        bm.to_mesh(mesh)
        bm.free()
        mesh.materials.append(material)
        sphere = bpy.data.objects.new("spot", mesh)
        sphere.location = point
        scene.collection.objects.link(sphere)
        spheres.append(sphere)
    scene.render.engine, scene.cycles.samples, scene.cycles.device = "CYCLES", 4, "CPU"
    scene.render.filepath, scene.render.image_settings.file_format = str(path), "PNG"
    try:
        bpy.ops.render.render(write_still=True)
    finally:
        for sphere in spheres:
            bpy.data.objects.remove(sphere)
    image = bpy.data.images.load(str(path), check_existing=False)
    width, height = image.size
    pixels = np.empty(width * height * 4, np.float32)
    image.pixels.foreach_get(pixels)
    bpy.data.images.remove(image)
    bright = (pixels.reshape(height, width, 4)[::-1, :, 0] > 0.5).astype(np.uint8)   # top row first
    count, _, _, centres = cv2.connectedComponentsWithStats(bright)
    return (width, height), sorted((x + 0.5, y + 0.5) for x, y in centres[1:])  # pixel centres


def test_a_render_cropped_to_its_region_gets_keypoints_in_its_own_pixels(scene, tmp_path):
    """Blender writes only the Render Region when Crop to Render Region is on: the frame is that
    region, and a joint lands where Blender draws it in the written file."""
    camera = scene.camera
    camera.data.lens, camera.data.sensor_fit = 35, "AUTO"
    camera.data.shift_x = camera.data.shift_y = 0.0
    camera.location, camera.rotation_euler = (0.0, -5.0, 1.0), Euler((math.radians(90), 0, 0))
    render = scene.render
    render.resolution_x, render.resolution_y, render.resolution_percentage = 203, 151, 100
    render.border_min_x, render.border_max_x, render.border_min_y, render.border_max_y = 0.13, 0.71, 0.22, 0.93
    points = [Vector((-0.5, 0.0, 1.6)), Vector((0.4, 0.3, 0.6))]
    try:
        render.use_border, render.use_crop_to_border = True, False
        assert frame_region(scene) == (0, 0, 203, 151)        # a region without cropping keeps the frame
        render.use_crop_to_border = True
        bpy.context.view_layer.update()
        x0, y0, width, height = frame_region(scene)
        assert (x0, y0, width, height) == (26, 151 - 140, 144 - 26, 140 - 33)
        written, spots = _render_spots(scene, points, tmp_path / "region.png")
        assert written == (width, height) == frame_size(scene)
        projected = sorted(project_points(scene, camera, points))
        assert len(spots) == 2
        for got, drawn in zip(projected, spots):
            assert got == pytest.approx(drawn, abs=0.75), (projected, spots)
        # A joint outside the region but inside the camera's frame is out of this frame.
        assert project_points(scene, camera, [Vector((-2.2, 0.0, 1.0))]) == [None]
        render.use_border = False
        assert project_points(scene, camera, [Vector((-2.2, 0.0, 1.0))])[0] is not None
    finally:
        render.use_border = render.use_crop_to_border = False


@pytest.mark.parametrize("resolution,percentage", [((800, 600), 29), ((1280, 720), 35)])
def test_the_frame_is_the_size_blender_writes(scene, tmp_path, resolution, percentage):
    """Percentages whose product is whole in integers but not in floats (0.29 × 800 = 231.99…)."""
    scene.render.resolution_x, scene.render.resolution_y = resolution
    scene.render.resolution_percentage = percentage
    written, _ = _render_spots(scene, [], tmp_path / "frame.png")
    assert frame_size(scene) == written == (resolution[0] * percentage // 100, resolution[1] * percentage // 100)


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
