"""A round's plans (configure): what each online node is sent, in bytes that do not grow with the
fleet.

A node's plan is the round's settings and its own device's entry (`RoundPlan`). The first plan a
node gets in a run carries the base model; later ones only its sha256, plus the base again for a
node that said it lacks it (BASE_MISSING). In a fleet that aggregates, each device also gets the
adapters the last round left for it (checked on the way out as on the way in, `shared.records`).

A node whose device the coordinator does not know yet (in a simulation it learns a node's device
from its first reply) gets an unaddressed plan, the fleet's roster to find itself in and, in a
resumed run, every device's adapters by name: O(N) for that node, in a simulation's first round
only. Everything several nodes get is one object, built once per round (the base once per run):
Flower computes an object's id once and the SuperLink stores it once, however many messages
hold it. So is the aggregate that devices share (fedavg's mean): one array, not one per device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from skip2fleet.server.federation.exchange import Exchange
from skip2fleet.shared.config import FleetConfig
from skip2fleet.shared.model import Model
from skip2fleet.shared.protocol import THETA, UNADDRESSED, Entry, ErrorCode, Part, RoundPlan
from skip2fleet.shared.records import adapters_record, model_record, plan_record, roster_record


def entries(config: FleetConfig) -> dict[str, Entry]:
    """Each device's entry, as its plans carry it."""
    return {
        d.name: Entry(
            device=d.name,
            index=i,
            partition=d.data.partition,
            rank=config.rank_of(d),
            probe=d.probe,
            idle_watts=d.idle_watts,
            full_watts=d.full_watts,
            data_path=d.data.path or "",
        )
        for i, d in enumerate(config.devices)
    }


def plan_for(config: FleetConfig, number: int, digest: str, state_root: str) -> RoundPlan:
    """The round's plan, addressed to no device yet (`RoundPlan.with_entry` addresses it)."""
    t, task = config.training, config.task
    return RoundPlan(
        round=number,
        method=t.method,
        cache=t.cache,
        epochs=t.epochs,
        lr=t.lr,
        batch_size=t.batch_size,
        seed=t.seed,
        base_sha256=digest,
        dataset=task.dataset,
        data_dir=task.data_dir or "",
        source_room=task.source_room,
        state_root=state_root,
        label_column=task.label_column,
        holdout=task.holdout,
        accept=t.accept,
        max_samples=t.max_samples,
        **dataclasses.asdict(UNADDRESSED),
    )


@dataclass
class Deliveries:
    """What this run has delivered: which nodes hold the base, and the adapters the last round
    left for each device to start the next one from."""

    base: Model
    sizes: dict[str, int]  # values in each device's packed adapters
    outgoing: dict[str, np.ndarray] = field(default_factory=dict)
    has_base: set[int] = field(default_factory=set)  # sent it, and did not refuse it since
    entries: dict[str, Entry] = field(default_factory=dict)  # for nodes not yet heard from
    _base_record: ArrayRecord | None = None

    def __post_init__(self) -> None:
        self._entry_values = {d: dataclasses.asdict(e) for d, e in self.entries.items()}

    def contents(
        self, nodes: list[int], plan: RoundPlan, device_of: dict[int, str]
    ) -> dict[int, RecordDict]:
        """The message content for each node: its own plan, and records shared between nodes."""
        adapters = self._adapters_by_device()
        common = plan.values()
        unknown: dict[str, object] = {}  # built on the first node not yet heard from
        contents = {}
        for node in nodes:
            device = device_of.get(node)
            if device is None:
                if not unknown:
                    unknown = self._for_unknown(plan, adapters)
                content = RecordDict(unknown)
            else:
                own = common | self._entry_values.get(device, {})
                content = RecordDict({Part.PLAN: plan_record(own)})
                if device in adapters:
                    content[Part.ADAPTERS] = adapters[device]
            if node not in self.has_base:
                content[Part.BASE] = self.base_record()
            contents[node] = content
        self.has_base.update(nodes)
        return contents

    def base_record(self) -> ArrayRecord:
        if self._base_record is None:
            self._base_record = model_record(self.base)
        return self._base_record

    def _adapters_by_device(self) -> dict[str, ArrayRecord]:
        """Each device's adapters as they travel, one record per distinct array."""
        shared: dict[tuple[int, int], ArrayRecord] = {}
        records = {}
        for device, theta in self.outgoing.items():
            key = (id(theta), self.sizes[device])
            if key not in shared:
                shared[key] = adapters_record(theta, self.sizes[device])
            records[device] = shared[key]
        return records

    def _for_unknown(self, plan: RoundPlan, adapters: dict[str, ArrayRecord]) -> dict[str, object]:
        """An unaddressed plan, the roster, and every device's adapters by name."""
        records: dict[str, object] = {
            Part.PLAN: plan_record(plan),
            Part.ROSTER: roster_record(list(self.entries.values())),
        }
        if adapters:
            records[Part.ADAPTERS_BY_DEVICE] = ArrayRecord(
                {device: record[THETA] for device, record in adapters.items()}
            )
        return records

    def forget_base(self, answers: Exchange) -> None:
        """Nodes that replied BASE_MISSING get the base again with their next plan."""
        self.has_base -= {
            node
            for node, reply in answers.replies.items()
            if reply.has_error() and reply.error.code == ErrorCode.BASE_MISSING
        }
