"""Ctrl-C during `fleet simulate` and `fleet run`: a real SIGINT to the command's process group,
as a terminal sends it. The command ends within 5 s with exit code 130 and one line saying how to
resume, no traceback; the completed rounds match their manifests; the simulation's Ray session
folder is gone; a run on a deployment is stopped on the SuperLink, so that it resumes at once."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from typer.testing import CliRunner

from skip2fleet.cli.fleet import app
from skip2fleet.server.federation.runs import RunFolder
from skip2fleet.server.operations.superlink import flower_env
from tests.test_deployment import loopback_fleet  # noqa: F401 (a fixture)

FLEET = [sys.executable, "-m", "skip2fleet.cli"]
LIMIT_S = 5


def listen_to_ctrl_c() -> None:
    """In the child: SIGINT back to its default, as in a terminal. A suite started in the
    background of a shell without job control inherits SIGINT ignored, and Python then leaves
    it ignored (one CI run launched so timed out here)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt(command: list[str], run: Path, env: dict, cwd: Path) -> tuple[float, int, str]:
    """Start `command` in its own process group and SIGINT the group once two rounds are saved:
    the seconds until it exits, its exit code and its stderr."""
    process = subprocess.Popen(
        command, cwd=cwd, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=listen_to_ctrl_c,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (run / "rounds" / "002").is_dir():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "no second round"
            time.sleep(0.1)
        sent = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)
        _, said = process.communicate(timeout=60)
        assert not list(Path("/tmp/ray").glob(f"session_*_{process.pid}"))  # Ray's default place
        return time.monotonic() - sent, process.returncode, said
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def assert_stopped_cleanly(outcome: tuple[float, int, str], run: Path, command: str) -> None:
    seconds, code, said = outcome
    assert code == 130, said
    assert said.rstrip().splitlines()[-1] == f"interrupted; resume with `{command} --resume {run}`"
    assert "Traceback" not in said
    assert seconds < LIMIT_S, f"{seconds:.1f} s"
    folder = RunFolder(run)
    folder.verify()  # every completed round matches its manifest
    assert len(folder.completed_rounds()) >= 2
    assert [p.name for p in (run / "rounds").iterdir() if not p.name.isdigit()] == []
    print(f"INTERRUPT {command}: exit 130 after {seconds:.2f} s")


def test_ctrl_c_stops_a_simulation_and_removes_its_ray_folder(tmp_path):
    ray_tmp = Path(tempfile.mkdtemp(prefix="t-", dir="/tmp"))  # Ray's sockets need a short path
    try:
        run = tmp_path / "run"
        command = [*FLEET, "simulate", "--rounds", "300", "--devices", "2", "--out", str(run)]
        outcome = interrupt(command, run, {**os.environ, "TMPDIR": str(ray_tmp)}, tmp_path)
        assert_stopped_cleanly(outcome, run, "fleet simulate")
        assert list(ray_tmp.iterdir()) == []  # the session this run made is gone
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_ctrl_c_stops_a_run_on_the_superlink(loopback_fleet, tmp_path):  # noqa: F811
    fleet, path, _ = loopback_fleet
    config = yaml.safe_load(path.read_text())
    config["federation"]["rounds"] = 100
    config["training"]["epochs"] = 5
    many = tmp_path / "fleet-100.yaml"
    many.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    command = [*FLEET, "run", "--config", str(many), "--out", str(run)]
    assert_stopped_cleanly(interrupt(command, run, flower_env(fleet), tmp_path), run, "fleet run")
    done = RunFolder(run).completed_rounds()
    deadline = time.monotonic() + 30  # Flower ends the stopped ServerApp (3 s here)
    while RunFolder(run).holder() is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    resumed = CliRunner().invoke(app, ["run", "--resume", str(run), "--rounds", str(max(done) + 1)])
    assert resumed.exit_code == 0, resumed.output
    assert RunFolder(run).completed_rounds() == [*done, max(done) + 1]
