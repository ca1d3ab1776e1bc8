"""The add-on's own OpenPose-style armature: one bone per COCO-18 keypoint, at the bone's head."""
from __future__ import annotations

import bpy
from mathutils import Vector

from .mapping import FACE_OFFSETS, NAMES, PRESETS

# A 1.70 m adult in metres, facing -Y (Blender's front view); the subject's right is -X.
JOINTS: dict[str, tuple[float, float, float]] = {
    "neck": (0.0, 0.0, 1.45),
    "right_shoulder": (-0.19, 0.0, 1.42), "right_elbow": (-0.21, 0.02, 1.13),
    "right_wrist": (-0.22, 0.0, 0.87),
    "right_hip": (-0.10, 0.0, 0.93), "right_knee": (-0.11, -0.01, 0.50),
    "right_ankle": (-0.11, 0.02, 0.08),
}
for _name in list(JOINTS):
    if _name.startswith("right_"):
        x, y, z = JOINTS[_name]
        JOINTS["left_" + _name[6:]] = (-x, y, z)
# The face sits where the add-on would synthesise it from the `neck` bone (calibrated on a
# real body), so removing a face bone from this rig leaves the keypoint where it was.
_WIDTH = JOINTS["left_shoulder"][0] - JOINTS["right_shoulder"][0]
for _name, (left, up, forward) in FACE_OFFSETS.items():
    JOINTS[_name] = (left * _WIDTH, -forward * _WIDTH,
                     JOINTS["neck"][2] + (up + PRESETS["pg2"].head_drop) * _WIDTH)

# Tail of each keypoint bone: the next joint down the limb, or a short stub.
_TAILS: dict[str, tuple[float, float, float] | str] = {
    "neck": (0.0, 0.0, 1.72),  # vertical: its direction is the face frame's "up"
    "shoulder": "elbow", "elbow": "wrist", "hip": "knee", "knee": "ankle",
}
_PARENTS = {"nose": "neck", "eye": "neck", "ear": "neck", "elbow": "shoulder",
            "wrist": "elbow", "knee": "hip", "ankle": "knee"}
TORSO = "torso"


def _tail(name: str) -> Vector:
    side, _, joint = name.partition("_") if "_" in name else ("", "", name)
    head = Vector(JOINTS[name])
    spec = _TAILS.get(name) or _TAILS.get(joint)
    if isinstance(spec, str):
        return Vector(JOINTS[f"{side}_{spec}"])
    if spec is not None:
        return Vector(spec)
    stub = {"wrist": (0, 0, -0.08), "ankle": (0, -0.12, -0.06), "eye": (0, -0.03, 0), "nose": (0, -0.04, 0),
            "ear": (0.03 if side == "left" else -0.03, 0, 0)}[joint]
    return head + Vector(stub)


BoneSpec = tuple  # (name, head xyz, tail xyz, parent name or None, connected[, roll])


def build_armature(collection: bpy.types.Collection, view_layer: bpy.types.ViewLayer, name: str,
                   bones, location=(0.0, 0.0, 0.0)) -> bpy.types.Object:
    """An armature object from (name, head, tail, parent, connected[, roll]) rows, parents first."""
    armature = bpy.data.armatures.new(name)
    obj = bpy.data.objects.new(name, armature)
    obj.location = location
    collection.objects.link(obj)
    previous = view_layer.objects.active
    view_layer.objects.active = obj
    bpy.ops.object.mode_set(mode="EDIT")
    try:
        edit_bones = armature.edit_bones
        for bone_name, head, tail, parent, connected, *roll in bones:
            bone = edit_bones.new(bone_name)
            bone.head, bone.tail, bone.roll = head, tail, roll[0] if roll else 0.0
            if parent is not None:
                bone.parent = edit_bones[parent]
                bone.use_connect = connected
    finally:
        bpy.ops.object.mode_set(mode="OBJECT")
        view_layer.objects.active = previous if previous is not None else obj
    return obj


def pose_rig_bones() -> list[BoneSpec]:
    """The PG2 Pose Rig's bones: a `torso` root, then one bone per keypoint."""
    rows: list[BoneSpec] = [(TORSO, (0.0, 0.0, JOINTS["right_hip"][2]), JOINTS["neck"], None, False)]
    for key in ("neck",) + tuple(n for n in NAMES if n != "neck"):
        side, _, joint = key.partition("_") if "_" in key else ("", "", key)
        parent = _PARENTS.get(joint)
        if parent is None:
            rows.append((key, JOINTS[key], tuple(_tail(key)), TORSO, False))
        elif parent == "neck":
            rows.append((key, JOINTS[key], tuple(_tail(key)), "neck", False))
        else:
            rows.append((key, JOINTS[key], tuple(_tail(key)), f"{side}_{parent}", True))
    # Parents must exist before their children: order by chain depth.
    depth = {"shoulder": 0, "hip": 0, "elbow": 1, "knee": 1, "wrist": 2, "ankle": 2}
    return rows[:2] + sorted(rows[2:], key=lambda r: depth.get(r[0].partition("_")[2], 0))


def create_pose_rig(collection: bpy.types.Collection, view_layer: bpy.types.ViewLayer,
                    name: str = "PG2 Pose Rig", location=(0.0, 0.0, 0.0)) -> bpy.types.Object:
    """Create the 18-joint rig (plus a `torso` root) in `collection` and return the object."""
    obj = build_armature(collection, view_layer, name, pose_rig_bones(), location)
    obj.data.display_type = "STICK"
    obj.show_in_front = True
    return obj
