"""`fleet simulate`: the whole fleet on this machine, on Flower's Simulation Engine.

Each device of fleet.yaml becomes a simulated SuperNode (its partition id is its index); the
ServerApp runs in this process and prints a row per round as it completes. The base model is
pretrained first, on the coordinator's source data, exactly as for a real run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from server import options as opt
from server.app import make_server_app
from server.pretraining import fleet_base
from server.progress import stderr
from server.report import federated_report, print_round
from server.runs import RunFolder
from shared import model as base_model
from shared.adapters import packed_size
from shared.atomic import write_text_atomic
from shared.config import Device, DeviceData, FleetConfig, as_yaml_dict, load_config, parse_config
from shared.datasets.federated import default_partitions
from shared.errors import FleetError
from shared.methods import get_method
from shared.records import model_record, vector_record, wire_bytes

DEFAULT_CONFIG = Path("fleet.yaml")


def resolve_fleet(
    config_path: Path | None,
    devices: int | None,
    rounds: int | None,
    dataset: str | None,
    data_dir: Path | None,
    aggregation: str | None,
) -> FleetConfig:
    """fleet.yaml (or the defaults) with the command line's overrides, validated again."""
    path = config_path or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    config = load_config(path) if path else parse_config({}, "defaults")
    data = as_yaml_dict(config)
    if rounds is not None:
        data["federation"]["rounds"] = rounds
    if aggregation is not None:
        data["federation"]["aggregation"] = aggregation
    if data_dir is not None:
        data["task"]["data_dir"] = str(data_dir)
    if dataset is not None:
        data["task"]["dataset"] = dataset
    if devices is not None or dataset is not None or not config.devices:
        count = devices or max(len(config.devices), 3)
        partitions = default_partitions(data["task"]["dataset"], count, config.task.subjects)
        data["devices"] = [
            dataclasses.asdict(Device(f"sim-{i + 1}", data=DeviceData(partition)))
            for i, partition in enumerate(partitions)
        ]
        data["federation"]["min_devices"] = min(data["federation"]["min_devices"], count)
    return parse_config(data, str(path or "defaults"))


def simulate_command(
    config: opt.FleetFile = None,
    devices: opt.DeviceCount = None,
    rounds: Annotated[int | None, typer.Option(min=1, help="Federated rounds.")] = None,
    dataset: opt.DatasetOverride = None,
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
        folder = RunFolder(resume).extend(rounds)
    else:
        fleet = resolve_fleet(config, devices, rounds, dataset, data_dir, aggregation)
        out = out or Path("runs") / time.strftime("simulate-%Y%m%d-%H%M%S")
        folder = RunFolder.create(out, as_yaml_dict(fleet), fleet_base(fleet))
    fleet, base = folder.config(), folder.base()
    task = fleet.task
    stderr.print(
        f"simulating {len(fleet.devices)} devices x {fleet.federation.rounds} rounds "
        f"({task.dataset}, {fleet.training.method}, aggregation {fleet.federation.aggregation}) "
        f"in {folder.path}"
    )
    typer.echo("round  duration   devices  accuracy before -> after  train batch  uplink/device")
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
    dims = base_model.dims(base)
    rank = fleet.training.rank
    summary = {
        "dataset": task.dataset,
        "method": fleet.training.method,
        "aggregation": fleet.federation.aggregation,
        "devices": len(fleet.devices),
        "wall_s": wall,
        "full_model_bytes": wire_bytes(model_record(base)),
        "adapter_bytes": wire_bytes(
            vector_record(np.zeros(packed_size(get_method(fleet.training.method), dims, rank)))
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
    """Flower's Simulation Engine (Ray) with the ServerApp in this process."""
    from flwr.simulation import run_simulation as flower_simulation

    from client.app import app as client_app

    logging.getLogger("flwr").addFilter(_NotDeprecation())
    flower_simulation(
        server_app=make_server_app(folder.path, on_round=on_round),
        client_app=client_app,
        num_supernodes=devices,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
