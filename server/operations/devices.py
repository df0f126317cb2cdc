"""Each device's own file, rendered from fleet.yaml, and `fleet agent`, which runs a device's agent
from fleet.yaml on this machine (tests, benches, a device managed by hand).

A device never gets the fleet file: fleet.yaml names the coordinator's folders (its state folder,
`task.data_dir` checked to exist where the fleet file is loaded), so a device loading it would fail
wherever those folders are missing, which is every real board. It gets `device.json`
(`shared/devicefile.py`) with its own name, paths, ports and probe.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from skip2fleet.server.operations.certs import fleet_credentials
from skip2fleet.shared.atomic import write_text_atomic
from skip2fleet.shared.config import Device, FleetConfig, load_config
from skip2fleet.shared.devicefile import DEVICE_FILE, DeviceSettings
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.services import agent_command as agent_argv

SUPERNODE_PORT = 9094  # a device's SuperNode's ClientAppIo port (Flower's default)


def data_folder(fleet: FleetConfig, device: Device) -> str | None:
    """The device's data folder, on the device: its own, else the task's (the same path there)."""
    return device.data.data_dir or fleet.task.data_dir


def device_settings(
    fleet: FleetConfig,
    device: Device,
    state: Path,
    agent_address: str | None = None,
    ca_cert: Path | None = None,
) -> DeviceSettings:
    """`device`'s own file, its state folder at `state`; the agent serves on `agent_address`
    (default: the device's host, where the coordinator's Prometheus scrapes it) and checks its
    clock against the front door with the CA certificate at `ca_cert` (on the device)."""
    return DeviceSettings(
        name=device.name,
        state_dir=str(state),
        data_dir=data_folder(fleet, device),
        samples=device.data.path,
        probe=device.probe,
        idle_watts=device.idle_watts,
        full_watts=device.full_watts,
        agent_address=agent_address or device.host,
        agent_port=device.agent_port,
        supernode_port=SUPERNODE_PORT,
        coordinator=f"{fleet.coordinator.address}:{fleet.coordinator.port}",
        ca_cert=str(ca_cert) if ca_cert is not None and fleet.coordinator.tls else None,
    )


def agent_command(
    device: Annotated[str, typer.Option(help="This device's name in the fleet file.")],
    config: Annotated[Path, typer.Option(help="The fleet file.")] = Path("fleet.yaml"),
    state_dir: Annotated[
        Path, typer.Option(help="The ClientApp's state folder (its SuperNode's state-dir).")
    ] = Path("~/.skip2fleet/device"),
    address: Annotated[str, typer.Option(help="Address to serve on.")] = "0.0.0.0",
    port: Annotated[
        int | None, typer.Option(help="Port (default: the device's agent_port).")
    ] = None,
    hz: Annotated[float, typer.Option(min=0.1, help="Power samples per second.")] = 10.0,
    sys_root: Annotated[
        Path, typer.Option(help="Where sysfs is (tests use a fixture tree).")
    ] = Path("/sys"),
    proc_root: Annotated[Path, typer.Option(help="Where procfs is.")] = Path("/proc"),
) -> None:
    """Export a device's power, energy, temperature, CPU, memory and last fine-tune: writes the
    device's own file into its state folder and becomes the agent a deployed device runs."""
    fleet = load_config(config)
    entry = next((d for d in fleet.devices if d.name == device), None)
    if entry is None:
        raise FleetError(
            f"{config}: no device {device!r} ({', '.join(d.name for d in fleet.devices)})"
        )
    ca_cert = fleet_credentials(fleet).ca_cert
    settings = device_settings(
        fleet, entry, state_dir.expanduser(), address, ca_cert if ca_cert.is_file() else None
    )
    if port is not None:
        settings = dataclasses.replace(settings, agent_port=port)
    state = Path(settings.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    own = write_text_atomic(state / DEVICE_FILE, settings.text())
    argv = [*agent_argv(Path(sys.executable), own), "--hz", str(hz)]
    argv += ["--sys-root", str(sys_root), "--proc-root", str(proc_root)]
    os.execv(argv[0], argv)
