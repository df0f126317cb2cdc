"""The layout shows the architecture and the package installs whole: every Python folder is a
listed package, and imports flow one way (shared -> client / server -> the CLI)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("server", "client", "shared", "ansible")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_python_folder_is_a_listed_package_of_skip2fleet():
    tool = pyproject()["tool"]["setuptools"]
    folders = {
        "skip2fleet." + ".".join(init.parent.relative_to(ROOT).parts)
        for part in PARTS
        for init in (ROOT / part).rglob("__init__.py")
    }
    assert folders | {"skip2fleet.ansible"} == set(tool["packages"])
    assert not (ROOT / "ansible" / "__init__.py").exists()  # it would shadow Ansible itself
    assert tool["package-dir"] == {f"skip2fleet.{part}": part for part in PARTS}


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith("skip2fleet.") or n.split(".")[0] in PARTS}


def modules(part: str) -> list[Path]:
    return sorted((ROOT / part).rglob("*.py"))


@pytest.mark.parametrize(
    ("part", "forbidden"),
    [
        ("shared", ("skip2fleet.server", "skip2fleet.client")),
        ("client", ("skip2fleet.server",)),
        ("server", ("skip2fleet.client",)),
    ],
)
def test_imports_flow_one_way_through_shared(part, forbidden):
    wrong = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in modules(part)
        if path != ROOT / "server" / "cli.py"  # the CLI sits on top and wires both sides
        for name in imports_of(path)
        if name.startswith(forbidden) or not name.startswith("skip2fleet.")
    }
    assert not wrong


def test_nothing_but_the_console_script_imports_the_cli():
    users = [p for part in PARTS for p in modules(part) if "skip2fleet.server.cli" in imports_of(p)]
    assert users == []
    assert pyproject()["project"]["scripts"] == {"fleet": "skip2fleet.server.cli:app"}
