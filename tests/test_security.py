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
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from skip2fleet.cli.fleet import app
from skip2fleet.server.operations.certs import credentials_for
from skip2fleet.server.operations.frontdoor import PUBLIC_KEY_HEADER, key_header
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
    "/v1/fleet/register-node%3f",  # an encoded `?`, `#` or `/`, a trailing slash, a `..`
    "/v1/fleet/register-node%23",
    "/v1/fleet/register-node/",
    "/v1/fleet%2fregister-node",
    "/v1/fleet/pull-messages/../register-node",
    "/v1/fleet/pull-messages?x=1",
    "/v1/fleet/unregister-node",
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


def status_of(
    namespace: str, url: str, ca: Path, body: bytes = b"{}", headers: dict | None = None
) -> str:
    """The HTTP status a POST from `namespace` gets (curl, checking the server with `ca`)."""
    curl = ["curl", "-s", "--path-as-is", "-o", "/dev/null", "-w", "%{http_code}"]
    curl += ["--cacert", str(ca)]
    for name, value in (headers or {}).items():
        curl += ["-H", f"{name}: {value}"]
    done = subprocess.run(
        ["ip", "netns", "exec", namespace, *curl, "-X", "POST", "--data-binary", "@-", url],
        input=body,
        capture_output=True,
        timeout=60,
    )
    return done.stdout.decode()


# A stranger's own key, its signed activation request as Flower's SuperNode would send it.
ACTIVATE_WITH_OWN_KEY = """
import base64, sys, httpx
from flwr.proto.fleet_pb2 import ActivateNodeRequest
from flwr.supercore.date import now
from flwr.supercore.primitives.asymmetric import (
    generate_key_pairs, public_key_to_bytes, sign_message)
private, public = generate_key_pairs()
key = public_key_to_bytes(public)
stamp = now().isoformat()
headers = {
    "content-type": "application/protobuf",
    "flwr-public-key": base64.b64encode(key).decode(),
    "flwr-timestamp": stamp,
    "flwr-signature": base64.b64encode(sign_message(private, stamp.encode())).decode(),
}
body = ActivateNodeRequest(public_key=key, heartbeat_interval=30).SerializeToString()
answer = httpx.post(sys.argv[1] + "/v1/fleet/activate-node", content=body, headers=headers,
                    verify=sys.argv[2])
print(answer.status_code)
"""


@pytest.fixture(scope="module")
def stranger_fleet(tmp_path_factory):
    """Three devices deployed twice with `fleet deploy` (the second changes nothing) and the
    attacker namespace s2f4; pi-4's key is registered like every device's, but no SuperNode of
    it is deployed (the impostor below uses it)."""
    folder = tmp_path_factory.mktemp("stranger")
    key = ssh_keypair(folder)
    try:
        with fake_hosts(4, key) as hosts:
            devices = [fake_device(i, h, h.folder) for i, h in enumerate(hosts[:3])]
            devices.append({"name": "pi-4", "host": hosts[3].address})
            config = write_fleet(
                folder,
                COORDINATOR_IP,
                devices,
                training={"epochs": 20, "pretrain_epochs": 5},
                federation={"rounds": 2, "min_devices": 3, "round_timeout_s": 90},
            )
            path = folder / "fleet.yaml"
            limit = [arg for d in devices[:3] for arg in ("--limit", d["name"])]
            code, cold_s, output = deploy(path, key, *limit)
            assert code == 0, output
            code, warm_s, output = deploy(path, key, *limit)
            assert code == 0, output
            deployed = (
                f"deploy of 3 devices with the front door and become: cold {cold_s:.1f} s, "
                f"second {warm_s:.1f} s"
            )
            yield hosts, config, path, deployed
    finally:
        stop_coordinator_services(folder / "state")


def test_a_stranger_on_the_network_gets_nothing_but_the_fleet_api(stranger_fleet, tmp_path):
    hosts, config, path, deployed = stranger_fleet
    state = path.parent / "state"
    marker = Path(tempfile.mkdtemp(prefix="skip2fleet-evil-", dir="/var/tmp")) / "ran"
    marker.parent.chmod(0o777)
    record = [deployed]
    try:
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
        own_key = in_namespace(attacker, sys.executable, "-c", ACTIVATE_WITH_OWN_KEY, door, str(ca))
        record.append(f"activate-node with a key of its own: {own_key.stdout.strip()}")
        assert own_key.stdout.strip() == "403", own_key.stderr
        # a device's public key is no secret: with one, a body over the limit is 413
        public = {PUBLIC_KEY_HEADER: key_header(creds.node_public_key("pi-1"))}
        big = b"x" * (2 << 20)
        status = status_of(attacker, door + "/v1/fleet/push-messages", ca, big, public)
        record.append(f"POST /v1/fleet/push-messages with 2 MiB and pi-1's public key: {status}")
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

        # Device services as `skip2fleet`, what runs apps or reads the state as `skip2fleet-app`
        # (which cannot read the node key); keys and archives 0600.
        roles = ("flower-supernode", "flower-superexec", "telemetry.agent", "cli serve")
        for host in hosts[:3]:
            found = service_processes(host)
            owners = {role: user for user, command in found for role in roles if role in command}
            assert len(found) == 4 and owners == {
                "flower-supernode": "skip2fleet",
                "flower-superexec": "skip2fleet-app",  # the ClientApps' user
                "telemetry.agent": "skip2fleet",
                "cli serve": "skip2fleet-app",
            }, found
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
        shutil.rmtree(marker.parent, ignore_errors=True)
    print("\n".join(record))


# Slow bodies and slow headers from one address, bounded in count and time: `slots` connections
# of each kind, each reconnecting (after 0.5 s) whenever the door closes it, until `seconds` pass.
FLOOD = """
import asyncio, json, ssl, sys, time
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
slots, seconds = int(sys.argv[4]), float(sys.argv[5])
context = ssl.create_default_context(cafile=ca)
attempts, end = 0, time.monotonic() + seconds
BODY = (f"POST /v1/fleet/push-messages HTTP/1.1\\r\\nHost: {host}\\r\\n"
        "Content-Type: application/protobuf\\r\\nContent-Length: 1000000\\r\\n\\r\\n").encode()

async def slot(slow_header):
    global attempts
    while time.monotonic() < end:
        attempts += 1
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=context), 5)
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            await asyncio.sleep(0.5)
            continue
        try:
            if not slow_header:
                writer.write(BODY)
            for byte in (BODY if slow_header else b"x" * 1000000):
                if time.monotonic() > end or reader.at_eof():
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(1)
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.close()
        await asyncio.sleep(0.5)

async def main():
    await asyncio.gather(*(slot(i % 2 == 1) for i in range(2 * slots)))

asyncio.run(main())
print(json.dumps({"attempts": attempts}))
"""


def held_connections(port: str, attacker: str, flood: subprocess.Popen) -> list[int]:
    """Sampled twice a second while `flood` runs: the TCP connections from `attacker` that nginx
    has accepted on `port` and holds (owned by an nginx process; one the kernel has queued but
    nginx not yet accepted has no owner). Filled by a thread."""
    counts: list[int] = []

    def sample() -> None:
        while flood.poll() is None:
            listed = subprocess.run(
                ["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
                capture_output=True,
                text=True,
            ).stdout
            counts.append(
                sum(
                    line.split()[3].startswith(f"{attacker}:") and '"nginx"' in line
                    for line in listed.splitlines()
                )
            )
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    return counts


def test_a_flood_of_slow_bodies_and_headers_from_one_address_does_not_stop_a_round(
    stranger_fleet, tmp_path
):
    """600 connections (300 slow bodies, 300 slow headers, one byte a second) from the attacker
    namespace for at most `flood_s` while a real round runs: the round completes with every
    device; after the flood, every device trains again within 60 s; a run that needs pi-4 too
    (registered, never started) names what the door refused."""
    hosts, config, path, _ = stranger_fleet
    flood_s = 75
    creds = credentials_for(load_config(path))
    ca = tmp_path / "attacker-ca.crt"
    shutil.copy(creds.ca_cert, ca)
    port = str(config["coordinator"]["port"])
    one_round = dict(config, federation={"rounds": 1, "min_devices": 3, "round_timeout_s": 60})
    (tmp_path / "one-round.yaml").write_text(yaml.safe_dump(one_round))
    short = dict(config, federation={"rounds": 1, "min_devices": 4, "round_timeout_s": 5})
    (tmp_path / "needs-pi-4.yaml").write_text(yaml.safe_dump(short))
    run = tmp_path / "run"
    flood = subprocess.Popen(
        [
            *("ip", "netns", "exec", hosts[3].name, sys.executable, "-c", FLOOD),
            *(COORDINATOR_IP, port, str(ca), "300", str(flood_s)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    held = held_connections(port, hosts[3].address, flood)
    try:
        time.sleep(10)  # the flood is on
        during = CliRunner().invoke(
            app, ["run", "--config", str(tmp_path / "one-round.yaml"), "--out", str(run)]
        )
        assert during.exit_code == 0, during.output
        failed = CliRunner().invoke(
            app,
            ["run", "--config", str(tmp_path / "needs-pi-4.yaml"), "--out", str(tmp_path / "x")],
        )
        assert failed.exit_code == 2, failed.output
        assert "only 3 of the 4 devices" in failed.output, failed.output
        assert "the front door logged" in failed.output, failed.output
        out, _ = flood.communicate(timeout=flood_s + 60)
    finally:
        if flood.poll() is None:
            os.killpg(flood.pid, 9)
            flood.wait()
    stopped = time.monotonic()
    figures = json.loads(out.strip().splitlines()[-1])
    first = json.loads((run / "rounds" / "001" / "round.json").read_text())
    assert sorted(first["devices"]) == ["pi-1", "pi-2", "pi-3"], first
    after = CliRunner().invoke(app, ["run", "--resume", str(run), "--rounds", "2"])
    assert after.exit_code == 0, after.output
    second = json.loads((run / "rounds" / "002" / "round.json").read_text())
    assert sorted(second["devices"]) == ["pi-1", "pi-2", "pi-3"], second
    again_s = time.monotonic() - stopped
    assert again_s <= 60
    said = " ".join(failed.output.split())
    for line in (
        f"flood: 600 connection slots for {flood_s} s, {figures['attempts']} attempts, "
        f"connections nginx held from the attacker: median {statistics.median(held):.0f}, "
        f"at most {max(held)} ({len(held)} samples of ss, twice a second)",
        f"round during the flood: {first['duration_s']:.1f} s, devices "
        f"{', '.join(sorted(first['devices']))}; the round after it: {second['duration_s']:.1f} s",
        f"every device trained again {again_s:.0f} s after the flood",
        f"a run short of devices: {said[said.find('only') :][:220]}",
    ):
        print(f"FLOOD {line}")
    # the door's share for one address: 16 (one over it is accepted, then closed at once)
    assert 0 < statistics.median(held) <= 16 and sum(n > 16 for n in held) <= len(held) / 10
