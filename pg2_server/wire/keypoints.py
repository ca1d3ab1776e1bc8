"""The COCO-18 keypoint names in the order requests send them; "right" is the subject's own right."""
from __future__ import annotations

NAMES: tuple[str, ...] = (
    "nose", "neck",
    "right_shoulder", "right_elbow", "right_wrist",
    "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle",
    "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)
COUNT = len(NAMES)
INDEX = {name: i for i, name in enumerate(NAMES)}
