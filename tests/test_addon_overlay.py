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


class RecordingGPU:
    """Stands in for the `gpu` module (no GPU headless): records shaders and state calls."""

    def __init__(self, calls):
        self.calls = calls
        outer = self

        class State:
            def __getattr__(self, name):
                return lambda *a: (outer.calls.append(("state", name)), (0, 0, 800, 600))[1]

        class Shader:
            def from_builtin(self, name):
                outer.calls.append(("shader", name))
                return self

            def uniform_float(self, name, value):
                outer.calls.append(("uniform", name))
        self.state, self.shader = State(), Shader()


@pytest.fixture
def posed():
    """The add-on on, a fresh scene: a camera 6.5 m in front of the PG2 Pose Rig, the panel's armature."""
    import math

    from mathutils import Euler

    from blender_addon import rig
    addon_utils.enable("blender_addon", default_set=True, handle_error=None)
    bpy.ops.wm.read_factory_settings(use_empty=True)
    addon_utils.enable("blender_addon", default_set=True, handle_error=None)
    scene = bpy.context.scene
    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(camera)
    camera.location, camera.rotation_euler = (0, -6.5, 0.9), Euler((math.radians(90), 0, 0))
    scene.camera = camera
    scene.pg2.armature = rig.create_pose_rig(scene.collection, bpy.context.view_layer)
    bpy.context.view_layer.update()
    yield scene
    addon_utils.disable("blender_addon", default_set=True, handle_error=None)


def test_draw_callback_runs_on_a_scene_with_a_camera(posed, monkeypatch):
    """The real draw handler, headless: only the GPU module and the batch are stand-ins."""
    import math
    from mathutils import Euler
    scene, camera = posed, posed.camera
    calls, batches = [], []

    class Batch:
        def __init__(self, shader, kind, content):
            batches.append((kind, content))

        def draw(self, shader):
            calls.append(("draw",))
    monkeypatch.setattr(overlay, "gpu", RecordingGPU(calls))
    monkeypatch.setattr(overlay, "batch_for_shader", Batch)
    overlay.draw()
    kinds = {kind: content for kind, content in batches}
    assert len(kinds["LINES"]["pos"]) == 2 * 17 and len(kinds["POINTS"]["pos"]) == 18
    assert all(c != overlay.HIDDEN for c in kinds["POINTS"]["color"])  # all in view
    assert all(isinstance(p, tuple) and len(p) == 3 for p in kinds["POINTS"]["pos"])
    assert calls.count(("draw",)) == 2
    # Turned away: still draws, every joint greyed.
    camera.rotation_euler = Euler((math.radians(-90), 0, 0))
    bpy.context.view_layer.update()
    batches.clear()
    overlay.draw()
    assert all(c == overlay.HIDDEN for c in dict(batches)["POINTS"]["color"])
    scene.camera = None
    assert overlay.scene_geometry(scene) is not None
    scene.pg2.show_overlay = False
    assert overlay.scene_geometry(scene) is None


def test_joints_behind_the_body_are_grey_as_a_run_leaves_them_out(posed):
    """With Hide Occluded Joints on, the overlay greys what a run would leave out of the request,
    and follows a pose change on the same frame."""
    import bmesh
    from mathutils import Matrix

    from blender_addon.mapping import INDEX
    scene = posed
    mesh = bpy.data.meshes.new("shield")            # a slab in front of the left arm, bound
    bm = bmesh.new()
    bmesh.ops.create_cube(bm, size=1.0, matrix=Matrix.LocRotScale((0.3, -0.3, 1.0), None, (0.3, 0.05, 1.2)))
    bm.to_mesh(mesh)
    bm.free()
    shield = bpy.data.objects.new("shield", mesh)
    scene.collection.objects.link(shield)
    shield.modifiers.new("Armature", "ARMATURE").object = scene.pg2.armature
    bpy.context.view_layer.update()

    def grey(name):
        # What the draw handler draws: kept between scene changes, recomputed after one.
        _, _, joints, colors = overlay.drawn_geometry(scene)
        return colors[INDEX[name]] == overlay.HIDDEN     # every joint mapped: one per index
    assert scene.pg2.occlusion
    assert grey("left_wrist") and grey("left_elbow") and not grey("right_wrist")
    shield.location.z = -3.0                          # moved away on the same frame
    bpy.context.view_layer.update()
    assert not grey("left_wrist")
    shield.location.z = 0.0
    bpy.context.view_layer.update()
    assert grey("left_wrist")
    assert overlay.drawn_geometry(scene) is overlay.drawn_geometry(scene)  # no change: kept
    scene.pg2.occlusion = False                       # the add-on's setting: no depsgraph update
    assert not grey("left_wrist")
