"""`fleet run` and `fleet certs`: federated rounds on a real Flower deployment.

The SuperLink and the SuperNodes are long-lived services (`fleet deploy` starts them); `fleet run`
submits one Flower run through the Control API and follows it: it prints a row per round as the
ServerApp writes it to the run folder, and ends when Flower reports the run finished, naming the
reason when it failed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from server.certs import Credentials, ensure_credentials
from server.pretraining import fleet_base
from server.progress import stderr
from server.report import print_round
from server.runs import RunFolder
from server.superlink import (
    CONNECTION,
    flwr,
    register_nodes,
    registered_nodes,
    state_dir,
    write_app,
    write_connection,
)
from shared import model as base_model
from shared.config import FleetConfig, as_yaml_dict, load_config
from shared.errors import FleetError

ConfigPath = Annotated[Path, typer.Option("--config", help="The fleet file.")]
POLL_S = 1.0
STATUS_EVERY_S = 3.0


def credentials_for(fleet: FleetConfig) -> Credentials:
    """The fleet's CA, SuperLink certificate and node keys (created once, in the state folder)."""
    addresses = sorted({fleet.coordinator.address, "127.0.0.1", "localhost"})
    return ensure_credentials(
        state_dir(fleet) / "credentials", addresses, [d.name for d in fleet.devices]
    )


def certs_command(
    config: ConfigPath = Path("fleet.yaml"),
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


def start_run(fleet: FleetConfig, folder: RunFolder, clientapp: str = "client.app:app") -> str:
    """Submit the run folder's rounds to the SuperLink; returns Flower's run id."""
    write_connection(fleet, credentials_for(fleet))
    app_dir = write_app(fleet, clientapp)
    answer = flwr(
        fleet, "run", str(app_dir), CONNECTION, "--run-config", f"run-dir='{folder.path}'"
    )
    return str(answer["run-id"])


def run_status(fleet: FleetConfig, run_id: str) -> tuple[str, str]:
    run = flwr(fleet, "ls", CONNECTION, "--run-id", run_id)["runs"][0]
    return str(run["status"]), str(run.get("status-details", ""))


def follow(fleet: FleetConfig, folder: RunFolder, run_id: str) -> None:
    """Print each round as it completes; return when the run completes, raise if it fails."""
    printed = set(folder.completed_rounds())
    remaining = fleet.federation.rounds - len(printed)
    deadline = time.monotonic() + remaining * (fleet.federation.round_timeout_s + 30) + 120
    status, details, next_status = "pending", "", 0.0
    while True:
        for number in folder.completed_rounds():
            if number not in printed:
                print_round(folder.round_result(number))
                printed.add(number)
        if status.startswith("finished"):
            break
        if time.monotonic() >= next_status:
            status, details = run_status(fleet, run_id)
            next_status = time.monotonic() + STATUS_EVERY_S
            continue  # print the rounds written meanwhile before leaving
        if time.monotonic() > deadline:
            raise FleetError(
                f"run {run_id} still {status} after its rounds' time; see "
                f"`flwr ls` and the SuperLink log"
            )
        time.sleep(POLL_S)
    if status != "finished:completed" or len(printed) < fleet.federation.rounds:
        reason = folder.failure() or details or "see the SuperLink log"
        raise FleetError(
            f"run {run_id} {status} after {len(printed)} of "
            f"{fleet.federation.rounds} rounds: {reason}"
        )


def run_command(
    config: ConfigPath = Path("fleet.yaml"),
    base: Annotated[
        Path | None, typer.Option(help="Base model (.npz); default: pretrain one now.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/run-<time>).")] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue this run folder after its last complete round.")
    ] = None,
    rounds: Annotated[int | None, typer.Option(min=1, help="Total rounds (with --resume).")] = None,
) -> None:
    """Run the fleet's federated rounds on its SuperLink and SuperNodes (TLS, node auth)."""
    if resume is not None:
        folder = RunFolder(resume).extend(rounds)
        fleet = folder.config()
    else:
        fleet = load_config(config)
        model = base_model.load(base) if base is not None else fleet_base(fleet)
        folder = RunFolder.create(
            out or Path("runs") / time.strftime("run-%Y%m%d-%H%M%S"), as_yaml_dict(fleet), model
        )
    address = f"{fleet.coordinator.address}:{fleet.coordinator.port}"
    stderr.print(
        f"submitting {fleet.federation.rounds} rounds to the SuperLink at {address}; "
        f"run folder {folder.path}"
    )
    typer.echo("round  duration   devices  accuracy before -> after  train batch  uplink/device")
    run_id = start_run(fleet, folder)
    follow(fleet, folder, run_id)
    typer.echo(f"run {run_id} completed; rounds in {folder.path}/rounds")
