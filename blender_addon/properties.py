"""Scene settings of the add-on: `scene.pg2` (armature, source, framing, output, overrides)."""
from __future__ import annotations

import bpy
from bpy.props import (BoolProperty, CollectionProperty, EnumProperty, FloatProperty,
                       FloatVectorProperty, IntProperty, PointerProperty, StringProperty)

from .mapping import HEAD, NAMES, PRESETS, BoneMapping, Override, armature_mapping

KEYPOINT_ITEMS = [(name, name.replace("_", " ").title(), f"COCO-18 keypoint {i}: {name}")
                  for i, name in enumerate(NAMES)] + [
    (HEAD, "Head (Face)", "The head bone the face points (nose, eyes, ears) are placed from, for a rig "
                          "whose preset finds none; empty: no face")]
PRESET_ITEMS = [("auto", "Automatic", "Recognise the rig from its bone names")] + [
    (p.name, p.label, f"Bone names of the {p.label} rig") for p in PRESETS.values()]


# Blender 5 warns on "//" (relative to the .blend) unless a path property says it takes it.
_RELATIVE = {"PATH_SUPPORTS_BLEND_RELATIVE"}


def _is_armature(self, obj) -> bool:
    return obj.type == "ARMATURE"


class PG2BoneOverride(bpy.types.PropertyGroup):
    """One keypoint taken from a bone of the user's choice (empty bone: keypoint left out)."""
    keypoint: EnumProperty(name="Keypoint", items=KEYPOINT_ITEMS)
    bone: StringProperty(name="Bone", description="Bone of the armature; empty leaves the keypoint out")
    end: EnumProperty(name="End", items=[("head", "Head", "The bone's head (its joint)"),
                                         ("tail", "Tail", "The bone's tail")], default="head")


class PG2Person(bpy.types.PropertyGroup):
    """One more person of the shot: an armature and the photo of whom it poses."""
    armature: PointerProperty(name="Armature", type=bpy.types.Object, poll=_is_armature)
    source_path: StringProperty(name="Photo", subtype="FILE_PATH", options=_RELATIVE,
                                description="PNG or JPEG photo of this person")


class PG2SceneSettings(bpy.types.PropertyGroup):
    """What to generate: the posed armature, the person's photo, framing and output."""
    armature: PointerProperty(name="Armature", type=bpy.types.Object, poll=_is_armature,
                              description="The posed armature whose joints become the 18 keypoints")
    preset: EnumProperty(name="Rig", items=PRESET_ITEMS, default="auto",
                         description="Which bone names to read the keypoints from")
    show_mapping: BoolProperty(name="Show Mapping", default=False,
                               description="List each keypoint's bone (or what it is made from) and the missing ones")
    overrides: CollectionProperty(type=PG2BoneOverride)
    people: CollectionProperty(type=PG2Person, description="Several people: each armature with its own "
                               "photo, in Person framing, composited back to front; empty = just the Armature")
    person_index: IntProperty(default=0)
    override_index: IntProperty(default=0)
    source_kind: EnumProperty(name="Source", items=[
        ("FILE", "File", "A PNG or JPEG photo of the person on disk"),
        ("IMAGE", "Image", "An image datablock of this file")], default="FILE")
    source_path: StringProperty(name="Source photo", subtype="FILE_PATH", options=_RELATIVE,
                                description="PNG or JPEG photo of the person to pose")
    source_image: PointerProperty(name="Source image", type=bpy.types.Image,
                                  description="Image datablock with the person to pose")
    framing: EnumProperty(name="Framing", items=[
        ("CAMERA", "Camera", "The whole camera frame is the model's target frame"),
        ("PERSON", "Person", "Crop around the skeleton with the model's aspect ratio, then "
                             "composite the result back into the full frame")], default="CAMERA")
    margin: FloatProperty(name="Margin", default=0.15, min=0.0, max=1.0,
                          description="Person framing: space around the skeleton, as a fraction of its height")
    background: EnumProperty(name="Background", items=[
        ("COLOR", "Colour", "Composite the person over a solid colour"),
        ("RENDER", "Render", "Composite the person over the scene's rendered frame (the file at the "
                             "Output Properties path; the current frame is rendered if it is missing)"),
        ("TRANSPARENT", "Transparent", "Keep only the person (RGBA)")], default="COLOR",
        description="Person framing: what lies around the generated crop")
    background_color: FloatVectorProperty(name="Colour", subtype="COLOR", size=3, min=0.0, max=1.0,
                                          default=(1.0, 1.0, 1.0))
    output_path: StringProperty(name="Output", subtype="FILE_PATH", default="//pg2/frame_####.png",
                                options=_RELATIVE,
                                description="Frame files; #### becomes the zero-padded frame number")
    pose_output_path: StringProperty(name="Poses", subtype="FILE_PATH", default="//pg2_poses/pose_####.png",
                                     options=_RELATIVE,
                                     description="Export Poses: skeleton images; each gets a NAME_keypoints.json "
                                                 "(OpenPose) beside it; #### becomes the frame number")
    frame_start: IntProperty(name="Start", default=1, min=-1048574)   # Blender's own frame limits
    frame_end: IntProperty(name="End", default=250, min=-1048574)
    frame_step: IntProperty(name="Step", default=1, min=1)
    use_scene_range: BoolProperty(name="Scene Range", default=True,
                                  description="Use the scene's frame range and step")
    overwrite: BoolProperty(name="Overwrite", default=False,
                            description="Regenerate frames whose files exist (off: an interrupted batch resumes)")
    in_flight: IntProperty(name="In Flight", default=4, min=1, max=64,
                           description="Requests sent ahead so the server's batcher stays busy")
    set_camera_background: BoolProperty(name="Camera Background", default=False,
                                        description="Also show the single-frame result behind the camera view")
    show_overlay: BoolProperty(name="Show Skeleton", default=True,
                               description="Draw the keypoints the model will get in the viewport")
    unprojectable: EnumProperty(name="Unposed Frames", items=[
        ("SKIP", "Skip", "Frames where fewer than two joints are in front of the camera are left out (and counted)"),
        ("BLANK", "Blank", "Such frames are written with the background only, so the sequence has no gaps")],
        default="SKIP", description="Frame ranges: what to do with frames whose pose the camera does not see")
    occlusion: BoolProperty(name="Hide Occluded Joints", default=True,
                            description="Leave out joints hidden behind the body (a ray from the camera "
                                        "against the meshes bound to the armature), as in the training data")
    load_into_sequencer: BoolProperty(name="Load into Sequencer", default=False,
                                      description="After Generate Frames, add the frames as an image strip "
                                                  "in this scene's Video Sequencer")
    progress: FloatProperty(name="Progress", default=0.0, min=0.0, max=1.0, subtype="FACTOR")
    status: StringProperty(name="Status", default="")

    def bone_mapping(self, armature=None) -> BoneMapping:
        """The mapping of `armature` (default: the chosen one) under this preset and overrides.
        The overrides are the chosen armature's: another one (a People row) takes those whose
        bone it has, and those that leave a keypoint out."""
        armature = armature if armature is not None else self.armature
        overrides = [Override(o.keypoint, o.bone, o.end) for o in self.overrides]
        if armature != self.armature:
            overrides = [o for o in overrides if not o.bone or o.bone in armature.data.bones]
        return armature_mapping(armature, self.preset, overrides)


CLASSES = (PG2BoneOverride, PG2Person, PG2SceneSettings)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.pg2 = PointerProperty(type=PG2SceneSettings)


def unregister() -> None:
    del bpy.types.Scene.pg2
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
