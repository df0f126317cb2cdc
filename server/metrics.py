"""Each round's figures, pushed to a Prometheus Pushgateway, grouped by run.

Flower ends the ServerApp's process with the run, so nothing there can be scraped: the coordinator
pushes after every round instead. Names follow Prometheus conventions: base units with unit
suffixes, labels `device`, `method`, `round` (and `job`, `run` from the grouping key); nothing per
training step. A Pushgateway that cannot be reached costs one logged line per round: the round has
already been written to the run folder.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

log = logging.getLogger("skip2fleet")
JOB = "skip2fleet"
PUSH_TIMEOUT_S = 3.0


def round_registry(result: dict, method: str) -> CollectorRegistry:
    registry = CollectorRegistry()

    def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, doc, ("round", *labels), registry=registry)

    number = str(result["round"])
    Gauge("skip2fleet_round_number", "Last completed round.", registry=registry).set(
        result["round"]
    )
    gauge("skip2fleet_round_duration_seconds", "Wall time of the round.").labels(number).set(
        result["duration_s"]
    )
    outcome = gauge("skip2fleet_round_devices", "Devices by outcome.", ("outcome",))
    for name, count in (
        ("ok", len(result["devices"])),
        ("refused", len(result["refused"])),
        ("missing", len(result["missing"])),
    ):
        outcome.labels(number, name).set(count)
    gauge("skip2fleet_round_refused_replies", "Replies refused in the round.").labels(number).set(
        len(result["refused"])
    )
    if result.get("svd_relative_error") is not None:
        gauge("skip2fleet_round_svd_relative_error", "Error left by SVD re-factorisation.").labels(
            number
        ).set(result["svd_relative_error"])

    per_device = ("device", "method")
    accuracy = gauge(
        "skip2fleet_device_accuracy_ratio",
        "Accuracy on the device's held-out data.",
        (*per_device, "phase"),
    )
    batch = gauge(
        "skip2fleet_device_train_batch_seconds", "Time per training batch.", (*per_device, "phase")
    )
    power = gauge(
        "skip2fleet_device_finetune_power_watts",
        "Power during the fine-tune.",
        (*per_device, "stat"),
    )
    scalars = {
        "finetune_s": gauge(
            "skip2fleet_device_finetune_seconds", "Fine-tune wall time.", per_device
        ),
        "uplink_bytes": gauge("skip2fleet_device_uplink_bytes", "Bytes of the reply.", per_device),
        "energy_joules": gauge(
            "skip2fleet_device_finetune_energy_joules", "Energy of the fine-tune.", per_device
        ),
        "cache_bytes": gauge("skip2fleet_device_cache_bytes", "Skip2 cache size.", per_device),
    }
    for device, figures in result["devices"].items():
        labels = (number, device, method)
        for phase in ("before", "after"):
            accuracy.labels(*labels, phase).set(figures[f"acc_{phase}"] / 100)
        for phase in ("forward", "backward", "update"):
            batch.labels(*labels, phase).set(figures[f"{phase}_ms"] / 1e3)
        for stat in ("mean", "peak"):
            power.labels(*labels, stat).set(figures[f"{stat}_watts"])
        for key, metric in scalars.items():
            metric.labels(*labels).set(figures[key])
    return registry


def push_round(gateway: str, run: str, method: str, result: dict) -> str | None:
    """Push the round's figures; returns the reason if the Pushgateway could not take them."""
    try:
        registry = round_registry(result, method)
        push_to_gateway(
            gateway, job=JOB, grouping_key={"run": run}, registry=registry, timeout=PUSH_TIMEOUT_S
        )
    except OSError as exc:  # URLError and connection errors are OSErrors
        log.warning(
            "round %s: Pushgateway %s unreachable (%s); figures are in the run folder",
            result["round"],
            gateway,
            exc,
        )
        return str(exc)
    return None
