"""Joints hidden behind the body: a ray from the camera to each keypoint against the meshes
bound to the armature, with the synthetic renderer's rule (docs/synthetic.md): a keypoint is
hidden when the first body surface on its camera ray lies more than a tolerance in front of
it (0.04 m for face points, which lie on the surface; 0.15 m for joints, inside the limbs).
The tolerances are for an adult whose shoulders are 0.38 m apart and scale with the rig: a
character modelled in centimetres, or scaled, keeps the same rule. The neck, the shoulders'
midpoint deep inside the body, stays when a shoulder is visible.
"""
from __future__ import annotations

import numpy as np
from mathutils import Vector

from .mapping import FACE, INDEX, face_axes, keypoints_3d

FACE_TOLERANCE = 0.04
JOINT_TOLERANCE = 0.15
# How far a face point may move to reach the surface (metres).
SURFACE_REACH = 0.06
SHOULDERS = 0.38   # the shoulder width the three lengths above are for (metres)
_FACE = {INDEX[n] for n in FACE}
_SHOULDERS = (INDEX["right_shoulder"], INDEX["left_shoulder"])


def rendered_objects(view_layer) -> set:
    """The objects `view_layer` renders: in a collection neither excluded from the layer nor
    disabled for renders (nor inside one that is), and not disabled for renders themselves."""
    found = set()

    def walk(layer_collection):
        if layer_collection.exclude or layer_collection.collection.hide_render:
            return
        found.update(o for o in layer_collection.collection.objects if not o.hide_render)
        for child in layer_collection.children:
            walk(child)

    walk(view_layer.layer_collection)
    return found


def bound_meshes(armature, view_layer=None) -> list:
    """Rendered mesh objects deformed by `armature` (an Armature modifier pointing at it, or
    parented to it with the Armature parent type), in `view_layer` (default: the context's).
    An outfit kept in an excluded or unrendered collection, or in another scene, hides nothing."""
    import bpy
    rendered = rendered_objects(view_layer or bpy.context.view_layer)
    return sorted((obj for obj in rendered
                   if obj.type == "MESH" and (
                       any(m.type == "ARMATURE" and m.object == armature for m in obj.modifiers)
                       or (obj.parent == armature and obj.parent_type == "ARMATURE"))),
                  key=lambda obj: obj.name)


class Occluder:
    """Drops hidden keypoints of one armature's current pose (main thread).

    The deformed vertices come from Blender (one `foreach_get` per mesh and frame); the rays
    are cast in numpy against every triangle: building a BVH tree for each deformed frame
    (what `Object.ray_cast` does) took ~30 ms per 20k-vertex mesh, this takes a few.
    """

    def __init__(self, armature, mapping=None):
        self.armature = armature
        self.mapping = mapping
        self.meshes = bound_meshes(armature)
        self._triangles: dict[str, tuple] = {}
        self._cached = None

    def unit(self, mapping) -> float:
        """The rig's size against the adult the tolerances are for: its shoulder width in world
        units over SHOULDERS (1 for an adult modelled in metres, 100 for one in centimetres)."""
        if mapping is None or not mapping.rest_scale:
            return 1.0
        scale = float(np.mean(np.abs(self.armature.matrix_world.to_scale())))
        head = self.armature.pose.bones.get(mapping.head_bone) if mapping.head_bone else None
        if head is not None:   # a character sized by a pose bone (Rigify's root or torso), as the face is
            scale *= head.matrix.to_3x3().median_scale
        return mapping.rest_scale * scale / SHOULDERS

    def _world_mesh(self, depsgraph) -> tuple[np.ndarray, np.ndarray]:
        """The deformed vertices of every bound mesh in world space (V, 3) and the triangles
        as vertex indices (T, 3)."""
        vertices, triangles, offset = [], [], 0
        for obj in self.meshes:
            evaluated = obj.evaluated_get(depsgraph)
            mesh = evaluated.data
            count = len(mesh.vertices)
            key = obj.name
            if key not in self._triangles or self._triangles[key][1] != count:
                mesh.calc_loop_triangles()
                indices = np.empty(len(mesh.loop_triangles) * 3, np.int32)
                mesh.loop_triangles.foreach_get("vertices", indices)
                self._triangles[key] = (indices.reshape(-1, 3), count)
            co = np.empty(count * 3, np.float32)
            mesh.vertices.foreach_get("co", co)
            # float32 throughout: half the memory traffic, ample for millimetres.
            matrix = np.array(evaluated.matrix_world, np.float32)
            vertices.append(co.reshape(-1, 3) @ matrix[:3, :3].T + matrix[:3, 3])
            triangles.append(self._triangles[key][0] + offset)
            offset += count
        if not vertices:
            return np.zeros((0, 3)), np.zeros((0, 3), np.int32)
        return np.concatenate(vertices), np.concatenate(triangles)

    def face_on_surface(self, points_3d, mesh: tuple[np.ndarray, np.ndarray]) -> list:
        """Face keypoints moved onto the body's surface: nose and eyes along the face's forward
        axis (eye bones sit inside the eyeballs), ears along its sideways axis; a point moves
        only when the surface is within `SURFACE_REACH` of it (a hand in front of the face is
        not the face)."""
        axes = face_axes(self.armature, self.mapping) if self.mapping is not None else None
        vertices, indices = mesh
        if axes is None or not len(indices):
            return list(points_3d)
        triangles = vertices[indices]
        left, _, forward = (np.array(v) for v in axes)
        reach = SURFACE_REACH * self.unit(self.mapping)
        out = list(points_3d)
        # Each ray is 2 × SURFACE_REACH long: only triangles whose bounding box meets the
        # ray's own box can be hit (elementwise min/max: reductions over a 3-long axis are slow).
        c0, c1, c2 = triangles[:, 0], triangles[:, 1], triangles[:, 2]
        lo, hi = np.minimum(np.minimum(c0, c1), c2), np.maximum(np.maximum(c0, c1), c2)
        for name in FACE:
            point = points_3d[INDEX[name]]
            if point is None:
                continue
            point = np.array(point)
            outward = {"right_ear": -left, "left_ear": left}.get(name, forward)
            origin = point + outward * reach
            end = point - outward * reach
            ray_lo, ray_hi = np.minimum(origin, end), np.maximum(origin, end)
            meets = ((lo[:, 0] <= ray_hi[0]) & (hi[:, 0] >= ray_lo[0]) & (lo[:, 1] <= ray_hi[1])
                     & (hi[:, 1] >= ray_lo[1]) & (lo[:, 2] <= ray_hi[2]) & (hi[:, 2] >= ray_lo[2]))
            near = triangles[meets]
            if not len(near):
                continue
            a = near[:, 0]
            t = _first_hit(a, near[:, 1] - a, near[:, 2] - a, origin, -outward)
            if t is not None and t <= 2 * reach:
                out[INDEX[name]] = Vector(origin - outward * t)
        return out

    def visible(self, scene, keypoints, points_3d=None) -> list:
        """`keypoints` (pixels or None) with the hidden ones set to None; unchanged without a mesh."""
        if not self.meshes:
            return list(keypoints)
        mapping = self.mapping or _mapping(scene, self.armature)
        if points_3d is None:
            points_3d = keypoints_3d(self.armature, mapping)
        candidates = [k for k, p in enumerate(points_3d)
                      if keypoints[k] is not None and p is not None and k != INDEX["neck"]]
        out = list(keypoints)
        camera = scene.camera
        # normalized(): a scaled camera (parented to a rig imported at 0.01) sees the same depths
        to_camera = np.array(camera.matrix_world.normalized().inverted(), np.float32)
        ortho = camera.data.type == "ORTHO"
        vertices, indices = self.triangles(scene)
        if len(indices) and candidates:
            points = np.array([tuple(points_3d[k]) for k in candidates], np.float32)
            corners = _view(vertices, to_camera, ortho)[indices]
            hidden = _hidden(corners, _view(points, to_camera, ortho),
                             np.array([FACE_TOLERANCE if k in _FACE else JOINT_TOLERANCE for k in candidates])
                             * self.unit(mapping),
                             ortho)
            for k, h in zip(candidates, hidden):
                if h:
                    out[k] = None
        neck = INDEX["neck"]
        if out[neck] is not None and all(out[i] is None for i in _SHOULDERS):
            out[neck] = None
        return out

    def triangles(self, scene) -> tuple[np.ndarray, np.ndarray]:
        """This frame's world vertices and triangle indices (read once per frame, shared by
        the face and the occlusion)."""
        import bpy
        frame = (scene.frame_current, scene.frame_subframe)
        if getattr(self, "_frame", None) != frame or self._cached is None:
            self._cached = self._world_mesh(bpy.context.evaluated_depsgraph_get())
            self._frame = frame
        return self._cached


def _first_hit(a, e1, e2, origin, direction):
    """Distance along the ray to the nearest triangle it crosses (Möller–Trumbore), or None."""
    p = np.cross(direction, e2)
    det = np.einsum("ij,ij->i", e1, p)
    ok = np.abs(det) > 1e-12
    inv = 1.0 / np.where(ok, det, 1.0)
    s = origin - a
    u = np.einsum("ij,ij->i", s, p) * inv
    q = np.cross(s, e1)
    v = (q @ direction) * inv
    t = np.einsum("ij,ij->i", e2, q) * inv
    hit = ok & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0)
    return float(t[hit].min()) if hit.any() else None


def _view(points: np.ndarray, to_camera: np.ndarray, ortho: bool) -> np.ndarray:
    """World points → (u, v, depth): camera-plane coordinates (x/depth, y/depth for a
    perspective camera) and the distance in front of the camera."""
    local = points @ to_camera[:3, :3].T + to_camera[:3, 3]
    depth = -local[:, 2]  # the camera looks down its -Z
    if ortho:
        return np.stack([local[:, 0], local[:, 1], depth], axis=1)
    safe = np.where(depth > 1e-6, depth, np.nan)
    return np.stack([local[:, 0] / safe, local[:, 1] / safe, depth], axis=1)


def _hidden(corners: np.ndarray, points: np.ndarray, tolerance: np.ndarray, ortho: bool = False) -> np.ndarray:
    """For each point (u, v, depth): whether a triangle (rows of 3 corners in `corners`) covers
    it more than `tolerance` (metres along the ray) in front of it.

    All rays start at the camera, so in (u, v) they are points and the triangles are flat:
    a bounding-box test keeps a few triangles per ray, then barycentric coordinates give
    coverage and the depth of the surface there (affine in u, v in an orthographic view; in a
    perspective one 1/depth is).
    """
    tri = corners.reshape(-1, 3, 3)
    # Triangles reaching behind the camera are dropped (their u, v are NaN there); elementwise
    # minimum/maximum, since reductions over a 3-long axis are many times slower in numpy.
    tri = tri[(tri[:, 0, 2] > 0) & (tri[:, 1, 2] > 0) & (tri[:, 2, 2] > 0)]
    c0, c1, c2 = tri[:, 0, :2], tri[:, 1, :2], tri[:, 2, :2]
    lo, hi = np.minimum(np.minimum(c0, c1), c2), np.maximum(np.maximum(c0, c1), c2)
    lo_u, lo_v, hi_u, hi_v = lo[:, 0].copy(), lo[:, 1].copy(), hi[:, 0].copy(), hi[:, 1].copy()
    out = np.zeros(len(points), bool)
    for i, (u, v, depth) in enumerate(points):
        if not np.isfinite(u):
            continue
        near = tri[(lo_u <= u) & (u <= hi_u) & (lo_v <= v) & (v <= hi_v)]
        if not len(near):
            continue
        a, b, c = near[:, 0], near[:, 1], near[:, 2]
        det = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
        ok = np.abs(det) > 1e-18
        det = np.where(ok, det, 1.0)
        w1 = ((u - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (v - a[:, 1])) / det
        w2 = ((b[:, 0] - a[:, 0]) * (v - a[:, 1]) - (u - a[:, 0]) * (b[:, 1] - a[:, 1])) / det
        w0 = 1.0 - w1 - w2
        inside = ok & (w0 >= 0) & (w1 >= 0) & (w2 >= 0)
        if not inside.any():
            continue
        if ortho:   # depth is linear across a triangle in an orthographic view, 1/depth in a perspective one
            surface = (w0 * a[:, 2] + w1 * b[:, 2] + w2 * c[:, 2])[inside]
        else:
            surface = 1.0 / (w0 / a[:, 2] + w1 / b[:, 2] + w2 / c[:, 2])[inside]
        # Depths along the same ray scale with the distance: convert the tolerance.
        stretch = 1.0 if ortho else float(np.sqrt(u * u + v * v + 1.0))
        out[i] = bool((surface < depth - tolerance[i] / stretch).any())
    return out


def _mapping(scene, armature):
    return scene.pg2.bone_mapping(armature)
