"""`fleet simulate`: the whole fleet on this machine, on Flower's Simulation Engine.

Each device of fleet.yaml becomes a simulated SuperNode (its partition id is its index); the
ServerApp runs in this process and prints a row per round as it completes. The base model is
pretrained first, on the coordinator's source data, exactly as for a real run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from skip2fleet.server import options as opt
from skip2fleet.server.federation.report import federated_report, print_round, print_round_header
from skip2fleet.server.federation.runs import RunFolder
from skip2fleet.server.federation.serverapp import make_server_app
from skip2fleet.server.progress import stderr
from skip2fleet.server.training.pretraining import fleet_base
from skip2fleet.shared import model as base_model
from skip2fleet.shared.adapters import packed_size
from skip2fleet.shared.atomic import write_text_atomic
from skip2fleet.shared.config import (
    as_yaml_dict,
)
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.methods import get_method
from skip2fleet.shared.records import model_record, vector_record, wire_bytes
from skip2fleet.shared.services import CLIENTAPP, load_component


def simulate_command(
    config: opt.FleetFile = None,
    devices: opt.DeviceCount = None,
    rounds: Annotated[int | None, typer.Option(min=1, help="Federated rounds.")] = None,
    dataset: opt.DatasetOverride = None,
    model: opt.ModelOverride = None,
    data_dir: opt.DataDir = None,
    aggregation: Annotated[str | None, typer.Option(help="none, fedavg or svd.")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Run folder (default runs/simulate-<time>).")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue this run folder after its last completed round."),
    ] = None,
    json_out: opt.JsonOut = None,
) -> None:
    """Run the fleet's federated rounds on this machine, one simulated device per entry."""
    if resume is not None:
        folder = RunFolder(resume).resume(rounds)
    else:
        fleet = opt.resolve_fleet(config, devices, rounds, dataset, data_dir, aggregation, model)
        out = out or Path("runs") / time.strftime("simulate-%Y%m%d-%H%M%S")
        folder = RunFolder.create(out, as_yaml_dict(fleet), fleet_base(fleet))
    fleet, base = folder.config(), folder.base()
    task = fleet.task
    stderr.print(
        f"simulating {len(fleet.devices)} devices x {fleet.federation.rounds} rounds "
        f"({task.label}, {fleet.training.method}, aggregation {fleet.federation.aggregation}) "
        f"in {folder.path}"
    )
    print_round_header()
    for number in folder.completed_rounds():
        print_round(folder.round_result(number))
    started = time.monotonic()
    run_simulation(folder, len(fleet.devices))
    wall = time.monotonic() - started
    rounds_done = [folder.round_result(n) for n in folder.completed_rounds()]
    if len(rounds_done) < fleet.federation.rounds:
        raise FleetError(
            f"the simulation ended after {len(rounds_done)} of "
            f"{fleet.federation.rounds} rounds; see the log above"
        )
    spec = base_model.spec_of(base)
    rank = fleet.training.rank
    summary = {
        "dataset": task.label,
        "method": fleet.training.method,
        "aggregation": fleet.federation.aggregation,
        "devices": len(fleet.devices),
        "wall_s": wall,
        "full_model_bytes": wire_bytes(model_record(base)),
        "adapter_bytes": wire_bytes(
            vector_record(np.zeros(packed_size(get_method(fleet.training.method), spec, rank)))
        ),
        "rounds": rounds_done,
    }
    markdown, chart = federated_report(summary)
    chart(folder.path / "report.png")
    write_text_atomic(folder.path / "report.md", markdown)
    write_text_atomic(folder.path / "result.json", json.dumps(summary, indent=2) + "\n")
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(summary, indent=2) + "\n")
    typer.echo(markdown)
    typer.echo(f"wall {wall:.1f} s; report in {folder.path}/report.md and report.png")


class _NotDeprecation(logging.Filter):
    """Flower 1.41 calls `run_simulation` deprecated in favour of `flwr run`, which starts a
    detached local SuperLink that outlives the command; in-process, nothing is left running."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in record.getMessage()


def run_simulation(
    folder: RunFolder, devices: int, on_round: Callable[[dict], None] = print_round
) -> None:
    """Flower's Simulation Engine (Ray) with the ServerApp in this process.

    Ray rewrites this process's PYTHONPATH for its workers (with an empty entry, which means
    the working directory); it is put back afterwards, so that no later subprocess of ours
    imports whatever lies in the working directory."""
    from flwr.simulation import run_simulation as flower_simulation

    logging.getLogger("flwr").addFilter(_NotDeprecation())
    pythonpath = os.environ.get("PYTHONPATH")
    try:
        flower_simulation(
            server_app=make_server_app(folder.path, on_round=on_round),
            client_app=load_component(CLIENTAPP),
            num_supernodes=devices,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
    finally:
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath
