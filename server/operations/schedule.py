"""`fleet schedule`: the fleet's rounds at the times `federation.schedule` names, with nobody
typing `fleet run`.

The schedule is systemd's calendar syntax (`OnCalendar=`, e.g. `daily`, `*-*-* 03:00`,
`*:0/30`), read by `systemd-analyze calendar`. `fleet deploy` installs on the coordinator a
systemd timer that starts `fleet schedule run` where PID 1 is systemd, else a supervised
`fleet schedule wait`, which sleeps until each elapse and does the same. A scheduled run:

1. takes the fleet's run lock (`runlock.py`): runs never overlap; one that finds the lock taken
   is skipped (`skipped-overlap`);
2. asks every device's agent how many samples it holds that it has not trained on
   (`client/untrained.py`); a device that never trained counts as having new samples, one whose
   agent does not answer as not. Fewer than `federation.min_devices` such devices skip the run
   (`skipped-no-new-samples`), saying how many had some;
3. runs the fleet's rounds as `fleet run` does, into `runs/scheduled-<UTC time>` in the state
   folder, with the base of the previous scheduled run (the devices hold it already);
4. keeps its outcome: `schedule.json` in the state folder (`fleet status` shows it with the next
   elapse) and, with a Pushgateway, the group `job="skip2fleet-schedule"`: the last run's time,
   rounds and devices with new samples as values, its outcome as one of four label values.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import typer

from skip2fleet.server import options as opt
from skip2fleet.server.federation.pushes import push_group
from skip2fleet.server.federation.run import submit_and_follow
from skip2fleet.server.federation.runlock import RunLocked, fleet_run_lock
from skip2fleet.server.federation.runs import RunFolder
from skip2fleet.server.operations.certs import fleet_credentials
from skip2fleet.server.operations.status import agent_figures
from skip2fleet.server.progress import stderr
from skip2fleet.server.training.pretraining import fleet_base
from skip2fleet.shared import metric_names as names
from skip2fleet.shared import model as base_model
from skip2fleet.shared.atomic import write_text_atomic
from skip2fleet.shared.config import Device, FleetConfig, as_yaml_dict, load_config, state_dir
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.exposition import Family

JOB = "skip2fleet-schedule"
RECORD = "schedule.json"  # the last scheduled run's outcome, in the fleet's state folder
RUNS = "runs"  # the scheduled runs' folders, in the fleet's state folder
KEEP_RUNS = 30  # scheduled runs' folders kept, the newest (a daily schedule: a month of history)
OUTCOMES = ("completed", "failed", "skipped-overlap", "skipped-no-new-samples")
AGENTS_AT_ONCE = 32
ELAPSE = re.compile(r"Next elapse: \w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC")


@dataclass(frozen=True)
class Outcome:
    """What one scheduled run did."""

    outcome: str  # one of OUTCOMES
    started: float  # Unix time
    rounds: int  # completed
    why: str  # one line
    folder: str | None = None  # the run folder, when rounds ran
    with_new_samples: int = 0


def next_elapse(expression: str) -> datetime:
    """The next time (UTC) `expression` elapses, as systemd computes it; a FleetError naming
    the expression when systemd does not read it."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        raise FleetError(
            "federation.schedule: systemd-analyze not found (it reads the calendar syntax; "
            "install systemd)"
        )
    done = subprocess.run(
        [tool, "calendar", "--iterations=1", expression],
        capture_output=True,
        text=True,
        env=os.environ | {"TZ": "UTC", "LC_ALL": "C"},
        timeout=30,
    )
    found = ELAPSE.search(done.stdout)
    if done.returncode != 0 or found is None:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise FleetError(
            f"federation.schedule: {expression!r} is not a systemd calendar expression"
            f" ({said[-1] if said else 'it never elapses'})"
        )
    return datetime.strptime(found[1], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)


def devices_with_new_samples(fleet: FleetConfig) -> tuple[list[str], list[str]]:
    """(devices with samples they have not trained on or that never trained, devices whose
    agent did not answer), asked at once."""

    def ask(device: Device) -> tuple[str, dict[str, float] | None]:
        return device.name, agent_figures(device)

    with ThreadPoolExecutor(AGENTS_AT_ONCE) as pool:
        answers = list(pool.map(ask, fleet.devices))
    silent = [name for name, figures in answers if figures is None]
    fresh = [name for name, figures in answers if figures is not None and has_new(figures)]
    return fresh, silent


def has_new(figures: dict[str, float]) -> bool:
    """From a device agent's metrics: samples it has not trained on, or (where it cannot count
    them: a built-in partition) no round trained yet."""
    untrained = figures.get(names.UNTRAINED_SAMPLES.name)
    if untrained is not None:
        return untrained > 0
    return names.LAST_FINETUNE_ROUND not in figures


def scheduled_run(fleet: FleetConfig) -> Outcome:
    """One scheduled run (lock, check, rounds), its outcome kept and pushed; never raises for
    what a run meets (a taken lock, too few devices, a failed round)."""
    started = time.time()
    try:
        with fleet_run_lock(fleet, "a scheduled run"):
            fresh, silent = devices_with_new_samples(fleet)
            needed = fleet.federation.min_devices
            if len(fresh) < needed:
                why = (
                    f"{len(fresh)} of {len(fleet.devices)} devices have samples they have not "
                    f"trained on ({len(silent)} did not answer); min_devices is {needed}"
                )
                outcome = Outcome("skipped-no-new-samples", started, 0, why, None, len(fresh))
            else:
                outcome = _rounds(fleet, started, len(fresh))
    except RunLocked as exc:
        outcome = Outcome("skipped-overlap", started, 0, str(exc))
    keep(fleet, outcome)
    return outcome


def _rounds(fleet: FleetConfig, started: float, fresh: int) -> Outcome:
    runs = state_dir(fleet) / RUNS
    earlier = sorted(runs.glob("scheduled-*/base.npz"))
    stamp = datetime.fromtimestamp(started, UTC).strftime("%Y%m%d-%H%M%S")
    try:
        base = fleet_base(fleet, earlier[-1] if earlier else None)
        folder = RunFolder.create(runs / f"scheduled-{stamp}", as_yaml_dict(fleet), base)
    except FleetError as exc:
        return Outcome("failed", started, 0, str(exc), None, fresh)
    try:
        submit_and_follow(fleet, folder)
    except FleetError as exc:
        done = len(folder.completed_rounds())
        return Outcome("failed", started, done, str(exc), str(folder.path), fresh)
    finally:
        prune(runs)  # failed runs' folders too: a schedule that keeps failing fills nothing
    done = len(folder.completed_rounds())
    why = f"{done} rounds, base {base_model.sha256(base)[:12]}"
    return Outcome("completed", started, done, why, str(folder.path), fresh)


def prune(runs: Path, keep: int = KEEP_RUNS) -> list[Path]:
    """Delete all but the newest `keep` scheduled runs' folders (names sort by time); those
    deleted. A schedule never fills the disk with history Prometheus also holds."""
    folders = sorted(p for p in runs.glob("scheduled-*") if p.is_dir())
    old = folders[:-keep] if keep else folders
    for folder in old:
        shutil.rmtree(folder, ignore_errors=True)
    return old


def keep(fleet: FleetConfig, outcome: Outcome) -> None:
    """The outcome in `schedule.json` and, with a Pushgateway, in its group (one logged line
    when it does not take it)."""
    write_text_atomic(state_dir(fleet) / RECORD, json.dumps(asdict(outcome), indent=1) + "\n")
    gateway = fleet.coordinator.pushgateway
    if not gateway:
        return
    families = [
        Family.of(metric).add([], value)
        for metric, value in (
            (names.SCHEDULE_LAST_RUN, outcome.started),
            (names.SCHEDULE_LAST_ROUNDS, outcome.rounds),
            (names.SCHEDULE_NEW_SAMPLES, outcome.with_new_samples),
        )
    ]
    outcomes = Family.of(names.SCHEDULE_OUTCOME)
    for value in OUTCOMES:
        outcomes.add([value], float(value == outcome.outcome))
    try:
        push_group(
            gateway, JOB, [*families, outcomes], fleet_credentials(fleet).pushgateway_password
        )
    except OSError as exc:
        stderr.print(f"Pushgateway {gateway} did not take the scheduled run's outcome ({exc})")


def last_outcome(fleet: FleetConfig) -> Outcome | None:
    """The last scheduled run's outcome, if there was one."""
    try:
        return Outcome(**json.loads((state_dir(fleet) / RECORD).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def describe(outcome: Outcome) -> str:
    when = datetime.fromtimestamp(outcome.started, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{when}: {outcome.outcome} ({outcome.why})"


def run_command(config: opt.ConfigPath = Path("fleet.yaml")) -> None:
    """One scheduled run now: skipped, and why, when a run is going or fewer than min_devices
    devices have samples they have not trained on (what the coordinator's timer starts)."""
    outcome = scheduled_run(load_config(config))
    typer.echo(describe(outcome))
    if outcome.outcome == "failed":
        raise typer.Exit(1)


def wait_command(config: opt.ConfigPath = Path("fleet.yaml")) -> None:
    """Run the fleet's rounds at every elapse of federation.schedule, until stopped (what
    `fleet deploy` starts where there is no systemd to keep a timer)."""
    fleet = load_config(config)
    while True:
        expression = fleet.federation.schedule
        if not expression:
            raise FleetError(f"{config}: federation.schedule is not set; nothing to wait for")
        when = next_elapse(expression)
        stderr.print(f"next scheduled run at {when:%Y-%m-%d %H:%M:%S} UTC ({expression})")
        while (left := when.timestamp() - time.time()) > 0:
            time.sleep(min(left, 60.0))  # at least every minute: the clock, a new fleet.yaml
            fleet = load_config(config)
            if fleet.federation.schedule != expression:
                break
        else:
            typer.echo(describe(scheduled_run(fleet)))
            fleet = load_config(config)
