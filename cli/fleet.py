"""Every `fleet` command, the coordinator's (`server/cli.py`) with the device's (`cli/device.py`):
what `fleet --help` lists and every command but the device's runs in."""

from __future__ import annotations

from skip2fleet.cli.conventions import fleet_app
from skip2fleet.cli.device import commands as device_commands
from skip2fleet.cli.model import app as model_commands
from skip2fleet.client.serving.bench import bench_command as serve_bench
from skip2fleet.server.cli import app as coordinator_commands
from skip2fleet.server.cli import bench_app

# The service's bench measures the device's own code, which the coordinator's side never imports.
bench_app.command("serve")(serve_bench)

app = fleet_app("skip2fleet: fine-tune small models on fleets of edge devices with Skip2-LoRA.")
app.add_typer(coordinator_commands)
app.add_typer(device_commands)
app.add_typer(model_commands, name="model")
