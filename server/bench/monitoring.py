"""`fleet bench monitor`: what monitoring costs and how fresh it is, on a real Prometheus.

It starts a Pushgateway, Prometheus (with the config `fleet monitor config` writes) and one
`fleet agent` sampling an hwmon power sensor at 10 Hz (a fixture tree: this machine has none),
then measures, in one run:
- the agent's scrape time as Prometheus records it (`scrape_duration_seconds`);
- the agent process's CPU time over `--seconds`, as a share of one core;
- for each round of a short simulated run that pushes, the time from the push to the round
  being answered by a Prometheus query.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Annotated

import typer

from skip2fleet.server import options as opt
from skip2fleet.server.federation.runs import RunFolder
from skip2fleet.server.federation.simulate import run_simulation
from skip2fleet.server.operations.loopback import (
    Processes,
    free_port,
    prometheus_query,
    start_prometheus,
    start_pushgateway,
    wait_for,
)
from skip2fleet.server.operations.monitoring import AGENT_JOB, write_monitoring
from skip2fleet.server.training.pretraining import fleet_base
from skip2fleet.shared import metric_names as names
from skip2fleet.shared.atomic import write_text_atomic
from skip2fleet.shared.config import as_yaml_dict, parse_config


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hwmon_fixture(root: Path) -> Path:
    chip = root / "class" / "hwmon" / "hwmon0"
    chip.mkdir(parents=True)
    (chip / "name").write_text("ina219\n")
    (chip / "power1_input").write_text("2400000\n")
    return root


def measure_monitoring(seconds: float, rounds: int, workdir: Path) -> dict:
    gateway_port, prometheus_port = free_port(), free_port()
    data = as_yaml_dict(opt.resolve_fleet(None, 1, rounds, "generated", None, None))
    data["coordinator"].update(
        pushgateway=f"127.0.0.1:{gateway_port}", prometheus_port=prometheus_port
    )
    data["devices"][0].update(host="127.0.0.1", agent_port=free_port(), probe="hwmon")
    fleet = parse_config(data)
    (workdir / "fleet.yaml").write_text(json.dumps(data))  # JSON is YAML
    write_monitoring(fleet, workdir / "monitoring")
    processes = Processes(workdir / "logs")
    try:
        start_pushgateway(processes, gateway_port)
        start_prometheus(processes, workdir / "monitoring" / "prometheus", prometheus_port)
        agent = processes.start(
            "agent",
            [
                "fleet",
                "agent",
                "--config",
                str(workdir / "fleet.yaml"),
                "--device",
                fleet.devices[0].name,
                "--address",
                "127.0.0.1",
                "--hz",
                "10",
                "--sys-root",
                str(hwmon_fixture(workdir / "sys")),
            ],
            dict(os.environ),
        )
        up = f'up{{job="{AGENT_JOB}"}} == 1'
        wait_for(lambda: prometheus_query(prometheus_port, up), 60, "the agent's first scrape")
        typer.echo(f"agent scraped; measuring its CPU time over {seconds:.0f} s")
        before, started = cpu_seconds(agent.pid), time.monotonic()
        time.sleep(seconds)
        cpu_share = (cpu_seconds(agent.pid) - before) / (time.monotonic() - started)

        def value(expr: str) -> float:
            return float(prometheus_query(prometheus_port, expr)[0]["value"][1])

        durations = f'scrape_duration_seconds{{job="{AGENT_JOB}"}}[{int(seconds)}s]'
        scrape = {
            "median": value(f"quantile_over_time(0.5, {durations})"),
            "max": value(f"max_over_time({durations})"),
        }
        scrapes = int(value(f"count_over_time({durations})"))

        latencies = []

        def on_round(result: dict) -> None:  # runs right after the ServerApp pushed the round
            pushed = time.monotonic()
            query = f"{names.ROUND_NUMBER.name} == {result['round']}"
            wait_for(lambda: prometheus_query(prometheus_port, query), 30, "the round", 0.05)
            latencies.append(time.monotonic() - pushed)

        folder = RunFolder.create(workdir / "run", data, fleet_base(fleet))
        run_simulation(folder, 1, on_round)
        return {
            "seconds": seconds,
            "scrapes": scrapes,
            "scrape_duration_s": scrape,
            "agent_cpu_share_of_one_core": cpu_share,
            "round_to_queryable_s": latencies,
        }
    finally:
        processes.stop_all()


def monitor_command(
    seconds: Annotated[float, typer.Option(min=10, help="How long to watch the agent.")] = 60.0,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds of the pushing run.")] = 3,
    json_out: opt.JsonOut = None,
) -> None:
    """Agent scrape time and CPU cost at 10 Hz, and round-to-queryable delay, on a real
    Prometheus and Pushgateway started and stopped here (Debian's packages)."""
    with tempfile.TemporaryDirectory(prefix="fleet-bench-monitor-") as workdir:
        results = measure_monitoring(seconds, rounds, Path(workdir))
    scrape = results["scrape_duration_s"]
    typer.echo(
        f"agent scrape: median {scrape['median'] * 1e3:.2f} ms, max {scrape['max'] * 1e3:.2f} ms "
        f"over {results['scrapes']} scrapes; agent CPU at 10 Hz: "
        f"{results['agent_cpu_share_of_one_core'] * 100:.2f} % of one core over "
        f"{results['seconds']:.0f} s; round end to queryable: "
        + ", ".join(f"{s:.2f} s" for s in results["round_to_queryable_s"])
        + f" (median {median(results['round_to_queryable_s']):.2f} s)"
    )
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(results, indent=2) + "\n")
