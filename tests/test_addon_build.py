"""The installable extension zip: layout, manifest, wheels, and an install into real Blender.

Offline: the wheels are rebuilt from the installed msgpack/pyzmq distributions (their RECORD
files), so no download is needed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from blender_addon import build

ROOT = Path(__file__).resolve().parents[1]


from test_addon_operators import server  # noqa: E402,F401  (a real pg2-server)


def wheel_from_installed(name: str, dest: Path) -> Path:
    """A wheel holding exactly the files an installed distribution's RECORD lists."""
    dist = metadata.distribution(name)
    wheel_meta = next(f for f in dist.files if f.name == "WHEEL" and f.parent.name.endswith(".dist-info"))
    tag = next(line.split(":", 1)[1].strip() for line in wheel_meta.read_text().splitlines()
               if line.startswith("Tag:"))
    path = dest / f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}-{tag}.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in dist.files:
            local = Path(dist.locate_file(file))
            if local.is_file() and ".." not in file.parts and "__pycache__" not in file.parts:
                archive.write(local, file.as_posix())
    return path


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("wheels")
    for name in ("msgpack", "pyzmq"):
        wheel_from_installed(name, dest)
    (dest / "numpy-1.0-py3-none-any.whl").write_bytes(b"not ours")  # ignored: not a requirement
    return dest


@pytest.fixture(scope="module")
def built(wheels, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    zips = build.build(out, wheels_from=wheels, work_dir=out / "work")
    assert len(zips) == 1
    return zips[0]


def test_zip_layout_and_manifest(built, wheels):
    with zipfile.ZipFile(built) as archive:
        names = set(archive.namelist())
        manifest = tomllib.loads(archive.read("blender_manifest.toml").decode())
        wire = archive.read("pg2_wire/protocol.py")
    assert built.name == "pg2_pose-0.1.0.zip"
    assert manifest["id"] == "pg2_pose" and manifest["schema_version"] == "1.0.0"
    assert manifest["blender_version_min"] == "4.2.0"
    assert manifest["license"] == ["SPDX:GPL-3.0-or-later"]
    assert manifest["permissions"]["network"] and manifest["permissions"]["files"]
    expected = sorted(f"./wheels/{p.name}" for p in wheels.glob("*.whl") if not p.name.startswith("numpy"))
    assert sorted(manifest["wheels"]) == expected
    assert {n for n in names if n.endswith(".whl")} == {w[2:] for w in expected}
    assert manifest["platforms"] == ["linux-x64"]  # only linux wheels were given
    assert wire == (ROOT / "pg2_server/wire/protocol.py").read_bytes()  # copied, not rewritten
    # The whole wire package, and nothing of pg2_server beyond it.
    assert {n for n in names if n.startswith("pg2_wire/")} == \
        {f"pg2_wire/{p.name}" for p in (ROOT / "pg2_server/wire").glob("*.py")}
    assert {"__init__.py", "mapping.py", "projection.py", "operators.py"} <= names
    assert not {n for n in names if "__pycache__" in n or n in ("build.py", "calibrate_face.py")}


def test_split_platforms_and_fallback_zip(wheels, tmp_path):
    zips = build.build(tmp_path / "split", split_platforms=True, wheels_from=wheels, work_dir=tmp_path / "w")
    assert [z.name for z in zips] == ["pg2_pose-0.1.0-linux_x64.zip"]
    # Without Blender's builder the same layout comes out, and validates.
    plain = build.build(tmp_path / "plain", split_platforms=True, wheels_from=wheels,
                        work_dir=tmp_path / "w2", use_blender=False)
    assert [z.name for z in plain] == ["pg2_pose-0.1.0-linux_x64.zip"]
    with zipfile.ZipFile(zips[0]) as a, zipfile.ZipFile(plain[0]) as b:
        assert set(a.namelist()) == set(b.namelist())
        generated = tomllib.loads(b.read("blender_manifest.toml").decode())["build"]["generated"]
    assert generated["platforms"] == ["linux-x64"] and len(generated["wheels"]) == 2


def test_wheel_platforms():
    names = [Path(n) for n in (
        "msgpack-1.2.4-cp311-cp311-macosx_11_0_arm64.whl", "pyzmq-27.3.0-cp311-cp311-macosx_10_15_universal2.whl",
        "msgpack-1.2.4-cp311-cp311-win_amd64.whl", "pyzmq-27.3.0-cp312-abi3-win_amd64.whl",
        "msgpack-1.2.4-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl")]
    assert build.wheel_platforms(names) == ["windows-x64", "macos-arm64"]


def test_bad_inputs_are_refused(tmp_path, built):
    (tmp_path / "empty").mkdir()
    with pytest.raises(build.BuildError, match="no pyzmq or msgpack wheels"):
        build.build(tmp_path / "out", wheels_from=tmp_path / "empty", work_dir=tmp_path / "w")
    staged = tmp_path / "staged"
    with zipfile.ZipFile(built) as archive:
        archive.extractall(staged)
    manifest = (staged / "blender_manifest.toml").read_text()
    (staged / "blender_manifest.toml").write_text(manifest.replace("GPL-3.0-or-later", "MIT"))
    with pytest.raises(build.BuildError, match="license"):
        build.check_manifest(staged)
    (staged / "blender_manifest.toml").write_text(manifest)
    next((staged / "wheels").glob("*.whl")).unlink()
    with pytest.raises(build.BuildError, match="does not hold it"):
        build.check_manifest(staged)


def test_build_imports_without_blender():
    code = "import sys; sys.modules['bpy'] = None; import blender_addon.build; print('ok')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_zip_installs_into_blender_and_uses_its_own_wire(built, tmp_path, server):
    pytest.importorskip("bpy")
    endpoint = server
    script = textwrap.dedent(f"""
        import sys, bpy
        bpy.ops.wm.read_factory_settings(use_empty=True)
        bpy.ops.extensions.package_install_files(filepath={str(built)!r}, repo="user_default",
                                                 enable_on_install=True)
        package = "bl_ext.user_default.pg2_pose"
        assert package in sys.modules, sorted(m for m in sys.modules if m.startswith("bl_ext"))
        wire = sys.modules[package + ".wire"]
        print("client", wire.client.__name__)
        assert bpy.context.preferences.addons.get(package) is not None
        bpy.ops.pg2.add_pose_rig()
        print("bones", len(bpy.context.scene.pg2.armature.data.bones))
        # Generate against the real server, and export poses, from the installed zip.
        import math
        from mathutils import Euler
        scene = bpy.context.scene
        scene.render.resolution_x, scene.render.resolution_y = 60, 80
        camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
        scene.collection.objects.link(camera)
        camera.location, camera.rotation_euler = (0, -6.5, 0.9), Euler((math.radians(90), 0, 0))
        scene.camera = camera
        imaging = sys.modules[package + ".imaging"]
        open("person.png", "wb").write(imaging.encode_png(imaging.background(8, 8, (0.8, 0.5, 0.2))))
        settings = scene.pg2
        settings.source_path = "person.png"
        settings.output_path = {str(tmp_path / "frames" / "f_####.png")!r}
        settings.pose_output_path = {str(tmp_path / "poses" / "p_####.png")!r}
        scene.frame_start, scene.frame_end = 1, 2
        bpy.context.preferences.addons[package].preferences.endpoint = {endpoint!r}
        print("generate", bpy.ops.pg2.generate_frames())
        print("export", bpy.ops.pg2.export_poses(frames="RANGE"))
    """)
    env = dict(os.environ, HOME=str(tmp_path))  # a throwaway user config
    env.pop("BLENDER_USER_RESOURCES", None)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env=env, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "client bl_ext.user_default.pg2_pose.pg2_wire.client" in run.stdout
    assert "bones 19" in run.stdout
    assert "generate {'FINISHED'}" in run.stdout and "export {'FINISHED'}" in run.stdout
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [".pg2-frames.json", "f_0001.png", "f_0002.png"]
    assert len(list((tmp_path / "poses").glob("p_*_keypoints.json"))) == 2
