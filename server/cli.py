"""The coordinator's `fleet` commands. Only wiring lives here; the work is in the modules it calls.

`fleet` itself is `skip2fleet.cli`: it adds the device's commands and runs a device's without
loading this side."""

from __future__ import annotations

import typer

from skip2fleet.server.bench import (
    byzantine,
    coordinator,
    device,
    federated,
    methods,
    monitoring,
    peft,
    round,
    series,
    tune,
)
from skip2fleet.server.data import check_command, import_hapt_command
from skip2fleet.server.federation.run import run_command
from skip2fleet.server.federation.simulate import simulate_command
from skip2fleet.server.operations import schedule
from skip2fleet.server.operations.deploy import deploy_command
from skip2fleet.server.operations.devices import agent_command
from skip2fleet.server.operations.monitoring import config_command
from skip2fleet.server.operations.status import status_command
from skip2fleet.server.operations.superlink import certs_command
from skip2fleet.server.training.finetune import finetune_command
from skip2fleet.server.training.pretraining import pretrain_command

app = typer.Typer()  # merged into `fleet` by cli/fleet.py, which sets its help and rules
bench_app = typer.Typer(no_args_is_help=True, help="Measure the methods, rounds and monitoring.")
bench_app.command("timing")(methods.timing_command)
bench_app.command("accuracy")(methods.accuracy_command)
bench_app.command("peft")(peft.peft_command)
bench_app.command("tune")(tune.tune_command)
bench_app.command("round")(round.round_command)
bench_app.command("federated")(federated.federated_command)
bench_app.command("monitor")(monitoring.monitor_command)
bench_app.command("device")(device.device_command)
bench_app.command("byzantine")(byzantine.byzantine_command)
bench_app.command("series")(series.series_command)
bench_app.command("coordinator")(coordinator.coordinator_command)
monitor_app = typer.Typer(no_args_is_help=True, help="Prometheus and Grafana for the fleet.")
monitor_app.command("config")(config_command)
data_app = typer.Typer(no_args_is_help=True, help="Prepare data sets, check your own samples.")
data_app.command("import-hapt")(import_hapt_command)
data_app.command("check")(check_command)

schedule_app = typer.Typer(
    no_args_is_help=True, help="Rounds by themselves, at the times federation.schedule names."
)
schedule_app.command("run")(schedule.run_command)
schedule_app.command("wait")(schedule.wait_command)

app.add_typer(bench_app, name="bench")
app.add_typer(schedule_app, name="schedule")
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
