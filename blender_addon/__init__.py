"""PG2 Pose: pose an armature in Blender, get the person of a photo in that pose.

A Blender 4.2+ extension (blender_manifest.toml). The generator runs in `pg2-server serve`,
reached over ZeroMQ; see docs/blender.md.
"""
from . import operators, overlay, panels, preferences, properties

_MODULES = (preferences, properties, operators, panels, overlay)


def register() -> None:
    for module in _MODULES:
        module.register()


def unregister() -> None:
    for module in reversed(_MODULES):
        module.unregister()
