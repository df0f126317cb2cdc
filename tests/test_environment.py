"""The process settings (`shared/process.py`: one BLAS thread, no Flower telemetry) are made by the
entry points before NumPy or Flower load, and by nothing else: set after, BLAS keeps a thread per
core (two bench workers then ran 3x slower) and Flower phones home; set on import, every library
user's process would be changed behind its back."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest

from skip2fleet.server.operations.superlink import flower_env
from skip2fleet.shared.config import parse_config
from skip2fleet.shared.process import PROCESS_SETTINGS

ROOT = Path(__file__).resolve().parents[1]
CLEAN = {k: v for k, v in os.environ.items() if k not in PROCESS_SETTINGS}

# Runs `python -m skip2fleet.cli ARGS` (what the `fleet` script runs: `skip2fleet.cli.main`),
# recording the settings at the moment NumPy and Flower are first imported.
WATCH = f"""
import json, os, runpy, sys
VARIABLES = {tuple(PROCESS_SETTINGS)!r}
seen = {{}}
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name in ("numpy", "flwr") and name not in seen:
            seen[name] = {{v: os.environ.get(v) for v in VARIABLES}}
sys.meta_path.insert(0, Watch())
sys.argv = ["fleet", *sys.argv[1:]]
try:
    runpy.run_module("skip2fleet.cli", run_name="__main__")
except SystemExit:
    pass
print(json.dumps(seen))
"""


@pytest.mark.parametrize(
    ("args", "loads"),
    [(["predict", "--help"], {"numpy"}), (["simulate", "--help"], {"numpy", "flwr"})],
)
def test_fleet_makes_the_settings_before_numpy_and_flower(args, loads):
    out = subprocess.run(
        [sys.executable, "-c", WATCH, *args], env=CLEAN, capture_output=True, text=True, check=True
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(seen) >= loads
    for module, variables in seen.items():
        assert variables == PROCESS_SETTINGS, module


def test_importing_skip2fleet_changes_nothing_in_the_process():
    modules = [
        "skip2fleet.cli.fleet",
        "skip2fleet.client.clientapp",
        "skip2fleet.server.federation.serverapp",
        "skip2fleet.server.bench.methods",
    ]
    code = f"import os\nfor m in {modules!r}: __import__(m)\n"
    code += f"print(sorted(set({list(PROCESS_SETTINGS)!r}) & set(os.environ)))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=CLEAN, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_flower_s_processes_start_with_the_settings(monkeypatch):
    """`flower_env`: what the loopback deployment and `fleet run` start Flower with."""
    for name in PROCESS_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's own choice stands
    env = flower_env(parse_config({}))
    assert env["OMP_NUM_THREADS"] == "2"
    assert {k: env[k] for k in PROCESS_SETTINGS if k != "OMP_NUM_THREADS"} == {
        k: v for k, v in PROCESS_SETTINGS.items() if k != "OMP_NUM_THREADS"
    }


def render(template: str) -> str:
    """One of the service role's templates, as Ansible renders it for `fleet deploy`."""
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined)
    environment.filters["quote"] = shlex.quote
    source = (ROOT / "ansible/roles/service/templates" / template).read_text()
    return environment.from_string(source).render(
        ansible_managed="test",
        svc_name="supernode",
        svc_argv=["/opt/skip2fleet/venv/bin/flower-supernode", "--insecure"],
        svc_dir="/opt/skip2fleet/run",
        svc_path="/opt/skip2fleet/venv/bin:/usr/bin",
        svc_user="",
        process_env=PROCESS_SETTINGS,
    )


def test_a_deployed_service_runs_with_the_settings():
    unit = render("unit.service.j2")
    (line,) = [line for line in unit.splitlines() if "OPENBLAS" in line]
    assert dict(a.split("=", 1) for a in line.removeprefix("Environment=").split()) == (
        PROCESS_SETTINGS
    )
    script = render("supervise.sh.j2")
    (line,) = [line for line in script.splitlines() if "OPENBLAS" in line]
    done = subprocess.run(["sh", "-c", f"{line}; env"], env={}, capture_output=True, text=True)
    exported = dict(a.split("=", 1) for a in done.stdout.splitlines() if "=" in a)
    assert {k: exported.get(k) for k in PROCESS_SETTINGS} == PROCESS_SETTINGS
