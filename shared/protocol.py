"""What the coordinator asks of a device each round, and what the device reports back.

Every name the two sides share lives here: the records of a plan and of a reply (`Part`), the
fields inside them, the `--node-config` keys a ClientApp reads (`NodeConfig`), the error codes, the
accept rule's values (`Accept`; the cache codecs are `shared.cache.Codec`), and one dataclass per
direction (`RoundPlan`, `Figures`). Turning them into Flower records is `shared.records`'; this
module imports nothing of Flower's, so fleet.yaml's checks can use its names. A device finds
node's plan names its device; a node whose device the coordinator does not know yet finds itself
in the fleet's roster by its `--node-config device=NAME`, or in a simulation by its partition id.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum, StrEnum

from skip2fleet.shared.cache import Codec
from skip2fleet.shared.datasets.samples import (
    DEFAULT_HOLDOUT,
    DEFAULT_LABEL_COLUMN,
    DEFAULT_MAX_SAMPLES,
)


class Part(StrEnum):
    """The records of a message (its RecordDict's keys)."""

    PLAN = "plan"  # ConfigRecord: the RoundPlan
    BASE = "base"  # ArrayRecord: the base model (the first plan of a run, or when asked for)
    ADAPTERS = "adapters"  # ArrayRecord of one array, THETA: packed adapters (`shared.layout`)
    ADAPTERS_BY_DEVICE = "adapters-by-device"  # a resumed run's first round: node ids not known
    ROSTER = "roster"  # ArrayRecord of one array, ROSTER_JSON: every device's Entry, for a node
    # whose device the coordinator does not know yet (a simulation's first round)
    FIGURES = "figures"  # MetricRecord: the device's Figures
    DEVICE = "device"  # ConfigRecord of one value, DEVICE_NAME: who replies


THETA = "theta"  # the one array of an adapters record
PLAN_JSON = "json"  # the one value of a plan record: the RoundPlan's values as JSON
ROSTER_JSON = "entries"  # the one array of a roster record: a JSON list of Entry, as bytes
DEVICE_NAME = "name"  # the one value of a reply's device record


class NodeConfig(StrEnum):
    """The `--node-config` keys a ClientApp reads (a simulation sets only PARTITION_ID)."""

    DEVICE = "device"  # the device's name in fleet.yaml
    PARTITION_ID = "partition-id"  # Flower's, in a simulation: the device's index
    STATE_DIR = "state-dir"  # where the device keeps its base, cache, adapters and versions
    DATA_DIR = "data-dir"  # the device's data folder, over the plan's
    SYS_ROOT = "sys-root"  # sysfs and procfs for the power probes (tests point them at fixtures)
    PROC_ROOT = "proc-root"


class ErrorCode(IntEnum):
    """Flower error codes of a device's error replies."""

    DEVICE_ERROR = 1001  # the device refused the round (missing data, unknown device, ...)
    BASE_MISSING = 1002  # it lacks the plan's base (wiped, or refused by hash): send it again


class Accept(StrEnum):
    """When a round's new adapters become a device's active model (`training.accept`)."""

    IF_BETTER = "if-better"  # only when not worse on the hold-out than the base and the active
    ALWAYS = "always"


@dataclass(frozen=True)
class Entry:
    """What a plan says of its one device (fleet.yaml's entry, as the device needs it)."""

    device: str
    index: int  # its place in fleet.yaml: its seed's offset, its simulation partition id
    partition: str
    rank: int
    probe: str  # which power probe samples its fine-tune
    idle_watts: float
    full_watts: float
    data_path: str = ""  # its own samples' folder ("" for none: the task's partition)


@dataclass(frozen=True)
class RoundPlan:
    """One device's plan for a round: the round's settings and that device's entry, so its size
    does not grow with the fleet. `device` "" (`UNADDRESSED`): the coordinator does not know this
    node's device yet (a simulation's first round), and the message carries the fleet's entries
    (`Part.ROSTER`) for the device to find its own (`for_node`)."""

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
    device: str
    index: int
    partition: str
    rank: int
    probe: str
    idle_watts: float
    full_watts: float
    data_path: str = ""
    label_column: str = DEFAULT_LABEL_COLUMN
    holdout: float = DEFAULT_HOLDOUT
    accept: Accept = Accept.IF_BETTER
    cache: Codec = Codec.F32  # Skip2-LoRA's cache codec: see training.cache
    max_samples: int = DEFAULT_MAX_SAMPLES  # newest training samples a device keeps of its own

    def values(self) -> dict:
        """The plan as plain values (enums as their names), as it travels."""
        return {k: str(v) if isinstance(v, StrEnum) else v for k, v in vars(self).items()}

    @classmethod
    def from_record(cls, record: Mapping) -> RoundPlan:
        """The plan a record carries (`PLAN_JSON`); an unknown accept rule or codec, or a value
        missing, is a ValueError."""
        sent = json.loads(str(record[PLAN_JSON]))
        try:
            values = {f.name: sent[f.name] for f in dataclasses.fields(cls)}
        except (KeyError, TypeError) as exc:
            raise ValueError(f"a plan without {exc}") from None
        return cls(**values | {"accept": Accept(values["accept"]), "cache": Codec(values["cache"])})

    def with_entry(self, entry: Entry) -> RoundPlan:
        return dataclasses.replace(self, **dataclasses.asdict(entry))

    def for_node(self, roster: list[dict], node_config: Mapping) -> RoundPlan:
        """An unaddressed plan made this node's, from the fleet's entries: by the node's
        configured device name, or in a simulation by its partition id."""
        if NodeConfig.DEVICE in node_config:
            name = str(node_config[NodeConfig.DEVICE])
            found = [e for e in roster if e["device"] == name]
            if not found:
                raise ValueError(f"device {name!r} is not in the fleet ({len(roster)} devices)")
            return self.with_entry(Entry(**found[0]))
        index = int(node_config[NodeConfig.PARTITION_ID])
        if not 0 <= index < len(roster):
            raise ValueError(f"partition {index} has no device in the fleet")
        return self.with_entry(Entry(**roster[index]))


UNADDRESSED = Entry("", -1, "", 0, "", 0.0, 0.0)


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

    @classmethod
    def from_record(cls, record: Mapping) -> Figures:
        return cls(**{f.name: record[f.name] for f in dataclasses.fields(cls)})
