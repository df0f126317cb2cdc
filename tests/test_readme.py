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
