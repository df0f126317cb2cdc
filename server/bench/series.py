"""`fleet bench series`: what the coordinator's pushes leave in Prometheus as the fleet grows and
rounds pass, and how long a push takes against its timeout.

For each fleet size it starts a Pushgateway and a Prometheus scraping it (Debian's, on loopback,
as `fleet monitor config` configures the scrape), pushes synthetic rounds of that many devices in
the run folder's result format, waits after each push until Prometheus has scraped that round,
and counts the series after round 1 and after the last round: in Prometheus' head block (every
series it stored, also those no longer pushed) and in the Pushgateway's exposition (what every
scrape reads). `measure_series` takes the push to measure, so the coordinator's own bench can
drive it with the round it builds.
"""

from __future__ import annotations

import json
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Annotated

import typer
import yaml

from skip2fleet.server import options as opt
from skip2fleet.server.federation.pushes import PUSH_TIMEOUT_S, FleetPushes
from skip2fleet.server.operations.loopback import (
    Processes,
    free_port,
    prometheus_query,
    start_prometheus,
    start_pushgateway,
    wait_for,
)
from skip2fleet.server.operations.monitoring import PUSH_JOB, PUSH_SCRAPE_INTERVAL
from skip2fleet.shared import metric_names as names
from skip2fleet.shared.atomic import write_text_atomic
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.protocol import Figures

Push = Callable[[dict], bool]  # pushes one round's result; False when the gateway did not take it
SCRAPED_TIMEOUT_S = 120  # a scrape of a gateway that holds every round of 10,000 devices is slow


def synthetic_figures() -> Figures:
    """A device's report of a round, plausible figures."""
    return Figures(
        samples=100, loss=0.5, acc_before=60.0, acc_after=80.0, forward_ms=0.02,
        backward_ms=0.03, update_ms=0.01, train_batch_ms=0.06, finetune_s=1.5, cache_bytes=40_000,
        cache_built=0, uplink_bytes=12_000, rank=4, peak_rss_bytes=120 << 20, energy_joules=3.0,
        mean_watts=2.0, peak_watts=2.5, power_estimated=1,
    )  # fmt: skip


def synthetic_round(number: int, devices: int) -> dict:
    """A round of `devices` devices that all replied, as the run folder keeps it."""
    figures = synthetic_figures().__dict__
    return {
        "round": number,
        "duration_s": 10.0 + number,
        "aggregation": "fedavg",
        "svd_relative_error": None,
        "devices": {f"device-{i:05d}": dict(figures) for i in range(devices)},
        "refused": {},
        "missing": [],
    }


def head_series(prometheus_port: int) -> int:
    """Series in Prometheus' head block: every series stored lately, live or gone stale."""
    url = f"http://127.0.0.1:{prometheus_port}/api/v1/status/tsdb"
    with urllib.request.urlopen(url, timeout=30) as answer:
        return int(json.load(answer)["data"]["headStats"]["numSeries"])


def gateway_series(gateway: str) -> tuple[int | None, int | None]:
    """Samples (series) and bytes of one scrape of the Pushgateway; None when it does not
    answer within two minutes (a gateway holding every round of 10,000 devices)."""
    try:
        with urllib.request.urlopen(f"http://{gateway}/metrics", timeout=120) as answer:
            text = answer.read()
    except OSError:
        return None, None
    return sum(1 for line in text.splitlines() if line and not line.startswith(b"#")), len(text)


def measure_series(
    devices: int,
    rounds: int,
    workdir: Path,
    push_to: Callable[[str], Push] | None = None,
    interval: str = PUSH_SCRAPE_INTERVAL,
) -> dict:
    """Push `rounds` synthetic rounds of `devices` devices with `push_to(gateway)` (default: the
    ServerApp's pushes) and count the series after round 1 and after the last."""
    push_to = push_to or (lambda gateway: FleetPushes(gateway, "bench", "skip2-lora").push)
    gateway_port, prometheus_port = free_port(), free_port()
    gateway = f"127.0.0.1:{gateway_port}"
    config = {
        "global": {"scrape_interval": interval},
        "scrape_configs": [
            {
                "job_name": PUSH_JOB,
                "honor_labels": True,
                "scrape_timeout": interval,
                "static_configs": [{"targets": [gateway]}],
            }
        ],
    }
    (workdir / "prometheus").mkdir(parents=True)
    write_text_atomic(workdir / "prometheus" / "prometheus.yml", yaml.safe_dump(config))
    processes = Processes(workdir / "logs")
    rows: dict = {"devices": devices, "rounds": rounds, "push_s": [], "pushed": [], "scraped": []}
    try:
        start_pushgateway(processes, gateway_port)
        start_prometheus(processes, workdir / "prometheus", prometheus_port)
        wait_for(lambda: prometheus_query(prometheus_port, "up == 1"), 60, "the first scrape")
        push = push_to(gateway)
        for number in range(1, rounds + 1):
            result = synthetic_round(number, devices)
            started = time.monotonic()
            rows["pushed"].append(push(result))
            rows["push_s"].append(time.monotonic() - started)
            scraped = f"max({names.ROUND_NUMBER.name}) >= {number}"
            try:  # a push that timed out may still land, and a scrape may time out
                wait_for(lambda q=scraped: prometheus_query(prometheus_port, q), SCRAPED_TIMEOUT_S,
                         f"round {number} in Prometheus", 0.1)  # fmt: skip
                rows["scraped"].append(True)
            except FleetError:
                rows["scraped"].append(False)
            if number in (1, rounds):
                rows[f"series_after_{number}"] = head_series(prometheus_port)
                series, size = gateway_series(gateway)
                rows[f"gateway_series_after_{number}"] = series
                rows[f"scrape_bytes_after_{number}"] = size
        duration = f'scrape_duration_seconds{{job="{PUSH_JOB}"}}'
        answer = prometheus_query(prometheus_port, duration)
        rows["last_scrape_s"] = float(answer[0]["value"][1]) if answer else None
    finally:
        processes.stop_all()
    rows["series_after_last"] = rows[f"series_after_{rounds}"]
    return rows


def series_command(
    devices: Annotated[
        str, typer.Option(help="Fleet sizes, comma-separated.")
    ] = "10,100,1000,10000",
    rounds: Annotated[int, typer.Option(min=2, help="Rounds pushed per fleet size.")] = 20,
    json_out: opt.JsonOut = None,
) -> None:
    """Prometheus series after 1 round and after `--rounds`, and the push time against its
    timeout, per fleet size, on a real Pushgateway and Prometheus started and stopped here."""
    sizes = opt.counts(devices, "--devices")
    typer.echo(
        f"| devices | series after 1 | after {rounds} | ratio | gateway series after {rounds} "
        f"| push s (median, max; timeout {PUSH_TIMEOUT_S:g}) | pushes taken | rounds scraped |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = []
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="fleet-bench-series-") as workdir:
            row = measure_series(size, rounds, Path(workdir))
        rows.append(row)
        typer.echo(
            f"| {size} | {row['series_after_1']} | {row['series_after_last']} "
            f"| {row['series_after_last'] / row['series_after_1']:.3f} "
            f"| {row[f'gateway_series_after_{rounds}']} "
            f"| {median(row['push_s']):.2f}, {max(row['push_s']):.2f} "
            f"| {sum(row['pushed'])} of {rounds} | {sum(row['scraped'])} of {rounds} |"
        )
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(rows, indent=2) + "\n")
