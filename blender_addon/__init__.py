"""PG2 Pose: pose an armature in Blender, get the person of a photo in that pose.

A Blender 4.2+ extension (blender_manifest.toml). The generator runs in `pg2-server serve`,
reached over ZeroMQ; see docs/blender.md. Submodules are imported on register, so the
build script (`python -m blender_addon.build`) runs without Blender.
"""


def _modules():
    from . import operators, overlay, panels, preferences, properties
    return (preferences, properties, operators, panels, overlay)


def register() -> None:
    for module in _modules():
        module.register()


def unregister() -> None:
    for module in reversed(_modules()):
        module.unregister()
