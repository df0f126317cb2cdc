"""`fleet status`: each device as the SuperLink and its agent see it."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import typer

from skip2fleet.server import options as opt
from skip2fleet.server.operations.monitoring import CLOCK_OFF_S
from skip2fleet.server.operations.superlink import CONNECTION, flwr, registered_nodes
from skip2fleet.server.progress import stderr
from skip2fleet.shared import metric_names as names
from skip2fleet.shared.config import Device, FleetConfig, load_config
from skip2fleet.shared.errors import FleetError


def agent_figures(device: Device) -> dict[str, float] | None:
    """The device agent's metrics, or None when it does not answer."""
    try:
        with urllib.request.urlopen(
            f"http://{device.host}:{device.agent_port}/metrics", timeout=3
        ) as response:
            text = response.read().decode()
    except OSError:
        return None
    return metrics_by_key(text)


def metrics_by_key(text: str) -> dict[str, float]:
    """Prometheus' text format as {`name|label value|...`: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        sample.name + "".join(f"|{v}" for v in sample.labels.values()): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def status_command(config: opt.ConfigPath = Path("fleet.yaml")) -> None:
    """The schedule (last and next run), then each device: registered and online at the
    SuperLink, agent up, last round and accuracy."""
    fleet = load_config(config)
    typer.echo(schedule_line(fleet))
    registry = registered_nodes(fleet)
    try:
        listed = flwr(fleet, "supernode", "list", CONNECTION, timeout=15)["nodes"]
        nodes = {int(node["node-id"]): node["status"] for node in listed}
    except FleetError as exc:
        stderr.print(f"SuperLink not reachable: {exc}")
        nodes = {}
    typer.echo(
        f"{'device':<12} {'registered':<11} {'SuperLink':<20} {'agent':<6} "
        f"{'round':>5} {'accuracy':>9}  active model (hold-out accuracy)"
    )
    for device in fleet.devices:
        node = registry.get(device.name)
        figures = agent_figures(device)
        last = (figures or {}).get(names.LAST_FINETUNE_ROUND)
        after = (figures or {}).get(f"{names.LAST_FINETUNE_ACCURACY.name}|after")
        seen = nodes.get(node, "-") if node is not None else "-"
        typer.echo(
            f"{device.name:<12} {'yes' if node is not None else 'no':<11} "
            f"{clock_verdict(figures or {}) or seen:<20} "
            f"{'up' if figures is not None else 'down':<6} "
            f"{int(last) if last is not None else '-':>5} "
            f"{f'{after * 100:.2f} %' if after is not None else '-':>9}  "
            f"{active_model(figures or {})}"
        )


def clock_verdict(figures: dict[str, float]) -> str | None:
    """`clock 10 min ahead` when the device's agent sees its clock off the front door's by more
    than Flower tolerates, which the SuperLink would only show as offline; else None."""
    offset = figures.get(names.CLOCK_OFFSET.name)
    if offset is None or abs(offset) <= CLOCK_OFF_S:
        return None
    size = abs(offset)
    amount = f"{size / 60:.0f} min" if size >= 90 else f"{size:.0f} s"
    return f"clock {amount} {'ahead' if offset > 0 else 'behind'}"


def active_model(figures: dict[str, float]) -> str:
    """`base 1a2b3c4d5e6f + round 3 (91.20 %)` from the agent's active-model metrics."""
    accuracy = figures.get(names.ACTIVE_MODEL.name)
    if accuracy is None:
        return "-"
    base_value = figures.get(names.ACTIVE_MODEL_BASE.name)
    base = "?" if base_value is None else names.base_hex(base_value)
    round_ = int(figures.get(names.ACTIVE_MODEL_ROUND.name, 0))
    adapters = f"round {round_}" if round_ else "no adapters"
    return f"base {base} + {adapters} ({accuracy * 100:.2f} %)"


def schedule_line(fleet: FleetConfig) -> str:
    """`schedule daily; last run ...; next ...` (imported here: schedule.py imports this
    module's `agent_figures`)."""
    from skip2fleet.server.operations.schedule import describe, last_outcome, next_elapse

    expression = fleet.federation.schedule
    last = last_outcome(fleet)
    said = f"last scheduled run {describe(last)}" if last else "no scheduled run yet"
    if not expression:
        return f"schedule: none (federation.schedule; rounds run by `fleet run`); {said}"
    try:
        upcoming = f"next {next_elapse(expression):%Y-%m-%d %H:%M:%S} UTC"
    except FleetError as exc:
        upcoming = str(exc)
    return f"schedule: {expression}; {said}; {upcoming}"
