"""`fleet bench coordinator`: the coordinator's own work per round as the fleet grows, the
devices' training excluded.

For each fleet size and model it runs the ServerApp's rounds (`play_round`, every phase: plans,
the exchange's bookkeeping, validation, screening, fedavg, the run folder, the push) on a real
Pushgateway and Prometheus on loopback (`measure_series`), against an in-process grid whose
nodes reply at once with synthetic adapters in the real wire format: each reply's objects are
serialised as a device sends them (not timed) and inflated as Flower's grid does on the
coordinator (timed, with the exchange). A deployment's trusted roster (every node registered),
HAR's features (MLP) or raw windows (CNN), Skip2-LoRA at rank 4. Each fleet size runs in a fresh
process, so its peak RSS is its own. Each phase's wall time and this process' CPU time are
measured: on a shared machine the CPU time is what the load does not inflate.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Annotated

import numpy as np
import typer
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, RecordDict
from flwr.app.message.message import make_message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

from skip2fleet.server import options as opt
from skip2fleet.server.bench.series import measure_series, synthetic_figures
from skip2fleet.server.federation.runs import RunFolder
from skip2fleet.server.federation.serverapp import open_run, play_round
from skip2fleet.server.operations.monitoring import PUSH_SCRAPE_INTERVAL
from skip2fleet.shared import model as base_model
from skip2fleet.shared.atomic import write_text_atomic
from skip2fleet.shared.config import parse_config
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.layout import layout
from skip2fleet.shared.methods import get_method
from skip2fleet.shared.protocol import DEVICE_NAME, THETA, Part
from skip2fleet.shared.records import figures_record, wire_bytes
from skip2fleet.shared.spec import build

SHAPES = {"mlp": (561,), "cnn": (9, 128)}  # HAR's features, and its raw windows
CLASSES = 6
RANK = 4
PHASES = ("configure", "exchange", "validate", "screen", "aggregate", "persist", "report")
MB = 2**20


class SyntheticGrid:
    """Flower's Grid as the ServerApp uses it, in this process: every node replies at once with
    adapters near a shared vector (so screening has a real median), in the wire format."""

    def __init__(self, devices: dict[int, str], size: int) -> None:
        self.devices, self.size = devices, size
        self.center = np.random.default_rng(0).normal(0, 0.01, size).astype(np.float32)
        self.sent: dict[str, int] = {}  # message id -> node
        self.first = min(devices)
        self.first_content: RecordDict | None = None  # the first node's, as last pushed
        self.device_s = 0.0  # spent making the devices' replies: not the coordinator's
        self.device_cpu_s = 0.0

    def get_node_ids(self) -> list[int]:
        return list(self.devices)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for message in messages:
            node = message.metadata.dst_node_id
            _ = message.object_id  # what Flower's grid computes to push it (shared parts once)
            ids.append(f"m{node}")
            self.sent[ids[-1]] = node
            if node == self.first:
                self.first_content = message.content
        return ids

    def pull_messages(self, ids) -> list[Message]:
        replies = []
        for mid in ids:
            started, cpu = time.perf_counter(), time.process_time()
            node = self.sent.pop(mid)
            objects = self._sent_by(node)
            self.device_s += time.perf_counter() - started
            self.device_cpu_s += time.process_time() - cpu
            content = inflate_object_from_contents(objects.pop("root"), objects)
            metadata = Metadata(1, f"r{mid}", node, 1, mid, "", time.time(), 600.0, "train")
            replies.append(make_message(metadata, content))
        return replies

    def _sent_by(self, node: int) -> dict[str, bytes]:
        """A device's reply as its objects' bytes on the wire (and which one is the root)."""
        scale = np.float32(1 + (node % 7) / 100)
        content = RecordDict(
            {
                Part.ADAPTERS: ArrayRecord({THETA: Array(self.center * scale)}),
                Part.DEVICE: ConfigRecord({DEVICE_NAME: self.devices[node]}),
                Part.FIGURES: figures_record(synthetic_figures()),
            }
        )
        objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(content).items()}
        return objects | {"root": content.object_id}


def bench_folder(workdir: Path, devices: int, model: str, rounds: int, gateway: str) -> RunFolder:
    """A run folder for `devices` registered devices of HAR's `model`."""
    names = [f"device-{i:05d}" for i in range(devices)]
    config = {
        "coordinator": {"pushgateway": gateway, "state_dir": str(workdir / "state")},
        "training": {"model": model, "rank": RANK, "epochs": 1},
        "federation": {
            "aggregation": "fedavg",
            "rounds": rounds,
            "min_devices": devices,
            "round_timeout_s": 3600,
        },
        "devices": [{"name": n, "data": {"partition": str(i)}} for i, n in enumerate(names)],
    }
    parse_config(config, "bench fleet")
    spec = build(model, SHAPES[model], CLASSES)
    base = base_model.init_model(spec, np.random.default_rng(0))
    folder = RunFolder.create(workdir / "run", config, base)
    folder.save_node_registry({name: i + 1 for i, name in enumerate(names)})
    return folder


def measure_coordinator(
    devices: int, model: str, rounds: int, workdir: Path, interval: str = PUSH_SCRAPE_INTERVAL
) -> dict:
    """Rounds of `devices` devices through `play_round` with a real Pushgateway, their phases
    timed; the series Prometheus holds after round 1 and the last."""
    for name in ("_run_id", "_node_id", "_task_id"):  # as Flower sets them in a ServerApp
        setattr(TaskIdentity, name, 1)
    laps: list[dict[str, float]] = []  # wall seconds of each phase, per round
    cpu_laps: list[dict[str, float]] = []  # this process' CPU seconds of each phase, per round
    peaks: dict[str, float] = {}  # the process' peak RSS, MB, when each phase first ended
    grid: SyntheticGrid | None = None
    sizes: dict[str, int] = {}

    def rounds_to(gateway: str):
        nonlocal grid
        folder = bench_folder(workdir, devices, model, rounds, gateway)
        run = open_run(folder, lambda result: None)
        size = layout(get_method("skip2-lora"), run.spec, RANK).size
        grid = SyntheticGrid({n: d for n, d in run.roster.device_of.items()}, size)

        def one_round(result: dict) -> bool:
            times, cpu_times = {}, {}
            mark = [time.perf_counter(), grid.device_s, time.process_time(), grid.device_cpu_s]

            def lap(phase: str) -> None:
                now = [time.perf_counter(), grid.device_s, time.process_time(), grid.device_cpu_s]
                times[phase] = now[0] - mark[0] - (now[1] - mark[1])
                cpu_times[phase] = now[2] - mark[2] - (now[3] - mark[3])
                mark[:] = now
                peaks.setdefault(phase, peak_rss_mb())

            play_round(grid, run, result["round"], lap)
            laps.append(times)
            cpu_laps.append(cpu_times)
            content = grid.first_content
            sizes.update(
                plan_bytes=wire_bytes(content[Part.PLAN]), message_bytes=wire_bytes(content)
            )
            return True

        return one_round

    series = measure_series(devices, rounds, workdir, rounds_to, interval)
    later, later_cpu = laps[1:] or laps, cpu_laps[1:] or cpu_laps
    return {
        "devices": devices,
        "model": model,
        "seconds": median(sum(t.values()) for t in later),
        "round_1_s": sum(laps[0].values()),
        "phases_s": {phase: median(t[phase] for t in later) for phase in PHASES},
        "cpu_seconds": median(sum(t.values()) for t in later_cpu),
        "phases_cpu_s": {phase: median(t[phase] for t in later_cpu) for phase in PHASES},
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_mb_by_phase": peaks,
        **sizes,
        "series_after_1": series["series_after_1"],
        f"series_after_{rounds}": series["series_after_last"],
        "pushes_scraped": sum(series["scraped"]),
        "rounds": rounds,
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure_in(
    queue, devices: int, model: str, rounds: int, interval: str = PUSH_SCRAPE_INTERVAL
) -> None:
    with tempfile.TemporaryDirectory(prefix="fleet-bench-coordinator-") as workdir:
        try:
            queue.put(measure_coordinator(devices, model, rounds, Path(workdir), interval))
        except Exception as exc:  # reported by the parent, with the fleet size
            queue.put({"error": f"{type(exc).__name__}: {exc}"})


def measure_fresh(devices: int, model: str, rounds: int, interval: str) -> dict:
    """`measure_coordinator` in a new process: its peak RSS is this fleet size's alone."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    args = (queue, devices, model, rounds, interval)
    process = context.Process(target=_measure_in, args=args)
    process.start()
    try:
        row = queue.get()
    finally:
        process.join()
    if "error" in row:
        raise FleetError(f"{devices} {model} devices: {row['error']}")
    return row


def coordinator_command(
    devices: Annotated[
        str, typer.Option(help="Fleet sizes, comma-separated.")
    ] = "10,100,1000,10000",
    model: Annotated[str, typer.Option(help="mlp or cnn (HAR's).")] = "mlp",
    rounds: Annotated[int, typer.Option(min=2, help="Rounds per fleet size.")] = 20,
    scrape_interval: Annotated[
        str,
        typer.Option(
            help="Prometheus' scrape interval (and timeout) of the Pushgateway: longer on a busy "
            "machine, where a scrape of 10,000 devices' 110,000 series can outlast 2 s."
        ),
    ] = PUSH_SCRAPE_INTERVAL,
    json_out: opt.JsonOut = None,
) -> None:
    """The coordinator's work per round (devices' training excluded), per phase, with its peak
    memory, a plan's bytes and Prometheus' series after 1 and after `--rounds` rounds."""
    if model not in SHAPES:
        raise FleetError(f"--model: {model!r} is not one of {', '.join(SHAPES)}")
    sizes = opt.counts(devices, "--devices")
    typer.echo(
        f"| devices | model | s per round (CPU s) | {' | '.join(PHASES)} | round 1 s | peak RSS MB "
        f"| plan B | message B | series after 1 | after {rounds} |\n"
        f"|---:|---|---:|{'---:|' * len(PHASES)}---:|---:|---:|---:|---:|---:|"
    )
    rows = []
    for size in sizes:
        row = measure_fresh(size, model, rounds, scrape_interval)
        rows.append(row)
        phases = " | ".join(f"{row['phases_s'][p]:.3f}" for p in PHASES)
        typer.echo(
            f"| {size} | {model} | {row['seconds']:.3f} ({row['cpu_seconds']:.3f}) | {phases} "
            f"| {row['round_1_s']:.2f} "
            f"| {row['peak_rss_mb']:.0f} | {row['plan_bytes']} | {row['message_bytes']} "
            f"| {row['series_after_1']} | {row[f'series_after_{rounds}']} |"
        )
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(rows, indent=2) + "\n")
