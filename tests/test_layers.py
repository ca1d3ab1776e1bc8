"""The layers of docs/architecture.md, read from the imports of every module."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pg2_server", "training", "blender_addon")


def imports_of(path: Path) -> set[str]:
    """The project modules `path` imports (relative imports resolved), at any depth of the file."""
    module = list(path.relative_to(ROOT).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.update([target] if node.module else [f"{target}.{a.name}" for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def modules(package: str) -> dict[str, set[str]]:
    return {p.relative_to(ROOT).as_posix(): imports_of(p) for p in sorted((ROOT / package).rglob("*.py"))}


def test_pg2_server_imports_neither_training_nor_the_addon():
    for path, names in modules("pg2_server").items():
        assert not {n for n in names if n.split(".")[0] != "pg2_server"}, path


def test_the_wire_package_imports_only_itself():
    for path, names in modules("pg2_server").items():
        if path.startswith("pg2_server/wire/"):
            assert all(n.startswith("pg2_server.wire") for n in names), (path, names)


def test_no_library_module_imports_a_command_line():
    for package in PACKAGES:
        for path, names in modules(package).items():
            if path not in ("pg2_server/cli.py", "training/cli.py"):
                assert not {n for n in names if n in ("pg2_server.cli", "training.cli")}, path


def test_the_addon_takes_pg2_server_only_through_its_wire_module():
    for path, names in modules("blender_addon").items():
        outside = {n for n in names if n.startswith("pg2_server")}
        assert path == "blender_addon/wire.py" or not outside, (path, outside)
