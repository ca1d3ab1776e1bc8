"""Add-on preferences: server endpoint, timeout, CURVE keys; a connection test shows `info`."""
from __future__ import annotations

from dataclasses import dataclass

import bpy
from bpy.props import FloatProperty, StringProperty

from .wire import client, protocol
from .wire import curve as wire_curve


@dataclass(frozen=True)
class Connection:
    """Validated connection settings, safe to hand to a worker thread."""
    endpoint: str
    timeout: float
    curve: object = None  # wire_curve.ClientKeys or None

    def open(self, context=None, timeout: float | None = None):
        """A new client (one per thread: ZeroMQ sockets are not thread-safe), in `context`
        (terminating that context interrupts the client's waits: how a run is cancelled)."""
        return client.Client(self.endpoint, timeout=timeout or self.timeout, retries=1,
                             curve=self.curve, context=context)


def endpoint_problem(endpoint: str) -> str | None:
    """Why `endpoint` cannot be used, in words; None if it is fine."""
    scheme, sep, rest = endpoint.strip().partition("://")
    if scheme == "tcp" and "/" in rest:
        # Checked here because the protocol's own check reads "5557/" as a missing port.
        address = rest.split("/")[0]
        return (f"{endpoint.strip()!r} has a '/' after the address; a ZeroMQ endpoint is just "
                f"tcp://HOST:PORT, e.g. tcp://{address or '127.0.0.1:5557'}")
    try:
        protocol.check_endpoint(endpoint)
    except ValueError as e:
        return str(e)
    return None


class PG2Preferences(bpy.types.AddonPreferences):
    bl_idname = __package__

    endpoint: StringProperty(name="Server", default=protocol.DEFAULT_ENDPOINT,
                             description="ZeroMQ endpoint of `pg2-server serve`: tcp://HOST:PORT")
    timeout: FloatProperty(name="Timeout (s)", default=30.0, min=0.5, max=3600.0,
                           description="How long to wait for each reply before reporting the server as unreachable")
    server_key: StringProperty(name="Server Public Key", subtype="FILE_PATH", options={"PATH_SUPPORTS_BLEND_RELATIVE"},
                               description="CURVE: the server's public certificate (server.key); empty = no encryption")
    client_key: StringProperty(name="Client Secret Key", subtype="FILE_PATH", options={"PATH_SUPPORTS_BLEND_RELATIVE"},
                               description="CURVE: this client's certificate with its secret key (NAME.key_secret)")
    server_info: StringProperty(name="Server", default="")

    def draw(self, context):
        layout = self.layout
        layout.prop(self, "endpoint")
        problem = endpoint_problem(self.endpoint)
        if problem:
            layout.label(text=problem, icon="ERROR")
        layout.prop(self, "timeout")
        box = layout.box()
        box.label(text="Encryption (CURVE, optional)")
        box.prop(self, "server_key")
        box.prop(self, "client_key")
        row = layout.row()
        row.operator("pg2.test_connection", icon="LINKED")
        for line in self.server_info.split("\n"):
            if line:
                layout.label(text=line)


def preferences(context=None) -> PG2Preferences | None:
    """This add-on's preferences, or None when Blender has no entry for it (never a KeyError)."""
    context = context or bpy.context
    addon = context.preferences.addons.get(__package__)
    return addon.preferences if addon is not None else None


def connection(context=None) -> Connection:
    """The connection settings, validated; raises ValueError with what to fix."""
    prefs = preferences(context)
    endpoint = prefs.endpoint if prefs else protocol.DEFAULT_ENDPOINT
    timeout = prefs.timeout if prefs else 30.0
    problem = endpoint_problem(endpoint)
    if problem:
        raise ValueError(f"Preferences › Add-ons › PG2: {problem}")
    curve = None
    if prefs and (prefs.server_key or prefs.client_key):
        if not (prefs.server_key and prefs.client_key):
            raise ValueError("CURVE needs both the server's public key file and this client's secret "
                             "key file in the add-on preferences (or neither)")
        curve = wire_curve.ClientKeys.from_files(bpy.path.abspath(prefs.server_key),
                                                 bpy.path.abspath(prefs.client_key))
    return Connection(endpoint, timeout, curve)


def describe_info(info: dict) -> str:
    """A few lines of the server's `info` reply for the preferences panel."""
    server = info.get("server") if isinstance(info.get("server"), dict) else {}
    lines = [f"{server.get('name', 'server')} {server.get('version', '?')}, protocol "
             f"{', '.join(str(v) for v in info.get('protocol_versions', []))}"]
    for model in info.get("models", []) or []:
        canvas = model.get("canvas", "?")
        if isinstance(canvas, (list, tuple)) and len(canvas) == 2:
            size = protocol.info_canvas(model)
            canvas = f"{size.width}x{size.height} (WxH)"
        lines.append(f"Model {model.get('name', '?')}: preset {model.get('preset', '?')}, canvas {canvas}")
    devices = info.get("devices") or []
    if devices:
        lines.append("Devices: " + ", ".join(str(d) for d in devices))
    if info.get("ready") is False:
        lines.append("Not ready yet (loading its model, or a broker without workers): "
                     "a job waits for it up to the Timeout")
    return "\n".join(lines)


def register() -> None:
    bpy.utils.register_class(PG2Preferences)


def unregister() -> None:
    bpy.utils.unregister_class(PG2Preferences)
