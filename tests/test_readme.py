"""The README's two commands stay true: CI runs the test command exactly as the README shows it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line for block in blocks[:2] for line in block.splitlines() if line.strip()]


def test_readme_starts_with_two_commands_and_ci_runs_the_second():
    main, tests = readme_commands()[:2]
    assert "fleet " in main and "pip install" in main
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


PARTS = ("cli", "server", "client", "shared")


def layout_bullets() -> dict[str, set[str]]:
    """The Layout section's bullets: folder -> the module names it lists (`name.py`)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    bullets = re.split(r"\n- (?=`)", "\n" + section)[1:]
    named = {}
    for bullet in bullets:
        folder = re.match(r"`([\w/]+/)`", bullet)
        if folder:
            named[folder.group(1)] = set(re.findall(r"`(\w+\.py)`", bullet))
    return named


def test_the_layout_names_every_module_in_its_folder_and_no_other():
    named = layout_bullets()
    modules = {
        (f"{path.parent.relative_to(ROOT).as_posix()}/", path.name)
        for part in PARTS
        for path in (ROOT / part).rglob("*.py")
        if path.name != "__init__.py" or path.parent.name == "cli"
    }
    listed = {(folder, name) for folder, names in named.items() for name in names}
    listed = {(f, n) for f, n in listed if f.split("/")[0] in PARTS}
    assert sorted(modules - listed) == []  # every module is named under its folder
    assert sorted(listed - modules) == []  # and every name is a module there
