"""The device's fine-tuned model at work: the active base and adapters, merged for inference.

`load_device_model(state_dir)` reads what the ClientApp made active (`client.store`), merges the
adapters into the base once (`shared.layout`: the same merge the rounds evaluate with, and no
training state built), and `predict(x)`
gives class probabilities for raw samples; `fleet predict` is this on a file or standard input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skip2fleet.client.store import Active, DeviceStore
from skip2fleet.shared import model as base_model
from skip2fleet.shared.errors import DataError, FleetError
from skip2fleet.shared.layout import layout
from skip2fleet.shared.methods import get_method
from skip2fleet.shared.predictor import Predictor


@dataclass(frozen=True)
class DeviceModel:
    """The model that answers on this device, and which one it is."""

    active: Active
    classes: tuple[str, ...]
    width: int  # raw values per sample
    predictor: Predictor

    @property
    def round(self) -> int | None:
        """The round that made the active adapters; None when the base answers alone."""
        return self.active.version.round if self.active.version else None

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities, a row per sample of raw values (samples x width, or one
        sample as a flat vector, or samples x channels x length)."""
        x = np.asarray(x, dtype=np.float32)
        rows = x.reshape(1, -1) if x.ndim == 1 else x.reshape(len(x), -1)
        if rows.shape[1] != self.width:
            raise DataError(f"a sample has {rows.shape[1]} values; the model takes {self.width}")
        return base_model.probabilities(self.predictor(rows))


def load_device_model(state_dir: Path) -> DeviceModel:
    """The active base and adapters of the device keeping its state in `state_dir`."""
    store = DeviceStore(Path(state_dir))
    active = store.active()
    if active is None:
        raise FleetError(f"{store.root}: no active model yet; it appears after the first round")
    model = store.load_base(active.base_sha256)
    if model is None:
        raise FleetError(f"{store.root}: the active base {active.base_sha256[:12]} is missing")
    version = active.version
    if version is None:
        predictor = Predictor(base_model.spec_of(model), model)
    else:
        theta = store.version_theta(version)
        adapters = layout(get_method(version.method), base_model.spec_of(model), version.rank)
        if theta.shape != (adapters.size,):
            raise FleetError(
                f"{store.root}: adapters version {version.number} hold {theta.size} values, "
                f"{version.method} at rank {version.rank} takes {adapters.size} (saved by an "
                "older skip2fleet with another layout); the next round makes a new version"
            )
        predictor = adapters.predictor(model, theta.astype(np.float32))
    width = base_model.spec_of(model).width
    return DeviceModel(active, base_model.classes_of(model), width, predictor)
