"""`fleet simulate`: the whole fleet on this machine, on Flower's Simulation Engine.

Each device of fleet.yaml becomes a simulated SuperNode (its partition id is its index); the
ServerApp runs in this process and prints a row per round as it completes. The base model is
pretrained first, on the coordinator's source data, exactly as for a real run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from skip2fleet.server import options as opt
from skip2fleet.server.federation.exchange import STOP
from skip2fleet.server.federation.report import (
    SHOWN,
    federated_report,
    print_round,
    print_round_header,
)
from skip2fleet.server.federation.runs import RunFolder
from skip2fleet.server.federation.serverapp import make_server_app
from skip2fleet.server.progress import stderr
from skip2fleet.server.training.pretraining import fleet_base
from skip2fleet.shared import model as base_model
from skip2fleet.shared.atomic import write_text_atomic
from skip2fleet.shared.config import (
    as_yaml_dict,
)
from skip2fleet.shared.errors import FleetError, Interrupted
from skip2fleet.shared.layout import layout
from skip2fleet.shared.methods import get_method
from skip2fleet.shared.records import adapters_record, model_record, wire_bytes
from skip2fleet.shared.services import CLIENTAPP, load_component

Rounds = Annotated[int | None, typer.Option(min=1, help="Federated rounds.")]
Aggregation = Annotated[str | None, typer.Option(help="none, fedavg, svd, median or trimmed-mean.")]


def simulate_command(
    config: opt.FleetFile = None,
    devices: opt.DeviceCount = None,
    rounds: Rounds = None,
    dataset: opt.DatasetOverride = None,
    model: opt.ModelOverride = None,
    cache: opt.CacheOverride = None,
    data_dir: opt.DataDir = None,
    aggregation: Aggregation = None,
    out: opt.RunOut = None,
    resume: opt.Resume = None,
    json_out: opt.JsonOut = None,
    base: opt.BaseFile = None,
) -> None:
    """Run the fleet's federated rounds on this machine, one simulated device per entry."""
    if resume is not None:
        folder = RunFolder(resume).resume(rounds)
    else:
        fleet = opt.resolve_fleet(
            config, devices, rounds, dataset, data_dir, aggregation, model, cache
        )
        out = out or Path("runs") / time.strftime("simulate-%Y%m%d-%H%M%S")
        folder = RunFolder.create(out, as_yaml_dict(fleet), fleet_base(fleet, base))
    wall = simulate_rounds(folder)
    summary = run_summary(folder, wall)
    markdown, chart = federated_report(summary)
    chart(folder.path / "report.png")
    write_text_atomic(folder.path / "report.md", markdown)
    shown, _ = federated_report(summary, shown=SHOWN)
    for path in (folder.path / "result.json", json_out):
        if path is not None:
            write_text_atomic(path, json.dumps(summary, indent=2) + "\n")
    typer.echo(shown)
    typer.echo(f"wall {wall:.1f} s; report in {folder.path}/report.md and report.png")


def simulate_rounds(folder: RunFolder) -> float:
    """The run folder's remaining rounds, a row printed per round (the completed ones first);
    the seconds they took. Ctrl-C says how to resume; rounds missing at the end are an error."""
    fleet = folder.config()
    stderr.print(
        f"simulating {len(fleet.devices)} devices x {fleet.federation.rounds} rounds "
        f"({fleet.data_label}, {fleet.training.method}, aggregation "
        f"{fleet.federation.aggregation}) in {folder.path}"
    )
    print_round_header()
    for number in folder.completed_rounds():
        print_round(folder.round_result(number))
    started = time.monotonic()
    try:
        run_simulation(folder, len(fleet.devices))
    except Interrupted:
        raise Interrupted(
            f"interrupted; resume with `fleet simulate --resume {folder.path}`"
        ) from None
    done = len(folder.completed_rounds())
    if done < fleet.federation.rounds:
        raise FleetError(
            f"the simulation ended after {done} of {fleet.federation.rounds} rounds; "
            "see the log above"
        )
    return time.monotonic() - started


def run_summary(folder: RunFolder, wall: float) -> dict:
    """What the run's report shows: the fleet, the bytes of a model and of adapters, the rounds."""
    fleet, base = folder.config(), folder.base()
    method, rank = get_method(fleet.training.method), fleet.training.rank
    size = layout(method, base_model.spec_of(base), rank).size
    return {
        "dataset": fleet.data_label,
        "method": fleet.training.method,
        "aggregation": fleet.federation.aggregation,
        "devices": len(fleet.devices),
        "wall_s": wall,
        "full_model_bytes": wire_bytes(model_record(base)),
        "adapter_bytes": wire_bytes(adapters_record(np.zeros(size), size)),
        "rounds": [folder.round_result(n) for n in folder.completed_rounds()],
    }


class _NotDeprecation(logging.Filter):
    """Flower 1.41 calls `run_simulation` deprecated in favour of `flwr run`, which starts a
    detached local SuperLink that outlives the command; in-process, nothing is left running."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in record.getMessage()


@contextmanager
def _ray_folder() -> Iterator[str]:
    """A temporary folder for this simulation's Ray session, removed afterwards: by default Ray
    leaves a session folder (logs, sockets) under /tmp/ray for every run, and other runs' are
    not ours to remove."""
    folder = tempfile.mkdtemp(prefix="fleet-ray-")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def _ctrl_c_stops_exchanges() -> Iterator[None]:
    """The first Ctrl-C ends the ServerApp's exchange at its next poll (the run then ends with
    `Interrupted`, its completed rounds saved); a second one interrupts at once."""

    def stop(signum: int, frame: object) -> None:
        STOP.set()
        signal.signal(signal.SIGINT, previous)
        stderr.print("interrupted: stopping the simulation (Ctrl-C again to force)")

    STOP.clear()
    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _ends_quietly_when_stopped(server_app: ServerApp) -> ServerApp:
    """`server_app`, returning normally when Ctrl-C stopped its exchange: Flower waits 3 s for
    the result of a ServerApp that raised instead (run_simulation raises once Flower is done)."""
    quiet = ServerApp()

    @quiet.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            server_app(grid, context)
        except Interrupted:
            if not STOP.is_set():
                raise

    return quiet


def run_simulation(
    folder: RunFolder,
    devices: int,
    on_round: Callable[[dict], None] = print_round,
    client_app: ClientApp | None = None,
) -> None:
    """Flower's Simulation Engine (Ray) with the ServerApp in this process and `client_app` (the
    device's) on each simulated SuperNode; Ctrl-C raises `Interrupted` once the ServerApp has
    stopped.

    Ray rewrites this process's PYTHONPATH for its workers (with an empty entry, which means
    the working directory); it is put back afterwards, so that no later subprocess of ours
    imports whatever lies in the working directory."""
    from flwr.simulation import run_simulation as flower_simulation

    logging.getLogger("flwr").addFilter(_NotDeprecation())
    pythonpath = os.environ.get("PYTHONPATH")
    try:
        with _ray_folder() as ray_folder, _ctrl_c_stops_exchanges():
            flower_simulation(
                server_app=_ends_quietly_when_stopped(make_server_app(folder.path, on_round)),
                client_app=client_app or load_component(CLIENTAPP),
                num_supernodes=devices,
                backend_config={
                    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                    "init_args": {"_temp_dir": ray_folder},
                },
            )
    finally:
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath
    if STOP.is_set():
        raise Interrupted("interrupted")
