"""The device's long-lived Prometheus exporter (`python -m skip2fleet.client.telemetry.agent`).

Flower starts a ClientApp process per message, so no metrics endpoint can live there: the agent
runs beside the SuperNode, samples the power probe at 10 Hz (an energy counter that keeps counting
between rounds), and on each scrape reads temperature, CPU and memory and the figures the ClientApp
left of the last fine-tune. A probe that cannot be read leaves its gauge out of the scrape and
counts an error by kind; the agent keeps serving.

It is resident on a board with 512 MB, so it imports only the standard library (no NumPy, no
Flower, no YAML, not even prometheus_client or http.server, which cost 10-13 MB between them): it
reads the device's own file (`shared/devicefile.py`) and writes Prometheus' text format itself
(`shared/exposition.py`).
"""

from __future__ import annotations

import argparse
import json
import signal
import socketserver
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from skip2fleet.client.telemetry.clock import ClockCheck
from skip2fleet.client.telemetry.power import PowerSampler
from skip2fleet.client.telemetry.probes import ProbeError, ThermalZones, power_probe
from skip2fleet.client.untrained import untrained_samples
from skip2fleet.client.watchdog import SuperNodeWatchdog
from skip2fleet.shared import metric_names as names
from skip2fleet.shared.devicefile import ACTIVE, LAST_FIGURES, SERVE_SNAPSHOT, DeviceSettings
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.exposition import Family, Sample


def _family(kind: str, metric: names.Metric) -> Family:
    return Family.of(metric, kind)


def _gauge(name: str, help_text: str, value: float) -> Family:
    return Family(name, help_text, "gauge").add([], value)


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
        self.samples: Path | None = None  # the device's own samples' folder, if it has one
        self.clock: ClockCheck | None = None  # with a coordinator in the device file
        self.watchdog: SuperNodeWatchdog | None = None

    def collect(self) -> Iterator[Family]:
        errors = _family("counter", names.PROBE_ERRORS)
        if self.sampler is not None:
            probe = self.sampler.probe
            labels = [probe.source, str(probe.estimated).lower()]
            if self.sampler.last_watts is not None:
                yield _family("gauge", names.DEVICE_POWER).add(labels, self.sampler.last_watts)
            yield _family("counter", names.DEVICE_ENERGY).add(labels, self.sampler.joules)
            for kind, count in self.sampler.errors.items():
                errors.add([probe.source, kind], count)
        try:
            celsius = self.thermal.celsius()
            metric = names.DEVICE_TEMPERATURE
            yield _gauge(metric.name, metric.help, celsius)
        except ProbeError as exc:
            self.errors[("thermal", exc.kind)] += 1
        for (probe_name, kind), count in self.errors.items():
            errors.add([probe_name, kind], count)
        if self.clock is not None:
            for kind, count in self.clock.errors.items():
                errors.add(["clock", kind], count)
        yield errors
        yield from self._coordinator()
        yield from self._system()
        yield from self._last_finetune()
        untrained = untrained_samples(self.state_dir, self.samples)
        if untrained is not None:
            yield _family("gauge", names.UNTRAINED_SAMPLES).add([], untrained)
        yield from self._active_model()
        yield from serving_families(self.state_dir / SERVE_SNAPSHOT, self.errors)

    def _coordinator(self) -> Iterator[Family]:
        """The clock's offset against the front door, and the watchdog's restarts."""
        if self.clock is not None and self.clock.offset is not None:
            metric = names.CLOCK_OFFSET
            yield _gauge(metric.name, metric.help, self.clock.offset)
        if self.watchdog is not None:
            yield _family("counter", names.SUPERNODE_RESTARTS).add([], self.watchdog.restarts)

    def _active_model(self) -> Iterator[Family]:
        """The model `fleet predict` uses, from the state folder's active.json (read as JSON
        here: the store that writes it imports NumPy): its round, version and base as values, so a
        new one changes values and makes no series."""
        path = self.state_dir / ACTIVE
        if not path.is_file():
            return
        try:
            active = json.loads(path.read_text())
            version = active["version"] or {}
            values = {
                names.ACTIVE_MODEL: float(active["accuracy"]) / 100,
                names.ACTIVE_MODEL_ROUND: int(version.get("round", 0)),
                names.ACTIVE_MODEL_VERSION: int(version.get("number", 0)),
                names.ACTIVE_MODEL_BASE: names.base_id(str(active["base_sha256"])),
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self.errors[("state", "garbage")] += 1
            return
        for metric, value in values.items():
            yield _family("gauge", metric).add([], value)

    def _system(self) -> Iterator[Family]:
        try:
            ticks = [
                float(v) for v in (self.proc_root / "stat").read_text().split("\n")[0].split()[1:]
            ]
            total, idle = sum(ticks), ticks[3] + ticks[4]
            previous, self._cpu_previous = self._cpu_previous, (total, idle)
            if previous is not None and total > previous[0]:
                busy = 1 - (idle - previous[1]) / (total - previous[0])
                yield _gauge(names.DEVICE_CPU_BUSY.name, names.DEVICE_CPU_BUSY.help, busy)
            meminfo = {
                line.split(":")[0]: float(line.split()[1]) * 1024
                for line in (self.proc_root / "meminfo").read_text().splitlines()
                if line.split(":")[0] in ("MemTotal", "MemAvailable")
            }
            for key, name in (("MemTotal", "total"), ("MemAvailable", "available")):
                yield _gauge(
                    names.DEVICE_MEMORY.format(kind=name), f"Memory, {name}.", meminfo[key]
                )
        except (OSError, ValueError, IndexError, KeyError):
            self.errors[("proc", "garbage")] += 1

    def _last_finetune(self) -> Iterator[Family]:
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
                yield _gauge(names.LAST_FINETUNE.format(figure=name), help_text, figures[key])
        accuracy = _family("gauge", names.LAST_FINETUNE_ACCURACY)
        for phase in ("before", "after"):
            accuracy.add([phase], figures.get(f"acc_{phase}", 0.0) / 100)
        yield accuracy
        batch = _family("gauge", names.LAST_FINETUNE_BATCH)
        for phase in ("forward", "backward", "update"):
            batch.add([phase], figures.get(f"{phase}_ms", 0.0) / 1e3)
        yield batch

    def exposition(self) -> bytes:
        return "".join(family.text() for family in self.collect()).encode()


def _histogram(metric: names.Metric, data: dict) -> Family:
    family = Family(metric.name, metric.help, "histogram")
    cumulative = 0
    for bound, count in zip([*data["bounds"], "+Inf"], data["counts"], strict=True):
        cumulative += count
        family.samples.append(Sample(f"{metric.name}_bucket", {"le": str(bound)}, cumulative))
    family.samples.append(Sample(f"{metric.name}_sum", {}, data["sum"]))
    family.samples.append(Sample(f"{metric.name}_count", {}, cumulative))
    return family


def serving_families(path: Path, errors: Counter[tuple[str, str]]) -> Iterator[Family]:
    """What `fleet serve` did, from the snapshot it leaves in the state folder (none: nothing)."""
    try:
        snap = json.loads(path.read_text())
        predictions = _family("counter", names.SERVE_PREDICTIONS)
        for name, count in sorted(snap["predictions"].items()):
            predictions.add([name], count)
        rejected = _family("counter", names.SERVE_REJECTED)
        for kind, count in snap["rejected"].items():
            rejected.add([kind], count)
        families = [
            predictions,
            rejected,
            _histogram(names.SERVE_CONFIDENCE, snap["confidence"]),
            _histogram(names.SERVE_LATENCY, snap["latency_seconds"]),
            _family("counter", names.SERVE_SWITCHES).add([], snap["switches"]),
            _family("counter", names.SERVE_LOAD_FAILURES).add([], snap["load_failures"]),
        ]
        for metric, key in (
            (names.SERVE_VERSION, "version"),
            (names.SERVE_ROUND, "round"),
            (names.SERVE_BACKLOG, "spool_backlog"),
            (names.SERVE_UPDATED, "time"),
        ):
            families.append(_gauge(metric.name, metric.help, float(snap[key])))
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        errors[("serve", "garbage")] += 1
        return
    yield from families


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    collector: DeviceCollector


class _Handler(socketserver.StreamRequestHandler):
    """HTTP/1.0 GET /metrics (anything else: 404); enough for Prometheus and curl."""

    timeout = 10

    def handle(self) -> None:
        try:
            request = self.rfile.readline(8192).split()
            while self.rfile.readline(8192).strip():  # the headers, unread
                pass
        except OSError:
            return
        if request[:1] == [b"GET"] and request[1:2] and request[1].split(b"?")[0] == b"/metrics":
            status, body = b"200 OK", self.server.collector.exposition()  # type: ignore[attr-defined]
        else:
            status, body = b"404 Not Found", b"only /metrics here\n"
        head = (
            b"HTTP/1.0 " + status + b"\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8"
            b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        self.wfile.write(head + body)


def serve(collector: DeviceCollector, address: str, port: int) -> threading.Event:
    """Serve the collector over HTTP in a thread; returns the event that stops it (SIGTERM and
    SIGINT set it too)."""
    try:
        server = _Server((address, port), _Handler)
    except OSError as exc:
        raise FleetError(f"agent: cannot listen on {address}:{port} ({exc.strerror})") from None
    server.collector = collector
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def run_agent(
    settings: DeviceSettings, hz: float = 10.0, sys_root: Path = Path("/sys"),
    proc_root: Path = Path("/proc"),
) -> None:  # fmt: skip
    """Export this device's power, energy, temperature, CPU, memory, last fine-tune and the
    samples it has not trained on until SIGTERM."""
    probe = power_probe(
        settings.probe, sys_root, proc_root, settings.idle_watts, settings.full_watts
    )
    sampler = PowerSampler(probe, hz).start() if probe is not None else None
    collector = DeviceCollector(
        sampler,
        ThermalZones(sys_root / "class" / "thermal"),
        proc_root,
        Path(settings.state_dir).expanduser(),
    )
    collector.samples = Path(settings.samples) if settings.samples else None
    if settings.coordinator:
        collector.clock = ClockCheck(settings.coordinator, settings.ca_cert).start()
        collector.watchdog = SuperNodeWatchdog(settings.name, settings.coordinator, proc_root)
        collector.watchdog.start()
    stop = serve(collector, settings.agent_address, settings.agent_port)
    print(
        f"agent for {settings.name}: probe {probe.source if probe else 'none'}, "
        f"http://{settings.agent_address}:{settings.agent_port}/metrics",
        flush=True,
    )
    stop.wait()
    if sampler is not None:
        sampler.stop()


def main(argv: list[str] | None = None) -> None:
    """What a device runs, reading its own device file; errors as one line and exit code 2."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name if __spec__ else 'agent'}",
        description="The device's Prometheus exporter.",
    )
    parser.add_argument("--config", type=Path, required=True, help="The device file.")
    parser.add_argument("--hz", type=float, default=10.0, help="Power samples per second.")
    parser.add_argument("--sys-root", type=Path, default=Path("/sys"), help="Where sysfs is.")
    parser.add_argument("--proc-root", type=Path, default=Path("/proc"), help="Where procfs is.")
    args = parser.parse_args(argv)
    try:
        if not args.hz >= 0.1:
            raise FleetError(f"--hz: {args.hz} is below 0.1")
        run_agent(DeviceSettings.read(args.config), args.hz, args.sys_root, args.proc_root)
    except FleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
