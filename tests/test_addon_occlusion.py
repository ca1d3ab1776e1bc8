"""Occlusion: joints hidden behind a mesh bound to the armature are left out."""
from __future__ import annotations

import math

import pytest

bpy = pytest.importorskip("bpy")
import bmesh  # noqa: E402
from mathutils import Euler, Matrix  # noqa: E402

from blender_addon import occlusion, rig  # noqa: E402
from blender_addon.generation import plan_frame  # noqa: E402
from blender_addon.mapping import INDEX, armature_mapping  # noqa: E402


def box(name, center, size):
    mesh = bpy.data.meshes.new(name)
    bm = bmesh.new()
    bmesh.ops.create_cube(bm, size=1.0, matrix=Matrix.LocRotScale(center, None, size))
    bm.to_mesh(mesh)
    bm.free()
    obj = bpy.data.objects.new(name, mesh)
    bpy.context.scene.collection.objects.link(obj)
    return obj


@pytest.fixture
def scene():
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.render.resolution_x, scene.render.resolution_y = 240, 320
    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(camera)
    camera.location, camera.rotation_euler = (0, -6.5, 0.9), Euler((math.radians(90), 0, 0))
    scene.camera = camera
    arm = rig.create_pose_rig(scene.collection, bpy.context.view_layer)
    # A slab in front of the subject's left arm (+X), bound to the armature.
    shield = box("shield", (0.3, -0.3, 1.0), (0.3, 0.05, 1.2))
    shield.modifiers.new("Armature", "ARMATURE").object = arm
    box("unbound", (-0.3, -0.3, 0.5), (0.3, 0.05, 0.3))  # not the body: ignored
    bpy.context.view_layer.update()
    return scene, arm, camera


def test_joints_behind_the_bound_mesh_are_hidden(scene):
    scene, arm, camera = scene
    assert [m.name for m in occlusion.bound_meshes(arm)] == ["shield"]
    mapping = armature_mapping(arm)
    occluder = occlusion.Occluder(arm, mapping)
    keypoints = plan_frame(scene, arm, mapping, keep_outside=False, occlusion=occluder)
    for name in ("left_shoulder", "left_elbow", "left_wrist"):
        assert keypoints[INDEX[name]] is None, name
    for name in ("right_shoulder", "right_elbow", "right_wrist", "right_knee", "neck", "nose"):
        assert keypoints[INDEX[name]] is not None, name
    assert plan_frame(scene, arm, mapping, keep_outside=False)[INDEX["left_wrist"]] is not None
    # Seen from behind, the slab is behind the joints.
    camera.location, camera.rotation_euler = (0, 6.5, 0.9), Euler((math.radians(90), 0, math.radians(180)))
    bpy.context.view_layer.update()
    keypoints = plan_frame(scene, arm, mapping, keep_outside=False, occlusion=occluder)
    assert keypoints[INDEX["left_wrist"]] is not None and keypoints[INDEX["left_elbow"]] is not None


def test_neck_follows_the_shoulders(scene):
    scene, arm, camera = scene
    box("wide", (0.0, -0.3, 1.4), (1.0, 0.05, 0.3)).modifiers.new("Armature", "ARMATURE").object = arm
    bpy.context.view_layer.update()
    mapping = armature_mapping(arm)
    keypoints = plan_frame(scene, arm, mapping, keep_outside=False, occlusion=occlusion.Occluder(arm, mapping))
    assert keypoints[INDEX["right_shoulder"]] is None and keypoints[INDEX["left_shoulder"]] is None
    assert keypoints[INDEX["neck"]] is None


def test_face_points_move_onto_the_bound_head(scene):
    """A sphere of a head around the rig's face: nose and eyes go to its front, ears to its sides."""
    scene, arm, camera = scene
    from mathutils import Vector
    mapping = armature_mapping(arm)
    from blender_addon.mapping import keypoints_3d
    points = keypoints_3d(arm, mapping)
    nose = points[INDEX["nose"]]
    centre = Vector((0.0, nose.y + 0.09, nose.z))  # 9 cm behind the nose
    mesh = bpy.data.meshes.new("head")
    bm = bmesh.new()
    bmesh.ops.create_uvsphere(bm, u_segments=64, v_segments=32, radius=0.11,
                              matrix=Matrix.Translation(centre))
    bm.to_mesh(mesh)
    bm.free()
    head = bpy.data.objects.new("head", mesh)
    scene.collection.objects.link(head)
    head.modifiers.new("Armature", "ARMATURE").object = arm
    bpy.context.view_layer.update()
    occluder = occlusion.Occluder(arm, mapping)
    moved = occluder.face_on_surface(points, occluder.triangles(scene))
    for name in ("nose", "right_eye", "left_eye", "right_ear", "left_ear"):
        assert abs((moved[INDEX[name]] - centre).length - 0.11) < 0.003, name
    assert moved[INDEX["nose"]].y < nose.y  # pulled forward onto the face (the body faces -Y)
    assert moved[INDEX["right_ear"]].x < points[INDEX["right_ear"]].x + 0.06
    assert moved[INDEX["right_shoulder"]] == points[INDEX["right_shoulder"]]


def test_a_rig_in_centimetres_seen_by_a_scaled_camera_keeps_the_same_rule(scene):
    """Everything 100× larger (a scene modelled in centimetres), the camera inheriting the
    scale: the same joints are hidden as in metres."""
    scene, arm, camera = scene
    mapping = armature_mapping(arm)
    in_metres = plan_frame(scene, arm, mapping, keep_outside=False, occlusion=occlusion.Occluder(arm, mapping))
    world = bpy.data.objects.new("centimetres", None)
    scene.collection.objects.link(world)
    world.scale = (100, 100, 100)
    for obj in scene.objects:
        if obj is not world:
            obj.parent = world
    bpy.context.view_layer.update()
    mapping = armature_mapping(arm)
    occluder = occlusion.Occluder(arm, mapping)
    assert occluder.unit(mapping) == pytest.approx(100)
    hidden = [k is None for k in in_metres]
    assert hidden[INDEX["left_wrist"]] and not hidden[INDEX["right_wrist"]]
    assert [k is None for k in plan_frame(scene, arm, mapping, keep_outside=False, occlusion=occluder)] == hidden
    placed = camera.matrix_world.copy()          # the camera alone back at scale 1, where it was
    camera.parent = None
    camera.matrix_world = placed.normalized()
    bpy.context.view_layer.update()
    assert tuple(camera.scale) == pytest.approx((1, 1, 1))
    assert [k is None for k in plan_frame(scene, arm, mapping, keep_outside=False, occlusion=occluder)] == hidden
    camera.scale = (0.5, 0.5, 0.5)               # and scaled down
    bpy.context.view_layer.update()
    assert [k is None for k in plan_frame(scene, arm, mapping, keep_outside=False, occlusion=occluder)] == hidden


def test_a_body_sized_by_a_pose_bone_keeps_the_same_rule(scene):
    """Twice the size through the torso bone's pose scale (how Rigify characters are resized) or
    through the object's scale: the same size for the tolerances, the same joints hidden."""
    scene, arm, camera = scene
    shield = scene.objects["shield"]   # moves with the torso bone, and with the object as its child
    group = shield.vertex_groups.new(name=rig.TORSO)
    group.add(range(len(shield.data.vertices)), 1.0, "REPLACE")
    shield.parent = arm
    bpy.context.view_layer.update()
    mapping = armature_mapping(arm)
    occluder = occlusion.Occluder(arm, mapping)
    torso = arm.matrix_world @ arm.pose.bones[rig.TORSO].head
    arm.scale, arm.location = (2, 2, 2), -torso   # twice the size about the torso bone's head
    bpy.context.view_layer.update()
    assert occluder.unit(mapping) == pytest.approx(2)
    by_object = [k is None for k in plan_frame(scene, arm, mapping, keep_outside=False, occlusion=occluder)]
    assert any(by_object) and not all(by_object)
    arm.scale, arm.location = (1, 1, 1), (0, 0, 0)
    arm.pose.bones[rig.TORSO].scale = (2, 2, 2)
    bpy.context.view_layer.update()
    assert occluder.unit(mapping) == pytest.approx(2)
    assert [k is None for k in plan_frame(scene, arm, mapping, keep_outside=False, occlusion=occluder)] == by_object


def test_meshes_that_are_not_rendered_hide_nothing(scene):
    scene, arm, camera = scene
    shield = bpy.data.objects["shield"]
    outfits = bpy.data.collections.new("spare outfits")
    scene.collection.children.link(outfits)
    scene.collection.objects.unlink(shield)
    outfits.objects.link(shield)
    mapping = armature_mapping(arm)
    assert [m.name for m in occlusion.bound_meshes(arm)] == ["shield"]
    layer = bpy.context.view_layer.layer_collection.children["spare outfits"]
    for switch_off, switch_on in ((lambda: setattr(layer, "exclude", True), lambda: setattr(layer, "exclude", False)),
                                  (lambda: setattr(outfits, "hide_render", True),
                                   lambda: setattr(outfits, "hide_render", False)),
                                  (lambda: setattr(shield, "hide_render", True),
                                   lambda: setattr(shield, "hide_render", False))):
        switch_off()
        bpy.context.view_layer.update()
        assert occlusion.bound_meshes(arm) == []
        keypoints = plan_frame(scene, arm, mapping, keep_outside=False, occlusion=occlusion.Occluder(arm, mapping))
        assert keypoints[INDEX["left_wrist"]] is not None
        switch_on()


def test_an_orthographic_view_reads_depth_linearly_across_a_triangle():
    import numpy as np

    # One slanted triangle in (u, v, depth): depth 1 at u = 0, 3 at u = 2; the point at u = 1 lies
    # 0.2 behind the surface (depth 2), within a 0.5 tolerance.
    corners = np.array([[0.0, -1.0, 1.0], [2.0, -1.0, 3.0], [0.0, 1.0, 1.0],
                        [2.0, -1.0, 3.0], [2.0, 1.0, 3.0], [0.0, 1.0, 1.0]], np.float32)
    point = np.array([[1.0, 0.0, 2.2]], np.float32)
    assert not occlusion._hidden(corners, point, np.array([0.5]), ortho=True)[0]
    assert occlusion._hidden(corners, np.array([[1.0, 0.0, 2.6]], np.float32), np.array([0.5]), ortho=True)[0]
