"""Synthetic bodies: Anny phenotypes and poses → posed meshes, COCO-18 joints and body parts.

Anny's default parameterisation ("local-ref") takes each bone's rotation about the world axes
of the rest pose at the bone's head, composed down the chain. In that frame the body faces −Y,
Z is up and the subject's left is +X, so: a rotation about +X swings a hanging limb backwards,
about +Y swings it towards −X (abducts the right side), about +Z turns it to its left.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Anny's COCO regressor labels, in the order we ask for them: the COCO-18 order of pg2_server.wire.keypoints without neck.
_REGRESSOR_LABELS = [
    "nose", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
    "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee",
    "left_ankle", "right_eye", "left_eye", "right_ear", "left_ear",
]

# Body parts, per vertex, from the bone that skins it most.
HEAD, TORSO, ARM, HAND, LEG, FOOT, EYE = range(7)
PART_NAMES = ["head", "torso", "arm", "hand", "leg", "foot", "eye"]


def _part_of_bone(name: str) -> int:
    base = name.split(".")[0]
    if base.startswith("eye"):
        return EYE
    if base.startswith(("neck", "head")):
        return HEAD
    if base.startswith(("shoulder", "upperarm", "lowerarm")):
        return ARM
    if base.startswith(("wrist", "finger", "metacarpal")):
        return HAND
    if base.startswith(("upperleg", "lowerleg")):
        return LEG
    if base.startswith(("foot", "toe")):
        return FOOT
    return TORSO  # root, pelvis, spine, clavicle


@dataclass(frozen=True)
class Phenotype:
    """Anny's shape parameters, all in [0, 1] (gender 0 = male, 1 = female)."""
    gender: float
    age: float
    muscle: float
    weight: float
    height: float
    proportions: float

    @property
    def female(self) -> bool:
        return self.gender >= 0.5


def sample_phenotype(rng: np.random.Generator) -> Phenotype:
    """An adult body: clearly male or female, varied build, height and proportions."""
    female = rng.random() < 0.5
    gender = rng.uniform(0.75, 1.0) if female else rng.uniform(0.0, 0.25)
    # age 0.5 is "young" adult and 1 "old" on Anny's scale (0.25 is a child).
    return Phenotype(gender=float(gender), age=float(rng.uniform(0.45, 0.85)),
                     muscle=float(rng.uniform(0.2, 0.8)), weight=float(rng.uniform(0.2, 0.8)),
                     height=float(rng.uniform(0.2, 0.9)), proportions=float(rng.uniform(0.2, 0.8)))


# ---------------------------------------------------------------------------------------------
# Poses: rotation angles (radians, world axes of the rest pose) per bone, plus the body's yaw.

VIEWS = ("front", "side", "back")


@dataclass(frozen=True)
class Pose:
    """One pose: per-bone rotation angles (see `rotation_matrix`) and the view (yaw of the whole body towards the camera)."""
    rotations: dict[str, tuple[float, float, float]]
    view: str
    yaw: float  # radians about +Z; 0 = facing the camera


def _angles(x: float = 0.0, y: float = 0.0, z: float = 0.0) -> tuple[float, float, float]:
    """Angles about X, Y and Z; `rotation_matrix` composes them."""
    return (float(x), float(y), float(z))


def rotation_matrix(angles: tuple[float, float, float]) -> np.ndarray:
    """Rz @ Rx @ Ry: about world Y first (bring a limb in or out), then X (swing), then Z (turn)."""
    x, y, z = angles
    cx, sx, cy, sy, cz, sz = np.cos(x), np.sin(x), np.cos(y), np.sin(y), np.cos(z), np.sin(z)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ rx @ ry


def sample_pose(rng: np.random.Generator, view: str) -> Pose:
    """A plausible standing or walking pose within joint limits, seen from `view`."""
    d = np.radians
    rot: dict[str, tuple[float, float, float]] = {}
    walking = rng.random() < 0.45
    if walking:
        phase = rng.uniform(0, 2 * np.pi)
        stride = d(rng.uniform(12, 28))
        s = np.sin(phase)
        # Forward swing is a −X rotation; the knee flexes (+X) most while its leg swings forward.
        rot["upperleg01.L"] = _angles(x=-stride * s, y=d(rng.uniform(-4, 1)))
        rot["upperleg01.R"] = _angles(x=stride * s, y=d(rng.uniform(-1, 4)))
        rot["lowerleg01.L"] = _angles(x=d(5) + max(0.0, s) * d(rng.uniform(20, 50)))
        rot["lowerleg01.R"] = _angles(x=d(5) + max(0.0, -s) * d(rng.uniform(20, 50)))
        swing = d(rng.uniform(10, 30))
        arm_l, arm_r = swing * s, -swing * s
    else:
        legs = rng.choice(("stance", "weight", "crossed"), p=(0.45, 0.4, 0.15))
        spread = [d(rng.uniform(-2, 12)) for _ in range(2)]
        rot["upperleg01.L"] = _angles(x=d(rng.uniform(-12, 8)), y=-spread[0], z=d(rng.uniform(-10, 15)))
        rot["upperleg01.R"] = _angles(x=d(rng.uniform(-12, 8)), y=spread[1], z=d(rng.uniform(-15, 10)))
        rot["lowerleg01.L"] = _angles(x=d(rng.uniform(0, 20)))
        rot["lowerleg01.R"] = _angles(x=d(rng.uniform(0, 20)))
        free = "L" if rng.random() < 0.5 else "R"
        sign = 1.0 if free == "L" else -1.0
        if legs == "weight":  # weight on one straight leg, the other knee bent and the foot out
            rot[f"upperleg01.{free}"] = _angles(x=d(rng.uniform(-18, -4)), y=-sign * d(rng.uniform(2, 12)),
                                                z=sign * d(rng.uniform(0, 20)))
            rot[f"lowerleg01.{free}"] = _angles(x=d(rng.uniform(12, 35)))
            other = "R" if free == "L" else "L"
            rot[f"upperleg01.{other}"] = _angles(x=d(rng.uniform(-3, 3)), y=sign * d(rng.uniform(0, 5)))
            rot[f"lowerleg01.{other}"] = _angles(x=d(rng.uniform(0, 4)))
        elif legs == "crossed":  # one leg crossed in front of the other (+Y brings the left leg inwards)
            rot[f"upperleg01.{free}"] = _angles(x=d(rng.uniform(-12, -4)), y=sign * d(rng.uniform(8, 14)),
                                                z=sign * d(rng.uniform(-5, 10)))
            rot[f"lowerleg01.{free}"] = _angles(x=d(rng.uniform(5, 15)))
        arm_l, arm_r = d(rng.uniform(-25, 15)), d(rng.uniform(-25, 15))
        if rng.random() < 0.12:  # one arm raised or reaching forward
            side = "L" if rng.random() < 0.5 else "R"
            lift = d(rng.uniform(40, 100))
            if side == "L":
                arm_l = -lift
            else:
                arm_r = -lift
    arms = "free"
    if not walking:
        arms = str(rng.choice(("free", "hip", "hips", "folded", "pockets"), p=(0.45, 0.2, 0.1, 0.1, 0.15)))
    hip_side = "L" if rng.random() < 0.5 else "R"
    # Rest is an A-pose (arms ~42° from the body): +Y brings the left arm down, −Y the right.
    for side, flex, sign in (("L", arm_l, 1.0), ("R", arm_r, -1.0)):
        towards_body = d(rng.uniform(15, 38)) if rng.random() < 0.7 else d(rng.uniform(-30, 15))
        rot[f"upperarm01.{side}"] = _angles(x=flex, y=sign * towards_body, z=sign * d(rng.uniform(-20, 20)))
        elbow = d(rng.uniform(0, 25)) if rng.random() < 0.7 else d(rng.uniform(25, 110))
        rot[f"lowerarm01.{side}"] = _angles(x=-elbow)
        if arms in ("hip", "hips") and (arms == "hips" or side == hip_side):
            # hand on the hip: elbow out, the forearm bent back in (about Y, in the arm's plane)
            rot[f"upperarm01.{side}"] = _angles(x=d(rng.uniform(0, 15)), y=sign * d(rng.uniform(-5, 8)))
            rot[f"lowerarm01.{side}"] = _angles(y=sign * d(rng.uniform(95, 110)))
        elif arms == "folded":  # forearms across the chest
            rot[f"upperarm01.{side}"] = _angles(x=d(rng.uniform(-30, -18)), y=sign * d(rng.uniform(32, 40)))
            rot[f"lowerarm01.{side}"] = _angles(x=-d(rng.uniform(85, 100)), z=-sign * d(rng.uniform(60, 75)))
        elif arms == "pockets":  # hands at the front hips, elbows a little back
            rot[f"upperarm01.{side}"] = _angles(x=d(rng.uniform(5, 15)), y=sign * d(rng.uniform(30, 38)))
            rot[f"lowerarm01.{side}"] = _angles(x=-d(rng.uniform(25, 40)), y=sign * d(rng.uniform(10, 25)))
    rot["spine03"] = _angles(x=d(rng.uniform(-6, 6)), y=d(rng.uniform(-5, 5)), z=d(rng.uniform(-12, 12)))
    rot["neck01"] = _angles(x=d(rng.uniform(-12, 12)), y=d(rng.uniform(-8, 8)), z=d(rng.uniform(-25, 25)))
    centre = {"front": 0.0, "side": (np.pi / 2) * (1 if rng.random() < 0.5 else -1), "back": np.pi}[view]
    spread = {"front": 45, "side": 20, "back": 40}[view]  # front and back include three-quarter views
    yaw = centre + d(rng.uniform(-spread, spread))
    rot["root"] = _angles(z=yaw)
    return Pose(rot, view, float(yaw))


# ---------------------------------------------------------------------------------------------
# The body model.

class BodyModel:
    """Anny (default rig) with its COCO keypoint regressor; poses a phenotype in a batch."""

    def __init__(self):
        import anny
        import torch
        self._torch = torch
        self.model = anny.Anny()
        self.model.eval()
        self.regressor = anny.KeypointsRegressor.coco(self.model, labels=_REGRESSOR_LABELS)
        self.faces = self.model.get_triangular_faces().cpu().numpy().astype(np.int32)
        # per-corner UVs of those triangles (MPFB2's layout, which the face/lip masks are painted in)
        uv_index = self.model.face_texture_coordinate_indices.cpu().numpy()
        self.uvs = self.model.texture_coordinates.cpu().numpy()[uv_index].reshape(-1, 2).astype(np.float32)
        bones = list(self.model.bone_labels)
        self.bone_labels = bones
        weights = self.model.vertex_bone_weights.cpu().numpy()
        indices = self.model.vertex_bone_indices.cpu().numpy()
        dominant = indices[np.arange(len(indices)), weights.argmax(1)]
        bone_part = np.array([_part_of_bone(b) for b in bones])
        self.parts = bone_part[dominant].astype(np.int8)
        self.vertex_count = len(self.parts)

    def pose(self, phenotype: Phenotype, poses: list[Pose]) -> "PosedBodies":
        """One body shape in several poses (one batched forward pass)."""
        torch = self._torch
        k = len(poses)
        dtype = self.model.dtype
        names = sorted({b for p in poses for b in p.rotations})
        unknown = [b for b in names if b not in self.bone_labels]
        if unknown:
            raise ValueError(f"pose names bones that Anny's rig lacks: {unknown}")
        params = {}
        for bone in names:
            h = torch.eye(4, dtype=dtype).repeat(k, 1, 1)
            h[:, :3, :3] = torch.tensor(np.stack([rotation_matrix(p.rotations.get(bone, (0.0, 0.0, 0.0)))
                                                  for p in poses]), dtype=dtype)
            params[bone] = h
        pheno = {key: torch.full((k,), float(getattr(phenotype, key)), dtype=dtype)
                 for key in ("gender", "age", "muscle", "weight", "height", "proportions")}
        with torch.no_grad():
            out = self.model(pose_parameters=params, phenotype_kwargs=pheno)
            joints = self._coco18(self.regressor(out))
            rest = out["rest_vertices"][:1]
            rest_joints = self._coco18(self.regressor({"vertices": rest}))[0]
        return PosedBodies(out["vertices"].cpu().numpy(), joints, rest[0].cpu().numpy(), rest_joints)

    @staticmethod
    def _coco18(joints17) -> np.ndarray:
        joints17 = joints17.cpu().numpy()
        neck = (joints17[:, 1] + joints17[:, 4]) / 2  # shoulder midpoint, as in COCO-derived data
        return np.concatenate([joints17[:, :1], neck[:, None], joints17[:, 1:]], axis=1)


@dataclass(frozen=True)
class PosedBodies:
    """Posed vertices (K,V,3) and COCO-18 joints (K,18,3), rest vertices (V,3) and joints (18,3); metres."""
    vertices: np.ndarray
    joints: np.ndarray
    rest_vertices: np.ndarray
    rest_joints: np.ndarray
