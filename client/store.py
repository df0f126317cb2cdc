"""What a device keeps on disk between Flower messages.

Flower starts a ClientApp process per message and serialises `Context.state` with every one, so
nothing large lives in memory or in state: the base model (by its sha256), the device's data split,
the Skip2 cache (by base hash and data fingerprint), the device's own adapters and the figures of
its last fine-tune all live under one folder, and are reused across rounds and restarts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from skip2fleet.shared import model as base_model
from skip2fleet.shared.atomic import write_atomic, write_text_atomic
from skip2fleet.shared.cache import Cache, Codec, build_cache
from skip2fleet.shared.datasets import Split, TaskOptions
from skip2fleet.shared.datasets.samples import device_samples, fingerprint, sample_files
from skip2fleet.shared.devicefile import ACTIVE, LAST_FIGURES
from skip2fleet.shared.errors import FleetError

KEEP_VERSIONS = 5  # adapter versions kept for `fleet rollback` (the active one always)


@dataclass(frozen=True)
class Version:
    """Adapters a round made, as the device keeps them for predicting and rolling back."""

    number: int  # counts up on this device across runs
    round: int
    base_sha256: str
    method: str
    rank: int
    accuracy: float  # percent, on the device's hold-out when it was made


@dataclass(frozen=True)
class Active:
    """What the device predicts with: a base, and a version of adapters or none (the base)."""

    base_sha256: str
    version: Version | None
    accuracy: float  # percent on the hold-out when it became active


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

        def read() -> tuple[Split, Split]:
            # imported here: the data sets' readers are needed only before the split is kept
            from skip2fleet.shared.datasets.federated import device_split

            return device_split(dataset, partition, options)

        return self._kept_split(spec, read)

    def own_data(
        self,
        folder: Path,
        classes: tuple[str, ...],
        label_column: str,
        holdout: float,
        limit: int,
    ) -> tuple[Split, Split]:
        """The device's own samples as (training, hold-out), at most the newest `limit` training
        ones; read again when a file is added or changed (their names, sizes and times are part
        of the key)."""
        spec = f"{fingerprint(sample_files(folder))}|{classes}|{label_column}|{holdout}|{limit}"
        return self._kept_split(
            spec,
            lambda: device_samples(folder, classes, label_column, holdout, limit),
            prefix="own-",
        )

    def _kept_split(
        self, spec: str, make: Callable[[], tuple[Split, Split]], prefix: str = ""
    ) -> tuple[Split, Split]:
        """Read once and kept; with a `prefix`, only the newest of its kind is kept (a folder
        that grows would otherwise leave a copy per round)."""
        key = prefix + hashlib.sha256(spec.encode()).hexdigest()[:24]
        path = self._path("data", key, ".npz")
        if path.is_file():
            with np.load(path) as npz:
                return Split(npz["tune_x"], npz["tune_y"]), Split(npz["test_x"], npz["test_y"])
        tune, test = make()
        arrays = {"tune_x": tune.x, "tune_y": tune.y, "test_x": test.x, "test_y": test.y}
        write_atomic(path, lambda handle: np.savez(handle, **arrays))
        for old in path.parent.glob(f"{prefix}*.npz") if prefix else ():
            if old != path:
                old.unlink(missing_ok=True)
        return tune, test

    def cache(
        self, model: base_model.Model, digest: str, x: np.ndarray, codec: Codec = Codec.F32
    ) -> tuple[Cache, bool]:
        """The Skip2 cache of `x` under base `digest` by `codec`; True when built just now."""
        fingerprint = hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()
        path = self._path("cache", f"{digest[:24]}-{fingerprint[:24]}-{codec}", ".npz")
        n_classes = base_model.spec_of(model).n_classes
        if path.is_file():
            return Cache.load(path, n_classes), False
        cache = build_cache(model, x, codec)
        write_atomic(path, cache.save)
        for old in path.parent.glob(f"{digest[:24]}-*-{codec}.npz"):  # data no longer here
            if old != path:
                old.unlink(missing_ok=True)
        return cache, True

    def adapters_path(self, digest: str, method: str, rank: int) -> Path:
        return self._path("adapters", f"{digest[:24]}-{method}-r{rank}", ".npy")

    def load_adapters(self, digest: str, method: str, rank: int, size: int) -> np.ndarray | None:
        """The adapters to continue from, if any of `size` values (another size: saved by an
        older skip2fleet with another layout, so the round starts afresh)."""
        path = self.adapters_path(digest, method, rank)
        theta = np.load(path) if path.is_file() else None
        return theta if theta is not None and theta.shape == (size,) else None

    def save_adapters(self, digest: str, method: str, rank: int, theta: np.ndarray) -> None:
        write_atomic(self.adapters_path(digest, method, rank), lambda h: np.save(h, theta))

    # -- versions ----------------------------------------------------------------------------

    def versions(self) -> list[Version]:
        """Every kept version, oldest first."""
        folder = self.root / "versions"
        found = sorted(folder.glob("*.json")) if folder.is_dir() else []
        return [Version(**json.loads(f.read_text())) for f in found]

    def version_theta(self, version: Version) -> np.ndarray:
        return np.load(self._path("versions", f"{version.number:06d}", ".npy"))

    def save_version(
        self, theta: np.ndarray, round_: int, digest: str, method: str, rank: int, accuracy: float
    ) -> Version:
        """Keep `theta` as the next version (the arrays first, then the record naming them)."""
        number = max((v.number for v in self.versions()), default=0) + 1
        version = Version(number, round_, digest, method, rank, accuracy)
        stem = f"{number:06d}"
        write_atomic(self._path("versions", stem, ".npy"), lambda h: np.save(h, theta))
        write_text_atomic(self._path("versions", stem, ".json"), json.dumps(asdict(version)))
        return version

    def active(self) -> Active | None:
        path = self.root / ACTIVE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        version = data.get("version")
        return Active(
            data["base_sha256"], Version(**version) if version else None, data["accuracy"]
        )

    def activate(self, base_sha256: str, version: Version | None, accuracy: float) -> None:
        """Make `version` (None: the base alone) what predicts, then drop old versions."""
        record = {
            "base_sha256": base_sha256,
            "version": asdict(version) if version else None,
            "accuracy": accuracy,
        }
        write_text_atomic(self.root / ACTIVE, json.dumps(record, indent=2) + "\n")
        keep = {v.number for v in self.versions()[-KEEP_VERSIONS:]}
        keep |= {version.number} if version else set()
        for old in self.versions():
            if old.number not in keep:
                for suffix in (".json", ".npy"):  # the record first: never a record without arrays
                    self._path("versions", f"{old.number:06d}", suffix).unlink(missing_ok=True)

    def rollback(self, round_: int | None = None) -> Version:
        """Make an earlier kept version active: the newest one made by round `round_`, or the
        one before the active one; the active base must be the version's base."""
        active = self.active()
        if active is None:
            raise FleetError(f"{self.root}: no active model to roll back from")
        kept = [v for v in self.versions() if v.base_sha256 == active.base_sha256]
        if round_ is not None:
            chosen = [v for v in kept if v.round == round_]
            if not chosen:
                rounds = ", ".join(str(v.round) for v in kept) or "none"
                raise FleetError(f"{self.root}: no kept version of round {round_} (kept: {rounds})")
        else:
            current = active.version.number if active.version else 0
            chosen = [v for v in kept if v.number < current]
            if not chosen:
                raise FleetError(f"{self.root}: no version older than the active one is kept")
        version = chosen[-1]
        self.activate(version.base_sha256, version, version.accuracy)
        return version

    def save_figures(self, figures: dict) -> None:
        """The last fine-tune's figures, for the device agent to export."""
        write_text_atomic(self.root / LAST_FIGURES, json.dumps(figures, indent=2) + "\n")
