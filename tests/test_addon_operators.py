"""The add-on in real Blender: registration, and the operators end to end against a real
`pg2-server serve --preset tiny --random-weights` on a free loopback port."""
from __future__ import annotations

import json
import math
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")
import addon_utils  # noqa: E402
from mathutils import Euler  # noqa: E402

from blender_addon import imaging, rig  # noqa: E402
from blender_addon.operators import missing_for_poses  # noqa: E402
from pg2_server.wire.client import Client, ServerError  # noqa: E402
from conftest import free_port

ADDON = "blender_addon"
WIDTH, HEIGHT = 120, 160


def png_size(path) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def start_server(*command) -> tuple[subprocess.Popen, str]:
    """`pg2-server serve|broker ...` on a free loopback port; returns at once, before it answers."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    bind = ["--frontend", endpoint, "--backend", f"tcp://127.0.0.1:{free_port()}"] if command[0] == "broker" \
        else ["--bind", endpoint]
    process = subprocess.Popen([sys.executable, "-m", "pg2_server.cli", *command, *bind],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return process, endpoint


def wait_for(process, endpoint, ready=True, limit=90.0) -> None:
    """Until the server answers, and with `ready` until it takes work too: `serve` answers (not
    ready) as soon as its socket is bound, while its model is still loading."""
    deadline = time.monotonic() + limit
    with Client(endpoint, timeout=1.0, retries=1) as client:
        while True:
            try:
                if client.ready() or not ready:
                    return
                time.sleep(0.05)
            except ServerError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail("pg2-server did not start: " + (process.stderr.read() or "")[-2000:])


def stop(process) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def server():
    process, endpoint = start_server("serve", "--preset", "tiny", "--random-weights", "--threads", "1")
    wait_for(process, endpoint)
    yield endpoint
    stop(process)


@pytest.fixture
def loading_server():
    """A `pg2-server serve` whose model takes seconds to load (the market preset's 77 M random
    fp32 weights, canvas 64x128), given as soon as it answers: before its model is there."""
    process, endpoint = start_server("serve", "--preset", "market", "--random-weights", "--dtype", "float32",
                                     "--backend", "torch", "--threads", "1")
    wait_for(process, endpoint, ready=False)
    with Client(endpoint, timeout=5.0, retries=1) as client:
        assert client.ready() is False and client.info()["models"] == []
    yield endpoint
    stop(process)


@pytest.fixture
def broker():
    """A `pg2-server broker` with no worker: it answers, and is never ready."""
    process, endpoint = start_server("broker")
    wait_for(process, endpoint, ready=False)
    yield endpoint
    stop(process)


def fresh_file():
    """An empty file with the add-on enabled (factory settings also reset the add-ons)."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    module = addon_utils.enable(ADDON, default_set=True, handle_error=None)
    assert module is not None, "the add-on did not enable"
    return module


@pytest.fixture(scope="module")
def addon():
    yield fresh_file()
    addon_utils.disable(ADDON, default_set=True, handle_error=None)


def prefs():
    return bpy.context.preferences.addons.get(ADDON).preferences


@pytest.fixture
def shot(addon, tmp_path):
    """A fresh scene: camera on the PG2 Pose Rig (animated over frames 1-5), a source photo."""
    fresh_file()
    scene = bpy.context.scene
    scene.render.resolution_x, scene.render.resolution_y = WIDTH * 2, HEIGHT * 2
    scene.render.resolution_percentage = 50
    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(camera)
    camera.location, camera.rotation_euler = (0, -6.5, 0.9), Euler((math.radians(90), 0, 0))
    scene.camera = camera
    arm = rig.create_pose_rig(scene.collection, bpy.context.view_layer)
    bone = arm.pose.bones["right_shoulder"]
    bone.rotation_mode = "XYZ"
    for frame in range(1, 6):
        bone.rotation_euler = Euler((math.radians(15 * frame), 0, 0))
        bone.keyframe_insert("rotation_euler", frame=frame)
    scene.frame_start, scene.frame_end, scene.frame_current = 1, 5, 1
    source = tmp_path / "person.png"
    pixels = imaging.background(44, 64, (0.8, 0.5, 0.3))
    pixels[10:60, 12:32] = (30, 40, 200)
    source.write_bytes(imaging.encode_png(pixels))
    settings = scene.pg2
    settings.armature = arm
    settings.source_path = str(source)
    settings.output_path = str(tmp_path / "out" / "frame_####.png")
    return scene


def connect(endpoint, timeout=20.0):
    prefs().endpoint, prefs().timeout = endpoint, timeout
    prefs().server_key = prefs().client_key = ""


def test_register_unregister_three_times(addon):
    for _ in range(3):
        addon_utils.disable(ADDON, default_set=True, handle_error=None)
        assert not hasattr(bpy.types.Scene, "pg2")
        assert not hasattr(bpy.ops.pg2, "generate") or "generate" not in dir(bpy.ops.pg2)
        module = addon_utils.enable(ADDON, default_set=True, handle_error=None)
        assert module is not None and hasattr(bpy.types.Scene, "pg2")
        assert bpy.context.preferences.addons.get(ADDON) is not None
    assert {"generate", "generate_frames", "test_connection", "add_pose_rig"} <= set(dir(bpy.ops.pg2))


def test_add_pose_rig_operator(addon):
    fresh_file()
    assert bpy.ops.pg2.add_pose_rig() == {"FINISHED"}
    arm = bpy.context.scene.pg2.armature
    assert arm is not None and len(arm.data.bones) == 19


def test_one_frame_makes_pg2_result(shot, server):
    connect(server)
    shot.pg2.set_camera_background = True
    assert bpy.ops.pg2.generate() == {"FINISHED"}
    image = bpy.data.images["PG2 Result"]
    assert tuple(image.size) == (WIDTH, HEIGHT)
    assert max(image.pixels[:]) > 0.0
    assert shot.camera.data.background_images[0].image == image
    assert shot.frame_current == 1


def test_person_framing_composites_into_the_full_frame(shot, server):
    connect(server)
    settings = shot.pg2
    settings.framing, settings.background, settings.background_color = "PERSON", "COLOR", (0, 1, 0)
    settings.margin = 0.05
    assert bpy.ops.pg2.generate() == {"FINISHED"}
    image = bpy.data.images["PG2 Result"]
    assert tuple(image.size) == (WIDTH, HEIGHT)
    corner = image.pixels[0:4]  # bottom-left: far from the person, so the background colour
    assert corner[0] == pytest.approx(0.0, abs=0.01) and corner[1] == pytest.approx(1.0, abs=0.01)


def test_frame_range_writes_files_and_resumes(shot, server):
    connect(server)
    out = Path(shot.pg2.output_path).parent
    assert bpy.ops.pg2.generate_frames() == {"FINISHED"}
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == [f"frame_{i:04d}.png" for i in range(1, 6)]
    assert all(png_size(f) == (WIDTH, HEIGHT) for f in files)
    assert not list(out.glob(".pg2-*.part"))  # no temporary left behind
    assert (out / ".pg2-frames.json").is_file()  # the record of the settings the frames were made with
    stamps = {f: f.stat().st_mtime_ns for f in files}
    files[2].unlink()
    assert bpy.ops.pg2.generate_frames() == {"FINISHED"}
    assert files[2].exists()
    assert all(f.stat().st_mtime_ns == stamps[f] for f in files if f != files[2])
    assert bpy.ops.pg2.generate_frames() == {"FINISHED"}  # all exist: nothing sent
    assert all(f.stat().st_mtime_ns == stamps[f] for f in files if f != files[2])


def test_step_and_custom_range(shot, server):
    connect(server)
    settings = shot.pg2
    settings.use_scene_range = False
    settings.frame_start, settings.frame_end, settings.frame_step = 2, 9, 3
    settings.output_path = str(Path(settings.output_path).parent / "step_##")
    assert bpy.ops.pg2.generate_frames() == {"FINISHED"}
    out = Path(settings.output_path).parent
    assert sorted(f.name for f in out.glob("step_*")) == ["step_02.png", "step_05.png", "step_08.png"]
    settings.frame_start, settings.frame_end = -4, 0    # an animation that starts before frame 0
    settings.output_path = str(out / "before_##")
    assert bpy.ops.pg2.generate_frames() == {"FINISHED"}
    assert sorted(f.name for f in out.glob("before_*")) == ["before_-01.png", "before_-04.png"]   # step 3


def test_server_down_fails_within_the_timeout_and_writes_nothing(shot):
    connect(f"tcp://127.0.0.1:{free_port()}", timeout=1.0)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="not reachable"):
        bpy.ops.pg2.generate_frames()
    assert time.monotonic() - started < 5.0
    out = Path(shot.pg2.output_path).parent
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(RuntimeError, match="not reachable"):
        bpy.ops.pg2.test_connection()


def test_connection_test_shows_the_model(addon, server):
    connect(server)
    assert bpy.ops.pg2.test_connection() == {"FINISHED"}
    info = prefs().server_info
    assert "tiny" in info and "canvas 16x32" in info and "cpu" in info


def test_buttons_grey_out_without_an_armature_or_a_camera(shot):
    for op in (bpy.ops.pg2.generate, bpy.ops.pg2.generate_frames, bpy.ops.pg2.export_poses):
        assert op.poll()
    settings = shot.pg2
    armature = settings.armature
    settings.armature = None
    bpy.context.view_layer.objects.active = shot.camera
    assert not bpy.ops.pg2.generate.poll() and not bpy.ops.pg2.export_poses.poll()
    settings.armature = armature
    camera, shot.camera = shot.camera, None
    assert not bpy.ops.pg2.generate.poll() and not bpy.ops.pg2.generate_frames.poll()
    shot.camera = camera
    assert bpy.ops.pg2.generate.poll()
    camera.data.type = "PANO"          # a panorama is not projected as a photo
    assert not bpy.ops.pg2.generate.poll()
    assert "panoramic" in missing_for_poses(bpy.context)
    camera.data.type = "PERSP"
    # The list buttons: Remove needs a selected row.
    assert not bpy.ops.pg2.person_remove.poll() and not bpy.ops.pg2.override_remove.poll()
    assert bpy.ops.pg2.person_add() == {"FINISHED"} and bpy.ops.pg2.person_add() == {"FINISHED"}
    assert (len(settings.people), settings.person_index) == (2, 1)   # the new row is selected
    assert bpy.ops.pg2.person_remove.poll()
    assert bpy.ops.pg2.person_remove() == {"FINISHED"}
    assert (len(settings.people), settings.person_index) == (1, 0)
    assert bpy.ops.pg2.person_remove() == {"FINISHED"}
    assert not bpy.ops.pg2.person_remove.poll()
    assert bpy.ops.pg2.override_add() == {"FINISHED"} and len(settings.overrides) == 1
    assert bpy.ops.pg2.override_remove() == {"FINISHED"} and len(settings.overrides) == 0


@pytest.mark.parametrize("problem,message", [
    ("http", "web address"),
    ("no_port", "needs a host and a port"),
    ("no_armature", "choose the armature"),
    ("no_camera", "no active camera"),
    ("missing_source", "does not exist"),
    ("not_an_image", "not a PNG or JPEG"),
    ("unmapped", "pick a preset or map the bones"),
    ("curve_half", "CURVE needs both"),
])
def test_errors_say_what_to_fix(shot, problem, message, tmp_path):
    connect("tcp://127.0.0.1:9")
    settings = shot.pg2
    if problem == "http":
        prefs().endpoint = "http://localhost:5557"
    elif problem == "no_port":
        prefs().endpoint = "tcp://localhost"
    elif problem == "no_armature":
        settings.armature = None
        bpy.context.view_layer.objects.active = shot.camera
    elif problem == "no_camera":
        shot.camera = None
    elif problem == "missing_source":
        settings.source_path = str(tmp_path / "nobody.png")
    elif problem == "not_an_image":
        (tmp_path / "notes.png").write_text("hello")
        settings.source_path = str(tmp_path / "notes.png")
    elif problem == "unmapped":
        settings.armature = rig.build_armature(
            shot.collection, bpy.context.view_layer, "plain",
            [("Bone", (0, 0, 0), (0, 0, 1), None, False), ("Bone.001", (0, 0, 1), (0, 0, 2), "Bone", True)])
    elif problem == "curve_half":
        prefs().server_key = str(tmp_path / "server.key")
    with pytest.raises(RuntimeError, match=message):
        bpy.ops.pg2.generate()
    out = Path(settings.output_path).parent
    assert not out.exists()


def _run(scene, frames, folder, endpoint, in_flight=2, timeout=20.0, **kw):
    from blender_addon import generation
    from blender_addon.mapping import armature_mapping
    from blender_addon.preferences import Connection
    source = Path(scene.pg2.source_path).read_bytes()
    paths = [str(folder / f"f{i:03d}_{f:03d}.png") for i, f in enumerate(frames)]
    batch = generation.Batch(Connection(endpoint, timeout), source, None, generation.Framing(), in_flight)
    return generation.Run(scene, scene.pg2.armature, armature_mapping(scene.pg2.armature), frames, paths,
                          batch, **kw)


def drive(run, limit=60.0):
    """Call the timer callback's work until the run ends, as the modal timer would."""
    deadline = time.monotonic() + limit
    while not run.step():
        assert time.monotonic() < deadline, "the run did not end"
        time.sleep(0.005)
    return run


def test_run_streams_frames_and_cancels_cleanly(shot, server, tmp_path):
    """The UI path: planning in steps, a worker thread, events polled on the main thread."""
    run = drive(_run(shot, [1, 2, 3], tmp_path / "a", server))
    assert run.error is None and run.done == 3
    assert len(list((tmp_path / "a").iterdir())) == 3
    assert shot.frame_current == 1

    run = _run(shot, list(range(1, 6)) * 8, tmp_path / "b", server, in_flight=1)  # 40 requests
    while run.done == 0:
        run.step()
    run.cancel()
    run.batch.thread.join(2)
    assert not run.batch.thread.is_alive() and run.batch.context.closed
    assert run.done < 40
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith(".pg2-")]


def test_a_step_loads_a_render_or_poses_frames_never_both(shot, server, tmp_path, monkeypatch):
    """Reading a render (Blender's main-thread loader) and posing a frame each take tens of ms
    on big frames and meshes: they go in separate timer steps."""
    from blender_addon import generation, imaging
    from blender_addon.projection import frame_size
    width, height = frame_size(shot)
    renders = []
    for frame in range(1, 6):
        path = tmp_path / "render" / f"r_{frame:04d}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(imaging.encode_png(np.full((height, width, 4), (40 * frame, 0, 0, 255), np.uint8)))
        renders.append(str(path))
    loads, poses = [], []
    real_load, real_plan = generation.load_render, generation.plan_frame
    monkeypatch.setattr(generation, "load_render",
                        lambda path, size: loads.append((len(run.step_times), path)) or real_load(path, size))
    monkeypatch.setattr(generation, "plan_frame",
                        lambda scene, *a: poses.append((len(run.step_times), scene.frame_current))
                        or real_plan(scene, *a))
    run = _run(shot, [1, 2, 3, 4, 5], tmp_path / "out", server, renders=renders)
    drive(run)
    assert run.error is None and run.done == 5
    assert [path for _, path in loads] == renders and [frame for _, frame in poses] == [1, 2, 3, 4, 5]
    load_steps, pose_steps = {step for step, _ in loads}, {step for step, _ in poses}
    assert len(load_steps) == 5 and not load_steps & pose_steps, (loads, poses)


class RecordingLayout:
    """Stands in for a UI layout (there is none headless): checks every prop/operator named."""

    def __init__(self, seen):
        self.seen = seen

    def __getattr__(self, name):
        if name in ("prop", "prop_search", "template_ID", "template_list", "operator", "label"):
            return getattr(self, "_" + name)
        return lambda *a, **k: RecordingLayout(self.seen)

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)

    def _prop(self, data, name, **kw):
        data = getattr(data, "bl_rna", None) and data
        assert data is not None and name in data.bl_rna.properties, f"{data} has no property {name}"
        self.seen.append(name)

    def _prop_search(self, data, name, search_data, search_name, **kw):
        self._prop(data, name)
        assert search_name in search_data.bl_rna.properties

    def _template_ID(self, data, name, **kw):
        self._prop(data, name)

    def _template_list(self, list_type, list_id, data, name, active_data, active_name, **kw):
        assert hasattr(bpy.types, list_type)
        self._prop(data, name)
        self._prop(active_data, active_name)

    def _operator(self, idname, **kw):
        group, _, name = idname.partition(".")
        assert name in dir(getattr(bpy.ops, group)), idname
        return type("OperatorProperties", (), {})()

    def _label(self, text="", **kw):
        self.seen.append(("label", text))


def test_panels_and_preferences_draw_real_properties(shot):
    from blender_addon import panels, preferences

    class Context:
        scene = shot
    shot.pg2.show_mapping = True
    for framing, source in (("CAMERA", "FILE"), ("PERSON", "IMAGE")):
        shot.pg2.framing, shot.pg2.source_kind = framing, source
        for panel in (panels.PG2_PT_main, panels.PG2_PT_frames, panels.PG2_PT_overrides, panels.PG2_PT_people):
            seen = []
            panel.draw(type("P", (), {"layout": RecordingLayout(seen)})(), Context)
            assert seen
            if panel is panels.PG2_PT_main:
                assert ("label", "right elbow: right_elbow") in seen  # the mapping list
    seen = []
    shot.pg2.overrides.add()
    panels.PG2_UL_overrides.draw_item(None, Context, RecordingLayout(seen), shot.pg2, shot.pg2.overrides[0],
                                      0, None, "", 0)
    assert seen == ["keypoint", "bone", "end"]
    prefs().endpoint = "http://example.org:5557"
    seen = []

    class Prefs:  # the real preferences, drawn into the recording layout
        layout = RecordingLayout(seen)

        def __getattr__(self, name):
            return getattr(prefs(), name)
    preferences.PG2Preferences.draw(Prefs(), Context)
    assert any(isinstance(s, tuple) and "web address" in s[1] for s in seen)


def test_person_framing_over_the_render(shot, server, tmp_path):
    connect(server)
    settings = shot.pg2
    settings.framing, settings.background = "PERSON", "RENDER"
    shot.render.engine = "BLENDER_WORKBENCH"
    shot.render.image_settings.file_format = "PNG"
    shot.render.filepath = str(tmp_path / "render" / "r_####")
    shot.world = bpy.data.worlds.new("World")
    shot.world.color = (1.0, 0.0, 0.0)  # Workbench's "World" background: pure red
    shot.display.shading.background_type = "WORLD"
    # A range needs renders that exist.
    with pytest.raises(RuntimeError, match="no render of frame 1"):
        bpy.ops.pg2.generate_frames()
    # One frame: rendered on the spot, then the person goes over it.
    assert bpy.ops.pg2.generate() == {"FINISHED"}
    assert (tmp_path / "render" / "r_0001.png").exists()
    from blender_addon.generation import render_pixels
    render = render_pixels(str(tmp_path / "render" / "r_0001.png"))
    corner = bpy.data.images["PG2 Result"].pixels[0:3]  # bottom-left, far from the person
    assert corner == pytest.approx(render[-1, 0, :3] / 255, abs=1.5 / 255)
    red, green = int(render[-1, 0, 0]), int(render[-1, 0, 1])
    assert red > 2 * green  # the red world (through the view transform), not a default colour
    bpy.ops.render.render(animation=True)
    assert bpy.ops.pg2.generate_frames() == {"FINISHED"}
    assert len(list(Path(settings.output_path).parent.glob("frame_*.png"))) == 5


def test_jpeg_frames_and_bad_extensions(shot, server):
    connect(server)
    settings = shot.pg2
    folder = Path(settings.output_path).parent
    settings.output_path = str(folder / "j_####.jpg")
    shot.frame_end = 2
    assert bpy.ops.pg2.generate_frames() == {"FINISHED"}
    assert [p.read_bytes()[:3] for p in sorted(folder.glob("j_*.jpg"))] == [b"\xff\xd8\xff"] * 2
    settings.framing = "PERSON"
    with pytest.raises(RuntimeError, match="end in .png"):
        bpy.ops.pg2.generate_frames()
    settings.framing = "CAMERA"
    settings.output_path = str(folder / "t_####.tiff")
    with pytest.raises(RuntimeError, match=r"must end in \.png, \.jpg or \.jpeg"):
        bpy.ops.pg2.generate_frames()


def test_server_error_codes_are_reported(shot, server):
    connect(server)
    shot.render.resolution_x, shot.render.resolution_y, shot.render.resolution_percentage = 5000, 400, 100
    with pytest.raises(RuntimeError, match=r"PG2 server error too_large: .*4096.*lower Resolution % "
                                           r"\(Output Properties › Format\) or use Person framing"):
        bpy.ops.pg2.generate()


def test_frame_the_camera_cannot_see_is_skipped_or_blank(shot, server):
    connect(server)
    camera = shot.camera
    for frame, angle in ((1, 90), (2, 90), (3, -90), (4, 90)):  # frame 3: looking away
        camera.rotation_euler = Euler((math.radians(angle), 0, 0))
        camera.keyframe_insert("rotation_euler", frame=frame)
    out = Path(shot.pg2.output_path).parent
    assert bpy.ops.pg2.generate_frames() == {"FINISHED"}
    assert sorted(f.name for f in out.glob("*.png")) == [f"frame_{i:04d}.png" for i in (1, 2, 4, 5)]
    assert "skipped 1 frame(s) (3)" in shot.pg2.status
    shot.pg2.unprojectable = "BLANK"
    assert bpy.ops.pg2.generate_frames() == {"FINISHED"}
    blank = out / "frame_0003.png"
    assert png_size(blank) == (WIDTH, HEIGHT)
    from blender_addon.generation import render_pixels
    assert (render_pixels(str(blank))[..., :3] == 255).all()  # the white background only
    assert "written blank" in shot.pg2.status
    # JPEG frames: the blank one is a JPEG too, white whatever Person framing's hidden Background says.
    shot.pg2.output_path = str(out / "jpeg_####.jpg")
    shot.pg2.background = "TRANSPARENT"
    assert bpy.ops.pg2.generate_frames() == {"FINISHED"}
    for frame in range(1, 6):
        assert (out / f"jpeg_{frame:04d}.jpg").read_bytes()[:3] == b"\xff\xd8\xff", frame
    blank = render_pixels(str(out / "jpeg_0003.jpg"))
    assert blank.shape == (HEIGHT, WIDTH, 4) and (blank[..., :3] >= 250).all()


def test_dead_server_is_reported_fast_whatever_the_timeout(shot):
    connect(f"tcp://127.0.0.1:{free_port()}", timeout=30.0)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="not reachable"):
        bpy.ops.pg2.generate_frames()
    assert time.monotonic() - started < 8.0  # the connection check, not the 30 s reply timeout


@pytest.fixture
def black_hole():
    """A real ZeroMQ server socket that takes requests and never answers."""
    import zmq
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    yield f"tcp://127.0.0.1:{port}"
    router.close()
    context.term()


def test_cancel_stops_a_waiting_worker_at_once(shot, black_hole, tmp_path):
    run = _run(shot, [1, 2, 3], tmp_path / "c", black_hole, timeout=60.0)
    run.batch.check_timeout = 60.0  # get past the connection check: the worker waits on replies
    for _ in range(20):
        run.step()
        time.sleep(0.01)
    assert run.batch.thread.is_alive()
    started = time.monotonic()
    run.cancel()
    run.batch.thread.join(5)
    assert time.monotonic() - started < 1.0
    assert not run.batch.thread.is_alive() and run.batch.context.closed  # its socket is closed
    assert drive(run).ended and run.error is None


def test_loading_a_file_stops_running_generations(shot, black_hole, tmp_path):
    from blender_addon import operators
    connect(black_hole, timeout=60.0)
    shot.pg2.output_path = str(tmp_path / "o" / "f_####.png")
    run = operators.prepare_run(bpy.context, [1, 2], [str(tmp_path / "o" / f"f_{i}.png") for i in (1, 2)])
    operators._RUNS.add(run)  # as the modal operator does
    assert operators.running()
    saved = tmp_path / "other.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(saved), copy=True)
    bpy.ops.wm.open_mainfile(filepath=str(saved))
    assert not operators.running()
    run.batch.thread.join(2)
    assert not run.batch.thread.is_alive()


def test_output_problems_are_refused_before_any_work(shot, server, tmp_path):
    connect(server)
    settings = shot.pg2
    settings.output_path = "//pg2/frame_####.png"  # the file was never saved
    with pytest.raises(RuntimeError, match="not saved yet"):
        bpy.ops.pg2.generate_frames()
    (tmp_path / "afile").write_text("x")
    settings.output_path = str(tmp_path / "afile" / "frame_####.png")
    with pytest.raises(RuntimeError, match="cannot create the output folder .*afile"):
        bpy.ops.pg2.generate_frames()


def test_endpoint_with_a_trailing_slash_says_so(shot):
    connect("tcp://127.0.0.1:5557/")
    with pytest.raises(RuntimeError, match="has a '/' after the address.*tcp://127.0.0.1:5557"):
        bpy.ops.pg2.generate()


def test_joints_near_the_camera_plane_do_not_blow_up_the_crop(shot):
    from blender_addon import generation
    from blender_addon.mapping import armature_mapping
    from blender_addon.projection import person_crop
    from blender_addon.mapping import INDEX, keypoints_3d
    arm = shot.pg2.armature
    arm.animation_data_clear()
    shoulder = arm.pose.bones["right_shoulder"]
    shoulder.rotation_euler = Euler((math.radians(-90), 0, 0))  # the right arm reaches forward
    bpy.context.view_layer.update()
    mapping = armature_mapping(arm)
    wrist = keypoints_3d(arm, mapping)[INDEX["right_wrist"]]
    camera = shot.camera
    camera.location = (0.0, wrist.y - 0.004, 1.2)  # the hand 4 mm in front of the camera plane, to its side
    camera.data.lens = 12
    bpy.context.view_layer.update()
    keypoints = generation.plan_frame(shot, arm, mapping, keep_outside=True)
    assert keypoints[INDEX["right_wrist"]] is None  # thousands of pixels out: left out
    assert sum(p is not None for p in keypoints) >= 12
    crop = person_crop(keypoints, 0.5)
    assert max(crop.width, crop.height) < 4 * HEIGHT


def test_report_lines():
    from blender_addon.generation import Report
    report = Report(skipped=[(3, "why")], blank=[], few_visible=[7, 8])
    lines = report.lines()
    assert lines[0] == "skipped 1 frame(s) (3): why"
    assert "fewer than 6 joints visible on 2 frame(s) (7, 8)" in lines[1]


def test_planning_is_spread_over_steps(shot, server, tmp_path):
    """A long range is posed a few frames per timer step, with progress, never all at once."""
    run = _run(shot, list(range(1, 6)) * 12, tmp_path / "s", server)  # 60 frames
    run.lookahead = 10**6
    run.step(budget=0.0)
    assert 1 <= run.planned < 60 and run.progress_text().startswith(f"posing {run.planned} / 60")
    drive(run)
    assert run.done == 60 and run.error is None
    assert len(run.step_cpu_times) == len(run.step_times)
    assert all(0.0 <= cpu <= wall + 0.005 for cpu, wall in zip(run.step_cpu_times, run.step_times))


def test_render_result_as_the_source(shot, server):
    connect(server)
    settings = shot.pg2
    settings.source_kind = "IMAGE"
    shot.render.engine = "BLENDER_WORKBENCH"
    # Render Result appears once something is rendered.
    bpy.ops.render.render()
    settings.source_image = bpy.data.images["Render Result"]
    output = shot.render.image_settings   # the user's own output format survives the PNG save
    output.file_format, output.color_depth, output.exr_codec = "OPEN_EXR", "32", "DWAA"
    from blender_addon import generation
    data, size = generation.read_source(settings)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and size is None
    assert png_size_bytes(data) == (WIDTH, HEIGHT)
    assert (output.file_format, output.color_depth, output.exr_codec) == ("OPEN_EXR", "32", "DWAA")
    output.file_format, output.color_depth = "PNG", "8"
    assert bpy.ops.pg2.generate() == {"FINISHED"}


def test_a_strip_shows_each_file_at_its_own_frame(shot, tmp_path):
    """A frame step of 2 and a frame without a file: the last file before is held, so scene
    frame N shows frame N's file wherever there is one."""
    from blender_addon.operators import load_strip
    frames = [3, 5, 7, 9, 11]
    paths = [str(tmp_path / f"f_{f:04d}.png") for f in frames]
    for frame, path in zip(frames, paths):
        if frame != 7:                                     # frame 7 was skipped
            imaging.write_atomic(path, imaging.encode_png(np.zeros((2, 2, 3), np.uint8)))
    strip = load_strip(shot, paths, frames)
    assert strip.frame_final_start == 3 and strip.frame_final_duration == 9
    shown = {3 + i: e.filename for i, e in enumerate(strip.elements)}
    assert shown[3] == shown[4] == "f_0003.png" and shown[5] == "f_0005.png"
    assert shown[7] == shown[8] == "f_0005.png" and shown[9] == "f_0009.png" and shown[11] == "f_0011.png"
    shot.sequence_editor.strips.remove(strip)


def png_size_bytes(data):
    return struct.unpack(">II", data[16:24])


def test_frames_loaded_into_the_sequencer(shot, server):
    connect(server)
    settings = shot.pg2
    settings.load_into_sequencer = True
    assert bpy.ops.pg2.generate_frames() == {"FINISHED"}
    strip = shot.sequence_editor.strips["PG2 Frames"]
    assert strip.type == "IMAGE" and strip.frame_final_start == 1 and strip.frame_final_duration == 5
    assert [e.filename for e in strip.elements] == [f"frame_{i:04d}.png" for i in range(1, 6)]
    assert bpy.path.abspath(strip.directory).rstrip("/") == str(Path(settings.output_path).parent)
    assert bpy.ops.pg2.generate_frames() == {"FINISHED"}  # again: replaced, not stacked
    assert len(shot.sequence_editor.strips) == 1


def test_several_people_composited_back_to_front(shot, server, tmp_path):
    connect(server)
    settings = shot.pg2
    settings.framing, settings.background, settings.background_color = "PERSON", "COLOR", (0, 1, 0)
    settings.margin = 0.05
    first = settings.armature
    first.location = (-0.45, 1.5, 0)  # behind
    second = rig.create_pose_rig(shot.collection, bpy.context.view_layer, "second")
    second.location = (0.45, 0, 0)  # in front, overlapping the first in the frame
    third = rig.create_pose_rig(shot.collection, bpy.context.view_layer, "off screen")
    third.location = (40, 0, 0)
    red = tmp_path / "red.png"
    pixels = imaging.background(44, 64, (1.0, 0.0, 0.0))
    red.write_bytes(imaging.encode_png(pixels))
    for body in (second, third):
        person = settings.people.add()
        person.armature, person.source_path = body, str(red)
    bpy.context.view_layer.update()
    from blender_addon import generation, operators
    events = []
    run = operators.prepare_run(bpy.context, [1], [None], on_result=events.append)
    assert len(run.people) == 3
    drive(run)
    assert run.error is None and len(events) == 1
    job = events[0].job
    assert len(job.people) == 2  # the one off screen is left out of this frame
    distances = [part[3] for part in job.people]
    assert distances[0] > distances[1]  # the first armature is farther
    assert bpy.ops.pg2.generate() == {"FINISHED"}
    settings.framing = "CAMERA"
    with pytest.raises(RuntimeError, match="several people need Person framing"):
        bpy.ops.pg2.generate()
    settings.framing = "PERSON"
    # The main armature's source is the panel's: an image datablock when Source is Image.
    settings.source_path = str(red)
    settings.source_kind, settings.source_image = "IMAGE", bpy.data.images.new("blue person", 6, 10)
    run = operators.prepare_run(bpy.context, [1], [None])
    run.cancel()
    drive(run)
    assert run.people[0][4] == (6, 10) and run.people[1][3] == red.read_bytes()
    settings.source_kind = "FILE"
    # A rig preset the main armature matches but a row's armature does not: refused, not left out.
    settings.preset = "pg2"
    stranger = rig.build_armature(shot.collection, bpy.context.view_layer, "stranger",
                                  [("Hips", (0, 0, 1), (0, 0, 1.2), None, False)])
    settings.people[1].armature = stranger
    with pytest.raises(RuntimeError, match="no limb of stranger .People list. is mapped with the Rig preset 'pg2'"):
        bpy.ops.pg2.generate()
    settings.preset = "auto"
    with pytest.raises(RuntimeError, match="stranger .People list.: could not recognise the armature's bones"):
        bpy.ops.pg2.generate()
    settings.people[1].armature = third
    # The overrides are the main armature's: a row's armature lacking the bone goes without it.
    override = settings.overrides.add()
    override.keypoint, override.bone = "left_wrist", "left_elbow"
    hand = rig.build_armature(shot.collection, bpy.context.view_layer, "hand",
                              [("Hand", (0, 0, 1), (0, 0, 1.1), None, False)])
    override.bone = "Hand"   # not the main armature's: refused for it
    with pytest.raises(RuntimeError, match="'Hand' chosen for left_wrist is not in the armature"):
        bpy.ops.pg2.generate()
    bpy.data.objects.remove(hand)
    override.bone = ""       # left out: for every armature
    run = operators.prepare_run(bpy.context, [1], [None])
    run.cancel()
    drive(run)
    from blender_addon.mapping import INDEX
    assert all(mp.sources[INDEX["left_wrist"]] is None for _, mp, *_ in run.people)
    settings.overrides.clear()
    settings.people[0].armature = None
    with pytest.raises(RuntimeError, match="has no armature"):
        bpy.ops.pg2.generate()


def test_armatures_and_bodies_disabled_in_viewports_are_refused(shot, server):
    """Blender does not pose what is disabled in viewports: its keypoints would be a stale pose."""
    import bmesh
    connect(server)
    arm = shot.pg2.armature
    arm.hide_viewport = True
    with pytest.raises(RuntimeError, match="PG2 Pose Rig is disabled in viewports"):
        bpy.ops.pg2.generate()
    with pytest.raises(RuntimeError, match="disabled in viewports"):
        bpy.ops.pg2.export_poses()
    arm.hide_set(True); arm.hide_viewport = False   # hidden with the eye icon: still posed
    assert bpy.ops.pg2.generate() == {"FINISHED"}
    arm.hide_set(False)
    mesh = bpy.data.meshes.new("body")
    bm = bmesh.new()
    bmesh.ops.create_cube(bm, size=0.3)
    bm.to_mesh(mesh)
    body = bpy.data.objects.new("body", mesh)
    shot.collection.objects.link(body)
    body.modifiers.new("Armature", "ARMATURE").object = arm
    body.hide_viewport = True
    shot.pg2.occlusion = True
    with pytest.raises(RuntimeError, match="body is disabled in viewports .* or turn Occlusion off"):
        bpy.ops.pg2.generate()
    shot.pg2.occlusion = False
    assert bpy.ops.pg2.generate() == {"FINISHED"}


def test_composite_order_puts_the_nearer_person_on_top(tmp_path):
    from blender_addon import generation
    from blender_addon.projection import Crop
    import numpy as np
    batch = generation.Batch(None, b"", None, generation.Framing("PERSON", 0.1, (0, 0, 0)))
    job = generation.FrameJob(1, [], (8, 4), None, people=[([], b"", None, 5.0), ([], b"", None, 2.0)])
    job.results = {}
    near = np.full((4, 8, 4), (0, 0, 255, 255), np.uint8)
    far = np.full((4, 8, 4), (255, 0, 0, 255), np.uint8)

    class Result:
        def __init__(self, index, pixels):
            self.request = type("R", (), {"tag": (job, Crop(0, 0, 8, 4), index)})()
            self.image = type("I", (), {"data": pixels.tobytes(), "width": 8, "height": 4, "channels": 4,
                                        "format": "raw"})()
    batch._finish(Result(1, near))  # the nearer arrives first
    assert batch.events.empty()
    batch._finish(Result(0, far))
    event = batch.events.get_nowait()
    pixels = np.asarray(event.pixels).reshape(4, 8, 4)
    assert tuple(np.rint(pixels[0, 0, :3] * 255)) == (0, 0, 255)  # the near one on top


class ModalEvent:
    def __init__(self, type, value="NOTHING"):
        self.type, self.value = type, value


def modal_operator(context, frames, paths):
    """The generation operators' modal layer (`modal`, `cancel`) on a prepared run, as
    `_GenerationRun._go` leaves it in the UI; Blender's operator machinery is not needed."""
    from blender_addon import operators

    class Operator(operators._GenerationRun):
        def __init__(self):
            self.reports = []
            self._camera = None

        def report(self, kind, text):
            self.reports.append((set(kind), text))
    op = Operator()
    op._run = operators.prepare_run(context, frames, paths, on_result=op._show)
    operators._RUNS.add(op._run)
    return op


def test_modal_timer_runs_to_the_end(shot, server, tmp_path):
    from blender_addon import operators
    connect(server)
    paths = [str(tmp_path / "m" / f"f_{f}.png") for f in (1, 2, 3)]
    op = modal_operator(bpy.context, [1, 2, 3], paths)
    deadline = time.monotonic() + 60
    while (answer := op.modal(bpy.context, ModalEvent("TIMER"))) == {"PASS_THROUGH"}:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert answer == {"FINISHED"} and all(Path(p).exists() for p in paths)
    assert not operators.running() and shot.pg2.status == "generated 3 frame(s)"


def test_esc_stops_the_worker_within_a_second(shot, black_hole, tmp_path):
    from blender_addon import operators
    connect(black_hole, timeout=60.0)
    op = modal_operator(bpy.context, [1, 2, 3], [str(tmp_path / "e" / f"f_{f}.png") for f in (1, 2, 3)])
    for _ in range(10):
        assert op.modal(bpy.context, ModalEvent("TIMER")) == {"PASS_THROUGH"}
        time.sleep(0.01)
    batch = op._run.batch
    assert batch.thread.is_alive()  # waiting for a reply that never comes
    started = time.monotonic()
    assert op.modal(bpy.context, ModalEvent("ESC", "PRESS")) == {"CANCELLED"}
    batch.thread.join(1.0)
    assert time.monotonic() - started < 1.0
    assert not batch.thread.is_alive() and batch.context.closed
    assert not operators.running() and shot.pg2.status.startswith("cancelled after 0 / 3")


def test_cancel_called_by_blender_stops_the_worker(shot, black_hole, tmp_path):
    """Blender calls an operator's cancel() when it ends it (window closed, file loaded)."""
    from blender_addon import operators
    connect(black_hole, timeout=60.0)
    op = modal_operator(bpy.context, [1, 2], [str(tmp_path / "k" / f"f_{f}.png") for f in (1, 2)])
    op.modal(bpy.context, ModalEvent("TIMER"))
    op.cancel(bpy.context)
    assert not operators.running()
    op._run.batch.thread.join(1.0)
    assert not op._run.batch.thread.is_alive() and op._run.batch.context.closed


def test_a_loading_server_is_waited_for_and_the_person_framed_on_its_canvas(shot, loading_server, monkeypatch):
    """Person framing crops to the model's aspect ratio, which `info` gives only once the model
    is loaded: the run waits for the server to be ready (saying so) instead of guessing."""
    from blender_addon import generation, operators
    aspects = []
    crop = generation.person_crop
    monkeypatch.setattr(generation, "person_crop",
                        lambda keypoints, aspect, margin: aspects.append(aspect) or crop(keypoints, aspect, margin))
    connect(loading_server, timeout=60.0)
    shot.pg2.framing = "PERSON"
    op = modal_operator(bpy.context, [1], [None])
    statuses = set()
    deadline = time.monotonic() + 90
    while (answer := op.modal(bpy.context, ModalEvent("TIMER"))) == {"PASS_THROUGH"}:
        statuses.add(shot.pg2.status)
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert answer == {"FINISHED"}, op.reports
    assert aspects == [pytest.approx(64 / 128)]  # the market model's canvas, not a square guess
    assert any(s.startswith("waiting for the server to be ready") for s in statuses), statuses
    assert tuple(bpy.data.images["PG2 Result"].size) == (WIDTH, HEIGHT)
    assert not operators.running()


def test_a_server_still_loading_after_the_timeout_is_reported_as_such(shot, loading_server):
    connect(loading_server, timeout=0.5)
    shot.pg2.framing = "PERSON"
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=f"the server at {loading_server} is still loading its model "
                                           r"\(waited 0.5 s\)"):
        bpy.ops.pg2.generate()
    assert time.monotonic() - started < 5.0
    assert "PG2 Result" not in bpy.data.images


def test_a_broker_without_workers_is_reported_and_its_wait_cancels_at_once(shot, broker, tmp_path):
    from blender_addon import operators
    connect(broker, timeout=0.5)
    with pytest.raises(RuntimeError, match=f"the broker at {broker} has no worker yet"):
        bpy.ops.pg2.generate_frames()
    out = Path(shot.pg2.output_path).parent
    assert not out.exists() or not any(out.iterdir())
    assert bpy.ops.pg2.test_connection() == {"FINISHED"}
    assert "Not ready yet" in prefs().server_info
    connect(broker, timeout=60.0)
    op = modal_operator(bpy.context, [1, 2], [str(tmp_path / "b" / f"f_{f}.png") for f in (1, 2)])
    batch = op._run.batch
    deadline = time.monotonic() + 10
    while not batch.waiting:
        assert op.modal(bpy.context, ModalEvent("TIMER")) == {"PASS_THROUGH"}
        assert time.monotonic() < deadline
        time.sleep(0.02)
    started = time.monotonic()
    assert op.modal(bpy.context, ModalEvent("ESC", "PRESS")) == {"CANCELLED"}
    batch.thread.join(1.0)
    assert time.monotonic() - started < 1.0
    assert not batch.thread.is_alive() and batch.context.closed
    assert not operators.running() and shot.pg2.status.startswith("cancelled after 0 / 2")


def test_image_work_runs_on_the_worker_thread(shot, server, tmp_path, monkeypatch):
    """Converting the render, compositing, encoding and converting the result for Blender run
    off the main thread; the main thread only loads the render and shows the result."""
    import threading
    from blender_addon import generation
    from blender_addon.mapping import armature_mapping
    from blender_addon.preferences import Connection
    from blender_addon.projection import frame_size
    connect(server)
    width, height = frame_size(shot)
    render = tmp_path / "render.png"
    render.write_bytes(imaging.encode_png(np.full((height, width, 4), (0, 0, 200, 255), np.uint8)))
    threads = {}

    def record(module, name):
        real = getattr(module, name)

        def recorded(*args, **kwargs):
            threads.setdefault(name, set()).add(threading.current_thread() is threading.main_thread())
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, recorded)
    for name in ("composite", "encode_png", "to_blender_pixels"):
        record(imaging, name)
    for name in ("render_array", "load_render"):
        record(generation, name)
    results = []
    for paths in ([str(tmp_path / "w" / "f_1.png")], [None]):  # a frame file, the single result
        batch = generation.Batch(Connection(server, 20.0), Path(shot.pg2.source_path).read_bytes(), None,
                                 generation.Framing("PERSON", 0.1, "RENDER"))
        run = generation.Run(shot, shot.pg2.armature, armature_mapping(shot.pg2.armature), [1], paths, batch,
                             keep_outside=True, renders=[str(render)], on_result=results.append)
        drive(run)
        assert run.error is None and run.done == 1
    assert threads == {"load_render": {True}, "render_array": {False}, "composite": {False},
                       "encode_png": {False}, "to_blender_pixels": {False}}
    assert len(results) == 1 and results[0].size == (WIDTH, HEIGHT)


def test_renders_loaded_ahead_stay_within_their_memory_budget(shot, server):
    """Blender's float renders wait for the worker: 12 frames ahead at most, fewer at 4K."""
    from blender_addon import generation
    from blender_addon.mapping import armature_mapping
    from blender_addon.preferences import Connection
    shot.render.resolution_x, shot.render.resolution_y, shot.render.resolution_percentage = 3840, 2160, 100
    for in_flight, renders, expected in ((4, None, 12), (4, ["r.png"], 4), (64, ["r.png"], 4)):
        batch = generation.Batch(Connection(server, 20.0), b"", None, generation.Framing("PERSON", 0.1, "RENDER"),
                                 in_flight)
        run = generation.Run(shot, shot.pg2.armature, armature_mapping(shot.pg2.armature), [], [], batch,
                             renders=renders)
        assert run.lookahead == expected == min(2 * in_flight + 4, generation.RENDERS_QUEUED // (3840 * 2160 * 16)
                                                 if renders else 10**9)
        run.cancel()
        drive(run)


def test_frames_with_few_visible_joints_are_warned_about(shot, server):
    connect(server)
    settings = shot.pg2
    kept = {"neck", "right_shoulder", "right_elbow", "right_wrist"}
    from blender_addon.mapping import NAMES
    for name in NAMES:
        if name not in kept:
            override = settings.overrides.add()
            override.keypoint, override.bone = name, ""
    assert bpy.ops.pg2.generate_frames() == {"FINISHED"}
    assert len(list(Path(settings.output_path).parent.glob("*.png"))) == 5
    assert "fewer than 6 joints visible on 5 frame(s) (1, 2, 3, 4, 5)" in settings.status


def _modal_layer(operator):
    """The generation operators' modal layer, driven as Blender's timer would drive it."""
    from blender_addon import operators

    class Layer(operators._GenerationRun):
        def __init__(self):
            self.reports, self._camera = [], None

        def report(self, kind, text):
            self.reports.append((next(iter(kind)), text))
    Layer._finished, Layer._summary = operator._finished, lambda self: "done"
    return Layer()


class _Timer:
    type, value = "TIMER", "NOTHING"


def test_deleting_the_armature_while_frames_generate_ends_the_run(shot, server, tmp_path):
    """Deleted mid-run: an error that says so, and nothing left running ("already generating")."""
    from blender_addon import operators
    connect(server)
    frames = list(range(1, 6)) * 8
    layer = _modal_layer(operators.PG2_OT_generate_frames)
    layer._all_frames, layer._all_paths = frames, [str(tmp_path / f"d{i:03d}.png") for i in range(len(frames))]
    layer._run = operators.prepare_run(bpy.context, frames, layer._all_paths)
    layer._run.lookahead = 1
    operators._RUNS.add(layer._run)
    layer.modal(bpy.context, _Timer())
    bpy.data.objects.remove(shot.pg2.armature)
    answer = {"PASS_THROUGH"}
    deadline = time.monotonic() + 20
    while answer == {"PASS_THROUGH"}:
        assert time.monotonic() < deadline, "the run did not end"
        answer = layer.modal(bpy.context, _Timer())
    assert answer == {"CANCELLED"} and "was deleted while it ran" in layer._run.error
    assert not operators.running() and ("ERROR", layer._run.error) in layer.reports
    layer._run.batch.thread.join(5)
    assert not layer._run.batch.thread.is_alive()


def test_progress_and_the_strip_go_to_the_generating_scene(shot, server, tmp_path):
    """The user switches to another scene while frames generate: the run's scene keeps its
    status and gets the Sequencer strip; the other scene is left alone."""
    from types import SimpleNamespace

    from blender_addon import operators
    connect(server)
    shot.pg2.load_into_sequencer = True
    other = bpy.data.scenes.new("Edit")
    other.pg2.load_into_sequencer = True
    frames = [1, 2, 3]
    layer = _modal_layer(operators.PG2_OT_generate_frames)
    layer._all_frames, layer._all_paths = frames, [str(tmp_path / f"s{f:04d}.png") for f in frames]
    layer._run = operators.prepare_run(bpy.context, frames, layer._all_paths)
    operators._RUNS.add(layer._run)
    shown = SimpleNamespace(scene=other, window_manager=bpy.context.window_manager, workspace=None, screen=None)
    deadline = time.monotonic() + 30
    while (answer := layer.modal(shown, _Timer())) == {"PASS_THROUGH"}:
        assert time.monotonic() < deadline, "the run did not end"
        time.sleep(0.01)
    assert answer == {"FINISHED"} and shot.pg2.status.startswith("done")
    assert shot.sequence_editor.strips.get("PG2 Frames") is not None
    assert other.pg2.status == "" and other.sequence_editor is None
    bpy.data.scenes.remove(other)


def test_a_busy_server_is_asked_again_not_given_up_on(shot, tmp_path, monkeypatch):
    """A shared server whose queue is full answers `overloaded`: those frames are sent again
    after a backoff and the run finishes; past the patience, the run ends with the server's word."""
    from blender_addon import generation
    process, endpoint = start_server("serve", "--preset", "tiny", "--random-weights", "--threads", "1",
                                     "--max-queue", "1", "--max-batch", "1")
    try:
        wait_for(process, endpoint)
        frames = [1, 2, 3, 4, 5, 1, 2, 3]
        run = _run(shot, frames, tmp_path / "busy", endpoint, in_flight=4)
        texts = []
        deadline = time.monotonic() + 90
        while not run.step():
            texts.append(run.progress_text())
            assert time.monotonic() < deadline, "the run did not end"
            time.sleep(0.005)
        assert run.error is None and run.done == len(frames)
        assert any("the server is busy" in t for t in texts)     # some were answered `overloaded`
        monkeypatch.setattr(generation, "OVERLOADED_PATIENCE", 0.5)
        run = drive(_run(shot, frames, tmp_path / "impatient", endpoint, in_flight=4))
        assert run.error is not None and "overloaded" in run.error
    finally:
        stop(process)


@pytest.mark.parametrize("framing", ["CAMERA", "PERSON"])
@pytest.mark.parametrize("pixel_aspect", [(2.0, 1.0), (1.0, 2.0)])
def test_pixels_that_are_not_square_get_the_person_unstretched(shot, server, tmp_path, pixel_aspect, framing):
    """A frame of 2:1 (or 1:2) pixels shows the picture of a square-pixel frame half as tall (or
    wide): its result is that frame's result stretched to the frame's pixels."""
    import cv2
    connect(server)
    settings = shot.pg2
    settings.framing, settings.background, settings.background_color = framing, "COLOR", (0, 1, 0)
    shot.frame_end = 2
    render = shot.render
    pax, pay = pixel_aspect
    out = Path(settings.output_path).parent

    def first_frame():
        assert bpy.ops.pg2.generate_frames() == {"FINISHED"}
        return cv2.imread(str(out / "frame_0001.png"), cv2.IMREAD_COLOR)

    # The same picture in square pixels: half as many rows (wide pixels) or columns (tall ones).
    render.resolution_x, render.resolution_y = (WIDTH * 2, HEIGHT) if pax > pay else (WIDTH, HEIGHT * 2)
    square = first_frame()
    settings.output_path = str(tmp_path / "stretched" / "frame_####.png")
    out = tmp_path / "stretched"
    render.resolution_x, render.resolution_y = WIDTH * 2, HEIGHT * 2
    render.pixel_aspect_x, render.pixel_aspect_y = pax, pay
    stretched = first_frame()
    assert stretched.shape[:2] == (HEIGHT, WIDTH) and square.shape[:2] != (HEIGHT, WIDTH)
    expected = imaging.resize(square[..., ::-1], WIDTH, HEIGHT)[..., ::-1]
    difference = np.abs(stretched.astype(np.int16) - expected.astype(np.int16))
    assert difference.mean() < 1.0, difference.mean()


def test_a_video_output_is_refused_for_the_render_background(shot, server, tmp_path):
    """Person framing over the Render reads an image file per frame: a video output has none (its
    first frame would serve every frame), and nothing may be written under the video's name."""
    connect(server)
    settings = shot.pg2
    settings.framing, settings.background = "PERSON", "RENDER"
    shot.render.engine = "BLENDER_WORKBENCH"
    shot.render.image_settings.media_type = "VIDEO"
    shot.render.filepath = str(tmp_path / "render" / "shot_")
    assert shot.render.is_movie_format
    for operator in (bpy.ops.pg2.generate_frames, bpy.ops.pg2.generate):
        with pytest.raises(RuntimeError, match=r"the scene's output is a video \(FFMPEG\), .*set Output Properties › "
                                               r"Output › File Format to PNG, render the animation, then generate"):
            operator()
    assert not (tmp_path / "render").exists()
    assert not Path(settings.output_path).parent.exists() and "PG2 Result" not in bpy.data.images


def test_jpeg_frames_of_pixels_that_are_not_square_are_refused(shot, server):
    """Results stretched to pixels that are not square are written as PNG: a .jpg name is refused
    before anything is sent, not given PNG bytes."""
    connect(server)
    settings = shot.pg2
    folder = Path(settings.output_path).parent
    settings.output_path = str(folder / "j_####.jpg")
    shot.frame_end = 2
    shot.render.pixel_aspect_x = 2.0
    with pytest.raises(RuntimeError, match=r"the frame's pixels are not square \(Pixel Aspect 2:1, .*make the "
                                           r"output path end in \.png"):
        bpy.ops.pg2.generate_frames()
    assert not folder.exists() or not list(folder.iterdir())
    settings.output_path = str(folder / "p_####.png")
    assert bpy.ops.pg2.generate_frames() == {"FINISHED"}
    assert all(png_size(f) == (WIDTH, HEIGHT) for f in folder.glob("p_*.png"))


def _stamps(folder, pattern="frame_*.png"):
    return {f.name: f.stat().st_mtime_ns for f in Path(folder).glob(pattern)}


def test_a_resume_with_other_settings_is_refused_and_says_what_changed(shot, server):
    connect(server)
    settings = shot.pg2
    out = Path(settings.output_path).parent
    shot.frame_end = 3
    assert bpy.ops.pg2.generate_frames() == {"FINISHED"}
    entry = json.loads((out / ".pg2-frames.json").read_text())["sequences"]["frame_0000.png"]
    assert entry["settings"]["frame_size"] == [WIDTH, HEIGHT] and entry["settings"]["framing"] == "CAMERA"
    assert entry["model"] and entry["blank"] == [] and entry["stale"] == []
    stamps = _stamps(out)
    # A longer shot at full resolution in Person framing: frames 1-3 would not match 4-5.
    shot.frame_end, shot.render.resolution_percentage, settings.framing = 5, 100, "PERSON"
    with pytest.raises(RuntimeError, match=re.escape(
            f"the frames in {out} were made with other settings (frame size 120x160 → 240x320, framing "
            "Camera → Person): tick Overwrite to make them again, or choose another output folder")):
        bpy.ops.pg2.generate_frames()
    assert _stamps(out) == stamps
    shot.render.resolution_percentage, settings.framing = 50, "CAMERA"
    source = Path(settings.source_path)   # another photo under the same name
    source.write_bytes(imaging.encode_png(imaging.background(30, 50, (0.2, 0.4, 0.9))))
    os.utime(source, (time.time() + 5, time.time() + 5))
    with pytest.raises(RuntimeError, match=r"other settings \(source person\.png changed\): tick Overwrite"):
        bpy.ops.pg2.generate_frames()
    assert _stamps(out) == stamps
    settings.overwrite = True
    assert bpy.ops.pg2.generate_frames() == {"FINISHED"}
    stamps = _stamps(out)
    assert len(stamps) == 5
    # The same settings resume: only the missing frame is made.
    settings.overwrite = False
    (out / "frame_0002.png").unlink()
    assert bpy.ops.pg2.generate_frames() == {"FINISHED"}
    assert {k: v for k, v in _stamps(out).items() if k != "frame_0002.png"} == \
        {k: v for k, v in stamps.items() if k != "frame_0002.png"} and (out / "frame_0002.png").exists()
    # Frames kept from another model are not mixed with the server's.
    record = out / ".pg2-frames.json"
    data = json.loads(record.read_text())
    data["sequences"]["frame_0000.png"]["model"] = "another-model"
    record.write_text(json.dumps(data))
    (out / "frame_0004.png").unlink()
    with pytest.raises(RuntimeError, match="the frames kept in the output folder were made with the model "
                                           "another-model, but the server runs .*: tick Overwrite"):
        bpy.ops.pg2.generate_frames()
    assert not (out / "frame_0004.png").exists()
    with pytest.raises(RuntimeError, match="made with the model another-model"):   # still: the record keeps it
        bpy.ops.pg2.generate_frames()


def test_a_folder_without_a_record_is_checked_by_the_frames_sizes(shot, server):
    """Frames from before records: their PNG or JPEG headers must have the frame size."""
    connect(server)
    settings = shot.pg2
    out = Path(settings.output_path).parent
    shot.frame_end = 2
    for name in ("frame_####.png", "j_####.jpg"):
        settings.output_path = str(out / name)
        assert bpy.ops.pg2.generate_frames() == {"FINISHED"}
    (out / ".pg2-frames.json").unlink()
    assert imaging.file_image_size(str(out / "j_0001.jpg")) == (WIDTH, HEIGHT)
    shot.frame_end = 3
    assert bpy.ops.pg2.generate_frames() == {"FINISHED"}   # the same size: resumed
    assert (out / "j_0003.jpg").exists()
    (out / ".pg2-frames.json").unlink()
    shot.render.resolution_percentage = 100
    for name in ("frame_####.png", "j_####.jpg"):
        settings.output_path = str(out / name)
        first = name.replace("####", "0001")
        with pytest.raises(RuntimeError, match=re.escape(
                f"{first} in {out} is 120x160, but the frames are now 240x320: it was made with other "
                "settings; tick Overwrite to make the frames again, or choose another output folder")):
            bpy.ops.pg2.generate_frames()
    assert not (out / "frame_0003.png").exists()


def test_frames_written_blank_are_made_again_once_the_camera_sees_the_pose(shot, server):
    connect(server)
    camera = shot.camera
    for frame, angle in ((1, 90), (2, 90), (3, -90), (4, 90)):  # frame 3: looking away
        camera.rotation_euler = Euler((math.radians(angle), 0, 0))
        camera.keyframe_insert("rotation_euler", frame=frame)
    shot.pg2.unprojectable = "BLANK"
    out = Path(shot.pg2.output_path).parent
    assert bpy.ops.pg2.generate_frames() == {"FINISHED"}
    from blender_addon.generation import render_pixels
    assert (render_pixels(str(out / "frame_0003.png"))[..., :3] == 255).all()
    stamps = _stamps(out)
    camera.animation_data_clear()                 # the camera is fixed
    camera.rotation_euler = Euler((math.radians(90), 0, 0))
    assert bpy.ops.pg2.generate_frames() == {"FINISHED"}
    assert not (render_pixels(str(out / "frame_0003.png"))[..., :3] == 255).all()   # a person now
    assert {k: v for k, v in _stamps(out).items() if k != "frame_0003.png"} == \
        {k: v for k, v in stamps.items() if k != "frame_0003.png"}
    entry = json.loads((out / ".pg2-frames.json").read_text())["sequences"]["frame_0000.png"]
    assert entry["blank"] == []
    assert bpy.ops.pg2.generate_frames() == {"FINISHED"}   # nothing left to make
    assert shot.pg2.status.startswith("all 5 frame files exist")


def test_esc_then_generate_again_resumes(shot, black_hole, server, tmp_path):
    """Stopped with Esc, the same settings resume into the same folder."""
    from blender_addon import operators
    connect(server)
    settings = shot.pg2
    out = Path(settings.output_path).parent
    shot.frame_end = 2
    assert bpy.ops.pg2.generate_frames() == {"FINISHED"}
    stamps = _stamps(out)
    connect(black_hole, timeout=60.0)
    shot.frame_end = 4
    layer = _modal_layer(operators.PG2_OT_generate_frames)
    type(layer)._ended = operators.PG2_OT_generate_frames._ended   # the record is updated however it ends
    frames = [1, 2, 3, 4]
    paths = [str(out / f"frame_{f:04d}.png") for f in frames]
    from blender_addon import record
    layer._resume = record.plan(settings.output_path, frames, paths, record.settings_of(shot, settings.armature),
                                False)
    assert layer._resume.todo == [2, 3]
    layer._all_frames, layer._all_paths = frames, paths
    layer._run = operators.prepare_run(bpy.context, [3, 4], paths[2:])
    layer._resume.start()
    operators._RUNS.add(layer._run)
    layer.modal(bpy.context, _Timer())
    assert layer.modal(bpy.context, ModalEvent("ESC", "PRESS")) == {"CANCELLED"}
    connect(server)
    assert bpy.ops.pg2.generate_frames() == {"FINISHED"}
    assert {k: v for k, v in _stamps(out).items() if k in stamps} == stamps and len(_stamps(out)) == 4


def test_old_frames_an_overwrite_did_not_reach_are_made_again(shot, black_hole, server):
    """Overwrite with new settings, stopped before any frame: the old files are made again on
    the next run with Overwrite off, not kept as if they had the new settings."""
    from blender_addon import operators, record
    connect(server)
    settings = shot.pg2
    out = Path(settings.output_path).parent
    shot.frame_end = 3
    assert bpy.ops.pg2.generate_frames() == {"FINISHED"}
    shot.render.resolution_percentage = 100
    frames, paths = [1, 2, 3], [str(out / f"frame_{f:04d}.png") for f in (1, 2, 3)]
    layer = _modal_layer(operators.PG2_OT_generate_frames)
    type(layer)._ended = operators.PG2_OT_generate_frames._ended
    layer._resume = record.plan(settings.output_path, frames, paths, record.settings_of(shot, settings.armature),
                                True)
    connect(black_hole, timeout=60.0)
    layer._all_frames, layer._all_paths = frames, paths
    layer._run = operators.prepare_run(bpy.context, frames, paths)
    layer._resume.start()
    operators._RUNS.add(layer._run)
    assert layer.modal(bpy.context, ModalEvent("ESC", "PRESS")) == {"CANCELLED"}
    entry = json.loads((out / ".pg2-frames.json").read_text())["sequences"]["frame_0000.png"]
    assert entry["stale"] == [1, 2, 3] and entry["settings"]["frame_size"] == [2 * WIDTH, 2 * HEIGHT]
    connect(server)
    assert bpy.ops.pg2.generate_frames() == {"FINISHED"}   # Overwrite off
    assert [png_size(out / f"frame_{f:04d}.png") for f in frames] == [(2 * WIDTH, 2 * HEIGHT)] * 3


def test_render_result_is_sent_as_the_render_window_shows_it(shot, server):
    """Whatever the scene's output (a video, black and white, 16 bits), the Render Result goes
    as an 8-bit colour PNG, and the output settings come back as they were."""
    connect(server)
    settings = shot.pg2
    settings.source_kind = "IMAGE"
    shot.render.engine = "BLENDER_WORKBENCH"
    bpy.ops.render.render()
    settings.source_image = bpy.data.images["Render Result"]
    output, ffmpeg = shot.render.image_settings, shot.render.ffmpeg
    output.media_type = "VIDEO"
    ffmpeg.format, ffmpeg.codec = "MPEG4", "H264"
    from blender_addon import generation
    data, size = generation.read_source(settings)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and size is None
    assert png_size_bytes(data) == (WIDTH, HEIGHT) and data[24] == 8 and data[25] in (2, 6)   # 8-bit RGB(A)
    assert (output.media_type, output.file_format, ffmpeg.format, ffmpeg.codec) == ("VIDEO", "FFMPEG", "MPEG4", "H264")
    assert bpy.ops.pg2.generate() == {"FINISHED"}
    output.media_type = "IMAGE"
    output.file_format, output.color_mode, output.color_depth = "PNG", "BW", "16"
    data, _ = generation.read_source(settings)
    assert data[24] == 8 and data[25] in (2, 6)
    assert (output.media_type, output.file_format, output.color_mode, output.color_depth) == \
        ("IMAGE", "PNG", "BW", "16")


def test_an_unexpected_error_is_one_line_not_a_traceback(shot, server, monkeypatch, capsys):
    from blender_addon import generation
    connect(server)

    def broken(settings):
        raise KeyError("missing")
    monkeypatch.setattr(generation, "read_source", broken)
    for operator in (bpy.ops.pg2.generate, bpy.ops.pg2.generate_frames):
        with pytest.raises(RuntimeError) as error:
            operator()
        assert "PG2 failed unexpectedly: KeyError: 'missing'" in str(error.value)
        assert "Traceback" not in str(error.value)
        assert "Traceback" in capsys.readouterr().err   # kept for the console
    from blender_addon import operators
    assert not operators.running()


def test_a_server_that_dies_mid_run_says_which_frames_are_kept(shot, tmp_path):
    import threading
    process, endpoint = start_server("serve", "--preset", "tiny", "--random-weights", "--threads", "1")
    out = Path(shot.pg2.output_path).parent
    try:
        wait_for(process, endpoint)
        connect(endpoint, timeout=2.0)
        shot.frame_end = 400

        def kill():
            deadline = time.monotonic() + 60
            while len(list(out.glob("frame_*.png"))) < 3 and time.monotonic() < deadline:
                time.sleep(0.005)
            process.kill()
        threading.Thread(target=kill, daemon=True).start()
        with pytest.raises(RuntimeError) as error:
            bpy.ops.pg2.generate_frames()
    finally:
        stop(process)
    kept = len(list(out.glob("frame_*.png")))
    assert 3 <= kept < 400
    message = str(error.value)
    assert "PG2 server not reachable" in message and "is `pg2-server serve` running" in message
    assert f"{kept} of 400 frames are kept in {out}: Generate Frames again resumes there (Overwrite off)" in message
    assert shot.pg2.status in message


def test_ticking_load_into_sequencer_once_the_frames_exist_loads_them(shot, server):
    connect(server)
    assert bpy.ops.pg2.generate_frames() == {"FINISHED"}
    assert shot.sequence_editor is None or shot.sequence_editor.strips.get("PG2 Frames") is None
    shot.pg2.load_into_sequencer = True
    assert bpy.ops.pg2.generate_frames() == {"FINISHED"}   # all exist: nothing is sent
    strip = shot.sequence_editor.strips["PG2 Frames"]
    assert strip.frame_final_start == 1 and strip.frame_final_duration == 5
    assert shot.pg2.status == ("all 5 frame files exist; tick Overwrite to generate them again; loaded them "
                               "into the Sequencer as the strip 'PG2 Frames'")


def test_the_frames_panel_shows_the_scene_range_when_it_is_used(shot):
    from blender_addon import panels

    class Context:
        scene = shot
    shot.frame_start, shot.frame_end, shot.frame_step = 1001, 1100, 2
    shot.pg2.frame_start, shot.pg2.frame_end = 7, 9
    seen = []
    panels.PG2_PT_frames.draw(type("P", (), {"layout": RecordingLayout(seen)})(), Context)
    assert ("label", "Start 1001, End 1100, Step 2") in seen
    assert not {"frame_start", "frame_end", "frame_step"} & set(n for n in seen if isinstance(n, str))
    shot.pg2.use_scene_range = False
    seen = []
    panels.PG2_PT_frames.draw(type("P", (), {"layout": RecordingLayout(seen)})(), Context)
    assert {"frame_start", "frame_end", "frame_step"} <= set(n for n in seen if isinstance(n, str))
