"""`fleet bench federated`: per-device accuracy of the fleet's aggregations, over several trials.

A device's held-out data is small (100-150 windows for a HAR subject: one window is about 1 %),
so one run says little about whether fine-tuning helps a device. Each trial pretrains a new base
(seed + trial) and runs the fleet on Flower's Simulation Engine once per aggregation from that
same base; the table gives each device's mean accuracy before and after over the trials, and in
how many trials it gained.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from skip2fleet.server import options as opt
from skip2fleet.server.federation.runs import RunFolder
from skip2fleet.server.federation.simulate import run_simulation
from skip2fleet.server.progress import stderr
from skip2fleet.server.training.pretraining import fleet_base
from skip2fleet.shared.atomic import write_text_atomic
from skip2fleet.shared.config import AGGREGATIONS, FleetConfig, as_yaml_dict
from skip2fleet.shared.errors import FleetError


def measure_federated(
    fleet: FleetConfig, aggregations: list[str], trials: int, workdir: Path
) -> dict:
    """Last-round accuracy before/after per device, per aggregation, for every trial."""
    before: dict[str, list[float]] = {d.name: [] for d in fleet.devices}
    after = {a: {d.name: [] for d in fleet.devices} for a in aggregations}
    for trial in range(trials):
        seed = fleet.training.seed + trial
        trial_fleet = dataclasses.replace(
            fleet, training=dataclasses.replace(fleet.training, seed=seed)
        )
        base = fleet_base(trial_fleet)
        for aggregation in aggregations:
            config = as_yaml_dict(trial_fleet)
            config["federation"]["aggregation"] = aggregation
            folder = RunFolder.create(workdir / f"trial{trial + 1}-{aggregation}", config, base)
            stderr.print(f"trial {trial + 1}/{trials}, seed {seed}, aggregation {aggregation}")
            run_simulation(folder, len(fleet.devices), on_round=lambda _: None)
            done = folder.completed_rounds()
            if len(done) < fleet.federation.rounds:
                raise FleetError(f"{folder.path}: ended after {len(done)} rounds; see the log")
            last = folder.round_result(done[-1])
            for name in before:
                if name not in last["devices"]:
                    raise FleetError(f"{folder.path}: {name} did not finish the last round")
                figures = last["devices"][name]
                after[aggregation][name].append(figures["acc_after"])
                if aggregation == aggregations[0]:
                    before[name].append(figures["acc_before"])
    return {
        "dataset": fleet.task.dataset,
        "method": fleet.training.method,
        "rounds": fleet.federation.rounds,
        "epochs_per_round": fleet.training.epochs,
        "trials": trials,
        "partitions": {d.name: str(d.data.partition) for d in fleet.devices},
        "before": before,
        "after": after,
    }


def federated_table(results: dict) -> str:
    """Devices down, before and each aggregation across: mean (gains in how many trials)."""
    aggregations = list(results["after"])
    lines = [
        f"{results['dataset']}, {results['method']}: {results['rounds']} rounds x "
        f"{results['epochs_per_round']} epochs, mean accuracy % over {results['trials']} trials "
        "(in brackets: trials in which the device gained)",
        "",
        "| device (partition) | before | " + " | ".join(aggregations) + " |",
        "|---|---:|" + "---:|" * len(aggregations),
    ]
    for name, partition in results["partitions"].items():
        before = np.array(results["before"][name])
        cells = []
        for aggregation in aggregations:
            after = np.array(results["after"][aggregation][name])
            cells.append(f"{after.mean():.2f} ({int((after > before).sum())}/{len(after)})")
        lines.append(f"| {name} ({partition}) | {before.mean():.2f} | " + " | ".join(cells) + " |")
    mean_before = np.mean([np.mean(v) for v in results["before"].values()])
    means = [np.mean([np.mean(v) for v in results["after"][a].values()]) for a in aggregations]
    lines.append(f"| mean | {mean_before:.2f} | " + " | ".join(f"{m:.2f}" for m in means) + " |")
    return "\n".join(lines)


def federated_command(
    config: opt.FleetFile = None,
    devices: opt.DeviceCount = None,
    rounds: Annotated[int | None, typer.Option(min=1, help="Federated rounds per run.")] = None,
    dataset: opt.DatasetOverride = None,
    data_dir: opt.DataDir = None,
    aggregations: Annotated[
        str, typer.Option(help="Comma-separated aggregations to compare.")
    ] = ",".join(AGGREGATIONS),
    trials: Annotated[int, typer.Option(min=1, help="Independent bases (seed + trial).")] = 10,
    workdir: Annotated[
        Path, typer.Option(callback=opt.fresh_workdir, help="Folder for the run folders.")
    ] = Path("bench-out/federated"),
    json_out: opt.JsonOut = None,
) -> None:
    """Each device's accuracy before and after, mean over trials, aggregations side by side
    (Flower's Simulation Engine, a new base per trial)."""
    chosen = opt.chosen(aggregations, AGGREGATIONS, "--aggregations")
    fleet = opt.resolve_fleet(config, devices, rounds, dataset, data_dir, None)
    results = measure_federated(fleet, chosen, trials, workdir)
    table = federated_table(results)
    write_text_atomic(workdir / "federated.md", table + "\n")
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(results, indent=2) + "\n")
    typer.echo(table)
