"""Each round's figures, pushed to a Prometheus Pushgateway, one group per round of a run.

Flower ends the ServerApp's process with the run, so nothing there can be scraped: the coordinator
pushes after every round instead. Each round is its own group (`job`, `run`, `round`), so the
gateway keeps every round of a run and a Prometheus that was down catches up on all of them when
it scrapes again. Names follow Prometheus conventions: base units with unit suffixes, labels
`device`, `method`, `round`; nothing per training step. A Pushgateway that cannot be reached costs
one logged line per round: the round has already been written to the run folder, and the
coordinator pushes it again after the next round.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway
from prometheus_client.exposition import basic_auth_handler, default_handler

from skip2fleet.shared import metric_names as names

log = logging.getLogger("skip2fleet")
JOB = "skip2fleet"
PUSH_USER = "skip2fleet"  # the Pushgateway's one basic-auth user
PUSH_TIMEOUT_S = 3.0


def round_registry(result: dict, method: str) -> CollectorRegistry:
    registry = CollectorRegistry()

    def gauge(metric: names.Metric) -> Gauge:
        return Gauge(metric.name, metric.help, metric.labels, registry=registry)

    number = str(result["round"])
    gauge(names.ROUND_NUMBER).set(result["round"])
    gauge(names.ROUND_DURATION).labels(number).set(result["duration_s"])
    outcome = gauge(names.ROUND_DEVICES)
    for name, count in (
        ("ok", len(result["devices"])),
        ("refused", len(result["refused"])),
        ("missing", len(result["missing"])),
    ):
        outcome.labels(number, name).set(count)
    gauge(names.ROUND_REFUSED).labels(number).set(len(result["refused"]))
    if result.get("svd_relative_error") is not None:
        gauge(names.ROUND_SVD_ERROR).labels(number).set(result["svd_relative_error"])

    accuracy = gauge(names.DEVICE_ACCURACY)
    batch = gauge(names.DEVICE_TRAIN_BATCH)
    power = gauge(names.DEVICE_FINETUNE_POWER)
    scalars = {
        "finetune_s": gauge(names.DEVICE_FINETUNE_SECONDS),
        "uplink_bytes": gauge(names.DEVICE_UPLINK),
        "energy_joules": gauge(names.DEVICE_FINETUNE_ENERGY),
        "cache_bytes": gauge(names.DEVICE_CACHE),
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


def push_rounds(
    gateway: str, run: str, method: str, pending: list[dict], password_file: Path | None = None
) -> list[dict]:
    """Push `pending` rounds oldest first (with basic auth when the fleet has a Pushgateway
    password); returns those the Pushgateway did not take, for the next call. An unreachable
    gateway costs one logged line per call."""
    handler = _handler(password_file)
    for index, result in enumerate(pending):
        try:
            push_to_gateway(
                gateway,
                job=JOB,
                grouping_key={"run": run, "round": str(result["round"])},
                registry=round_registry(result, method),
                timeout=PUSH_TIMEOUT_S,
                handler=handler,
            )
        except OSError as exc:  # URLError and connection errors are OSErrors
            log.warning(
                "round %s: Pushgateway %s unreachable (%s); %d round(s) kept to push after the "
                "next round; the figures are in the run folder",
                pending[-1]["round"],
                gateway,
                exc,
                len(pending) - index,
            )
            return pending[index:]
    return []


def _handler(password_file: Path | None):
    if password_file is None or not password_file.is_file():
        return default_handler
    password = password_file.read_text().strip()

    def handler(url, method, timeout, headers, data):
        return basic_auth_handler(url, method, timeout, headers, data, PUSH_USER, password)

    return handler
