"""The wheel works on its own: built from the checkout, installed into a fresh venv in a folder
outside the checkout, it answers `fleet --help`, runs `fleet simulate --rounds 1` on the built-in
example fleet and `fleet deploy --check` against a fake device over real SSH (the playbook comes
from the wheel's package data). The transcript is printed for the record (`pytest -s`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakehosts import COORDINATOR_IP, fake_hosts, ssh_keypair
from tests.test_deploy import fake_device, stop_coordinator_services, summary, write_fleet

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("sshd"),
    reason="needs root (network namespaces) and sshd for the fake device (.ci/run installs them)",
)


def run(command: list[str], cwd: Path, env: dict, transcript: list[str]) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    transcript.append(
        f"$ {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(command))}"
        f"  -> exit {done.returncode}\n{output.rstrip()}"
    )
    assert done.returncode == 0, output
    return output


def test_the_wheel_runs_every_kind_of_command_from_a_fresh_venv(tmp_path):
    transcript: list[str] = []
    dist, venv, work = tmp_path / "dist", tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)]
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    }
    subprocess.run(build, check=True, capture_output=True, env=env)
    (wheel,) = dist.glob("skip2fleet-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"{wheel}[simulation,deploy]"], check=True, capture_output=True, env=env)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    fleet = str(venv / "bin" / "fleet")

    where = run([str(venv / "bin" / "python"), "-c", WHERE], work, env, transcript)
    assert str(venv) in where and "no top-level cli, server, client or shared" in where, where
    assert "simulate" in run([fleet, "--help"], work, env, transcript)
    output = run([fleet, "simulate", "--rounds", "1", "--devices", "2"], work, env, transcript)
    assert "built-in example fleet" in output and "wall" in output, output
    assert (work / "runs").is_dir()  # the run folder lands where the user stands

    key = ssh_keypair(tmp_path)
    try:
        with fake_hosts(1, key) as hosts:
            write_fleet(work, COORDINATOR_IP, [fake_device(0, hosts[0], hosts[0].folder)])
            check = [fleet, "deploy", "--config", "fleet.yaml", "--ssh-key", str(key), "--check"]
            output = run([*check, "--limit", "pi-1"], work, env, transcript)
            assert "Traceback" not in output and "pi-1" in summary(output), output
            assert not (hosts[0].folder / "opt").exists()  # a dry run installs nothing
    finally:
        stop_coordinator_services(work / "state")
    print("\n\n".join(transcript))


WHERE = """
import importlib.util, skip2fleet.cli, skip2fleet.server, skip2fleet.shared
print(skip2fleet.server.__file__)
if not any(importlib.util.find_spec(name) for name in ("cli", "server", "client", "shared")):
    print("no top-level cli, server, client or shared")
"""
