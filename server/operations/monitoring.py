"""`fleet monitor config`: Prometheus and Grafana files for the fleet, written from fleet.yaml.

    prometheus/prometheus.yml  the device agents (labelled by device) and the Pushgateway
    prometheus/alerts.yml      a device down, a device too hot, a round with refused replies
    grafana/provisioning/   the Prometheus datasource and the dashboard provider
    grafana/dashboards/skip2fleet.json

The dashboard is built with Grafana's own `grafana-foundation-sdk`, pinned to its Grafana 11.6
target, from one table of panels; every panel's query is checked against a real Prometheus in
the tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
import yaml

from skip2fleet.server import options as opt
from skip2fleet.server.federation.pushes import PUSH_USER
from skip2fleet.server.operations.certs import fleet_credentials
from skip2fleet.shared import metric_names as names
from skip2fleet.shared.atomic import write_text_atomic
from skip2fleet.shared.config import FleetConfig, load_config
from skip2fleet.shared.errors import FleetError

AGENT_JOB = "skip2fleet-agents"
PUSH_JOB = "skip2fleet-pushgateway"
DATASOURCE_UID = "skip2fleet-prometheus"
TOO_HOT_CELSIUS = 80  # Raspberry Pis start throttling between 80 and 85
REFUSED_ALERT_S = 3600  # how long a round with refused replies stays an alert
CLOCK_OFF_S = 4  # Flower refuses a device's signed requests from 5 s ahead (300 s behind)
SCRAPE_INTERVAL = "5s"
PUSH_SCRAPE_INTERVAL = "2s"  # a round's figures are queryable about this soon after it ends
DEVICE = 'device=~"$device"'


@dataclass(frozen=True)
class PanelSpec:
    title: str
    expr: str
    legend: str
    unit: str
    kind: str = "timeseries"  # timeseries | stat | bargauge


PANELS = (
    PanelSpec("Devices up", f'sum(up{{job="{AGENT_JOB}"}})', "devices up", "none", "stat"),
    PanelSpec("Last round", f"max({names.ROUND_NUMBER.name})", "round", "none", "stat"),
    PanelSpec("Device agents", f'up{{job="{AGENT_JOB}", {DEVICE}}}', "{{device}}", "none"),
    PanelSpec("Round duration", names.ROUND_DURATION.name, "last completed round", "s"),
    PanelSpec(
        "Accuracy before / after",
        f"{names.DEVICE_ACCURACY.name}{{{DEVICE}}}",
        "{{device}} {{phase}}",
        "percentunit",
        "bargauge",
    ),
    PanelSpec(
        "Active model (hold-out accuracy)",
        f"{names.ACTIVE_MODEL.name}{{{DEVICE}}}",
        "{{device}}",
        "percentunit",
        "bargauge",
    ),
    PanelSpec(
        "Active model's round",
        f"{names.ACTIVE_MODEL_ROUND.name}{{{DEVICE}}}",
        "{{device}}",
        "none",
        "bargauge",
    ),
    PanelSpec(
        "Train time per batch",
        f"{names.DEVICE_TRAIN_BATCH.name}{{{DEVICE}}}",
        "{{device}} {{phase}}",
        "s",
        "bargauge",
    ),
    PanelSpec(
        "Fine-tune time", f"{names.DEVICE_FINETUNE_SECONDS.name}{{{DEVICE}}}", "{{device}}", "s"
    ),
    PanelSpec("Power", f"{names.DEVICE_POWER.name}{{{DEVICE}}}", "{{device}} ({{source}})", "watt"),
    PanelSpec(
        "Energy per fine-tune",
        f"{names.DEVICE_FINETUNE_ENERGY.name}{{{DEVICE}}}",
        "{{device}}",
        "joule",
        "bargauge",
    ),
    PanelSpec(
        "Temperature", f"{names.DEVICE_TEMPERATURE.name}{{{DEVICE}}}", "{{device}}", "celsius"
    ),
    PanelSpec(
        "Bytes sent per round",
        f"sum({names.DEVICE_UPLINK.name}{{{DEVICE}}})",
        "the devices' replies",
        "bytes",
    ),
    PanelSpec(
        "Predictions per class",
        f"sum by (device, class) (rate({names.SERVE_PREDICTIONS.name}_total{{{DEVICE}}}[5m]))",
        "{{device}} {{class}}",
        "reqps",
    ),
    PanelSpec(
        "Prediction confidence (median)",
        "histogram_quantile(0.5, sum by (device, le) "
        f"(rate({names.SERVE_CONFIDENCE.name}_bucket{{{DEVICE}}}[5m])))",
        "{{device}}",
        "percentunit",
    ),
    PanelSpec(
        "Adapters version serving", f"{names.SERVE_VERSION.name}{{{DEVICE}}}", "{{device}}", "none"
    ),
)


def alarm_panels(fleet: FleetConfig) -> tuple[PanelSpec, ...]:
    if not fleet.task.alert_classes:
        return ()
    title = "Alarms (" + ", ".join(fleet.task.alert_classes) + ") a second"
    return (
        PanelSpec(
            title, alarm_expr(fleet).replace("{class", f"{{{DEVICE}, class"), "{{device}}", "reqps"
        ),
    )


def prometheus_config(fleet: FleetConfig) -> dict:
    gateway = fleet.coordinator.pushgateway or "127.0.0.1:9091"
    password = fleet_credentials(fleet).pushgateway_password
    auth = (
        {"basic_auth": {"username": PUSH_USER, "password_file": str(password)}}
        if password.is_file()
        else {}
    )
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [
            {
                "job_name": AGENT_JOB,
                "static_configs": [
                    {"targets": [f"{d.host}:{d.agent_port}"], "labels": {"device": d.name}}
                    for d in fleet.devices
                ],
            },
            # The coordinator's pushed figures carry their own job and device labels.
            {
                "job_name": PUSH_JOB,
                "honor_labels": True,
                "scrape_interval": PUSH_SCRAPE_INTERVAL,
                "static_configs": [{"targets": [gateway]}],
                **auth,
            },
        ],
    }


def alert_rules(fleet: FleetConfig) -> dict:
    return {
        "groups": [
            {
                "name": "skip2fleet",
                "rules": [
                    {
                        "alert": "DeviceDown",
                        "expr": f'up{{job="{AGENT_JOB}"}} == 0',
                        "for": "1m",
                        "labels": {"severity": "warning"},
                        "annotations": {"summary": "{{ $labels.device }}'s agent is not answering"},
                    },
                    {
                        "alert": "DeviceTooHot",
                        "expr": f"{names.DEVICE_TEMPERATURE.name} > {TOO_HOT_CELSIUS}",
                        "for": "2m",
                        "labels": {"severity": "warning"},
                        "annotations": {"summary": "{{ $labels.device }} is at {{ $value }} °C"},
                    },
                    {
                        "alert": "RoundRefusedReplies",
                        # the last round pushed, for an hour after its push; named by its run
                        "expr": f"{names.ROUND_REFUSED.name} * on (job) group_left (run) "
                        f"{names.RUN_INFO.name} > 0 and on (job) "
                        f"time() - push_time_seconds < {REFUSED_ALERT_S}",
                        "labels": {"severity": "info"},
                        "annotations": {
                            "summary": "round {{ with query "
                            f'"max({names.ROUND_NUMBER.name})"'
                            " }}{{ . | first | value }}{{ end }} of run {{ $labels.run }} "
                            "refused {{ $value }} replies"
                        },
                    },
                    clock_rule(),
                    *alarm_rules(fleet),
                ],
            }
        ]
    }


def clock_rule() -> dict:
    """A device whose clock is off the front door's: Flower refuses its requests."""
    return {
        "alert": "DeviceClockOff",
        "expr": f"abs({names.CLOCK_OFFSET.name}) > {CLOCK_OFF_S}",
        "for": "1m",
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "{{ $labels.device }}'s clock is {{ $value }} s off the coordinator's: "
            "Flower refuses its requests (fleet status)"
        },
    }


def alarm_expr(fleet: FleetConfig) -> str:
    """Alarm-class predictions a second per device, the mean over 5 minutes."""
    classes = "|".join(fleet.task.alert_classes)
    return f'sum by (device) (rate({names.SERVE_PREDICTIONS.name}_total{{class=~"{classes}"}}[5m]))'


def alarm_rules(fleet: FleetConfig) -> list[dict]:
    """A device whose service keeps seeing an alarm class (task.alert_classes), if any."""
    if not fleet.task.alert_classes:
        return []
    return [
        {
            "alert": "AlarmClass",
            "expr": f"{alarm_expr(fleet)} > {fleet.task.alert_rate}",
            "labels": {"severity": "critical"},
            "annotations": {
                "summary": "{{ $labels.device }} sees "
                + " or ".join(fleet.task.alert_classes)
                + ': {{ $value | printf "%.3f" }} a second'
            },
        }
    ]


def dashboard(fleet: FleetConfig) -> dict:
    """The Grafana 11 dashboard, built with grafana-foundation-sdk."""
    try:
        from grafana_foundation_sdk.builders import bargauge, prometheus, stat, timeseries
        from grafana_foundation_sdk.builders import dashboard as board
        from grafana_foundation_sdk.cog.encoder import JSONEncoder
        from grafana_foundation_sdk.models.dashboard import DataSourceRef, GridPos, VariableRefresh
    except ImportError:
        raise FleetError(
            "the dashboard needs grafana-foundation-sdk: pip install 'skip2fleet[monitor]'"
        ) from None
    source = DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
    builders = {"timeseries": timeseries.Panel, "stat": stat.Panel, "bargauge": bargauge.Panel}
    devices = (
        board.QueryVariable("device")
        .label("device")
        .datasource(source)
        .query(f'label_values(up{{job="{AGENT_JOB}"}}, device)')
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
    )
    built = (
        board.Dashboard("skip2fleet")
        .uid("skip2fleet")
        .tags(["skip2fleet"])
        .refresh("10s")
        .time("now-1h", "now")
        .with_variable(devices)
    )
    panels = PANELS + alarm_panels(fleet)
    stats = [p for p in panels if p.kind == "stat"]
    others = [p for p in panels if p.kind != "stat"]
    places = [GridPos(h=4, w=6, x=6 * i, y=0) for i in range(len(stats))]
    places += [GridPos(h=8, w=12, x=12 * (i % 2), y=4 + 8 * (i // 2)) for i in range(len(others))]
    for spec, place in zip(stats + others, places, strict=True):
        panel = (
            builders[spec.kind]()
            .title(spec.title)
            .unit(spec.unit)
            .datasource(source)
            .grid_pos(place)
            .with_target(prometheus.Dataquery().expr(spec.expr).legend_format(spec.legend))
        )
        built = built.with_panel(panel)
    return json.loads(JSONEncoder(sort_keys=True, indent=2).encode(built.build()))


def panel_queries(dashboard_json: dict) -> dict[str, str]:
    """Title -> PromQL of every panel of a dashboard."""
    return {p["title"]: t["expr"] for p in dashboard_json["panels"] for t in p["targets"]}


def write_monitoring(fleet: FleetConfig, out: Path) -> list[Path]:
    prometheus_url = f"http://127.0.0.1:{fleet.coordinator.prometheus_port}"
    files = {
        "prometheus/prometheus.yml": yaml.safe_dump(prometheus_config(fleet), sort_keys=False),
        "prometheus/alerts.yml": yaml.safe_dump(
            alert_rules(fleet), sort_keys=False, allow_unicode=True
        ),
        "grafana/provisioning/datasources/skip2fleet.yml": yaml.safe_dump(
            {
                "apiVersion": 1,
                "datasources": [
                    {
                        "name": "skip2fleet Prometheus",
                        "uid": DATASOURCE_UID,
                        "type": "prometheus",
                        "access": "proxy",
                        "url": prometheus_url,
                        "isDefault": True,
                    }
                ],
            },
            sort_keys=False,
        ),
        "grafana/provisioning/dashboards/skip2fleet.yml": yaml.safe_dump(
            {
                "apiVersion": 1,
                "providers": [
                    {
                        "name": "skip2fleet",
                        "type": "file",
                        "folder": "skip2fleet",
                        "options": {"path": str((out / "grafana" / "dashboards").resolve())},
                    }
                ],
            },
            sort_keys=False,
        ),
        "grafana/dashboards/skip2fleet.json": json.dumps(dashboard(fleet), indent=2) + "\n",
    }
    return [write_text_atomic(out / name, text) for name, text in files.items()]


def config_command(
    config: Annotated[Path, typer.Option(help="The fleet file.")] = Path("fleet.yaml"),
    out: Annotated[
        Path, typer.Option(callback=opt.writable_folder, help="Folder to write the files into.")
    ] = Path("monitoring"),
) -> None:
    """Write prometheus.yml, alert rules, Grafana provisioning and the dashboard."""
    for path in write_monitoring(load_config(config), out):
        typer.echo(f"wrote {path}")
