"""Sampling a power probe in a thread: joules, mean and peak watts, and errors by kind.

The ClientApp wraps a fine-tune in a sampler to report its energy; the device agent keeps one
running to export power and an energy counter. Nothing here blocks the training step: the thread
wakes `hz` times a second, reads the probe, and adds watts x elapsed time.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

from skip2fleet.client.telemetry.probes import PowerProbe, ProbeError


class PowerSampler:
    def __init__(
        self, probe: PowerProbe, hz: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.probe, self.period, self.clock = probe, 1.0 / hz, clock
        self.joules = 0.0
        self.samples = 0
        self.peak_watts = 0.0
        self.last_watts: float | None = None  # None while the probe cannot be read
        self.errors: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = self._last = 0.0

    def sample(self) -> None:
        """One reading, integrated over the time since the previous one."""
        now = self.clock()
        try:
            watts = self.probe.watts()
        except ProbeError as exc:
            with self._lock:
                self.errors[exc.kind] += 1
                self.last_watts = None
                self._last = now
            return
        with self._lock:
            self.joules += watts * (now - self._last)
            self.samples += 1
            self.peak_watts = max(self.peak_watts, watts)
            self.last_watts = watts
            self._last = now

    def start(self) -> PowerSampler:
        self._started = self._last = self.clock()
        try:  # counters and the CPU model answer per interval: the first call only primes them
            self.probe.watts()
        except ProbeError as exc:
            self.errors[exc.kind] += 1
        self._thread = threading.Thread(target=self._run, name="power-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def __enter__(self) -> PowerSampler:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def mean_watts(self) -> float:
        elapsed = self._last - self._started
        return self.joules / elapsed if elapsed > 0 else 0.0
