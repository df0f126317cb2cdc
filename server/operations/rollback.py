"""`fleet rollback --device NAME` on the coordinator: the device's own `fleet rollback`, over SSH.

The coordinator holds no copy of a device's adapter versions (they live in the device's state
folder), so it asks the device: it logs in as the fleet's `ssh_user`, checking the host key
`fleet deploy` recorded, and runs the device's `fleet rollback` as the ClientApps' user, who owns
that folder.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from skip2fleet.server.operations.deploy import APP_USER, known_hosts
from skip2fleet.shared.config import FleetConfig
from skip2fleet.shared.errors import FleetError


def remote_rollback(fleet: FleetConfig, name: str, round_: int | None, ssh_key: Path | None) -> str:
    """Roll device `name` back; returns what the device said."""
    device = next((d for d in fleet.devices if d.name == name), None)
    if device is None:
        known = ", ".join(d.name for d in fleet.devices)
        raise FleetError(f"{fleet.source}: no device {name!r} (devices: {known})")
    options = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"]
    options += ["-o", f"UserKnownHostsFile={known_hosts(fleet)}"]
    options += ["-i", str(ssh_key)] if ssh_key else []
    remote = ["sudo", "-n", "-u", APP_USER, f"{device.install_dir}/venv/bin/fleet", "rollback"]
    remote += ["--state-dir", f"{device.install_dir}/state"]
    remote += ["--round", str(round_)] if round_ is not None else []
    try:
        done = subprocess.run(
            ["ssh", *options, f"{device.ssh_user}@{device.host}", *remote],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        raise FleetError(f"{name}: no answer over SSH within 120 s") from None
    if done.returncode != 0:
        said = done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}"
        raise FleetError(f"{name}: rollback failed: {said.splitlines()[-1]}")
    return done.stdout.strip()
