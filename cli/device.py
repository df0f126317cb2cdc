"""The device's commands: what `fleet` builds for `fleet predict`, `fleet rollback` and
`fleet serve`, from `skip2fleet.client` and `skip2fleet.shared` alone (see `cli/__init__.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from skip2fleet.cli.conventions import fleet_app
from skip2fleet.client.predict import DEFAULT_STATE_DIR, StateDir, predict_command, rollback_here

commands = typer.Typer()  # the device's commands, in `app` here and in cli/fleet.py's
commands.command("predict")(predict_command)


@commands.command("rollback")
def rollback(
    round_: Annotated[
        int | None,
        typer.Option(
            "--round",
            min=1,
            help="The round whose adapters to use (default: the version before the active one).",
        ),
    ] = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    device: Annotated[
        str | None,
        typer.Option(help="On the coordinator: the device to roll back, over SSH."),
    ] = None,
    config: Annotated[
        Path, typer.Option(help="On the coordinator: the fleet file naming the device.")
    ] = Path("fleet.yaml"),
    ssh_key: Annotated[
        Path | None, typer.Option(help="On the coordinator: the SSH key for the device.")
    ] = None,
) -> None:
    """Make an earlier version of a device's adapters active (on the device, or --device NAME
    from the coordinator); `fleet predict` uses it from then on."""
    if device is None:
        typer.echo(rollback_here(state_dir, round_))
        return
    # The coordinator's way in: it loads the coordinator's side, which a device never takes.
    from skip2fleet.server.operations.rollback import remote_rollback
    from skip2fleet.shared.config import load_config

    typer.echo(remote_rollback(load_config(config), device, round_, ssh_key))


app = fleet_app("skip2fleet on a device: its active model at work, and choosing it.")
app.add_typer(commands)
