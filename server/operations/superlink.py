"""The coordinator's side of a Flower deployment: the SuperLink, node registration, `flwr run`.

`fleet` keeps its own Flower home (`<state_dir>/flwr`, with one connection named `fleet`) and its
own minimal Flower app folder (`<state_dir>/app`, whose components are the installed
`skip2fleet.server.federation.serverapp:app` and `skip2fleet.client.clientapp:app`), so it neither
reads nor changes the user's `~/.flwr`, and `fleet run` works from an installed wheel as well as
from a checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Annotated

import typer

from skip2fleet.server import options as opt
from skip2fleet.server.operations.certs import Credentials, credentials_for
from skip2fleet.shared.atomic import write_text_atomic
from skip2fleet.shared.config import FleetConfig, load_config, state_dir
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.process import with_process_settings
from skip2fleet.shared.services import CLIENTAPP

CONNECTION = "fleet"
APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "skip2fleet-rounds"
version = "0.1.0"
description = "Federated Skip2-LoRA rounds of skip2fleet"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "skip2fleet"

[tool.flwr.app.components]
serverapp = "skip2fleet.server.federation.serverapp:app"
clientapp = "{clientapp}"

[tool.flwr.app.config]
run-dir = ""
"""


def flower_env(config: FleetConfig) -> dict[str, str]:
    """The environment for Flower commands and the services that run Flower (their ServerApps and
    ClientApps inherit it): fleet's own Flower home, no telemetry, the process settings."""
    return {
        **with_process_settings(os.environ),
        "FLWR_HOME": str(state_dir(config) / "flwr"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }


def write_connection(config: FleetConfig, creds: Credentials) -> None:
    """`[superlink.fleet]` in fleet's Flower home: the SuperLink on this machine's loopback (the
    Control API is not reachable from anywhere else)."""
    home = state_dir(config) / "flwr"
    home.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{config.coordinator.superlink_port}"
    security = (
        f'root-certificates = "{creds.ca_cert}"' if config.coordinator.tls else "insecure = true"
    )
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\n{security}\n'
    )


def write_app(config: FleetConfig, clientapp: str = CLIENTAPP) -> Path:
    """The Flower app folder that `flwr run` packages (components from the installed code)."""
    folder = state_dir(config) / "app" / clientapp.replace(":", "-").replace(".", "-")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT.format(clientapp=clientapp))
    return folder


def superlink_command(config: FleetConfig, creds: Credentials) -> list[str]:
    """The `flower-superlink` command line of the coordinator's service: on loopback only (the
    front door forwards the Fleet API to it), never installing a submitted app's dependencies."""
    command = [
        "flower-superlink",
        "--database",
        str(state_dir(config) / "superlink.db"),
        "--host",
        "127.0.0.1",
        "--port",
        str(config.coordinator.superlink_port),
        "--disable-runtime-dependency-installation",
    ]
    if config.coordinator.tls:
        command += [
            "--ssl-ca-certfile",
            str(creds.ca_cert),
            "--ssl-certfile",
            str(creds.server_cert),
            "--ssl-keyfile",
            str(creds.server_key),
            "--enable-supernode-auth",
        ]
    else:
        command.append("--insecure")
    return command


def flwr(config: FleetConfig, *args: str, timeout: float = 60) -> dict:
    """Run a `flwr` CLI command against the fleet's SuperLink; its JSON answer."""
    try:
        done = subprocess.run(
            ["flwr", *args, "--format", "json"],
            env=flower_env(config),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise FleetError(
            f"flwr {args[0]}: no answer from the SuperLink in {timeout:.0f} s"
        ) from None
    try:
        answer = json.loads(done.stdout[done.stdout.index("{") :])
    except ValueError:
        answer = {}
    if done.returncode != 0 or not answer.get("success", False):
        detail = answer.get("error-message") or (done.stderr or done.stdout).strip()[-400:]
        raise FleetError(f"flwr {' '.join(args[:2])} failed: {detail}")
    return answer


def registered_nodes(config: FleetConfig) -> dict[str, int]:
    """Device name -> node id, as far as fleet's registry remembers (see `register_nodes`)."""
    path = state_dir(config) / "nodes.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def register_nodes(config: FleetConfig, creds: Credentials, devices: list[str]) -> dict[str, int]:
    """Register the devices' node keys with the SuperLink; ones it already holds are kept.

    Flower's node list does not show names, so `<state_dir>/nodes.json` remembers which node id
    belongs to which device."""
    registry_path = state_dir(config) / "nodes.json"
    registry = registered_nodes(config)
    listed = {int(n["node-id"]) for n in flwr(config, "supernode", "list", CONNECTION)["nodes"]}
    for device in devices:
        if registry.get(device) in listed:
            continue
        answer = flwr(
            config,
            "supernode",
            "register",
            str(creds.node_public_key(device)),
            CONNECTION,
            "--name",
            device,
        )
        registry[device] = int(answer["node-id"])
        write_text_atomic(registry_path, json.dumps(registry, indent=2) + "\n")
    return {device: registry[device] for device in devices}


def certs_command(
    config: opt.ConfigPath = Path("fleet.yaml"),
    register: Annotated[
        bool, typer.Option(help="Also register the node keys with the running SuperLink.")
    ] = False,
) -> None:
    """Create the CA, the SuperLink's TLS certificate and a node key per device (once)."""
    fleet = load_config(config)
    creds = credentials_for(fleet)
    typer.echo(f"CA certificate      {creds.ca_cert}")
    typer.echo(f"SuperLink TLS       {creds.server_cert} / {creds.server_key}")
    for device in fleet.devices:
        typer.echo(f"node key {device.name:<10} {creds.node_key(device.name)}")
    if register:
        write_connection(fleet, creds)
        before = registered_nodes(fleet)
        ids = register_nodes(fleet, creds, [d.name for d in fleet.devices])
        new = [name for name in ids if name not in before]
        typer.echo(f"registered {len(new)} new node key(s){': ' + ', '.join(new) if new else ''}")
