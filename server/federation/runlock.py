"""The fleet's run lock: one run at a time on a fleet, whoever starts it.

`fleet run` and a scheduled run (`fleet schedule`) take it before they submit anything: two runs
on one SuperLink would share its devices' rounds. It is an flock on `rounds.lock` in the fleet's
state folder, so the OS drops it when its process dies (a killed run never blocks the next); the
file says who holds it, for the message the next run prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from skip2fleet.shared.config import FleetConfig, state_dir
from skip2fleet.shared.errors import FleetError

LOCK_NAME = "rounds.lock"


class RunLocked(FleetError):
    """Another run of this fleet is going."""


@contextlib.contextmanager
def fleet_run_lock(fleet: FleetConfig, holder: str) -> Iterator[None]:
    """Hold the fleet's run lock for the block; `RunLocked`, naming who has it, when taken."""
    folder = state_dir(fleet)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(f"{path}: {lock_holder(path)} is running on this fleet") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{holder} (pid {os.getpid()})\n".encode())
        yield
    finally:
        os.close(fd)


def lock_holder(path: Path) -> str:
    """Who wrote the lock file, as it says."""
    with contextlib.suppress(OSError):
        said = path.read_text().strip()
        if said:
            return said
    return "another run"
