"""`fleet agent`: the device's long-lived Prometheus exporter.

Flower starts a ClientApp process per message, so no metrics endpoint can live there: the agent
runs beside the SuperNode, samples the power probe at 10 Hz (an energy counter that keeps counting
between rounds), and on each scrape reads temperature, CPU and memory and the figures the ClientApp
left of the last fine-tune. A probe that cannot be read leaves its gauge out of the scrape and
counts an error by kind; the agent keeps serving.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry

from skip2fleet.client.store import LAST_FIGURES, DeviceStore
from skip2fleet.client.telemetry.power import PowerSampler
from skip2fleet.client.telemetry.probes import ProbeError, ThermalZones, power_probe
from skip2fleet.shared import metric_names as names
from skip2fleet.shared.config import load_config
from skip2fleet.shared.errors import FleetError


def _family(kind: type, metric: names.Metric):
    return kind(metric.name, metric.help, labels=list(metric.labels))


class DeviceCollector:
    """Collects on every scrape; the power sampler runs on its own."""

    def __init__(
        self,
        sampler: PowerSampler | None,
        thermal: ThermalZones,
        proc_root: Path,
        state_dir: Path,
    ) -> None:
        self.sampler, self.thermal = sampler, thermal
        self.proc_root, self.state_dir = Path(proc_root), Path(state_dir)
        self.errors: Counter[tuple[str, str]] = Counter()
        self._cpu_previous: tuple[float, float] | None = None

    def collect(self):
        errors = _family(CounterMetricFamily, names.PROBE_ERRORS)
        if self.sampler is not None:
            probe = self.sampler.probe
            labels = [probe.source, str(probe.estimated).lower()]
            if self.sampler.last_watts is not None:
                power = _family(GaugeMetricFamily, names.DEVICE_POWER)
                power.add_metric(labels, self.sampler.last_watts)
                yield power
            energy = _family(CounterMetricFamily, names.DEVICE_ENERGY)
            energy.add_metric(labels, self.sampler.joules)
            yield energy
            for kind, count in self.sampler.errors.items():
                errors.add_metric([probe.source, kind], count)
        try:
            celsius = self.thermal.celsius()
            metric = names.DEVICE_TEMPERATURE
            yield GaugeMetricFamily(metric.name, metric.help, value=celsius)
        except ProbeError as exc:
            self.errors[("thermal", exc.kind)] += 1
        for (probe_name, kind), count in self.errors.items():
            errors.add_metric([probe_name, kind], count)
        yield errors
        yield from self._system()
        yield from self._last_finetune()
        yield from self._active_model()

    def _active_model(self):
        try:
            active = DeviceStore(self.state_dir).active()
        except (OSError, ValueError, KeyError, TypeError):
            self.errors[("state", "garbage")] += 1
            return
        if active is None:
            return
        version = active.version
        family = _family(GaugeMetricFamily, names.ACTIVE_MODEL)
        labels = [
            active.base_sha256[:12],
            str(version.round if version else 0),
            str(version.number if version else 0),
        ]
        family.add_metric(labels, active.accuracy / 100)
        yield family

    def _system(self):
        try:
            ticks = [
                float(v) for v in (self.proc_root / "stat").read_text().split("\n")[0].split()[1:]
            ]
            total, idle = sum(ticks), ticks[3] + ticks[4]
            previous, self._cpu_previous = self._cpu_previous, (total, idle)
            if previous is not None and total > previous[0]:
                busy = 1 - (idle - previous[1]) / (total - previous[0])
                metric = names.DEVICE_CPU_BUSY
                yield GaugeMetricFamily(metric.name, metric.help, value=busy)
            meminfo = {
                line.split(":")[0]: float(line.split()[1]) * 1024
                for line in (self.proc_root / "meminfo").read_text().splitlines()
                if line.split(":")[0] in ("MemTotal", "MemAvailable")
            }
            for key, name in (("MemTotal", "total"), ("MemAvailable", "available")):
                yield GaugeMetricFamily(
                    names.DEVICE_MEMORY.format(kind=name), f"Memory, {name}.", value=meminfo[key]
                )
        except (OSError, ValueError, IndexError, KeyError):
            self.errors[("proc", "garbage")] += 1

    def _last_finetune(self):
        path = self.state_dir / LAST_FIGURES
        try:
            figures = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        simple = {
            "round": ("round", "Round of the device's last fine-tune."),
            "finetune_s": ("seconds", "Wall time of the last fine-tune."),
            "energy_joules": ("energy_joules", "Energy of the last fine-tune."),
            "uplink_bytes": ("uplink_bytes", "Bytes of the last reply."),
            "samples": ("samples", "Samples of the last fine-tune."),
            "accepted": ("accepted", "1 when the last fine-tune's adapters became active."),
        }
        for key, (name, help_text) in simple.items():
            if key in figures:
                yield GaugeMetricFamily(
                    names.LAST_FINETUNE.format(figure=name), help_text, value=figures[key]
                )
        accuracy = _family(GaugeMetricFamily, names.LAST_FINETUNE_ACCURACY)
        for phase in ("before", "after"):
            accuracy.add_metric([phase], figures.get(f"acc_{phase}", 0.0) / 100)
        yield accuracy
        batch = _family(GaugeMetricFamily, names.LAST_FINETUNE_BATCH)
        for phase in ("forward", "backward", "update"):
            batch.add_metric([phase], figures.get(f"{phase}_ms", 0.0) / 1e3)
        yield batch


def agent_command(
    device: Annotated[str, typer.Option(help="This device's name in the fleet file.")],
    config: Annotated[Path, typer.Option(help="The fleet file.")] = Path("fleet.yaml"),
    state_dir: Annotated[
        Path, typer.Option(help="The ClientApp's state folder (its SuperNode's state-dir).")
    ] = Path("~/.skip2fleet/device"),
    address: Annotated[str, typer.Option(help="Address to serve on.")] = "0.0.0.0",
    port: Annotated[
        int | None, typer.Option(help="Port (default: the device's agent_port).")
    ] = None,
    hz: Annotated[float, typer.Option(min=0.1, help="Power samples per second.")] = 10.0,
    sys_root: Annotated[
        Path, typer.Option(help="Where sysfs is (tests use a fixture tree).")
    ] = Path("/sys"),
    proc_root: Annotated[Path, typer.Option(help="Where procfs is.")] = Path("/proc"),
) -> None:
    """Export this device's power, energy, temperature, CPU, memory and last fine-tune."""
    fleet = load_config(config)
    entry = next((d for d in fleet.devices if d.name == device), None)
    if entry is None:
        raise FleetError(
            f"{config}: no device {device!r} ({', '.join(d.name for d in fleet.devices)})"
        )
    probe = power_probe(entry.probe, sys_root, proc_root, entry.idle_watts, entry.full_watts)
    sampler = PowerSampler(probe, hz).start() if probe is not None else None
    collector = DeviceCollector(
        sampler, ThermalZones(sys_root / "class" / "thermal"), proc_root, state_dir.expanduser()
    )
    stop = serve(collector, address, port or entry.agent_port)
    typer.echo(
        f"agent for {device}: probe {probe.source if probe else 'none'}, "
        f"http://{address}:{port or entry.agent_port}/metrics"
    )
    stop.wait()
    if sampler is not None:
        sampler.stop()


def serve(collector: DeviceCollector, address: str, port: int) -> threading.Event:
    """Serve the collector over HTTP; returns the event that stops it (SIGTERM sets it too)."""
    registry = CollectorRegistry()
    registry.register(collector)
    start_http_server(port, addr=address, registry=registry)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def main() -> None:
    """`python -m skip2fleet.client.telemetry.agent`: what a device runs, without the
    coordinator's command line; errors as one line and exit code 2, as `fleet` does."""
    try:
        typer.run(agent_command)
    except FleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
