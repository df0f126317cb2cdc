"""A device's own file: what `fleet deploy` sends a device holds no coordinator path, the agent
starts from it where the coordinator's folders do not exist, imports neither NumPy nor Flower,
and stays small; a bad device file is one line and exit code 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import pytest
import yaml

from skip2fleet.server.operations.certs import credentials_for
from skip2fleet.server.operations.deploy import device_etc
from skip2fleet.server.operations.devices import device_settings
from skip2fleet.server.operations.loopback import free_port, wait_for
from skip2fleet.shared.config import load_config
from skip2fleet.shared.devicefile import DEVICE_FILE, DeviceSettings
from skip2fleet.shared.services import AGENT_MODULE
from tests.test_monitoring import fixture_sysfs

AGENT_BUDGET_KB = 25 * 1024  # issue 15: the resident agent on a 512 MB board


def coordinator_fleet(tmp_path: Path):
    """A fleet whose task data and state live in folders of the coordinator (tmp_path/...)."""
    (tmp_path / "data").mkdir()
    config = {
        "coordinator": {"state_dir": str(tmp_path / "state")},
        "task": {"dataset": "generated", "data_dir": str(tmp_path / "data")},
        "devices": [{"name": "pi-1", "host": "127.0.0.1", "agent_port": free_port()}],
    }
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(config))
    return load_config(tmp_path / "fleet.yaml")


def test_what_a_device_is_sent_names_no_folder_of_the_coordinator(tmp_path):
    fleet = coordinator_fleet(tmp_path)
    archive = device_etc(fleet, fleet.devices[0], credentials_for(fleet))
    with tarfile.open(archive) as tar:
        names = sorted(n for n in tar.getnames() if not n.startswith("."))
        own = tar.extractfile(f"etc/{DEVICE_FILE}").read().decode()
    assert names == ["etc/ca.crt", f"etc/{DEVICE_FILE}", "etc/node.key"]  # no fleet.yaml
    assert str(tmp_path / "state") not in own
    settings = json.loads(own)
    assert settings["name"] == "pi-1" and settings["state_dir"] == "/opt/skip2fleet/state"


def test_the_agent_starts_where_the_coordinators_folders_do_not_exist(tmp_path):
    fleet = coordinator_fleet(tmp_path)
    device = fleet.devices[0]
    settings = device_settings(fleet, device, tmp_path / "device-state")
    (tmp_path / "data").rmdir()  # on a device, the coordinator's data folder is not there
    (tmp_path / "fleet.yaml").unlink()
    own = tmp_path / DEVICE_FILE
    own.write_text(settings.text())
    sysfs = fixture_sysfs(tmp_path / "sys", 2.0, 50.0)
    command = [sys.executable, "-m", AGENT_MODULE, "--config", str(own), "--sys-root", str(sysfs)]
    agent = subprocess.Popen(command, start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{device.agent_port}/metrics"

        def scrape() -> str | None:
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    return reply.read().decode()
            except OSError:
                assert agent.poll() is None, agent.stderr.read()
                return None

        def sampled() -> str | None:  # the power sampler's first reading is in
            body = scrape()
            return body if body and "skip2fleet_device_power_watts{" in body else None

        body = wait_for(sampled, 30, "the agent's first power sample")
        assert 'skip2fleet_device_power_watts{source="hwmon",estimated="false"} 2.0' in body
        assert "skip2fleet_device_temperature_celsius{} 50.0" in body
        for _ in range(5):
            scrape()
        status = Path(f"/proc/{agent.pid}/status").read_text()
        peak_kb = int(status.split("VmHWM:")[1].split()[0])
        maps = Path(f"/proc/{agent.pid}/maps").read_text()
        assert "numpy" not in maps and "grpc" not in maps and "yaml" not in maps
        assert peak_kb <= AGENT_BUDGET_KB, f"agent peak RSS {peak_kb} kB"
    finally:
        os.killpg(agent.pid, signal.SIGTERM)
        agent.wait(timeout=10)
    assert agent.returncode == 0  # SIGTERM is a clean stop


def test_the_agent_imports_only_the_standard_library():
    probe = (
        f"import sys, {AGENT_MODULE}; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'numpy', 'flwr', 'grpc', 'yaml', 'typer', 'prometheus_client', 'http'}))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("agent_port"), "agent_port: missing"),
        (lambda s: s.update(task="har"), "task: unknown key"),
        (lambda s: s.update(agent_port="9101"), "agent_port: unexpected value '9101'"),
        (lambda s: s.update(data_dir=True), "data_dir: unexpected value True"),
    ],
)
def test_a_bad_device_file_is_one_line_and_exit_2(tmp_path, change, message):
    settings = json.loads(
        DeviceSettings("pi-1", "/s", None, None, "none", 1.0, 3.0, "127.0.0.1", 1, 9094).text()
    )
    change(settings)
    own = tmp_path / DEVICE_FILE
    own.write_text(json.dumps(settings))
    done = subprocess.run(
        [sys.executable, "-m", AGENT_MODULE, "--config", str(own)], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr == f"error: {own}: {message}\n"


def test_a_missing_or_garbled_device_file_is_one_line_and_exit_2(tmp_path):
    for content, message in ((None, "cannot read the device file"), ("{", "not a device file")):
        own = tmp_path / DEVICE_FILE
        if content is not None:
            own.write_text(content)
        command = [sys.executable, "-m", AGENT_MODULE, "--config", str(own)]
        done = subprocess.run(command, capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr.count("\n") == 1
        assert done.stderr.startswith(f"error: {own}: {message}")
