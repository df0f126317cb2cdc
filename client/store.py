"""What a device keeps on disk between Flower messages.

Flower starts a ClientApp process per message and serialises `Context.state` with every one, so
nothing large lives in memory or in state: the base model (by its sha256), the device's data split,
the Skip2 cache (by base hash and data fingerprint), the device's own adapters and the figures of
its last fine-tune all live under one folder, and are reused across rounds and restarts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from skip2fleet.shared import model as base_model
from skip2fleet.shared.atomic import write_atomic, write_text_atomic
from skip2fleet.shared.cache import build_cache
from skip2fleet.shared.datasets import Split, TaskOptions
from skip2fleet.shared.datasets.federated import device_split
from skip2fleet.shared.devicefile import LAST_FIGURES


class DeviceStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser()

    def _path(self, kind: str, key: str, suffix: str) -> Path:
        return self.root / kind / f"{key}{suffix}"

    def save_base(self, model: base_model.Model) -> str:
        digest = base_model.sha256(model)
        base_model.save(model, self._path("base", digest, ".npz"))
        return digest

    def load_base(self, digest: str) -> base_model.Model | None:
        path = self._path("base", digest, ".npz")
        if not path.is_file():
            return None
        model = base_model.load(path)
        return model if base_model.sha256(model) == digest else None

    def data(self, dataset: str, partition: str, options: TaskOptions) -> tuple[Split, Split]:
        """The device's (fine-tune, test) split, read from the data set once and kept."""
        spec = f"{dataset}|{partition}|{options.data_dir}|{options.source_room}|{options.seed}"
        spec += f"|{options.form}"
        path = self._path("data", hashlib.sha256(spec.encode()).hexdigest()[:24], ".npz")
        if path.is_file():
            with np.load(path) as npz:
                return Split(npz["tune_x"], npz["tune_y"]), Split(npz["test_x"], npz["test_y"])
        tune, test = device_split(dataset, partition, options)
        arrays = {"tune_x": tune.x, "tune_y": tune.y, "test_x": test.x, "test_y": test.y}
        write_atomic(path, lambda handle: np.savez(handle, **arrays))
        return tune, test

    def cache(self, model: base_model.Model, digest: str, x: np.ndarray) -> tuple[np.ndarray, bool]:
        """The Skip2 cache of `x` under base `digest`; True when it was built just now."""
        fingerprint = hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()
        path = self._path("cache", f"{digest[:24]}-{fingerprint[:24]}", ".npy")
        if path.is_file():
            return np.load(path), False
        cache = build_cache(model, x)
        write_atomic(path, lambda handle: np.save(handle, cache))
        return cache, True

    def adapters_path(self, digest: str, method: str, rank: int) -> Path:
        return self._path("adapters", f"{digest[:24]}-{method}-r{rank}", ".npy")

    def load_adapters(self, digest: str, method: str, rank: int) -> np.ndarray | None:
        path = self.adapters_path(digest, method, rank)
        return np.load(path) if path.is_file() else None

    def save_adapters(self, digest: str, method: str, rank: int, theta: np.ndarray) -> None:
        write_atomic(self.adapters_path(digest, method, rank), lambda h: np.save(h, theta))

    def save_figures(self, figures: dict) -> None:
        """The last fine-tune's figures, for the device agent to export."""
        write_text_atomic(self.root / LAST_FIGURES, json.dumps(figures, indent=2) + "\n")
