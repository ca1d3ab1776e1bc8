"""Build the installable extension zip: `python -m blender_addon.build [--split-platforms]`.

Stages the add-on in `build/blender_addon/pg2_pose/` with the package `pg2_server/wire/` copied
whole into `pg2_wire/`, the pyzmq and msgpack wheels that pip downloads for each
Python and platform Blender ships (or wheels from `--wheels-from DIR`, offline), and a
manifest listing exactly the wheels saved; then zips it with Blender's own extension
builder (`bl_pkg/cli/blender_ext.py`, found in the installed `bpy` package) and
validates the result; without Blender it writes the same layout itself. Never imports `bpy`.
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the build needs 3.11+ (as Blender's own tools do)
    tomllib = None

ADDON = Path(__file__).resolve().parent
ROOT = ADDON.parent
WIRE = ROOT / "pg2_server" / "wire"  # copied whole; its modules import only each other, pyzmq and msgpack
REQUIREMENTS = ("pyzmq", "msgpack")
PYTHONS = ("3.11", "3.13")  # Blender 4.2–5.0 embed CPython 3.11, 5.1+ 3.13
# Blender platform -> pip platform tags (pip also accepts the older tags each one implies).
PLATFORMS = {
    "linux-x64": ("manylinux_2_28_x86_64",),
    "windows-x64": ("win_amd64",),
    "macos-arm64": ("macosx_11_0_arm64",),
    "macos-x64": ("macosx_10_15_x86_64",),
}
_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<python>[^-]+)-(?P<abi>[^-]+)"
                    r"-(?P<platform>[^-]+)\.whl$")
_EXCLUDE = {"__pycache__", "build.py", "calibrate_face.py", "bench.py", "wheels", "pg2_wire"}


class BuildError(RuntimeError):
    """A build that cannot produce a valid extension; says what to fix."""


@dataclass(frozen=True)
class Wheel:
    path: Path

    @property
    def tags(self) -> dict:
        match = _WHEEL.match(self.path.name)
        if match is None:
            raise BuildError(f"{self.path.name} is not a wheel file name")
        return match.groupdict()


def find_blender_ext() -> Path | None:
    """Blender's extension builder, from the installed `bpy` wheel (located, not imported)."""
    spec = importlib.util.find_spec("bpy")
    for base in (spec.submodule_search_locations or []) if spec else []:
        for candidate in sorted(Path(base).glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py")):
            return candidate
    return None


def download_wheels(dest: Path, platforms=tuple(PLATFORMS), pythons=PYTHONS) -> list[Path]:
    """`pip download` the requirements for every Python × platform; returns what pip saved."""
    dest.mkdir(parents=True, exist_ok=True)
    saved: set[Path] = set()
    for platform in platforms:
        for python in pythons:
            before = set(dest.glob("*.whl"))
            command = [sys.executable, "-m", "pip", "download", "--only-binary=:all:",
                       "--python-version", python, "--dest", str(dest), "--no-cache-dir",
                       *[arg for tag in PLATFORMS[platform] for arg in ("--platform", tag)],
                       *REQUIREMENTS]
            run = subprocess.run(command, capture_output=True, text=True)
            if run.returncode != 0:
                raise BuildError(f"pip could not download wheels for Python {python} on {platform}:\n"
                                 + run.stderr.strip()[-2000:])
            names = re.findall(r"(?:Saved|File was already downloaded) (\S+\.whl)", run.stdout)
            saved.update(Path(n).resolve() for n in names)
            saved.update(set(dest.glob("*.whl")) - before)
    return sorted(p.resolve() for p in saved)


def stage(staging: Path, wheels: list[Path]) -> Path:
    """Copy the add-on, the wire package and the wheels into `staging`; write its manifest."""
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(ADDON, staging, ignore=lambda folder, names: [
        n for n in names if n in _EXCLUDE or n.endswith((".pyc", ".zip"))])
    if not (WIRE / "__init__.py").is_file():
        raise BuildError(f"{WIRE} is missing; the add-on carries that package")
    shutil.copytree(WIRE, staging / "pg2_wire", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (staging / "wheels").mkdir()
    for wheel in wheels:
        shutil.copy2(wheel, staging / "wheels" / wheel.name)
    manifest = (ADDON / "blender_manifest.toml").read_text()
    listing = ",\n".join(f'  "./wheels/{w.name}"' for w in sorted(wheels, key=lambda p: p.name))
    manifest = re.sub(r"(?m)^wheels = \[\]$", f"wheels = [\n{listing},\n]" if wheels else "wheels = []",
                      manifest)
    manifest = re.sub(r"(?m)^platforms = \[.*\]$",
                      "platforms = [" + ", ".join(f'"{p}"' for p in wheel_platforms(wheels)) + "]",
                      manifest)
    (staging / "blender_manifest.toml").write_text(manifest)
    return staging


def wheel_platforms(wheels: list[Path]) -> list[str]:
    """Blender platforms for which every requirement has a wheel (all, when there are none)."""
    if not wheels:
        return list(PLATFORMS)
    covered = []
    for platform in PLATFORMS:
        names = {Wheel(w).tags["name"].lower().replace("_", "-") for w in wheels
                 if _fits(Wheel(w).tags["platform"], platform)}
        if all(r in names for r in REQUIREMENTS):
            covered.append(platform)
    return covered


def _fits(tag: str, platform: str) -> bool:
    if tag == "any":
        return True
    system, _, arch = platform.partition("-")
    tags = tag.split(".")
    if system == "linux":
        return any(t.startswith(("manylinux", "musllinux", "linux")) and t.endswith("x86_64") for t in tags)
    if system == "windows":
        return "win_amd64" in tags
    machine = {"arm64": ("arm64", "universal2"), "x64": ("x86_64", "universal2", "intel")}[arch]
    return any(t.startswith("macosx") and t.endswith(machine) for t in tags)


def check_manifest(folder_or_zip: Path) -> dict:
    """Our own checks on top of Blender's validator: required fields and wheels present."""
    if tomllib is None:
        raise BuildError("building the extension needs Python 3.11 or later (for tomllib)")
    if folder_or_zip.suffix == ".zip":
        with zipfile.ZipFile(folder_or_zip) as archive:
            names = set(archive.namelist())
            manifest = tomllib.loads(archive.read("blender_manifest.toml").decode())
    else:
        names = {p.relative_to(folder_or_zip).as_posix() for p in folder_or_zip.rglob("*")}
        manifest = tomllib.loads((folder_or_zip / "blender_manifest.toml").read_text())
    expected = {"schema_version": "1.0.0", "id": "pg2_pose", "type": "add-on",
                "blender_version_min": "4.2.0", "license": ["SPDX:GPL-3.0-or-later"]}
    for key, value in expected.items():
        if manifest.get(key) != value:
            raise BuildError(f"manifest {key} is {manifest.get(key)!r}, expected {value!r}")
    for key in ("network", "files"):
        if not manifest.get("permissions", {}).get(key):
            raise BuildError(f"manifest lacks the {key!r} permission and its reason")
    # A per-platform zip lists its own subset under [build.generated].
    generated = manifest.get("build", {}).get("generated", {})
    for wheel in generated.get("wheels", manifest.get("wheels", [])):
        if wheel.removeprefix("./") not in names:
            raise BuildError(f"manifest lists {wheel} but the package does not hold it")
    wire = [f"pg2_wire/{p.name}" for p in sorted(WIRE.glob("*.py"))]
    for name in ("__init__.py", *wire):
        if name not in names:
            raise BuildError(f"the package lacks {name}")
    return manifest


def run_blender_ext(blender_ext: Path, *args: str) -> str:
    run = subprocess.run([sys.executable, str(blender_ext), *args], capture_output=True, text=True)
    if run.returncode != 0:
        raise BuildError(f"blender_ext.py {args[0]} failed:\n{(run.stdout + run.stderr).strip()}")
    return run.stdout


def zip_staging(staging: Path, output_dir: Path, split_platforms: bool) -> list[Path]:
    """Blender's package layout without Blender: files at the zip's root; a per-platform zip
    keeps only its wheels and names them under [build.generated], as blender_ext.py does."""
    manifest = tomllib.loads((staging / "blender_manifest.toml").read_text())
    name = f"{manifest['id']}-{manifest['version']}"
    targets = [(p, f"{name}-{p.replace('-', '_')}.zip") for p in manifest["platforms"]] \
        if split_platforms else [(None, f"{name}.zip")]
    written = []
    for platform, filename in targets:
        keep = [w for w in manifest.get("wheels", [])
                if platform is None or _fits(Wheel(Path(w)).tags["platform"], platform)]
        with zipfile.ZipFile(output_dir / filename, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(staging.rglob("*")):
                rel = path.relative_to(staging).as_posix()
                if path.is_dir() or (rel.startswith("wheels/") and f"./{rel}" not in keep):
                    continue
                data = path.read_bytes()
                if rel == "blender_manifest.toml" and platform is not None:
                    data += ("\n# BEGIN GENERATED CONTENT.\n[build.generated]\n"
                             f'platforms = ["{platform}"]\n'
                             "wheels = [" + ", ".join(f'"{w}"' for w in keep) + "]\n"
                             "# END GENERATED CONTENT.\n").encode()
                archive.writestr(rel, data)
        written.append(output_dir / filename)
    return written


def build(output_dir: Path, split_platforms: bool = False, wheels_from: Path | None = None,
          work_dir: Path | None = None, use_blender: bool = True) -> list[Path]:
    """Build and validate the extension zip(s); returns their paths."""
    work_dir = work_dir or ROOT / "build" / "blender_addon"
    if wheels_from is not None:
        if not Path(wheels_from).is_dir():
            raise BuildError(f"--wheels-from {wheels_from} is not a folder: give the folder that holds the pyzmq and "
                             "msgpack wheels (pip download … -d FOLDER)")
        wheels = sorted(p.resolve() for p in Path(wheels_from).glob("*.whl")
                        if Wheel(p).tags["name"].lower().replace("_", "-") in REQUIREMENTS)
        if not wheels:
            raise BuildError(f"{wheels_from} holds no pyzmq or msgpack wheels")
    else:
        wheels = download_wheels(work_dir / "wheels")
    staging = stage(work_dir / "pg2_pose", wheels)
    check_manifest(staging)
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    blender_ext = find_blender_ext() if use_blender else None
    before = set(output_dir.glob("pg2_pose-*.zip"))
    if blender_ext is not None:
        args = ["build", "--source-dir", str(staging), "--output-dir", str(output_dir)]
        run_blender_ext(blender_ext, *args, *(["--split-platforms"] if split_platforms else []))
    else:
        zip_staging(staging, output_dir, split_platforms)
    zips = sorted(set(output_dir.glob("pg2_pose-*.zip")) - before) or sorted(output_dir.glob("pg2_pose-*.zip"))
    for archive in zips:
        if blender_ext is not None:
            run_blender_ext(blender_ext, "validate", str(archive))
        check_manifest(archive)
    return zips


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blender_addon.build", description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default=str(ROOT / "dist"), help="where the zip(s) go (default dist/)")
    parser.add_argument("--split-platforms", action="store_true", help="one zip per platform")
    parser.add_argument("--wheels-from", help="use the pyzmq/msgpack wheels in this folder instead of pip download")
    args = parser.parse_args(argv)
    try:
        zips = build(Path(args.output_dir), args.split_platforms,
                     Path(args.wheels_from) if args.wheels_from else None)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for archive in zips:
        with zipfile.ZipFile(archive) as z:
            wheels = [n for n in z.namelist() if n.endswith(".whl")]
        print(f"{archive} ({archive.stat().st_size / 1e6:.1f} MB, {len(wheels)} wheels)")
        for name in wheels:
            print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
