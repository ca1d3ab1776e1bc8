"""The add-on's own OpenPose-style armature: one bone per COCO-18 keypoint, at the bone's head."""
from __future__ import annotations

import bpy
from mathutils import Vector

from .mapping import NAMES

# A 1.70 m adult in metres, facing -Y (Blender's front view); the subject's right is -X.
JOINTS: dict[str, tuple[float, float, float]] = {
    "nose": (0.0, -0.10, 1.58), "neck": (0.0, 0.0, 1.45),
    "right_shoulder": (-0.19, 0.0, 1.42), "right_elbow": (-0.21, 0.02, 1.13),
    "right_wrist": (-0.22, 0.0, 0.87),
    "right_hip": (-0.10, 0.0, 0.93), "right_knee": (-0.11, -0.01, 0.50),
    "right_ankle": (-0.11, 0.02, 0.08),
    "right_eye": (-0.033, -0.085, 1.62), "right_ear": (-0.075, 0.0, 1.60),
}
for _name in list(JOINTS):
    if _name.startswith("right_"):
        x, y, z = JOINTS[_name]
        JOINTS["left_" + _name[6:]] = (-x, y, z)

# Tail of each keypoint bone: the next joint down the limb, or a short stub.
_TAILS: dict[str, tuple[float, float, float] | str] = {
    "neck": (0.0, -0.02, 1.72), "nose": (0.0, -0.14, 1.58),
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
    stub = {"wrist": (0, 0, -0.08), "ankle": (0, -0.12, -0.06), "eye": (0, -0.03, 0),
            "ear": (0.03 if side == "left" else -0.03, 0, 0)}[joint]
    return head + Vector(stub)


def create_pose_rig(collection: bpy.types.Collection, view_layer: bpy.types.ViewLayer,
                    name: str = "PG2 Pose Rig", location=(0.0, 0.0, 0.0)) -> bpy.types.Object:
    """Create the 18-joint rig (plus a `torso` root) in `collection` and return the object."""
    armature = bpy.data.armatures.new(name)
    armature.display_type = "STICK"
    obj = bpy.data.objects.new(name, armature)
    obj.location = location
    obj.show_in_front = True
    collection.objects.link(obj)
    previous = view_layer.objects.active
    view_layer.objects.active = obj
    bpy.ops.object.mode_set(mode="EDIT")
    try:
        bones = armature.edit_bones
        torso = bones.new(TORSO)
        torso.head = (0.0, 0.0, JOINTS["right_hip"][2])
        torso.tail = JOINTS["neck"]
        for key in NAMES:
            bone = bones.new(key)
            bone.head = JOINTS[key]
            bone.tail = _tail(key)
            bone.roll = 0.0
        for key in NAMES:
            bone = bones[key]
            joint = key.partition("_")[2] or key
            parent = _PARENTS.get(joint if "_" in key else key)
            if parent is None:
                bone.parent = bones[TORSO]
            elif parent == "neck":
                bone.parent = bones["neck"]
            else:
                side = key.partition("_")[0]
                bone.parent = bones[f"{side}_{parent}"]
                bone.use_connect = True
    finally:
        bpy.ops.object.mode_set(mode="OBJECT")
        view_layer.objects.active = previous if previous is not None else obj
    return obj
