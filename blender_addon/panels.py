"""Panels: View3D sidebar tab "PG2" (pose, source, framing, output, bone overrides)."""
from __future__ import annotations

import bpy

from .mapping import NAMES, MappingError, describe


class _PG2Panel:
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "PG2"


class PG2_PT_main(_PG2Panel, bpy.types.Panel):
    bl_label = "PG2 Pose"
    bl_idname = "PG2_PT_main"

    def draw(self, context):
        layout = self.layout
        settings = context.scene.pg2
        layout.prop(settings, "armature")
        row = layout.row(align=True)
        row.prop(settings, "preset")
        row.prop(settings, "show_mapping", text="", icon="PRESET")
        armature = settings.armature
        if armature is None:
            layout.label(text="Choose an armature (or add Armature › PG2 Pose Rig)", icon="INFO")
        else:
            try:
                mapping = settings.bone_mapping()
                missing = mapping.missing()
                layout.label(text=f"Rig: {mapping.preset}; {len(NAMES) - len(missing)} of 18 keypoints",
                             icon="CHECKMARK" if not missing else "INFO")
                if missing:
                    layout.label(text="Missing: " + ", ".join(missing), icon="ERROR")
                if settings.show_mapping:
                    box = layout.box()
                    for name, text in describe(mapping):
                        box.label(text=f"{name.replace('_', ' ')}: {text}",
                                  icon="ERROR" if text == "missing" else "DOT")
            except MappingError as e:
                layout.label(text=str(e), icon="ERROR")
        if context.scene.camera is None:
            layout.label(text="No active camera", icon="ERROR")
        layout.prop(settings, "source_kind", expand=True)
        if settings.source_kind == "FILE":
            layout.prop(settings, "source_path")
        else:
            layout.template_ID(settings, "source_image", open="image.open")
        layout.prop(settings, "framing", expand=True)
        if settings.framing == "PERSON":
            col = layout.column(align=True)
            col.prop(settings, "margin")
            col.prop(settings, "background")
            if settings.background == "COLOR":
                col.prop(settings, "background_color")
        layout.prop(settings, "show_overlay")
        layout.prop(settings, "occlusion")
        row = layout.row()
        row.scale_y = 1.4
        row.operator("pg2.generate", icon="RENDER_STILL")
        layout.prop(settings, "set_camera_background")
        if settings.status:
            layout.prop(settings, "progress", text=settings.status)


class PG2_PT_frames(_PG2Panel, bpy.types.Panel):
    bl_label = "Frames"
    bl_parent_id = "PG2_PT_main"

    def draw(self, context):
        layout = self.layout
        settings = context.scene.pg2
        layout.prop(settings, "output_path")
        layout.prop(settings, "use_scene_range")
        col = layout.column(align=True)
        if settings.use_scene_range:   # the scene's own range (Output Properties › Frame Range)
            scene = context.scene
            col.label(text=f"Start {scene.frame_start}, End {scene.frame_end}, Step {scene.frame_step}",
                      icon="SCENE_DATA")
        else:
            col.prop(settings, "frame_start")
            col.prop(settings, "frame_end")
            col.prop(settings, "frame_step")
        layout.prop(settings, "overwrite")
        layout.prop(settings, "unprojectable")
        layout.prop(settings, "load_into_sequencer")
        layout.prop(settings, "in_flight")
        row = layout.row()
        row.scale_y = 1.4
        row.operator("pg2.generate_frames", icon="RENDER_ANIMATION")
        layout.separator()
        layout.prop(settings, "pose_output_path")
        row = layout.row(align=True)
        row.operator("pg2.export_poses", text="Export Pose", icon="ARMATURE_DATA").frames = "CURRENT"
        row.operator("pg2.export_poses", text="Export Poses", icon="OUTLINER_OB_ARMATURE").frames = "RANGE"


class PG2_UL_overrides(bpy.types.UIList):
    def draw_item(self, context, layout, data, item, icon, active_data, active_propname, index):
        armature = context.scene.pg2.armature
        row = layout.row(align=True)
        row.prop(item, "keypoint", text="")
        if armature is not None and armature.type == "ARMATURE":
            row.prop_search(item, "bone", armature.data, "bones", text="")
        else:
            row.prop(item, "bone", text="")
        row.prop(item, "end", text="")


class PG2_PT_overrides(_PG2Panel, bpy.types.Panel):
    bl_label = "Bone Overrides"
    bl_parent_id = "PG2_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        settings = context.scene.pg2
        row = self.layout.row()
        row.template_list("PG2_UL_overrides", "", settings, "overrides", settings, "override_index", rows=3)
        col = row.column(align=True)
        col.operator("pg2.override_add", icon="ADD", text="")
        col.operator("pg2.override_remove", icon="REMOVE", text="")


class PG2_UL_people(bpy.types.UIList):
    def draw_item(self, context, layout, data, item, icon, active_data, active_propname, index):
        row = layout.row(align=True)
        row.prop(item, "armature", text="")
        row.prop(item, "source_path", text="")


class PG2_PT_people(_PG2Panel, bpy.types.Panel):
    bl_label = "More People"
    bl_parent_id = "PG2_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        settings = context.scene.pg2
        layout = self.layout
        layout.label(text="Besides the Armature above: each with its own photo (Person framing)")
        row = layout.row()
        row.template_list("PG2_UL_people", "", settings, "people", settings, "person_index", rows=2)
        col = row.column(align=True)
        col.operator("pg2.person_add", icon="ADD", text="")
        col.operator("pg2.person_remove", icon="REMOVE", text="")


CLASSES = (PG2_PT_main, PG2_PT_frames, PG2_UL_overrides, PG2_PT_overrides, PG2_UL_people, PG2_PT_people)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
