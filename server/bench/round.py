"""`fleet bench round`: what a federated round costs beyond Flower's own, on a real deployment.

The same rounds run twice on one loopback deployment (SuperLink with TLS and node authentication,
a SuperNode per device): with a ClientApp that does no work, then with ours. The difference is our
round time and ClientApp memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import median
from typing import Annotated

import typer

from skip2fleet.server import options as opt
from skip2fleet.server.federation.run import follow, start_run
from skip2fleet.server.federation.runs import RunFolder
from skip2fleet.server.operations.loopback import loopback_deployment, on_loopback
from skip2fleet.server.training.pretraining import fleet_base
from skip2fleet.shared.atomic import write_text_atomic
from skip2fleet.shared.config import FleetConfig, as_yaml_dict
from skip2fleet.shared.services import CLIENTAPP, NOOP_CLIENTAPP

RUNS = (("noop", NOOP_CLIENTAPP), ("skip2fleet", CLIENTAPP))


def measure_rounds(fleet: FleetConfig, workdir: Path) -> dict:
    """The same rounds with a no-op ClientApp and with the real one, on one loopback deployment."""
    fleet = on_loopback(fleet, workdir / "state")
    base = fleet_base(fleet)
    runs = {}
    with loopback_deployment(fleet, workdir):
        for label, clientapp in RUNS:
            folder = RunFolder.create(workdir / label, as_yaml_dict(fleet), base)
            typer.echo(f"-- {label} ClientApp ({clientapp})")
            follow(fleet, folder, start_run(fleet, folder, clientapp))
            rounds = [folder.round_result(n) for n in folder.completed_rounds()]
            runs[label] = {
                "round_s": [r["duration_s"] for r in rounds],
                "peak_rss_bytes": max(
                    d["peak_rss_bytes"] for r in rounds for d in r["devices"].values()
                ),
            }
    extra = [
        a - b for a, b in zip(runs["skip2fleet"]["round_s"], runs["noop"]["round_s"], strict=True)
    ]
    return {
        "dataset": fleet.task.dataset,
        "devices": len(fleet.devices),
        "epochs_per_round": fleet.training.epochs,
        "runs": runs,
        "extra_round_s": extra,
        "median_extra_round_s": median(extra),
        "extra_peak_rss_bytes": runs["skip2fleet"]["peak_rss_bytes"]
        - runs["noop"]["peak_rss_bytes"],
    }


def round_command(
    config: opt.FleetFile = None,
    devices: opt.DeviceCount = None,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds per run.")] = 3,
    dataset: opt.DatasetOverride = None,
    data_dir: opt.DataDir = None,
    workdir: Annotated[
        Path, typer.Option(callback=opt.fresh_workdir, help="Folder for the runs and service logs.")
    ] = Path("bench-out/round"),
    json_out: opt.JsonOut = None,
) -> None:
    """Round time and ClientApp memory against a no-op ClientApp, on a loopback deployment
    (SuperLink with TLS and node authentication, one SuperNode per device) started and stopped
    here."""
    fleet = opt.resolve_fleet(config, devices, rounds, dataset, data_dir, None)
    results = measure_rounds(fleet, workdir)
    noop, real = results["runs"]["noop"], results["runs"]["skip2fleet"]
    typer.echo(
        "| round | no-op ClientApp s | skip2fleet ClientApp s | extra s |\n|---:|---:|---:|---:|"
    )
    for number, (a, b) in enumerate(zip(noop["round_s"], real["round_s"], strict=True), 1):
        typer.echo(f"| {number} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    typer.echo(
        f"median extra per round {results['median_extra_round_s']:+.2f} s; ClientApp peak RSS "
        f"{noop['peak_rss_bytes'] / 2**20:.1f} MB no-op, {real['peak_rss_bytes'] / 2**20:.1f} MB "
        f"skip2fleet ({results['extra_peak_rss_bytes'] / 2**20:+.1f} MB)"
    )
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(results, indent=2) + "\n")
