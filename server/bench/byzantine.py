"""`fleet bench byzantine`: what one malicious device can do to the fleet's model.

For each task, aggregation and attack, the fleet (5 devices by default, the last one the attacker)
runs its rounds on Flower's Simulation Engine from one base per task, and once more with no attack
(the clean run). The attacker is the real ClientApp whose reply is then corrupted (`ATTACKS`), or
which trains on flipped labels. Every device accepts its new adapters (`training.accept: always`),
so the honest devices' own hold-outs do not hide what the aggregate did to them: their accuracy is
that of the last round's adapters, trained from the aggregate. A row says the honest devices' mean
accuracy against the clean run's, whether every aggregate sent stayed finite and the run finished,
and how the coordinator named the attacker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from skip2fleet.server import options as opt
from skip2fleet.server.federation.runs import RunFolder
from skip2fleet.server.federation.simulate import run_simulation
from skip2fleet.server.progress import stderr
from skip2fleet.server.training.pretraining import fleet_base
from skip2fleet.shared import model as base_model
from skip2fleet.shared.atomic import write_text_atomic
from skip2fleet.shared.config import Federation, FleetConfig, as_yaml_dict
from skip2fleet.shared.datasets import TASKS as DATASETS
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.layout import Layout, layout
from skip2fleet.shared.methods import get_method
from skip2fleet.shared.protocol import THETA, Accept, NodeConfig, Part
from skip2fleet.shared.services import CLIENTAPP
from skip2fleet.shared.spec import Spec

CLIENT_MODULE = CLIENTAPP.split(":")[0]  # the device's code, loaded by name as Flower loads it

TASKS = ("fan-damage1", "har")  # the default; any task of `shared.datasets` may be chosen
ROBUST = ("fedavg", "svd", "median", "trimmed-mean")
Corrupt = Callable[[np.ndarray, np.ndarray, Layout, float], np.ndarray]


def _with_value(value: float) -> Corrupt:
    return lambda theta, start, lay, ratio: np.where(np.arange(theta.size) == 3, value, theta)


def _b_scaled(theta: np.ndarray, start: np.ndarray, lay: Layout, ratio: float) -> np.ndarray:
    out = theta.copy()
    for name, block in lay.blocks(out).items():
        if name.endswith(" B"):
            block *= 5
    return out


def _noise(theta: np.ndarray, start: np.ndarray, lay: Layout, ratio: float) -> np.ndarray:
    """Gaussian noise as large as its own change (a stand-in for the round's median)."""
    noise = np.random.default_rng(0).normal(size=theta.size)
    return start + noise * (np.linalg.norm(theta - start) / np.linalg.norm(noise))


ADAPTER_ATTACKS: dict[str, Corrupt] = {
    "nan": _with_value(np.nan),
    "inf": _with_value(np.inf),
    "b-x5": _b_scaled,
    "sign-flip": lambda theta, start, lay, ratio: start - (theta - start),
    # its change scaled to 0.9 x the screening limit, its own change standing in for the median
    "scaled-0.9-limit": lambda theta, start, lay, ratio: start + 0.9 * ratio * (theta - start),
    "noise": _noise,
}
SAMPLE_ATTACKS = {"samples-200": -200, "samples-0": 0, "samples-1e9": 10**9}
ATTACKS = (*ADAPTER_ATTACKS, *SAMPLE_ATTACKS, "label-flip")


def attacking_client(attack: str, attacker: int, ratio: float, spec: Spec) -> ClientApp:
    """The real ClientApp, except on the simulated device `attacker` (its partition id)."""
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        real = importlib.import_module(CLIENT_MODULE)
        if int(context.node_config[NodeConfig.PARTITION_ID]) != attacker:
            return real.train(msg, context)
        with flipped_labels() if attack == "label-flip" else contextlib.nullcontext():
            reply = real.train(msg, context)
        if not reply.has_content():
            return reply
        if attack in SAMPLE_ATTACKS:
            reply.content[Part.FIGURES]["samples"] = SAMPLE_ATTACKS[attack]
        elif attack in ADAPTER_ATTACKS:
            plan = real.own_plan(msg.content, context.node_config)  # the attacker's
            theta = reply.content[Part.ADAPTERS][THETA].numpy()
            start = _start(msg, plan.device)
            lay = layout(get_method(plan.method), spec, plan.rank)
            bad = ADAPTER_ATTACKS[attack](theta, start, lay, ratio).astype(np.float32)
            reply.content[Part.ADAPTERS] = ArrayRecord({THETA: Array(bad)})
        return reply

    return client


def _start(msg: Message, name: str) -> np.ndarray:
    """The adapters the coordinator sent this device to start from."""
    if Part.ADAPTERS in msg.content:
        return msg.content[Part.ADAPTERS][THETA].numpy()
    return msg.content[Part.ADAPTERS_BY_DEVICE][name].numpy()


@contextlib.contextmanager
def flipped_labels() -> Iterator[None]:
    """The device's training labels shifted by one class (its hold-out left as it is), by
    wrapping the ClientApp's loading phase (`client.inputs`)."""
    clientapp = importlib.import_module(CLIENT_MODULE)
    original = clientapp.load_inputs

    def flipped(*args, **kwargs):
        inputs = original(*args, **kwargs)
        classes = inputs.layout.spec.n_classes
        tune = dataclasses.replace(inputs.tune, y=(inputs.tune.y + 1) % classes)
        return dataclasses.replace(inputs, tune=tune)

    clientapp.load_inputs = flipped
    try:
        yield
    finally:
        clientapp.load_inputs = original


def run_once(
    fleet: FleetConfig, base, aggregation: str, attack: str | None, folder_path: Path
) -> dict:
    """One run; the honest devices' mean accuracy in the last round, finiteness, refusals."""
    config = as_yaml_dict(fleet)
    config["federation"]["aggregation"] = aggregation
    folder = RunFolder.create(folder_path, config, base)
    attacker = len(fleet.devices) - 1
    ratio, spec = fleet.federation.max_update_ratio, base_model.spec_of(base)
    client = attacking_client(attack, attacker, ratio, spec) if attack else None
    with contextlib.suppress(FleetError):
        run_simulation(folder, len(fleet.devices), on_round=lambda _: None, client_app=client)
    done = folder.completed_rounds()
    honest = [d.name for d in fleet.devices[:attacker]]
    last = folder.round_result(done[-1]) if done else {"devices": {}}
    accuracies = [last["devices"][d]["acc_after"] for d in honest if d in last["devices"]]
    name = fleet.devices[attacker].name
    refused = [folder.round_result(n)["refused"].get(name) for n in done]
    return {
        "honest_accuracy": float(np.mean(accuracies)) if accuracies else None,
        "finite": all(np.isfinite(v).all() for n in done for v in folder.outgoing(n).values()),
        "completed": len(done) == fleet.federation.rounds,
        "failure": folder.failure(),
        "refused": "; ".join(sorted({why for why in refused if why})),
    }


def measure_byzantine(
    fleets: dict[str, FleetConfig],
    aggregations: list[str],
    attacks: list[str],
    workdir: Path,
    on_rows: Callable[[list[dict]], None],
) -> list[dict]:
    """Every row, `on_rows` told of the rows so far after each (a long bench keeps what it has
    measured when it is stopped)."""
    rows: list[dict] = []
    for task, fleet in fleets.items():
        base = fleet_base(fleet)
        for aggregation in aggregations:
            stderr.print(f"{task}, {aggregation}: clean run")
            clean = run_once(fleet, base, aggregation, None, workdir / f"{task}-{aggregation}")
            for attack in attacks:
                stderr.print(f"{task}, {aggregation}: {attack}")
                path = workdir / f"{task}-{aggregation}-{attack}"
                row = run_once(fleet, base, aggregation, attack, path)
                rows.append(
                    {"task": task, "attack": attack, "aggregation": aggregation}
                    | {"clip": fleet.federation.clip}
                    | row
                    | {"clean_accuracy": clean["honest_accuracy"]}
                )
                on_rows(rows)
    return rows


def byzantine_table(rows: list[dict]) -> str:
    lines = [
        "| task | attack | aggregation | honest acc % | clean acc % | finite | attacker |",
        "|---|---|---|---:|---:|---|---|",
    ]
    for r in rows:
        acc = "-" if r["honest_accuracy"] is None else f"{r['honest_accuracy']:.2f}"
        named = r["refused"] or ("run stopped: " + r["failure"] if r["failure"] else "not refused")
        lines.append(
            f"| {r['task']} | {r['attack']} | {r['aggregation']} | {acc} | "
            f"{r['clean_accuracy']:.2f} | {'yes' if r['finite'] else 'NO'} | {named[:120]} |"
        )
    return "\n".join(lines)


def byzantine_command(
    tasks: Annotated[str, typer.Option(help="Comma-separated tasks.")] = ",".join(TASKS),
    aggregations: Annotated[str, typer.Option(help="Comma-separated aggregations.")] = ",".join(
        ROBUST
    ),
    attacks: Annotated[str, typer.Option(help="Comma-separated attacks.")] = ",".join(ATTACKS),
    devices: Annotated[int, typer.Option(min=3, help="Devices; the last is the attacker.")] = 5,
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds per run.")] = 3,
    clip: Annotated[
        float,
        typer.Option(help="federation.clip: times the median change; 0 turns clipping off."),
    ] = Federation.clip,
    data_dir: opt.DataDir = None,
    workdir: Annotated[
        Path, typer.Option(callback=opt.fresh_workdir, help="Folder for the run folders.")
    ] = Path("bench-out/byzantine"),
    json_out: opt.JsonOut = None,
) -> None:
    """One malicious device against each aggregation: the honest devices' accuracy after the
    rounds against a run with no attacker, whether the aggregate stayed finite, and how the
    attacker was named (Flower's Simulation Engine)."""
    chosen_tasks = opt.chosen(tasks, tuple(DATASETS), "--tasks")
    chosen_aggregations = opt.chosen(aggregations, ROBUST, "--aggregations")
    chosen_attacks = opt.chosen(attacks, ATTACKS, "--attacks")
    fleets = {}
    for task in chosen_tasks:
        fleet = opt.resolve_fleet(None, devices, rounds, task, data_dir, None)
        fleets[task] = dataclasses.replace(
            fleet,
            training=dataclasses.replace(fleet.training, accept=Accept.ALWAYS),
            federation=dataclasses.replace(
                fleet.federation, min_devices=devices - 1, clip=clip or None
            ),
        )

    def save(rows: list[dict]) -> None:
        write_text_atomic(workdir / "byzantine.md", byzantine_table(rows) + "\n")
        if json_out is not None:
            write_text_atomic(json_out, json.dumps(rows, indent=2) + "\n")

    rows = measure_byzantine(fleets, chosen_aggregations, chosen_attacks, workdir, save)
    typer.echo(byzantine_table(rows))
