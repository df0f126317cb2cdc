"""A device's round, phase one: load what it trains from.

The plan's base, checked against the plan's sha256 and kept on disk (a device without it raises
`BaseMissing`, and the coordinator sends it with the next plan); the device's data (its own
samples' folder, or its partition of the task); the Skip2 cache of that data (on disk, by base,
data and codec); and the adapters to start from: the coordinator's when it sent some (a fleet
that aggregates), else the device's own from its last round (none in round 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import RecordDict

from skip2fleet.client.store import DeviceStore
from skip2fleet.shared import model as base_model
from skip2fleet.shared.cache import Cache
from skip2fleet.shared.datasets import Split, TaskOptions
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.layout import Layout, layout
from skip2fleet.shared.methods import Method, get_method
from skip2fleet.shared.protocol import NodeConfig, Part, RoundPlan
from skip2fleet.shared.records import check_adapters, record_adapters, record_model
from skip2fleet.shared.spec import form_of


class BaseMissing(FleetError):
    """This device does not hold the plan's base model: the coordinator should send it."""


@dataclass(frozen=True)
class RoundInputs:
    """What one round on this device trains from."""

    plan: RoundPlan  # this device's
    store: DeviceStore
    model: base_model.Model  # the base
    layout: Layout  # of the plan's method on the base, at this device's rank
    tune: Split
    test: Split  # the hold-out: accuracy before and after, and the accept rule
    cache: Cache | None  # Skip2-LoRA's
    cache_built: bool  # built in this round (else read from disk)
    start: np.ndarray | None  # the adapters to continue from; None: a fresh start

    @property
    def name(self) -> str:
        return self.plan.device

    @property
    def method(self) -> Method:
        return self.layout.method


def load_inputs(content: RecordDict, node_config: dict, plan: RoundPlan) -> RoundInputs:
    name = plan.device
    root = node_config.get(NodeConfig.STATE_DIR) or Path(plan.state_root) / name
    store = DeviceStore(Path(str(root)))
    model = _base(content, store, plan, name)
    adapters = layout(get_method(plan.method), base_model.spec_of(model), plan.rank)
    tune, test = _data(store, model, plan, node_config)
    cache, built = None, False
    if adapters.method.cached:
        cache, built = store.cache(model, plan.base_sha256, tune.x, plan.cache)
    start = _start(content, store, plan, name, adapters)
    return RoundInputs(plan, store, model, adapters, tune, test, cache, built, start)


def _base(content: RecordDict, store: DeviceStore, plan: RoundPlan, name: str) -> base_model.Model:
    """The plan's base: the one it carries (kept on disk once its hash matches), else this
    device's copy."""
    if Part.BASE in content:
        received = record_model(content[Part.BASE])
        digest = base_model.sha256(received)
        if digest != plan.base_sha256:
            raise BaseMissing(
                f"{name}: base model hash {digest[:12]} does not match the announced "
                f"{plan.base_sha256[:12]}; refusing it"
            )
        store.save_base(received)
    model = store.load_base(plan.base_sha256)
    if model is None:
        raise BaseMissing(f"{name}: no base model {plan.base_sha256[:12]} on this device")
    return model


def _data(
    store: DeviceStore, model: base_model.Model, plan: RoundPlan, node_config: dict
) -> tuple[Split, Split]:
    """(training, hold-out): the device's own samples, or its partition of the plan's task."""
    spec = base_model.spec_of(model)
    own = plan.data_path
    if own:
        classes = base_model.classes_of(model)
        tune, test = store.own_data(
            Path(own), classes, plan.label_column, plan.holdout, plan.max_samples
        )
    else:
        data_dir = node_config.get(NodeConfig.DATA_DIR) or plan.data_dir or None
        folder = Path(str(data_dir)) if data_dir else None
        options = TaskOptions(folder, plan.source_room, seed=plan.seed, form=form_of(spec))
        tune, test = store.data(plan.dataset, plan.partition, options)
    if tune.x.shape[1] != spec.width:
        raise FleetError(
            f"{plan.device}: the base takes {spec.width} values per sample, "
            f"this device's {own or plan.dataset} data has {tune.x.shape[1]}"
        )
    return tune, test


def _start(
    content: RecordDict, store: DeviceStore, plan: RoundPlan, name: str, adapters: Layout
) -> np.ndarray | None:
    """The coordinator's adapters for this device if it sent some, else the device's own from
    its last round (of the layout's size: another size was saved by an older skip2fleet)."""
    if Part.ADAPTERS in content:
        return record_adapters(content[Part.ADAPTERS], adapters.size)
    if Part.ADAPTERS_BY_DEVICE in content and name in content[Part.ADAPTERS_BY_DEVICE]:
        return check_adapters(content[Part.ADAPTERS_BY_DEVICE][name], adapters.size).numpy()
    if plan.round == 1:
        return None
    method, rank = adapters.method.name, adapters.rank
    return store.load_adapters(plan.base_sha256, method, rank, adapters.size)
