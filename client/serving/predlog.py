"""Every prediction, one JSON line each, in a log that never outgrows its cap: at half the cap the
file becomes `NAME.1` (replacing the one before), so the two together stay within the cap."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np


class PredictionLog:
    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path, self.half = Path(path), max(1, max_bytes // 2)
        self.lock = threading.Lock()
        self.file = open(self.path, "ab")  # noqa: SIM115 (open for the service's life)

    def append(self, source: str, classes: tuple[str, ...], labels: np.ndarray,
               confidence: np.ndarray, version: int) -> None:  # fmt: skip
        """A line per sample: time, where it came from, class, confidence, model version."""
        head = f'{{"t":{time.time():.3f},"source":{json.dumps(source)},"class":'
        tail = f',"version":{version}}}\n'
        quoted = [json.dumps(name) for name in classes]
        lines = "".join(
            f'{head}{quoted[k]},"confidence":{c:.4f}{tail}'
            for k, c in zip(labels.tolist(), confidence.tolist(), strict=True)
        ).encode()
        with self.lock:
            if self.file.tell() + len(lines) > self.half:
                self._rotate()
            if len(lines) > self.half:  # a batch larger than the cap: its newest whole lines
                tail = lines[-self.half :]
                lines = tail[tail.find(b"\n") + 1 :]
            self.file.write(lines)
            self.file.flush()

    def _rotate(self) -> None:
        self.file.close()
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self.file = open(self.path, "ab")  # noqa: SIM115

    def close(self) -> None:
        with self.lock:
            self.file.close()
