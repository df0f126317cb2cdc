"""Services on this machine's loopback, for tests and benchmarks: a whole Flower deployment
(SuperLink with TLS and node authentication behind the nginx front door, one SuperNode per
device), Prometheus and the Pushgateway.

Every process starts in its own process group and is stopped by it (Flower's services start
children of their own), also when the block that used it fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Collection, Iterator
from pathlib import Path

from skip2fleet.server.operations.certs import credentials_for
from skip2fleet.server.operations.frontdoor import (
    nginx_command,
    run_folder,
    write_nginx_config,
)
from skip2fleet.server.operations.superlink import (
    flower_env,
    register_nodes,
    superlink_command,
    write_connection,
)
from skip2fleet.shared.config import FleetConfig
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.services import supernode_command

STARTUP_TIMEOUT_S = 60
FIXED_PORTS_FROM = 20000  # above the well-known and most registered services' ports
_turns = itertools.count(random.randrange(1 << 16))


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range: a port from inside it can be taken
    by any outgoing connection (or a client connecting to itself) between this call and the bind,
    or while the service that holds it restarts. Ports are handed out in turn, so one process
    never gets the same port twice before its service has bound it."""
    low = ephemeral_ports()[0]
    span = low - FIXED_PORTS_FROM
    for _ in range(min(span, 256)):
        port = FIXED_PORTS_FROM + next(_turns) % span
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", port))
            return port
    with socket.socket() as sock:  # no room below the ephemeral range
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ephemeral_ports(
    table: Path = Path("/proc/sys/net/ipv4/ip_local_port_range"),
) -> tuple[int, int]:
    try:
        low, high = (int(word) for word in table.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


class Processes:
    """Processes started in their own groups, logged to a folder, stopped by group."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, name: str, command: list[str], env: dict) -> subprocess.Popen:
        with (self.folder / f"{name}.log").open("w") as log:
            process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()

    def stop_all(self, grace_s: float = 15) -> None:
        for process in self.started.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in self.started.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
        for process in self.started.values():  # stragglers, and children of a leader that left
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def on_loopback(fleet: FleetConfig, state: Path) -> FleetConfig:
    """The fleet with its coordinator on 127.0.0.1, a free port, and state under `state`."""
    coordinator = dataclasses.replace(
        fleet.coordinator,
        address="127.0.0.1",
        port=free_port(),
        superlink_port=free_port(),
        state_dir=str(state),
        tls=True,
    )
    return dataclasses.replace(fleet, coordinator=coordinator)


@contextlib.contextmanager
def loopback_deployment(
    fleet: FleetConfig, folder: Path, offline: Collection[str] = ()
) -> Iterator[Processes]:
    """Start the SuperLink and its front door, register every device and start its SuperNode
    (through the front door, as on a real fleet), except those named in `offline`: registered,
    but left for the caller to start; stop all on exit."""
    creds = credentials_for(fleet)
    processes = Processes(folder / "logs")
    names = [d.name for d in fleet.devices]
    try:
        start_superlink(processes, fleet)
        start_frontdoor(processes, fleet, folder / "frontdoor")
        write_connection(fleet, creds)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:  # the Control API answers once the SuperLink is up
            try:
                register_nodes(fleet, creds, names)
                break
            except FleetError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        for device in fleet.devices:
            if device.name not in offline:
                start_supernode(processes, fleet, folder, device.name)
        yield processes
    finally:
        processes.stop_all()


def start_frontdoor(
    processes: Processes, fleet: FleetConfig, folder: Path, name: str = "frontdoor"
) -> subprocess.Popen:
    """nginx with the front door's configuration in `folder`, its logs where `fleet deploy`
    puts them (the ServerApp reads them to say why devices are missing)."""
    run_folder(fleet).mkdir(parents=True, exist_ok=True)
    config = write_nginx_config(fleet, credentials_for(fleet), folder)
    return processes.start(name, nginx_command(fleet, config), flower_env(fleet))


def start_superlink(processes: Processes, fleet: FleetConfig, name: str = "superlink") -> None:
    """The SuperLink (on loopback, behind the front door) with its database in the fleet's state
    folder (a restart with the same database keeps the registered nodes)."""
    command = superlink_command(fleet, credentials_for(fleet))
    processes.start(name, command, flower_env(fleet))


def start_supernode(
    processes: Processes,
    fleet: FleetConfig,
    folder: Path,
    device: str,
    name: str | None = None,
    env: dict | None = None,
) -> subprocess.Popen:
    """`device`'s SuperNode, its state under `folder/devices/<device>` (the same on a restart),
    in `env` (default: Flower's environment for the fleet)."""
    creds = credentials_for(fleet)
    data = next(d for d in fleet.devices if d.name == device).data
    command = supernode_command(
        f"127.0.0.1:{fleet.coordinator.port}",
        device,
        folder / "devices" / device,
        free_port(),
        creds.ca_cert,
        creds.node_key(device),
        Path(data.data_dir) if data.data_dir else None,
    )
    return processes.start(name or device, command, env or flower_env(fleet))


def start_prometheus(processes: Processes, config_dir: Path, port: int) -> None:
    """Debian's Prometheus on loopback with `config_dir/prometheus.yml`, its data beside it."""
    processes.start(
        "prometheus",
        [
            "prometheus",
            f"--config.file={config_dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={config_dir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
        ],
        dict(os.environ),
    )


def start_pushgateway(processes: Processes, port: int) -> None:
    """Debian's Pushgateway on loopback; its persistence file beside the logs keeps the pushed
    rounds across a restart."""
    processes.start(
        "pushgateway",
        [
            "prometheus-pushgateway",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--persistence.file={processes.folder / 'pushgateway.metrics'}",
        ],
        dict(os.environ),
    )


def prometheus_query(port: int, expr: str) -> list[dict]:
    """The result vector of an instant query."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as response:
        answer = json.load(response)
    if answer.get("status") != "success":
        raise FleetError(f"Prometheus refused {expr!r}: {answer.get('error')}")
    return answer["data"]["result"]


def wait_for(check, timeout: float, what: str, every: float = 0.2):
    """Poll `check()` until it returns something truthy; its value."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except (OSError, FleetError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise FleetError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
