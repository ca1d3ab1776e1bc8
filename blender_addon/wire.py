"""The wire package (protocol, client, keypoint names, image sniffing, CURVE keys) from its single
source, `pg2_server/wire/`.

The built extension carries a copy of that folder as `pg2_wire/` (made by build.py); run from
source, the repository's `pg2_server.wire` is imported instead (`pg2_server/__init__` imports
nothing heavy).
"""
from importlib.util import find_spec

if find_spec(f"{__package__}.pg2_wire") is not None:
    from .pg2_wire import client, curve, images, keypoints, protocol
else:
    from pg2_server.wire import client, curve, images, keypoints, protocol

__all__ = ["client", "curve", "images", "keypoints", "protocol"]
