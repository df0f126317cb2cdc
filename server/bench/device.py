"""`fleet bench device`: the memory of one device's whole stack during real rounds, in a memory
cgroup, so that anyone can re-measure whether a device fits a 512 MB board.

A loopback deployment (SuperLink with TLS and node authentication behind the front door) serves
the rounds; the device's stack runs as `fleet deploy` runs it (SuperNode with `--isolation process`,
SuperExec, the agent from its own device file), every process of it inside one cgroup v1 memory
group (cgroup v2's memory controller is not available here); the agent is scraped every second,
as Prometheus would. Every 50 ms the sampler reads each process of the group: its peak resident
set (VmHWM) by role, and the sums of the resident sets (RSS, and PSS, which splits a shared page
among the processes that map it) at that moment: the stack's peak is the largest sum. The
group's own peak
(`memory.max_usage_in_bytes`) counts the page cache too. With `--limit-mb` the group is capped,
swap included, and the rounds must still complete. Under qemu user mode a process's RSS holds
the emulator too: run this natively.

It also times the ClientApp's start-up, Flower's fixed cost of every round: the SuperExec starts
a new `flwr-clientapp` process per message. Per round, from the process' start (the kernel's
record), the figures file our ClientApp writes last and the fine-tune time it reports: the time
from launch until our round's work starts, that work, and the time from its end until the process
is gone, with the process' CPU time. Then, in the same interpreter, five fresh processes import
what `flwr-clientapp` imports and then our ClientApp module, to split the import time between
Flower's entry point and our code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from statistics import median
from typing import Annotated

import typer

from skip2fleet.server import options as opt
from skip2fleet.server.bench.monitoring import cpu_seconds
from skip2fleet.server.federation.run import follow, start_run
from skip2fleet.server.federation.runs import RunFolder
from skip2fleet.server.operations.certs import credentials_for
from skip2fleet.server.operations.devices import device_settings
from skip2fleet.server.operations.loopback import (
    Processes,
    free_port,
    loopback_deployment,
    on_loopback,
)
from skip2fleet.server.operations.superlink import flower_env
from skip2fleet.server.training.pretraining import fleet_base
from skip2fleet.shared.atomic import write_text_atomic
from skip2fleet.shared.config import FleetConfig, as_yaml_dict
from skip2fleet.shared.devicefile import DEVICE_FILE, LAST_FIGURES
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.services import (
    AGENT_MODULE,
    CLIENTAPP,
    agent_command,
    superexec_command,
    supernode_command,
)

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
# A process's role, by what its command line holds (first match).
ROLES = (
    ("flower-supernode", "supernode"),
    ("flower-superexec", "superexec"),
    ("flwr-clientapp", "clientapp"),
    (AGENT_MODULE, "agent"),
)
MB = 2**20
STARTUP_TRIALS = 5
# What a `flwr-clientapp` process imports before our code (its console script's module), then
# what Flower's loader imports of ours; wall and CPU seconds of each step, as JSON.
IMPORTS_PROBE = """
import json, resource, time
def now():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), usage.ru_utime + usage.ru_stime
marks = [now()]
import flwr.supernode.cli
marks.append(now())
import {module}
marks.append(now())
print(json.dumps([[b[i] - a[i] for i in (0, 1)] for a, b in zip(marks, marks[1:])]))
"""


def process_start(pid: int) -> float:
    """When a process started, in seconds since the epoch (to the kernel's clock tick)."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = next(
        int(line.split()[1])
        for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime ")
    )
    return boot + ticks / os.sysconf("SC_CLK_TCK")


class MemoryGroup:
    """A cgroup v1 memory group of our own, optionally capped (memory and swap alike)."""

    def __init__(self, name: str, limit_mb: int | None) -> None:
        if not (CGROUP_ROOT / "memory.max_usage_in_bytes").is_file():
            raise FleetError(f"{CGROUP_ROOT}: no cgroup v1 memory controller here (root needed)")
        self.path = CGROUP_ROOT / name
        self.path.mkdir()
        if limit_mb is not None:
            limit = str(limit_mb * MB)
            (self.path / "memory.limit_in_bytes").write_text(limit)
            swap = self.path / "memory.memsw.limit_in_bytes"
            if swap.exists():  # memory + swap: no swap at all
                swap.write_text(limit)

    def wrap(self, command: list[str]) -> list[str]:
        """`command`, run inside the group from its first instruction (children follow)."""
        script = f'echo $$ > {self.path}/cgroup.procs && exec "$@"'
        return ["sh", "-c", script, "sh", *command]

    def pids(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def read(self, name: str) -> int:
        return int((self.path / name).read_text())

    def oom_kills(self) -> int:
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def remove(self) -> None:
        deadline = time.monotonic() + 10
        while self.path.exists():
            try:
                self.path.rmdir()
            except OSError:  # processes still leaving
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


class Sampler(threading.Thread):
    """Reads every process of the group every `every` seconds until stopped."""

    def __init__(
        self, group: MemoryGroup, agent_url: str, figures: Path, every: float = 0.05
    ) -> None:
        super().__init__(daemon=True)
        self.group, self.every, self.agent_url = group, every, agent_url
        # each ClientApp process: its start, when last seen and its CPU seconds then
        self.clientapp_runs: dict[int, dict[str, float]] = {}
        # the figures our ClientApp writes last in a round: (round, fine-tune seconds, written)
        self.figures, self.finetunes = figures, []
        self.scrapes = 0
        self.peak_kb: dict[str, int] = defaultdict(int)  # role -> largest VmHWM of one process
        self.stack_peak_kb = 0  # the largest sum of VmRSS over the group at one moment
        self.stack_peak_roles: dict[str, int] = {}
        # the same with each shared page split among the processes that map it (PSS): what the
        # processes take together, where the RSS sum counts a shared library once per process
        self.stack_peak_pss_kb = 0
        self.other: set[str] = set()
        self.done = threading.Event()

    def run(self) -> None:
        next_scrape = 0.0
        while not self.done.is_set():
            self.sample()
            if time.monotonic() >= next_scrape:  # the agent serves a scrape a second
                next_scrape = time.monotonic() + 1.0
                with (
                    contextlib.suppress(OSError),
                    urllib.request.urlopen(self.agent_url, timeout=2) as reply,
                ):
                    self.scrapes += bool(reply.read())
            self.done.wait(self.every)

    def sample(self) -> None:
        now: dict[str, int] = defaultdict(int)
        pss = 0
        for pid in self.group.pids():
            with contextlib.suppress(OSError, IndexError, ValueError):
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                status = Path(f"/proc/{pid}/status").read_text()
                rss = int(status.split("VmRSS:")[1].split()[0])
                hwm = int(status.split("VmHWM:")[1].split()[0])
                rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
                pss += int(rollup.split("\nPss:")[1].split()[0])
                role = next((r for key, r in ROLES if key in command), "other")
                if role == "clientapp":
                    run = self.clientapp_runs.setdefault(pid, {"start": process_start(pid)})
                    run.update(seen=time.time(), cpu_s=cpu_seconds(pid))
                elif role == "other":
                    self.other.add(command)
                now[role] += rss
                self.peak_kb[role] = max(self.peak_kb[role], hwm)
        self.stack_peak_pss_kb = max(self.stack_peak_pss_kb, pss)
        if sum(now.values()) > self.stack_peak_kb:
            self.stack_peak_kb, self.stack_peak_roles = sum(now.values()), dict(now)
        with contextlib.suppress(OSError, ValueError, KeyError):
            written = self.figures.stat().st_mtime
            if not self.finetunes or written != self.finetunes[-1][2]:
                figures = json.loads(self.figures.read_text())
                self.finetunes.append((figures["round"], figures["finetune_s"], written))

    def startup(self) -> list[dict]:
        """Per round: launch -> our work starts -> it ends -> the ClientApp process is gone."""
        rows = []
        for number, work_s, written in self.finetunes:
            run = next(
                (r for r in self.clientapp_runs.values() if r["start"] <= written <= r["seen"]),
                None,
            )
            if run is not None:
                rows.append(
                    {
                        "round": number,
                        "launch_to_our_work_s": written - work_s - run["start"],
                        "our_work_s": work_s,
                        "after_our_work_s": run["seen"] - written,
                        "clientapp_s": run["seen"] - run["start"],
                        "clientapp_cpu_s": run["cpu_s"],
                    }
                )
        return rows


def import_split(python: str, module: str, trials: int = STARTUP_TRIALS) -> dict:
    """Median wall and CPU seconds of a fresh `python` importing Flower's `flwr-clientapp` entry,
    then `module` (our ClientApp), over `trials` processes; and of the whole process."""
    steps, totals = [], []
    for _ in range(trials):
        started = time.perf_counter()
        done = subprocess.run(
            [python, "-c", IMPORTS_PROBE.format(module=module)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
        )
        totals.append(time.perf_counter() - started)
        steps.append(json.loads(done.stdout))
    (flower, flower_cpu), (ours, ours_cpu) = (
        [median(trial[step][kind] for trial in steps) for kind in (0, 1)] for step in (0, 1)
    )
    return {
        "process_s": median(totals),
        "flower_imports_s": flower,
        "flower_imports_cpu_s": flower_cpu,
        "our_imports_s": ours,
        "our_imports_cpu_s": ours_cpu,
    }


def start_device_stack(
    processes: Processes, fleet: FleetConfig, folder: Path, group: MemoryGroup
) -> None:
    """The device's SuperNode, SuperExec and agent as `fleet deploy` starts them, in `group`."""
    device, creds = fleet.devices[0], credentials_for(fleet)
    home = folder / "device"
    (home / "etc").mkdir(parents=True)
    secret = home / "etc" / "superexec.secret"
    write_text_atomic(secret, os.urandom(32).hex(), 0o600)
    own = home / "etc" / DEVICE_FILE
    settings = device_settings(fleet, device, home / "state", "127.0.0.1", creds.ca_cert)
    write_text_atomic(own, settings.text())
    port = free_port()
    supernode = supernode_command(
        f"127.0.0.1:{fleet.coordinator.port}",
        device.name,
        home / "state",
        port,
        creds.ca_cert,
        creds.node_key(device.name),
        Path(settings.data_dir) if settings.data_dir else None,
        secret,
    )
    env = flower_env(fleet)
    processes.start("supernode", group.wrap(supernode), env)
    processes.start("superexec", group.wrap(superexec_command(secret, port)), env)
    processes.start("agent", group.wrap(agent_command(Path(sys.executable), own)), env)


def measure_device(fleet: FleetConfig, workdir: Path, limit_mb: int | None) -> dict:
    """The device stack's memory over the fleet's rounds (its first device only)."""
    fleet = on_loopback(fleet, workdir / "state")
    device = dataclasses.replace(fleet.devices[0], host="127.0.0.1", agent_port=free_port())
    fleet = dataclasses.replace(fleet, devices=(device,))
    base = fleet_base(fleet)
    group = MemoryGroup(f"skip2fleet-bench-{os.getpid()}", limit_mb)
    figures = workdir / "device" / "state" / LAST_FIGURES
    sampler = Sampler(group, f"http://127.0.0.1:{device.agent_port}/metrics", figures)
    try:
        with loopback_deployment(fleet, workdir, offline=[device.name]) as processes:
            start_device_stack(processes, fleet, workdir, group)
            sampler.start()
            folder = RunFolder.create(workdir / "run", as_yaml_dict(fleet), base)
            follow(fleet, folder, start_run(fleet, folder))
            rounds = [folder.round_result(n) for n in folder.completed_rounds()]
            sampler.done.set()
            sampler.join()
        replies = [r["devices"].get(device.name) for r in rounds]
        if len(rounds) < fleet.federation.rounds or not all(replies):
            raise FleetError(f"{device.name} did not complete every round: see {workdir}/logs")
        reported = max(d["peak_rss_bytes"] for d in replies) // 1024
        peaks = dict(sampler.peak_kb)
        peaks["clientapp"] = max(peaks.get("clientapp", 0), reported)
        return {
            "dataset": fleet.task.dataset,
            "rounds": len(rounds),
            "epochs_per_round": fleet.training.epochs,
            "limit_mb": limit_mb,
            "round_s": [r["duration_s"] for r in rounds],
            "peak_mb": {role: kb / 1024 for role, kb in sorted(peaks.items())},
            "sum_of_peaks_mb": sum(peaks.values()) / 1024,
            "stack_peak_mb": sampler.stack_peak_kb / 1024,
            "stack_peak_by_role_mb": {r: kb / 1024 for r, kb in sampler.stack_peak_roles.items()},
            "stack_peak_pss_mb": sampler.stack_peak_pss_kb / 1024,
            "other_processes": sorted(sampler.other),
            "cgroup_peak_mb": group.read("memory.max_usage_in_bytes") / MB,
            "cgroup_limit_hits": group.read("memory.failcnt"),
            "oom_kills": group.oom_kills(),
            "clientapps_seen": len(sampler.clientapp_runs),
            "agent_scrapes": sampler.scrapes,
            "clientapp_startup": sampler.startup(),
            "clientapp_imports": import_split(sys.executable, CLIENTAPP.split(":")[0]),
        }
    finally:
        sampler.done.set()
        group.remove()


def device_command(
    config: opt.FleetFile = None,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds to run.")] = 2,
    dataset: opt.DatasetOverride = None,
    data_dir: opt.DataDir = None,
    limit_mb: Annotated[
        int | None,
        typer.Option(min=64, help="Cap the device's cgroup (memory and swap) at this many MB."),
    ] = None,
    workdir: Annotated[
        Path, typer.Option(callback=opt.fresh_workdir, help="Folder for the run and service logs.")
    ] = Path("bench-out/device"),
    json_out: opt.JsonOut = None,
) -> None:
    """Peak memory of one device's stack (SuperNode, SuperExec, each ClientApp, agent) per
    process and in total during real rounds, in a cgroup v1 memory group (root), natively."""
    fleet = opt.resolve_fleet(config, 1, rounds, dataset, data_dir, None)
    results = measure_device(fleet, workdir.resolve(), limit_mb)
    typer.echo("| process | peak RSS MB |\n|---|---:|")
    for role, mb in results["peak_mb"].items():
        typer.echo(f"| {role} | {mb:.1f} |")
    typer.echo(
        f"stack peak (sum of RSS at one moment) {results['stack_peak_mb']:.1f} MB, of PSS "
        f"{results['stack_peak_pss_mb']:.1f} MB; sum of the processes' peaks "
        f"{results['sum_of_peaks_mb']:.1f} MB; cgroup peak (with page cache) "
        f"{results['cgroup_peak_mb']:.1f} MB; {results['rounds']} rounds of "
        f"{results['dataset']} completed"
        + (
            f" in a {limit_mb} MB cgroup without swap ({results['cgroup_limit_hits']} times at "
            f"the limit, {results['oom_kills']} OOM kills)"
            if limit_mb
            else ""
        )
    )
    typer.echo(
        "\n| round | launch to our work s | our work s | after it s | ClientApp s | its CPU s |\n"
        "|---:|---:|---:|---:|---:|---:|"
    )
    for row in results["clientapp_startup"]:
        typer.echo(
            f"| {row['round']} | {row['launch_to_our_work_s']:.2f} | {row['our_work_s']:.2f} "
            f"| {row['after_our_work_s']:.2f} | {row['clientapp_s']:.2f} "
            f"| {row['clientapp_cpu_s']:.2f} |"
        )
    imports = results["clientapp_imports"]
    typer.echo(
        f"imports of a fresh ClientApp process (median of {STARTUP_TRIALS}): Flower's "
        f"`flwr-clientapp` entry {imports['flower_imports_s']:.2f} s "
        f"({imports['flower_imports_cpu_s']:.2f} s CPU), then our ClientApp module "
        f"{imports['our_imports_s']:.3f} s ({imports['our_imports_cpu_s']:.3f} s CPU); "
        f"the whole process {imports['process_s']:.2f} s"
    )
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(results, indent=2) + "\n")
