"""The service's model: the device's active one, followed as rounds and rollbacks change it.

A watcher thread looks at `active.json` (its inode, size and mtime) every quarter second; a change
loads the new model beside the old and then replaces the one reference requests read, so a request
is answered wholly by one model and none waits for a load. A model that fails to load leaves the
previous one serving; the failure is logged and counted, and retried when `active.json` changes.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path

from skip2fleet.client.model import DeviceModel, load_device_model
from skip2fleet.client.serving.tally import Tally
from skip2fleet.shared.devicefile import ACTIVE
from skip2fleet.shared.errors import FleetError

POLL_S = 0.25


def describe(model: DeviceModel) -> str:
    version = model.active.version
    said = f"adapters of round {version.round} (version {version.number})" if version else "alone"
    return f"base {model.active.base_sha256[:12]} {said}"


class ModelFollower:
    def __init__(self, state_dir: Path, tally: Tally, say: Callable[[str], None]) -> None:
        self.state_dir, self.tally, self.say = Path(state_dir), tally, say
        self.model: DeviceModel | None = None  # what requests read, replaced whole
        self._seen: tuple | None = None
        self._stop = threading.Event()

    def _signature(self) -> tuple | None:
        try:
            info = (self.state_dir / ACTIVE).stat()
        except FileNotFoundError:
            return None
        return info.st_ino, info.st_size, info.st_mtime_ns

    def refresh(self) -> None:
        """Load the active model if `active.json` changed since the last look."""
        signature = self._signature()
        if signature == self._seen:
            return
        self._seen = signature
        if signature is None:
            return
        try:
            model = load_device_model(self.state_dir)
        except (FleetError, OSError, ValueError, KeyError) as exc:
            self.tally.load_failures += 1
            self.say(f"the active model did not load ({exc}); still serving the one before")
            return
        switched = self.model is not None
        self.model = model
        version = model.active.version
        self.tally.version = version.number if version else 0
        self.tally.round = version.round if version else 0
        self.tally.switches += switched
        self.say(f"{'switched to' if switched else 'serving'} {describe(model)}")

    def start(self) -> ModelFollower:
        self.refresh()
        threading.Thread(target=self._watch, daemon=True, name="follow-model").start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            self.refresh()

    def stop(self) -> None:
        self._stop.set()


def log_line(text: str) -> None:
    print(f"serve: {text}", file=sys.stderr, flush=True)
