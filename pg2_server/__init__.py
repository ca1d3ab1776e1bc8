"""PG2's generation server: model, pipeline, server, broker and workers; `wire` is what clients share."""


def package_version() -> str:
    """The installed pg2-blender version, or 0+unknown in a source tree that was never installed."""
    try:
        from importlib.metadata import version
        return version("pg2-blender")
    except Exception:
        return "0+unknown"
