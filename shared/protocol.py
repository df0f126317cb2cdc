"""What the coordinator asks of a device each round, and what the device reports back.

One dataclass per direction, turned into Flower records and back here, so that the key names
live in one place. A device finds itself in `devices` by its `--node-config device=NAME`, or in a
simulation by its partition id.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from flwr.app import ConfigRecord, MetricRecord

from skip2fleet.shared.datasets.samples import (
    DEFAULT_HOLDOUT,
    DEFAULT_LABEL_COLUMN,
    DEFAULT_MAX_SAMPLES,
)

PLAN, BASE, ADAPTERS, FIGURES = "plan", "base", "adapters", "figures"
ADAPTERS_BY_DEVICE = "adapters-by-device"  # a resumed run's first round: node ids not yet known
DEVICE_ERROR = 1001  # Flower error code of a device's refusal (missing data, unknown device, ...)
BASE_MISSING = 1002  # the device lacks the plan's base (wiped, or refused by hash): send it again


@dataclass(frozen=True)
class RoundPlan:
    round: int
    method: str
    epochs: int
    lr: float
    batch_size: int
    seed: int
    base_sha256: str
    dataset: str
    data_dir: str  # "" for none
    source_room: str
    state_root: str  # where simulated devices keep their folders; "" on real devices
    devices: list[str]
    partitions: list[str]
    ranks: list[int]
    probes: list[str]  # per device: which power probe samples its fine-tune
    idle_watts: list[float]
    full_watts: list[float]
    # per device: its own samples' folder ("" for none: the task's partition)
    data_paths: list[str] = dataclasses.field(default_factory=list)
    label_column: str = DEFAULT_LABEL_COLUMN
    holdout: float = DEFAULT_HOLDOUT
    accept: str = "if-better"  # or "always": see training.accept
    cache: str = "f32"  # Skip2-LoRA's cache codec: see training.cache
    max_samples: int = DEFAULT_MAX_SAMPLES  # newest training samples a device keeps of its own

    def data_path(self, index: int) -> str:
        return self.data_paths[index] if index < len(self.data_paths) else ""

    def record(self) -> ConfigRecord:
        return ConfigRecord(dataclasses.asdict(self))

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundPlan:
        return cls(**{f.name: record[f.name] for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class Figures:
    """A device's report of one round (units in the names)."""

    samples: int
    loss: float
    acc_before: float  # the base model on the device's held-out data, percent
    acc_after: float  # with the adapters after this round
    forward_ms: float  # per training batch
    backward_ms: float
    update_ms: float
    train_batch_ms: float
    finetune_s: float  # data, cache and training of this round
    cache_bytes: int
    cache_built: int  # 1 when the cache was built this round, 0 when read from disk
    uplink_bytes: float  # of this reply, measured on its serialised form
    rank: int
    peak_rss_bytes: int  # of the ClientApp process so far
    energy_joules: float  # of the fine-tune, from the device's power probe (0: no probe)
    mean_watts: float
    peak_watts: float
    power_estimated: int  # 1 when the probe is the CPU-load model
    accepted: int = 1  # 1 when this round's adapters became active, 0 when the device kept its own
    acc_active: float = 0.0  # the active model on the hold-out after the round, percent

    def record(self) -> MetricRecord:
        return MetricRecord(dataclasses.asdict(self))

    @classmethod
    def from_record(cls, record: MetricRecord) -> Figures:
        return cls(**{f.name: record[f.name] for f in dataclasses.fields(cls)})
