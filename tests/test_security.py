"""The fleet as a stranger on its network sees it: a deployment over real SSH (an ordinary user
with sudo on each device) with the coordinator on the bridge address, and an attacker namespace
on the same bridge holding only the CA certificate and the coordinator's address.

Everything but the Fleet API is refused at the front door; the stranger's `flwr run` runs
nothing anywhere; a SuperNode whose key is registered as one device cannot reply as another; the
operator's rounds complete; the SuperLink listens on loopback only; the device services run as
`skip2fleet`; keys and archives are 0600. The statuses are printed for the record (`pytest -s`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from skip2fleet.cli.fleet import app
from skip2fleet.server.operations.certs import credentials_for
from skip2fleet.shared.config import load_config
from skip2fleet.shared.services import supernode_command
from tests.fakehosts import COORDINATOR_IP, fake_hosts, ssh_keypair
from tests.test_deploy import (
    deploy,
    fake_device,
    service_processes,
    stop_coordinator_services,
    write_fleet,
)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("sshd") or not shutil.which("nginx"),
    reason="needs root (network namespaces), sshd and nginx (.ci/run installs them)",
)
REFUSED_PATHS = [
    "/v1/control/list-nodes",
    "/v1/control/start-run",
    "/v1/control/stop-run",
    "/v1/control/stream-logs",
    "/v1/control/register-node",
    "/v1/control/unregister-node",
    "/v1/runtime/get-nodes",
    "/v1/fleet/register-node",
    "/docs",
    "/openapi.json",
]
EVIL_APP = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "evil"
version = "1.0.0"
description = "A stranger's app"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "stranger"

[tool.flwr.app.components]
serverapp = "evil:server"
clientapp = "evil:client"
"""
# Leaves a mark wherever Flower runs it: on a device (ClientApp) or the coordinator (ServerApp).
EVIL_MODULE = """
from pathlib import Path

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

MARKER = Path("{marker}")
client = ClientApp()
server = ServerApp()


@client.train()
def train(msg, context):
    MARKER.write_text("a stranger's ClientApp ran here")
    return msg


@server.main()
def main(grid, context):
    MARKER.write_text("a stranger's ServerApp ran here")
"""


def in_namespace(namespace: str, *command: str, env: dict | None = None):
    return subprocess.run(
        ["ip", "netns", "exec", namespace, *command],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def status_of(namespace: str, url: str, ca: Path, body: bytes = b"{}") -> str:
    """The HTTP status a POST from `namespace` gets (curl, checking the server with `ca`)."""
    curl = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(ca)]
    done = subprocess.run(
        ["ip", "netns", "exec", namespace, *curl, "-X", "POST", "--data-binary", "@-", url],
        input=body,
        capture_output=True,
        timeout=60,
    )
    return done.stdout.decode()


def test_a_stranger_on_the_network_gets_nothing_but_the_fleet_api(tmp_path):
    key = ssh_keypair(tmp_path)
    state = tmp_path / "state"
    marker = Path(tempfile.mkdtemp(prefix="skip2fleet-evil-", dir="/var/tmp")) / "ran"
    marker.parent.chmod(0o777)
    record = []
    try:
        with fake_hosts(4, key) as hosts:
            devices = [fake_device(i, h, h.folder) for i, h in enumerate(hosts[:3])]
            # pi-4's key is registered like every device's, but its SuperNode (started below,
            # not deployed) says it is pi-1.
            devices.append({"name": "pi-4", "host": hosts[3].address})
            config = write_fleet(
                tmp_path,
                COORDINATOR_IP,
                devices,
                training={"epochs": 20, "pretrain_epochs": 5},
                federation={"rounds": 2, "min_devices": 3, "round_timeout_s": 90},
            )
            path = tmp_path / "fleet.yaml"
            limit = [arg for d in devices[:3] for arg in ("--limit", d["name"])]
            code, cold_s, output = deploy(path, key, *limit)
            assert code == 0, output
            code, warm_s, output = deploy(path, key, *limit)
            assert code == 0, output
            record.append(
                f"deploy of 3 devices with the front door and become: cold {cold_s:.1f} s, "
                f"second {warm_s:.1f} s"
            )
            fleet = load_config(path)
            creds = credentials_for(fleet)
            door = f"https://{COORDINATOR_IP}:{config['coordinator']['port']}"
            attacker = hosts[3].name
            ca = tmp_path / "attacker-ca.crt"  # all the stranger holds, with the address
            shutil.copy(creds.ca_cert, ca)

            # The SuperLink is on loopback only; the front door on the bridge address.
            listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
            superlink = config["coordinator"]["superlink_port"]
            bound = [
                line.split()[3]
                for line in listening.splitlines()
                if line.split()[3].endswith(f":{superlink}")
            ]
            assert bound == [f"127.0.0.1:{superlink}"], listening
            record.append(f"ss -ltn: SuperLink on {', '.join(bound)} only")

            for route in REFUSED_PATHS:
                status = status_of(attacker, door + route, ca)
                record.append(f"POST {route}: {status}")
                assert status == "403", (route, status)
            status = status_of(attacker, door + "/v1/fleet/push-messages", ca, b"x" * (2 << 20))
            record.append(f"POST /v1/fleet/push-messages with 2 MiB: {status}")
            assert status == "413"

            # The stranger's own Flower CLI: run, list, register, stop.
            home = tmp_path / "attacker-flwr"
            home.mkdir()
            (home / "config.toml").write_text(
                f'[superlink]\ndefault = "fleet"\n\n[superlink.fleet]\naddress = "{COORDINATOR_IP}:'
                f'{config["coordinator"]["port"]}"\nroot-certificates = "{ca}"\n'
            )
            evil = tmp_path / "stranger-app"
            evil.mkdir()
            (evil / "pyproject.toml").write_text(EVIL_APP)
            (evil / "evil.py").write_text(EVIL_MODULE.format(marker=marker))
            env = {**os.environ, "FLWR_HOME": str(home)}
            flwr = shutil.which("flwr")
            attempts = {
                "flwr run": [flwr, "run", str(evil), "fleet"],
                "flwr ls": [flwr, "ls", "fleet"],
                "flwr supernode register": [
                    flwr,
                    "supernode",
                    "register",
                    str(creds.node_public_key("pi-1")),
                    "fleet",
                ],
                "flwr supernode unregister": [flwr, "supernode", "unregister", "1", "fleet"],
                "flwr stop": [flwr, "stop", "1", "fleet"],
            }
            for what, command in attempts.items():
                done = in_namespace(attacker, *command, "--format", "json", env=env)
                answer = json.loads(done.stdout[done.stdout.find("{") :])
                reason = " ".join(answer.get("error-message", "").split())
                refused = re.search(r"'(\d{3} [A-Za-z ]+)' for url '[^']*?(/v1/[a-z/-]+)'", reason)
                assert answer["success"] is False and refused, (what, reason)
                assert refused[1] == "403 Forbidden", (what, reason)  # at the front door
                record.append(f"{what}: {refused[1]} ({refused[2]})")

            # A SuperNode whose key is registered as pi-4 says it is pi-1.
            impostor = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    attacker,
                    *supernode_command(
                        f"{COORDINATOR_IP}:{config['coordinator']['port']}",
                        "pi-1",
                        tmp_path / "impostor",
                        9094,
                        creds.ca_cert,
                        creds.node_key("pi-4"),
                    ),
                ],
                stdout=(tmp_path / "impostor.log").open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"},
            )
            try:
                run = tmp_path / "run"
                result = CliRunner().invoke(app, ["run", "--config", str(path), "--out", str(run)])
                assert result.exit_code == 0, result.output
            finally:
                os.killpg(impostor.pid, 9)
                impostor.wait()
            for number in (1, 2):
                outcome = json.loads((run / "rounds" / f"{number:03d}" / "round.json").read_text())
                assert sorted(outcome["devices"]) == ["pi-1", "pi-2", "pi-3"], outcome
                if "pi-4" in outcome["refused"]:
                    assert "claims to be 'pi-1'; its key is pi-4's" in outcome["refused"]["pi-4"]
                    record.append(f"round {number}: pi-4 refused: {outcome['refused']['pi-4']}")
            assert any(
                "pi-4"
                in json.loads((run / "rounds" / f"{n:03d}" / "round.json").read_text())["refused"]
                for n in (1, 2)
            )
            assert not marker.exists()  # the stranger's app ran nowhere

            # Device services as `skip2fleet`; keys and archives 0600.
            for host in hosts[:3]:
                users = {
                    user: command.split()[1].rsplit("/", 1)[-1]
                    for user, command in service_processes(host)
                }
                assert len(service_processes(host)) == 3, users
                assert set(users) == {"skip2fleet", "skip2fleet-app"}, users
                assert users["skip2fleet-app"] == "flower-superexec", users  # the ClientApps' user
                node_key = host.folder / "opt" / "etc" / "node.key"
                assert node_key.stat().st_mode & 0o777 == 0o600
                assert node_key.owner() == "skip2fleet"
                as_app = ["runuser", "-u", "skip2fleet-app", "--", "cat", str(node_key)]
                denied = subprocess.run(as_app, capture_output=True, text=True)
                assert denied.returncode != 0 and "Permission denied" in denied.stderr
            archives = list(state.glob("devices/*/etc-*.tar"))
            assert archives
            for secret in [
                creds.folder / "ca.key",
                creds.server_key,
                creds.node_key("pi-1"),
                *archives,
            ]:
                assert secret.stat().st_mode & 0o777 == 0o600, secret
            prometheus = state / "coordinator" / "prometheus" / "prometheus.yml"
            assert prometheus.stat().st_mode & 0o777 == 0o644
            record.append(
                "SuperNode and agent run as skip2fleet, the SuperExec and its ClientApps as "
                f"skip2fleet-app, which cannot read the node key ({denied.stderr.strip()}); "
                "keys and archives 0600"
            )
    finally:
        stop_coordinator_services(state)
        shutil.rmtree(marker.parent, ignore_errors=True)
    print("\n".join(record))
