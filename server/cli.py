"""`fleet`: the command line. Only wiring lives here; the work is in the modules it calls."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from skip2fleet.client.predict import DEFAULT_STATE_DIR, StateDir, predict_command, rollback_here
from skip2fleet.server.bench import device, federated, methods, monitoring, peft, round
from skip2fleet.server.data import check_command, import_hapt_command
from skip2fleet.server.federation.run import run_command
from skip2fleet.server.federation.simulate import simulate_command
from skip2fleet.server.federation.superlink import certs_command
from skip2fleet.server.operations.deploy import deploy_command
from skip2fleet.server.operations.devices import agent_command
from skip2fleet.server.operations.monitoring import config_command
from skip2fleet.server.operations.rollback import remote_rollback
from skip2fleet.server.operations.status import status_command
from skip2fleet.server.options import ConfigPath
from skip2fleet.server.progress import stderr
from skip2fleet.server.training.finetune import finetune_command
from skip2fleet.server.training.pretraining import pretrain_command
from skip2fleet.shared.config import load_config
from skip2fleet.shared.errors import FleetError


class _FleetGroup(TyperGroup):
    """Turns a `FleetError` anywhere below into one line on stderr and exit code 2."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except FleetError as exc:
            stderr.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_FleetGroup,
    no_args_is_help=True,
    add_completion=False,
    help="skip2fleet: fine-tune small models on fleets of edge devices with Skip2-LoRA.",
)
bench_app = typer.Typer(no_args_is_help=True, help="Measure the methods, rounds and monitoring.")
bench_app.command("timing")(methods.timing_command)
bench_app.command("accuracy")(methods.accuracy_command)
bench_app.command("peft")(peft.peft_command)
bench_app.command("round")(round.round_command)
bench_app.command("federated")(federated.federated_command)
bench_app.command("monitor")(monitoring.monitor_command)
bench_app.command("device")(device.device_command)
monitor_app = typer.Typer(no_args_is_help=True, help="Prometheus and Grafana for the fleet.")
monitor_app.command("config")(config_command)
data_app = typer.Typer(no_args_is_help=True, help="Prepare data sets, check your own samples.")
data_app.command("import-hapt")(import_hapt_command)
data_app.command("check")(check_command)

app.add_typer(bench_app, name="bench")
app.add_typer(monitor_app, name="monitor")
app.add_typer(data_app, name="data")
app.command("pretrain")(pretrain_command)
app.command("finetune")(finetune_command)
app.command("simulate")(simulate_command)
app.command("run")(run_command)
app.command("certs")(certs_command)
app.command("deploy")(deploy_command)
app.command("status")(status_command)
app.command("agent")(agent_command)
app.command("predict")(predict_command)


@app.command("rollback")
def rollback(
    device: Annotated[
        str | None, typer.Option(help="On the coordinator: the device to roll back, over SSH.")
    ] = None,
    round_: Annotated[
        int | None,
        typer.Option(
            "--round",
            min=1,
            help="The round whose adapters to use (default: the version before the active one).",
        ),
    ] = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    config: ConfigPath = Path("fleet.yaml"),
    ssh_key: Annotated[Path | None, typer.Option(help="SSH key for the device.")] = None,
) -> None:
    """Make an earlier version of a device's adapters active (on the device, or --device NAME
    from the coordinator); `fleet predict` uses it from then on."""
    if device is None:  # wiring only: the device's store here, or the device's command over SSH
        typer.echo(rollback_here(state_dir, round_))
    else:
        typer.echo(remote_rollback(load_config(config), device, round_, ssh_key))


if __name__ == "__main__":  # `python -m skip2fleet.server.cli`, as the coordinator role calls it
    app()
