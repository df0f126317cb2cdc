"""The layout shows the architecture and the package installs whole: every Python folder is a
listed package, imports flow one way (shared -> client / server -> cli, the `fleet` command), and
a device's commands load nothing of the coordinator's side."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from skip2fleet.cli import DEVICE_COMMANDS, command_of
from skip2fleet.cli import device as device_cli
from skip2fleet.cli import fleet as fleet_cli
from skip2fleet.cli import model as model_cli
from skip2fleet.server import cli as coordinator_cli
from skip2fleet.server.operations import wheelhouse

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("cli", "server", "client", "shared", "ansible")


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
    assert wheelhouse.PARTS == PARTS  # a device's wheel holds every part


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
        ("shared", ("skip2fleet.server", "skip2fleet.client", "skip2fleet.cli")),
        ("client", ("skip2fleet.server", "skip2fleet.cli")),
        ("server", ("skip2fleet.client", "skip2fleet.cli")),
    ],
)
def test_imports_flow_one_way_through_shared(part, forbidden):
    wrong = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in modules(part)
        for name in imports_of(path)
        if name.startswith(tuple(f + "." for f in forbidden)) or not name.startswith("skip2fleet.")
    }
    assert not wrong


def test_only_fleet_s_entry_wires_the_two_sides():
    assert pyproject()["project"]["scripts"] == {"fleet": "skip2fleet.cli:main"}
    users = {
        path.relative_to(ROOT).as_posix()
        for part in PARTS
        for path in modules(part)
        if "skip2fleet.server.cli" in imports_of(path)
    }
    assert users == {"cli/fleet.py"}


def test_fleet_is_the_coordinator_s_commands_and_the_device_s_each_once():
    def names(app) -> list[str]:
        return [c.name for c in app.registered_commands] + [g.name for g in app.registered_groups]

    device, coordinator = names(device_cli.commands), names(coordinator_cli.app)
    assert sorted(device) == sorted(DEVICE_COMMANDS)  # the dispatch knows every device command
    assert not set(device) & set(coordinator)
    groups = [(g.name, names(g.typer_instance)) for g in fleet_cli.app.registered_groups]
    assert ("model", names(model_cli.app)) in groups  # cli/model.py: where both sides meet
    assert "model" not in device + coordinator
    merged = [name for group, listed in groups if group != "model" for name in listed]
    assert sorted(merged) == sorted(device + coordinator)


@pytest.mark.parametrize(
    ("args", "command"),
    [(["predict", "-"], "predict"), (["--version"], None), (["bench", "peft"], "bench")],
)
def test_the_command_is_the_first_word_that_is_not_an_option(args, command):
    assert command_of(args) == command


def imported(command: list[str]) -> set[str]:
    """The skip2fleet modules `command` (a Python program) imports, by `-X importtime`."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *command], capture_output=True, text=True, timeout=60
    )
    assert "Traceback" not in done.stderr, done.stderr
    return {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "skip2fleet" in line
    }


FLEET = Path(sys.executable).parent / "fleet"  # the console script, as a device runs it


@pytest.mark.parametrize(
    "args",
    [
        *([name, "--help"] for name in DEVICE_COMMANDS),
        ["predict", "--state-dir", "/nonexistent"],
        ["rollback", "--state-dir", "/nonexistent"],
    ],
)
def test_a_device_s_commands_load_nothing_of_the_coordinator_s(args):
    loaded = imported([str(FLEET), *args])
    assert "skip2fleet.client.predict" in loaded  # the command itself did load
    assert not {m for m in loaded if m.startswith("skip2fleet.server")}


def test_the_device_s_agent_loads_nothing_of_the_coordinator_s():
    loaded = imported(["-m", "skip2fleet.client.telemetry.agent", "--help"])
    assert "skip2fleet.client.telemetry.power" in loaded
    assert not {m for m in loaded if m.startswith("skip2fleet.server")}


def test_the_coordinator_s_commands_still_load_the_coordinator():
    """The other half of the dispatch (and of the two tests above: they can see a server)."""
    assert "skip2fleet.server.cli" in imported([str(FLEET), "status", "--help"])
