"""`fleet bench serve`: the prediction service as sensors use it, through its real socket and
spool, on a base pretrained on the task (its adapters are random: speed does not depend on them).

One-sample latency from 4 concurrent clients, samples per second in batches of 100 from 4 clients
and through the spool, the service's peak RSS (VmHWM), and a switch of the active model while the
4 clients keep asking: how many requests failed and how long until answers came from the new one.
The service runs pinned to one core, as on a board whose other cores train.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from skip2fleet.client.store import DeviceStore
from skip2fleet.shared import model as base_model
from skip2fleet.shared.atomic import check_writable, write_text_atomic
from skip2fleet.shared.datasets import TASKS, TaskOptions, load_task
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.layout import layout
from skip2fleet.shared.methods import get_method
from skip2fleet.shared.pretrain import PretrainConfig, pretrain
from skip2fleet.shared.spec import build

CLIENTS, BATCH = 4, 100


class Client:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")

    def ask(self, line: bytes) -> dict:
        """One request line (without its newline) and its answer."""
        self.file.write(line + b"\n")
        self.file.flush()
        return json.loads(self.file.readline())


def json_line(x: np.ndarray) -> bytes:
    """Samples as a sensor writes them: float32's 7 significant digits, not Python's 17."""
    if x.ndim == 1:
        return ("[" + ",".join(f"{v:.7g}" for v in x) + "]").encode()
    return b"[" + b",".join(json_line(row) for row in x) + b"]"


def in_parallel(work, clients: int = CLIENTS) -> list:
    results: list = [None] * clients
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, work(i))) for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def device_state(root: Path, base: base_model.Model, rank: int) -> tuple[DeviceStore, list]:
    store, rng = DeviceStore(root), np.random.default_rng(0)
    digest = store.save_base(base)
    size = layout(get_method("skip2-lora"), base_model.spec_of(base), rank).size
    versions = [
        store.save_version(rng.normal(0, 0.1, size).astype("f4"), r, digest, "skip2-lora", rank, 0)
        for r in (1, 2)
    ]
    store.activate(digest, versions[0], 0.0)
    return store, versions


def start_service(state: Path) -> subprocess.Popen:
    core = max(os.sched_getaffinity(0))
    process = subprocess.Popen(
        [sys.executable, "-m", "skip2fleet.cli", "serve", "--state-dir", str(state), "--no-keep"],
        stderr=subprocess.DEVNULL, start_new_session=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {core}),
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (state / "serve.sock").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise typer.Exit(f"fleet serve did not start (exit {process.poll()})")
        time.sleep(0.05)
    return process


def latencies(sock: Path, lines: list[bytes], per_client: int) -> list[float]:
    def work(i: int) -> list[float]:
        client, seconds = Client(sock), []
        for k in range(per_client):
            started = time.perf_counter()
            client.ask(lines[(i * per_client + k) % len(lines)])
            seconds.append(time.perf_counter() - started)
        return seconds

    return [s for client in in_parallel(work) for s in client]


def batched_rate(sock: Path, batches: list[bytes], seconds: float) -> float:
    def work(i: int) -> int:
        client, done, end = Client(sock), 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            done += len(client.ask(batches[(i + done) % len(batches)])["class"])
        return done

    started = time.perf_counter()
    total = sum(in_parallel(work))
    return total / (time.perf_counter() - started)


def spool_rate(state: Path, x: np.ndarray, files: int) -> float:
    staging, spool = state / "staging", state / "spool"
    staging.mkdir()
    for k in range(files):
        with open(staging / f"{k:05d}.npz", "wb") as out:
            np.savez(out, x=x)
    started = time.perf_counter()
    for k in range(files):
        os.replace(staging / f"{k:05d}.npz", spool / f"{k:05d}.npz")
    while any(p.suffix == ".npz" for p in spool.iterdir()):
        time.sleep(0.005)
    return files * len(x) / (time.perf_counter() - started)


def switch_under_load(store: DeviceStore, version, lines: list[bytes]) -> tuple[int, float]:
    """Activate `version` while 4 clients ask: failed requests, seconds until it answered."""
    errors, switched_at, stop = [0], [0.0], threading.Event()
    started = [0.0]

    def work(i: int) -> None:
        client = Client(store.root / "serve.sock")
        while not stop.is_set():
            reply = client.ask(lines[i])
            if "error" in reply:
                errors[0] += 1
            elif reply["version"] == version.number and not switched_at[0] and started[0]:
                switched_at[0] = time.perf_counter()
                stop.set()

    def switch() -> None:
        time.sleep(0.5)
        started[0] = time.perf_counter()
        store.activate(version.base_sha256, version, 0.0)
        stop.wait(10)
        stop.set()

    threading.Thread(target=switch).start()
    in_parallel(work)
    return errors[0], (switched_at[0] - started[0]) if switched_at[0] else float("inf")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(state: Path, base: base_model.Model, x: np.ndarray, requests: int, seconds: float,
            files: int) -> dict:  # fmt: skip
    """Every figure of the bench, from a service started on a fresh state folder with `base`."""
    lines = [json_line(row) for row in x[:256]]
    batches = [json_line(x[k : k + BATCH]) for k in range(0, len(x) - BATCH + 1, BATCH)] or [
        json_line(np.resize(x, (BATCH, x.shape[1])))
    ]
    store, versions = device_state(state, base, 4)
    process = start_service(store.root)
    try:
        sock = store.root / "serve.sock"
        typer.echo(f"one-sample requests: {CLIENTS} clients x {requests}", err=True)
        waits = sorted(latencies(sock, lines, requests))
        typer.echo(f"batches of {BATCH} for {seconds} s", err=True)
        rate = batched_rate(sock, batches, seconds)
        typer.echo(f"spool: {files} files of 1,000 samples", err=True)
        spooled = spool_rate(store.root, np.resize(x, (1000, x.shape[1])), files)
        typer.echo("a model switch under load", err=True)
        errors, switch_s = switch_under_load(store, versions[1], lines)
        rss = peak_rss_mb(process.pid)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    return {
        "p50_ms": round(statistics.median(waits) * 1e3, 4),
        "p99_ms": round(waits[int(0.99 * (len(waits) - 1))] * 1e3, 4),
        "samples_per_s": round(rate),
        "spool_samples_per_s": round(spooled),
        "peak_rss_mb": round(rss, 1),
        "switch_errors": errors,
        "switch_seconds": round(switch_s, 3),
        "load_average": os.getloadavg()[0],
    }


def bench_command(
    dataset: Annotated[
        str, typer.Option(help=f"The task whose samples are sent: {', '.join(TASKS)}.")
    ] = "fan-damage1",
    data_dir: Annotated[
        Path | None,
        typer.Option(envvar="FLEET_DATA_DIR", help="The real data sets' folder."),
    ] = None,
    requests: Annotated[int, typer.Option(min=10, help="One-sample requests per client.")] = 2000,
    seconds: Annotated[float, typer.Option(min=0.5, help="Seconds of batched requests.")] = 5.0,
    files: Annotated[int, typer.Option(min=1, help="Spool files of 1,000 samples.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of pretraining and the adapters.")] = 0,
    json_out: Annotated[
        Path | None,
        typer.Option(
            "--json",
            callback=lambda p: p and check_writable(p),
            help="Also write the figures as JSON.",
        ),
    ] = None,
) -> None:
    """Latency, throughput (socket and spool), peak memory and a model switch under load of
    `fleet serve`, through its real socket, the service on one core."""
    if dataset not in TASKS:
        raise FleetError(f"--dataset {dataset}: unknown; choose from {', '.join(TASKS)}")
    task = load_task(dataset, TaskOptions(data_dir=data_dir, seed=seed))
    spec = build("mlp", task.input_shape, len(task.classes))
    base = pretrain(task.pretrain.x, task.pretrain.y, len(task.classes),
                    PretrainConfig(epochs=5, seed=seed), spec=spec)  # fmt: skip
    x = task.test.x.reshape(len(task.test.x), -1).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="fleet-bench-serve-") as tmp:
        state = Path(tmp) / "state"
        result = {"dataset": dataset, "features": int(x.shape[1])}
        result |= measure(state, base_model.with_classes(base, task.classes), x, requests,
                          seconds, files)  # fmt: skip
    typer.echo(json.dumps(result, indent=2))
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(result, indent=2) + "\n")
