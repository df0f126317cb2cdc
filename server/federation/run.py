"""`fleet run`: federated rounds on a real Flower deployment.

The SuperLink and the SuperNodes are long-lived services (`fleet deploy` starts them); `fleet run`
submits one Flower run through the Control API and follows it: it prints a row per round as the
ServerApp writes it to the run folder, and ends when Flower reports the run finished, naming the
reason when it failed and the command that resumes it (having first stopped, by its pid, a
ServerApp of the run that outlived a crashed SuperLink, so that the resume works at once). A
SuperLink that restarts meanwhile is waited for (status polls retry with back-off for up to a
round's timeout). `--resume` refuses a
folder whose ServerApp is still running and one whose completed rounds do not match their
manifests, before anything is submitted, and the fleet's run lock (`runlock.py`) keeps a second
run, typed or scheduled, from starting beside it. Ctrl-C stops the run on the SuperLink
(`flwr stop`) and says how to resume it; Flower ends the ServerApp, and with it its hold on the
folder, seconds later.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Annotated

import typer

from skip2fleet.server import options as opt
from skip2fleet.server.federation.report import print_round, print_round_header
from skip2fleet.server.federation.runlock import fleet_run_lock
from skip2fleet.server.federation.runs import RunFolder
from skip2fleet.server.operations.certs import credentials_for
from skip2fleet.server.operations.superlink import (
    CONNECTION,
    flwr,
    registered_nodes,
    write_app,
    write_connection,
)
from skip2fleet.server.progress import stderr
from skip2fleet.server.training.pretraining import fleet_base
from skip2fleet.shared.config import FleetConfig, as_yaml_dict, load_config
from skip2fleet.shared.errors import FleetError, Interrupted
from skip2fleet.shared.services import CLIENTAPP

POLL_S = 1.0
STATUS_EVERY_S = 3.0
RETRY_MAX_S = 10.0  # the longest pause between status polls while the SuperLink is away
STOP_TIMEOUT_S = 4.0  # Ctrl-C: for `flwr stop` to answer (the exit stays within 5 s)
ORPHAN_GRACE_S = 10.0  # a ServerApp that outlived its run: SIGTERM, then SIGKILL after this


def start_run(fleet: FleetConfig, folder: RunFolder, clientapp: str = CLIENTAPP) -> str:
    """Submit the run folder's rounds to the SuperLink; returns Flower's run id."""
    write_connection(fleet, credentials_for(fleet))
    folder.save_node_registry(registered_nodes(fleet))
    app_dir = write_app(fleet, clientapp)
    answer = flwr(
        fleet, "run", str(app_dir), CONNECTION, "--run-config", f"run-dir='{folder.path}'"
    )
    return str(answer["run-id"])


def run_status(fleet: FleetConfig, run_id: str) -> tuple[str, str]:
    """The run's status; while the SuperLink does not answer, retried with back-off for up to
    the round timeout (a restarted SuperLink answers again within seconds)."""
    deadline = time.monotonic() + fleet.federation.round_timeout_s
    pause = POLL_S
    while True:
        try:
            run = flwr(fleet, "ls", CONNECTION, "--run-id", run_id)["runs"][0]
            return str(run["status"]), str(run.get("status-details", ""))
        except FleetError as exc:
            if time.monotonic() + pause > deadline:
                raise FleetError(
                    f"{exc} (the SuperLink did not answer for "
                    f"{fleet.federation.round_timeout_s:.0f} s)"
                ) from None
        time.sleep(pause)
        pause = min(2 * pause, RETRY_MAX_S)


def follow(fleet: FleetConfig, folder: RunFolder, run_id: str) -> None:
    """Print each round as it completes; return when the run completes, raise if it fails."""
    printed = set(folder.completed_rounds())
    remaining = fleet.federation.rounds - len(printed)
    deadline = time.monotonic() + remaining * (fleet.federation.round_timeout_s + 30) + 120
    status, details, next_status = "pending", "", 0.0
    while True:
        for number in folder.completed_rounds():
            if number not in printed:
                print_round(folder.round_result(number))
                printed.add(number)
        if status.startswith("finished"):
            break
        if time.monotonic() >= next_status:
            status, details = run_status(fleet, run_id)
            next_status = time.monotonic() + STATUS_EVERY_S
            continue  # print the rounds written meanwhile before leaving
        if time.monotonic() > deadline:
            raise FleetError(
                f"run {run_id} still {status} after its rounds' time; see "
                f"`flwr ls` and the SuperLink log"
            )
        time.sleep(POLL_S)
    if status != "finished:completed" or len(printed) < fleet.federation.rounds:
        reason = folder.failure() or details or "see the SuperLink log"
        raise FleetError(
            f"run {run_id} {status} after {len(printed)} of "
            f"{fleet.federation.rounds} rounds: {reason}"
        )


def run_command(
    config: opt.ConfigPath = Path("fleet.yaml"),
    base: opt.BaseFile = None,
    out: opt.RunOut = None,
    resume: opt.Resume = None,
    rounds: Annotated[int | None, typer.Option(min=1, help="Total rounds (with --resume).")] = None,
    model: opt.ModelOverride = None,
    cache: opt.CacheOverride = None,
) -> None:
    """Run the fleet's federated rounds on its SuperLink and SuperNodes (TLS, node auth)."""
    if resume is not None:
        folder = RunFolder(resume).resume(rounds)  # refuses a folder whose ServerApp still runs
        fleet = folder.config()
        with fleet_run_lock(fleet, f"fleet run --resume {folder.path}"):
            run_id = submit_and_follow(fleet, folder)
    else:
        fleet = opt.with_training(load_config(config), model=model, cache=cache)
        out = out or Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")
        with fleet_run_lock(fleet, f"fleet run --out {out}"):
            folder = RunFolder.create(out, as_yaml_dict(fleet), fleet_base(fleet, base))
            run_id = submit_and_follow(fleet, folder)
    typer.echo(f"run {run_id} completed; rounds in {folder.path}/rounds")


def submit_and_follow(fleet: FleetConfig, folder: RunFolder) -> str:
    """Submit the folder's rounds and print each as it completes; Flower's run id."""
    address = f"{fleet.coordinator.address}:{fleet.coordinator.port}"
    stderr.print(
        f"submitting {fleet.federation.rounds} rounds to the SuperLink at {address}; "
        f"run folder {folder.path}"
    )
    print_round_header()
    run_id = start_run(fleet, folder)
    follow_to_the_end(fleet, folder, run_id)
    return run_id


def follow_to_the_end(fleet: FleetConfig, folder: RunFolder, run_id: str) -> None:
    """`follow` the run; a failure, or Ctrl-C (which stops the run on the SuperLink), says how
    to resume it."""
    resume = f"resume with `fleet run --resume {folder.path}`"
    try:
        follow(fleet, folder, run_id)
    except KeyboardInterrupt:
        try:
            flwr(fleet, "stop", run_id, CONNECTION, timeout=STOP_TIMEOUT_S)
        except FleetError as exc:
            raise Interrupted(f"interrupted, but the run may go on ({exc}); {resume}") from None
        raise Interrupted(f"interrupted; {resume}") from None
    except FleetError as exc:
        stopped = stop_orphaned_serverapp(folder)
        raise FleetError(f"{exc}{stopped}; resume with: fleet run --resume {folder.path}") from None


def stop_orphaned_serverapp(folder: RunFolder) -> str:
    """After a failed run, stop the ServerApp that still holds the run folder (one whose SuperLink
    died lives on for a while), by the pid it wrote into run.lock and only if that process is a
    `flwr-serverapp`, so that the resume command printed next works at once. Says what it did."""
    holder = folder.holder()
    if holder is None:
        return ""
    try:
        pid = int(holder.split()[-1])
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (ValueError, OSError):
        return f" ({holder} still holds run.lock)"
    if not any(part.endswith(b"flwr-serverapp") for part in command[:2]):
        return f" ({holder} holds run.lock and is not a ServerApp; left alone)"
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + ORPHAN_GRACE_S
        while folder.holder() is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        if folder.holder() is not None:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + ORPHAN_GRACE_S
            while folder.holder() is not None and time.monotonic() < deadline:
                time.sleep(0.2)
    if folder.holder() is not None:
        return f" (its ServerApp, pid {pid}, could not be stopped and still holds run.lock)"
    return f" (its ServerApp, pid {pid}, outlived the run and was stopped)"
