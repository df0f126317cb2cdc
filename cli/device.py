"""The device's commands: what `fleet` builds for `fleet predict`, `fleet rollback` and
`fleet serve`, from `skip2fleet.client` and `skip2fleet.shared` alone (see `cli/__init__.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from skip2fleet.cli.conventions import fleet_app
from skip2fleet.client.predict import (
    DEFAULT_STATE_DIR,
    StateDir,
    existing_state_dir,
    predict_command,
    rollback_here,
)

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


@commands.command("serve")
def serve(
    state_dir: StateDir = DEFAULT_STATE_DIR,
    socket: Annotated[
        Path | None,
        typer.Option(help="The Unix socket for JSON lines (default: STATE_DIR/serve.sock)."),
    ] = None,
    spool: Annotated[
        Path | None,
        typer.Option(
            help="The folder sensors drop .npz/.csv files into (default: STATE_DIR/spool)."
        ),
    ] = None,
    keep: Annotated[
        bool, typer.Option(help="Move answered spool files to done/ (--no-keep: delete them).")
    ] = True,
    log_max_mb: Annotated[
        float, typer.Option(min=0.01, help="Cap of the prediction log and its one rotated copy.")
    ] = 10.0,
) -> None:
    """Classify what the device's sensors send, all the time, with its active model: JSON lines
    on a Unix socket, files in a spool folder; every prediction in a bounded log and the agent's
    metrics; follows rounds and rollbacks within a second. Stops on SIGTERM."""
    from skip2fleet.client.serving.service import ServeSettings, run_service

    root = existing_state_dir(state_dir)
    run_service(
        ServeSettings(
            state_dir=root,
            socket=socket or root / "serve.sock",
            spool=spool or root / "spool",
            keep=keep,
            log_max_bytes=int(log_max_mb * (1 << 20)),
        )
    )


app = fleet_app("skip2fleet on a device: its active model at work, and choosing it.")
app.add_typer(commands)
