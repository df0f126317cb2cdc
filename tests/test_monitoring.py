"""Monitoring: the files `fleet monitor config` writes pass promtool, the alerts fire when they
should, and every dashboard panel's query returns data from a real Prometheus that scraped real
`fleet agent`s (on fixture sysfs trees) and a Pushgateway that a simulated run pushed to."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from skip2fleet.cli.fleet import app
from skip2fleet.server import options as opt
from skip2fleet.server.bench.coordinator import PHASES, measure_coordinator
from skip2fleet.server.bench.series import synthetic_round
from skip2fleet.server.federation.pushes import JOB, FleetPushes, group_path
from skip2fleet.server.operations.loopback import (
    Processes,
    free_port,
    prometheus_query,
    start_prometheus,
    start_pushgateway,
    wait_for,
)
from skip2fleet.server.operations.monitoring import panel_queries, write_monitoring
from skip2fleet.server.operations.status import metrics_by_key
from skip2fleet.shared.config import as_yaml_dict, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("prometheus", "prometheus-pushgateway", "promtool")
needs_prometheus = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in TOOLS),
    reason="Debian's prometheus and prometheus-pushgateway are missing (.ci/run installs them)",
)


@needs_prometheus
def test_written_config_and_rules_pass_promtool(tmp_path):
    result = CliRunner().invoke(
        app, ["monitor", "config", "--config", str(ROOT / "fleet.yaml"), "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    folder = tmp_path / "prometheus"
    for check in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"]):
        done = subprocess.run(["promtool", *check], cwd=folder, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    shutil.copy(ROOT / "tests" / "fixtures" / "alerts_test.yml", folder)
    done = subprocess.run(
        ["promtool", "test", "rules", "alerts_test.yml"], cwd=folder, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_has_every_panel_with_the_device_variable(tmp_path):
    write_monitoring(load_config(ROOT / "fleet.yaml"), tmp_path)
    board = json.loads((tmp_path / "grafana" / "dashboards" / "skip2fleet.json").read_text())
    assert board["templating"]["list"][0]["name"] == "device"
    queries = panel_queries(board)
    assert len(queries) == 17 and all(queries.values())
    assert (
        "skip2fleet_device_active_model_accuracy_ratio"
        in queries["Active model (hold-out accuracy)"]
    )
    assert sum("$device" in q for q in queries.values()) >= 8
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "skip2fleet-prometheus"


def fixture_sysfs(root: Path, watts: float, celsius: float) -> Path:
    (root / "class" / "hwmon" / "hwmon4").mkdir(parents=True)
    (root / "class" / "hwmon" / "hwmon4" / "name").write_text("ina260\n")
    (root / "class" / "hwmon" / "hwmon4" / "power1_input").write_text(f"{int(watts * 1e6)}\n")
    (root / "class" / "thermal" / "thermal_zone0").mkdir(parents=True)
    (root / "class" / "thermal" / "thermal_zone0" / "temp").write_text(f"{int(celsius * 1e3)}\n")
    return root


@needs_prometheus
def test_every_panel_returns_data_from_a_real_prometheus(tmp_path):
    gateway_port, prometheus_port = free_port(), free_port()
    data = as_yaml_dict(opt.resolve_fleet(None, 2, 1, "generated", None, None))
    data["coordinator"]["pushgateway"] = f"127.0.0.1:{gateway_port}"
    data["coordinator"]["prometheus_port"] = prometheus_port
    for device in data["devices"]:
        device.update(host="127.0.0.1", agent_port=free_port(), probe="hwmon")
    data["training"]["epochs"] = 20
    data["task"]["alert_classes"] = ["normal", "damaged", "stopped"]  # any prediction alarms
    data["task"]["alert_rate"] = 0.001
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(data))
    fleet = parse_config(data)
    write_monitoring(fleet, tmp_path / "monitoring")
    processes = Processes(tmp_path / "logs")
    try:
        start_pushgateway(processes, gateway_port)
        start_prometheus(processes, tmp_path / "monitoring" / "prometheus", prometheus_port)
        for i, device in enumerate(fleet.devices):
            sysfs = fixture_sysfs(tmp_path / f"sys-{device.name}", 2.0 + i, 50.0 + i)
            processes.start(
                f"agent-{device.name}",
                [
                    "fleet",
                    "agent",
                    "--config",
                    str(tmp_path / "fleet.yaml"),
                    "--device",
                    device.name,
                    "--address",
                    "127.0.0.1",
                    "--sys-root",
                    str(sysfs),
                    "--state-dir",
                    str(tmp_path / "run" / "devices" / device.name),
                ],
                dict(os.environ),
            )
        result = CliRunner().invoke(
            app,
            ["simulate", "--config", str(tmp_path / "fleet.yaml"), "--out", str(tmp_path / "run")],
        )
        assert result.exit_code == 0, result.output
        wait_for(
            lambda: len(prometheus_query(prometheus_port, 'up{job="skip2fleet-agents"} == 1')) == 2,
            60,
            "both agents scraped",
        )
        wait_for(
            lambda: prometheus_query(prometheus_port, "skip2fleet_round_number"),
            30,
            "the pushed round",
        )
        serving = tmp_path / "run" / "devices" / fleet.devices[0].name
        processes.start("serve", ["fleet", "serve", "--state-dir", str(serving)], dict(os.environ))
        wait_for(lambda: (serving / "spool").is_dir(), 30, "fleet serve's spool")
        fed = time.monotonic()
        alerts = None
        while alerts is None and time.monotonic() - fed < 60:  # a file a second: a rate
            sensor_file(serving / "spool", int(time.monotonic() * 1e3))
            alerts = firing(prometheus_port, "AlarmClass")
            time.sleep(1)
        assert alerts and alerts[0]["labels"]["device"] == fleet.devices[0].name, alerts
        print(f"ALARM fired {time.monotonic() - fed:.1f} s after the first spool file")
        board = json.loads((tmp_path / "monitoring/grafana/dashboards/skip2fleet.json").read_text())
        empty = []
        for title, query in panel_queries(board).items():
            expr = query.replace("$device", ".*")
            if not wait_for(lambda e=expr: prometheus_query(prometheus_port, e), 20, title):
                empty.append(title)
        assert empty == []
        power = prometheus_query(prometheus_port, 'skip2fleet_device_power_watts{device="sim-2"}')
        assert float(power[0]["value"][1]) == pytest.approx(3.0)
    finally:
        processes.stop_all()


def sensor_file(spool: Path, name: int) -> None:
    """What a sensor process drops: 20 samples of the generated task, written, then renamed."""
    x = np.random.default_rng(name).normal(size=(20, 64)).astype("f4")
    with open(spool / f"{name}.part", "wb") as out:
        np.savez(out, x=x)
    os.replace(spool / f"{name}.part", spool / f"{name}.npz")


def firing(port: int, name: str) -> list[dict] | None:
    """The alerts named `name` that Prometheus says are firing, if any."""
    url = f"http://127.0.0.1:{port}/api/v1/alerts"
    with urllib.request.urlopen(url, timeout=5) as response:
        alerts = json.load(response)["data"]["alerts"]
    return [
        a for a in alerts if a["labels"]["alertname"] == name and a["state"] == "firing"
    ] or None


def collect(collector) -> dict[str, float]:
    """{name{labels}: value} of one collection."""
    values = {}
    for family in collector.collect():
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}"] = sample.value
    return values


def test_agent_leaves_out_what_it_cannot_read_and_counts_it(tmp_path):
    from skip2fleet.client.telemetry.agent import DeviceCollector
    from skip2fleet.client.telemetry.power import PowerSampler
    from skip2fleet.client.telemetry.probes import HwmonPower, ThermalZones

    sysfs = fixture_sysfs(tmp_path / "sys", 2.0, 55.0)
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "stat").write_text("cpu  1 0 1 8 0 0 0 0 0 0\n")
    (tmp_path / "proc" / "meminfo").write_text("MemTotal: 1000 kB\nMemAvailable: 400 kB\n")
    (tmp_path / "state").mkdir()
    figures = {
        "round": 3,
        "acc_before": 60.0,
        "acc_after": 95.0,
        "forward_ms": 0.01,
        "backward_ms": 0.02,
        "update_ms": 0.003,
        "finetune_s": 1.5,
        "energy_joules": 4.2,
    }
    (tmp_path / "state" / "last-finetune.json").write_text(json.dumps(figures))
    sampler = PowerSampler(HwmonPower(sysfs / "class" / "hwmon"))
    sampler._started = sampler._last = 0.0
    sampler.sample()
    collector = DeviceCollector(
        sampler, ThermalZones(sysfs / "class" / "thermal"), tmp_path / "proc", tmp_path / "state"
    )
    values = collect(collector)
    assert values["skip2fleet_device_power_watts{estimated=false,source=hwmon}"] == 2.0
    assert values["skip2fleet_device_temperature_celsius{}"] == 55.0
    assert values["skip2fleet_device_memory_available_bytes{}"] == 400 * 1024
    assert values["skip2fleet_last_finetune_accuracy_ratio{phase=after}"] == 0.95
    assert values["skip2fleet_last_finetune_round{}"] == 3

    (sysfs / "class" / "hwmon" / "hwmon4" / "power1_input").unlink()  # the meter is unplugged
    (sysfs / "class" / "thermal" / "thermal_zone0" / "temp").write_text("garbage\n")
    sampler.sample()
    values = collect(collector)
    assert not any(name.startswith("skip2fleet_device_power_watts") for name in values)
    assert not any(name.startswith("skip2fleet_device_temperature") for name in values)
    assert values["skip2fleet_probe_errors_total{kind=vanished,probe=hwmon}"] == 1
    assert values["skip2fleet_probe_errors_total{kind=garbage,probe=thermal}"] == 1
    assert "skip2fleet_device_energy_joules_total{estimated=false,source=hwmon}" in values


def test_a_pushgateway_that_is_down_costs_one_line_per_round(tmp_path, caplog):
    data = as_yaml_dict(opt.resolve_fleet(None, 2, 2, "generated", None, None))
    data["coordinator"]["pushgateway"] = f"127.0.0.1:{free_port()}"  # nothing listens there
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(data))
    with caplog.at_level("WARNING", logger="skip2fleet"):
        result = CliRunner().invoke(
            app,
            ["simulate", "--config", str(tmp_path / "fleet.yaml"), "--out", str(tmp_path / "run")],
        )
    assert result.exit_code == 0, result.output
    warnings = [r.getMessage() for r in caplog.records if "Pushgateway" in r.getMessage()]
    assert len(warnings) == 2 and "round 1" in warnings[0] and "round 2" in warnings[1]
    assert all("in the run folder" in warning for warning in warnings)
    assert (tmp_path / "run" / "rounds" / "002" / "round.json").is_file()


@needs_prometheus
def test_the_coordinators_rounds_make_no_new_series_and_plans_do_not_grow(tmp_path):
    """`fleet bench coordinator` at a small size: the ServerApp's rounds of 4 and of 40 devices
    on a real Pushgateway and Prometheus; a plan's bytes are the same at both sizes, and the
    series after round 3 are those after round 1."""
    rows = [measure_coordinator(n, "mlp", 3, tmp_path / f"{n:03d}", interval="1s") for n in (4, 40)]
    for row in rows:
        assert row["pushes_scraped"] == 3, row
        assert row["series_after_3"] == row["series_after_1"] > 11 * row["devices"], row
        assert set(row["phases_s"]) == set(PHASES), row
    assert rows[0]["plan_bytes"] == rows[1]["plan_bytes"], rows
    assert rows[0]["message_bytes"] == rows[1]["message_bytes"], rows


@needs_prometheus
def test_the_gateway_keeps_one_group_for_the_fleet(tmp_path):
    """A run's first push deletes the job's groups of earlier versions (one per round), and no
    other job's; later pushes replace the fleet's group."""
    port = free_port()
    gateway = f"127.0.0.1:{port}"
    legacy = [
        {"job": JOB, "run": "old/run", "round": "1"},
        {"job": JOB, "run": "old/run", "round": "2"},
        {"job": "someone-else", "run": "x"},
    ]
    processes = Processes(tmp_path / "logs")
    try:
        start_pushgateway(processes, port)
        for labels in legacy:
            url = f"http://{gateway}{group_path(labels)}"
            put = urllib.request.Request(url, b"old_figure 1\n", method="PUT")
            wait_for(lambda r=put: urllib.request.urlopen(r, timeout=5), 30, "the Pushgateway")
        pushes = FleetPushes(gateway, "run-a", "skip2-lora")
        assert pushes.push(synthetic_round(1, 3)) and pushes.push(synthetic_round(2, 4))
        with urllib.request.urlopen(f"http://{gateway}/api/v1/metrics", timeout=5) as answer:
            groups = [g["labels"] for g in json.load(answer)["data"]]
        assert sorted(groups, key=str) == [{"job": JOB}, {"job": "someone-else", "run": "x"}]
        with urllib.request.urlopen(f"http://{gateway}/metrics", timeout=5) as answer:
            figures = metrics_by_key(answer.read().decode())
    finally:
        processes.stop_all()
    assert figures["skip2fleet_round_number||skip2fleet"] == 2
    devices = {key.split("|")[1] for key in figures if key.startswith("skip2fleet_device_cache")}
    assert len(devices) == 4
