"""Add-on benchmarks in Blender-as-a-module: `python -m blender_addon.bench projection|frames|steps`.

projection: 18 keypoints of an animated PG2 Pose Rig for N frames (frame_set included).
frames: a frame range through `bpy.ops.pg2.generate_frames` against a server, next to the
same requests sent straight from the Python client at the same in-flight count (the
server's own time per image); the ratio is what Blender adds. Starts
`pg2-server serve --random-weights` on a free port unless --endpoint is given.
steps: a frame range driven as the UI drives it (Run.step from a 50 ms timer), timing every
main-thread step: the longest must stay under 50 ms for the UI to stay responsive. Also
printed: each step's main-thread CPU time (its own work; the wall-clock time adds what other
processes took) and the load average before and after, since other jobs stretch single steps.
Not part of the built extension.
"""
from __future__ import annotations

import argparse
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


def _scene(width: int, height: int, frames: int):
    import bpy  # first: addon_utils and mathutils come with it
    import addon_utils
    from mathutils import Euler

    from blender_addon import imaging, rig
    bpy.ops.wm.read_factory_settings(use_empty=True)
    addon_utils.enable("blender_addon", default_set=True, handle_error=None)
    scene = bpy.context.scene
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = width, height, 100
    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(camera)
    camera.location, camera.rotation_euler = (0, -6.5, 0.9), Euler((math.radians(90), 0, 0))
    scene.camera = camera
    arm = rig.create_pose_rig(scene.collection, bpy.context.view_layer)
    for name in ("right_shoulder", "left_hip", "neck"):
        bone = arm.pose.bones[name]
        bone.rotation_mode = "XYZ"
        for frame in (1, frames // 2 + 1, frames):
            bone.rotation_euler = Euler((math.radians(40 * math.sin(frame / 7)), 0, 0))
            bone.keyframe_insert("rotation_euler", frame=frame)
    scene.frame_start, scene.frame_end = 1, frames
    scene.pg2.armature = arm
    source = Path(tempfile.mkdtemp()) / "person.png"
    pixels = imaging.background(88, 128, (0.8, 0.5, 0.3))
    pixels[10:120, 30:60] = (30, 40, 200)
    source.write_bytes(imaging.encode_png(pixels))
    scene.pg2.source_path = str(source)
    return scene, arm


def bench_projection(frames: int) -> None:
    import bpy

    from blender_addon.mapping import armature_mapping
    from blender_addon.projection import project_armature
    scene, arm = _scene(1920, 1080, frames)
    mapping = armature_mapping(arm)
    started = time.perf_counter()
    for frame in range(1, frames + 1):
        scene.frame_set(frame)
        points = project_armature(scene, arm, mapping=mapping)
    elapsed = time.perf_counter() - started
    assert sum(p is not None for p in points) == 18
    started = time.perf_counter()
    for frame in range(1, frames + 1):
        scene.frame_set(frame)
    frame_set_only = time.perf_counter() - started
    print(f"projection: {frames} frames in {elapsed:.3f} s ({elapsed / frames * 1e3:.3f} ms/frame); "
          f"frame_set alone {frame_set_only:.3f} s (Blender {bpy.app.version_string})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ready_server(endpoint: str | None, preset: str, timeout: float = 300.0):
    """Yields (endpoint, info) of a server that takes work: `endpoint`, or a
    `pg2-server serve --preset PRESET --random-weights` started on a free port for the block."""
    process = None
    with tempfile.TemporaryFile() as log:  # not a pipe: a chatty server would fill it and block
        if endpoint is None:
            endpoint = f"tcp://127.0.0.1:{_free_port()}"
            process = subprocess.Popen([sys.executable, "-m", "pg2_server.cli", "serve", "--preset", preset,
                                        "--random-weights", "--bind", endpoint], stdout=subprocess.DEVNULL,
                                       stderr=log)
        try:
            yield endpoint, _wait_until_ready(endpoint, process, log, timeout)
        finally:
            if process is not None:
                process.terminate()
                process.wait(10)


def _wait_until_ready(endpoint: str, process, log, timeout: float) -> dict:
    """The server's `info` once it takes work: it answers as soon as its socket is bound, with
    `ready: false` and no model in `info` while the model loads."""
    from blender_addon.wire import client
    deadline = time.monotonic() + timeout
    with client.Client(endpoint, timeout=2.0, retries=1) as c:
        while True:
            if process is not None and process.poll() is not None:
                log.seek(0)
                raise SystemExit("the bench server exited: " + log.read().decode(errors="replace")[-2000:])
            try:
                if c.ready():
                    return c.info()
            except client.ServerTimeout:
                pass  # not bound yet
            if time.monotonic() > deadline:
                raise SystemExit(f"the server at {endpoint} was not ready within {timeout:g} s")
            time.sleep(0.2)


def bench_frames(frames: int, in_flight: int, endpoint: str | None, preset: str, size,
                 rounds: int = 3) -> None:
    import bpy

    from blender_addon.wire import client, protocol
    with ready_server(endpoint, preset) as (endpoint, info):
        scene, arm = _scene(size[0], size[1], frames)
        prefs = bpy.context.preferences.addons["blender_addon"].preferences
        prefs.endpoint, prefs.timeout = endpoint, 120.0
        settings = scene.pg2
        settings.in_flight = in_flight
        out = Path(tempfile.mkdtemp())
        settings.output_path = str(out / "warm_####.png")
        scene.frame_end = 4
        bpy.ops.pg2.generate_frames()  # warm-up: server batches, sockets
        scene.frame_end = frames
        # Reference: the same keypoints, straight from the client, same in-flight count.
        from blender_addon import generation
        from blender_addon.mapping import armature_mapping
        jobs = generation.plan_frames(scene, arm, armature_mapping(arm), list(range(1, frames + 1)),
                                      [None] * frames, keep_outside=False)
        source = Path(settings.source_path).read_bytes()
        requests = [client.GenerateRequest(source, [None if p is None else list(p) for p in j.keypoints],
                                           list(j.frame_size)) for j in jobs]
        references, addons = [], []
        for round_ in range(rounds):  # alternate, so load from elsewhere hits both alike
            with client.Client(endpoint, timeout=120.0) as c:
                started = time.perf_counter()
                for _ in c.generate_many(requests, in_flight=in_flight):
                    pass
                references.append(time.perf_counter() - started)
            settings.output_path = str(out / f"r{round_}" / "frame_####.png")
            started = time.perf_counter()
            bpy.ops.pg2.generate_frames()
            addons.append(time.perf_counter() - started)
        reference, addon = min(references), min(addons)
        out = out / "r0"
        assert len(list(out.glob("frame_*.png"))) == frames
        model = info["models"][0]
        print(f"frames: {frames} frames {size[0]}x{size[1]}, model {model['name']} canvas {protocol.info_canvas(model)} (WxH) "
              f"on {info.get('devices')}, in flight {in_flight}")
        print(f"  client straight to server: best of {rounds} {reference:.2f} s "
              f"({reference / frames * 1e3:.1f} ms/image); all {', '.join(f'{t:.2f}' for t in references)}")
        print(f"  bpy.ops.pg2.generate_frames: best of {rounds} {addon:.2f} s "
              f"({addon / frames * 1e3:.1f} ms/frame); all {', '.join(f'{t:.2f}' for t in addons)}")
        print(f"  ratio add-on / server: {addon / reference:.3f} (target <= 1.1)")


def _skinned_body(scene, arm, vertices: int):
    """A mesh of about `vertices` vertices, skinned to the rig's nearest bones, so frame_set
    deforms a real mesh (and occlusion has a body to test against)."""
    import bpy
    import bmesh
    from mathutils import Matrix
    rings = max(8, int(math.sqrt(vertices / 2)))
    mesh = bpy.data.meshes.new("body")
    bm = bmesh.new()
    bmesh.ops.create_uvsphere(bm, u_segments=2 * rings, v_segments=rings, radius=1.0,
                              matrix=Matrix.LocRotScale((0, 0, 0.9), None, (0.28, 0.16, 0.9)))
    bm.to_mesh(mesh)
    bm.free()
    body = bpy.data.objects.new("body", mesh)
    scene.collection.objects.link(body)
    body.modifiers.new("Armature", "ARMATURE").object = arm
    bones = [(b.name, (b.head_local + b.tail_local) / 2) for b in arm.data.bones]
    groups = {name: body.vertex_groups.new(name=name) for name, _ in bones}
    nearest: dict[str, list[int]] = {}
    for v in mesh.vertices:
        name = min(bones, key=lambda b: (b[1] - v.co).length)[0]
        nearest.setdefault(name, []).append(v.index)
    for name, indices in nearest.items():
        groups[name].add(indices, 1.0, "REPLACE")
    return body


def bench_steps(frames: int, endpoint: str | None, preset: str, size, mesh: int, framing: str,
                over_render: bool, occlusion: bool = True) -> None:
    import bpy

    from blender_addon import generation, operators
    with ready_server(endpoint, preset) as (endpoint, _):
        scene, arm = _scene(size[0], size[1], frames)
        if mesh:
            _skinned_body(scene, arm, mesh)
        prefs = bpy.context.preferences.addons["blender_addon"].preferences
        prefs.endpoint, prefs.timeout = endpoint, 120.0
        settings = scene.pg2
        settings.framing = framing
        settings.occlusion = occlusion
        out = Path(tempfile.mkdtemp())
        if over_render:
            settings.background = "RENDER"
            scene.render.engine = "BLENDER_WORKBENCH"
            scene.render.image_settings.file_format = "PNG"
            scene.render.filepath = str(out / "render" / "r_####")
            started = time.perf_counter()
            bpy.ops.render.render(animation=True)
            print(f"rendered {frames} frames for the background in {time.perf_counter() - started:.1f} s")
        # Same-run reference: what planning every frame at once (the old way) costs.
        started = time.perf_counter()
        for frame in range(1, frames + 1):
            scene.frame_set(frame)
        frame_set_all = time.perf_counter() - started
        scene.frame_set(1)
        settings.output_path = str(out / "frame_####.png")
        paths = [generation.frame_path(settings.output_path, f) for f in range(1, frames + 1)]
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        run = operators.prepare_run(bpy.context, list(range(1, frames + 1)), paths)
        first = time.perf_counter() - started
        while not run.step():  # what the modal timer does every 50 ms
            time.sleep(0.05)
        wall = time.perf_counter() - started
        assert run.error is None, run.error
        steps = sorted(run.step_times)
        p99 = steps[min(len(steps) - 1, int(0.99 * len(steps)))]
        print(f"steps: {frames} frames {size[0]}x{size[1]}, {framing} framing"
              f"{' over the render' if over_render else ''}, mesh {mesh} vertices, occlusion "
              f"{'on' if occlusion else 'off'}; {run.done} written in "
              f"{wall:.1f} s")
        print(f"  start (checks, source, renders list): {first * 1e3:.1f} ms; {len(steps)} timer steps: "
              f"max {steps[-1] * 1e3:.1f} ms, 99th percentile {p99 * 1e3:.1f} ms, "
              f"mean {sum(steps) / len(steps) * 1e3:.2f} ms (target: max < 50 ms); over 50 ms: "
              f"{sum(t > 0.05 for t in steps)}; the 5 longest {', '.join(f'{t * 1e3:.0f}' for t in steps[-5:])} ms")
        cpu = sorted(run.step_cpu_times)
        print(f"  main-thread CPU per step: max {cpu[-1] * 1e3:.1f} ms, mean {sum(cpu) / len(cpu) * 1e3:.2f} ms; "
              f"over 50 ms: {sum(t > 0.05 for t in cpu)}; load average {load_before:.1f} before, "
              f"{os.getloadavg()[0]:.1f} after ({os.cpu_count()} cores)")
        print(f"  reference, same run: frame_set of all {frames} frames at once {frame_set_all * 1e3:.0f} ms "
              f"({frame_set_all / frames * 1e3:.2f} ms/frame)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("projection")
    p.add_argument("--frames", type=int, default=1000)
    p = sub.add_parser("frames")
    p.add_argument("--frames", type=int, default=50)
    p.add_argument("--in-flight", type=int, default=4)
    p.add_argument("--endpoint", help="a running server (default: start one)")
    p.add_argument("--preset", default="demo", help="model preset of the started server")
    p.add_argument("--size", type=int, nargs=2, default=(176, 256), metavar=("W", "H"))
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of each; the best counts")
    p = sub.add_parser("steps")
    p.add_argument("--frames", type=int, default=500)
    p.add_argument("--endpoint", help="a running server (default: start one)")
    p.add_argument("--preset", default="tiny", help="model preset of the started server")
    p.add_argument("--size", type=int, nargs=2, default=(176, 256), metavar=("W", "H"))
    p.add_argument("--mesh", type=int, default=20000, help="vertices of a skinned body (0: none)")
    p.add_argument("--framing", choices=("CAMERA", "PERSON"), default="CAMERA")
    p.add_argument("--over-render", action="store_true", help="Person framing over rendered frames")
    p.add_argument("--no-occlusion", action="store_true", help="Hide Occluded Joints off")
    args = parser.parse_args(argv)
    if args.what == "projection":
        bench_projection(args.frames)
    elif args.what == "steps":
        bench_steps(args.frames, args.endpoint, args.preset, args.size, args.mesh,
                    "PERSON" if args.over_render else args.framing, args.over_render, not args.no_occlusion)
    else:
        bench_frames(args.frames, args.in_flight, args.endpoint, args.preset, args.size, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
