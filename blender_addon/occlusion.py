"""Joints hidden behind the body: a ray from the camera to each keypoint against the meshes
bound to the armature, with the synthetic renderer's rule (docs/synthetic.md): a keypoint is
hidden when the first body surface on its camera ray lies more than a tolerance in front of
it (0.04 m for face points, which lie on the surface; 0.15 m for joints, inside the limbs).
The neck, the shoulders' midpoint deep inside the body, stays when a shoulder is visible.
"""
from __future__ import annotations

from mathutils import Vector

from .mapping import FACE, INDEX, keypoints_3d

FACE_TOLERANCE = 0.04
JOINT_TOLERANCE = 0.15
_FACE = {INDEX[n] for n in FACE}
_SHOULDERS = (INDEX["right_shoulder"], INDEX["left_shoulder"])


def bound_meshes(armature) -> list:
    """Visible mesh objects deformed by `armature`: an Armature modifier pointing at it, or
    parented to it with the Armature parent type."""
    import bpy
    return [obj for obj in bpy.data.objects
            if obj.type == "MESH" and not obj.hide_render and (
                any(m.type == "ARMATURE" and m.object == armature for m in obj.modifiers)
                or (obj.parent == armature and obj.parent_type == "ARMATURE"))]


class Occluder:
    """Drops hidden keypoints of one armature's current pose (main thread)."""

    def __init__(self, armature, mapping=None):
        self.armature = armature
        self.mapping = mapping
        self.meshes = bound_meshes(armature)

    def visible(self, scene, keypoints, points_3d=None) -> list:
        """`keypoints` (pixels or None) with the hidden ones set to None; unchanged without a mesh."""
        if not self.meshes:
            return list(keypoints)
        if points_3d is None:
            points_3d = keypoints_3d(self.armature, self.mapping or _mapping(scene, self.armature))
        import bpy
        camera = scene.camera
        # The posed (deformed) meshes of this frame.
        depsgraph = bpy.context.evaluated_depsgraph_get()
        evaluated = [m.evaluated_get(depsgraph) for m in self.meshes]
        origin_world = camera.matrix_world.translation
        ortho = camera.data.type == "ORTHO"
        forward = (camera.matrix_world.to_3x3() @ Vector((0, 0, -1))).normalized()
        out = list(keypoints)
        for k, point in enumerate(points_3d):
            if out[k] is None or point is None or k == INDEX["neck"]:
                continue
            origin = point - forward * 1000.0 if ortho else origin_world
            tolerance = FACE_TOLERANCE if k in _FACE else JOINT_TOLERANCE
            if _hit_before(evaluated, origin, point, tolerance):
                out[k] = None
        neck = INDEX["neck"]
        if out[neck] is not None and all(out[i] is None for i in _SHOULDERS):
            out[neck] = None
        return out


def _hit_before(objects, origin: Vector, point: Vector, tolerance: float) -> bool:
    """Whether any object's surface crosses the ray origin→point more than `tolerance` before it."""
    ray = point - origin
    distance = ray.length
    if distance <= tolerance:
        return False
    for obj in objects:
        inverse = obj.matrix_world.inverted()
        local_origin, local_point = inverse @ origin, inverse @ point
        local_ray = local_point - local_origin
        scale = local_ray.length / distance  # object units per metre along this ray
        hit, location, _, _ = obj.ray_cast(local_origin, local_ray.normalized(),
                                           distance=(distance - tolerance) * scale)
        if hit:
            return True
    return False


def _mapping(scene, armature):
    return scene.pg2.bone_mapping(armature)
