"""What the service has done, counted in bounded memory and written for the device agent.

The agent already listens for Prometheus on the device; the service adds no port of its own. It
writes this snapshot (a small JSON file in the state folder, replaced atomically about once a
second) and the agent exports it on each scrape. Labels stay bounded: a class of the base, a
rejection's kind; the model serving is a value (its version number), never a label.
"""

from __future__ import annotations

import json
import threading
import time
from bisect import bisect_left
from collections import Counter
from pathlib import Path

import numpy as np

from skip2fleet.shared.atomic import write_text_atomic
from skip2fleet.shared.devicefile import SERVE_SNAPSHOT

CONFIDENCE_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 1.0)
REJECTIONS = ("width", "values", "garbage", "file", "model")  # a rejection's kinds


class Histogram:
    """Prometheus' cumulative buckets, counted per bucket (the last is +Inf)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds, self.counts, self.total = bounds, [0] * (len(bounds) + 1), 0.0

    def observe(self, values: np.ndarray) -> None:
        counts = np.bincount(np.searchsorted(self.bounds, values), minlength=len(self.counts))
        for i, n in enumerate(counts):
            self.counts[i] += int(n)
        self.total += float(values.sum())

    def observe_one(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def as_dict(self) -> dict:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.total}


class Tally:
    """Predictions per class, confidence and latency, rejections, the model serving, the spool."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / SERVE_SNAPSHOT
        self.lock = threading.Lock()
        self.predictions: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.confidence = Histogram(CONFIDENCE_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.version = self.round = -1  # -1: nothing serving yet; 0: the base alone
        self.switches = self.load_failures = self.backlog = 0

    def answered(self, classes: tuple[str, ...], labels: np.ndarray, confidence: np.ndarray,
                 seconds: float) -> None:  # fmt: skip
        counts = np.bincount(labels, minlength=len(classes))
        with self.lock:
            for name, n in zip(classes, counts, strict=True):
                if n:
                    self.predictions[name] += int(n)
            self.confidence.observe(confidence)
            self.latency.observe_one(seconds)

    def reject(self, kind: str) -> None:
        with self.lock:
            self.rejected[kind] += 1

    def snapshot(self) -> dict:
        with self.lock:
            return {
                "time": time.time(),
                "predictions": dict(self.predictions),
                "rejected": {kind: self.rejected[kind] for kind in REJECTIONS},
                "confidence": self.confidence.as_dict(),
                "latency_seconds": self.latency.as_dict(),
                "version": self.version,
                "round": self.round,
                "switches": self.switches,
                "load_failures": self.load_failures,
                "spool_backlog": self.backlog,
            }

    def write(self) -> None:
        write_text_atomic(self.path, json.dumps(self.snapshot()) + "\n")
