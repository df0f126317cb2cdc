"""A round's plans (configure): what each online node is sent.

Every node gets the round's `RoundPlan`. The first plan a node gets in a run carries the base
model; later ones only its sha256, plus the base again for a node that said it lacks it
(BASE_MISSING). In a fleet that aggregates, each device also gets the adapters the last round left
for it (checked on the way out as on the way in, `shared.records`); a node not yet heard from in
this run (in a simulation the coordinator learns a node's device from its first reply) gets every
device's, by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from skip2fleet.server.federation.exchange import Exchange
from skip2fleet.shared.config import FleetConfig
from skip2fleet.shared.model import Model
from skip2fleet.shared.protocol import THETA, ErrorCode, Part, RoundPlan
from skip2fleet.shared.records import adapters_record, model_record, plan_record


def plan_for(config: FleetConfig, number: int, digest: str, state_root: str) -> RoundPlan:
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
        devices=[d.name for d in config.devices],
        partitions=[d.data.partition for d in config.devices],
        ranks=[config.rank_of(d) for d in config.devices],
        probes=[d.probe for d in config.devices],
        idle_watts=[d.idle_watts for d in config.devices],
        full_watts=[d.full_watts for d in config.devices],
        data_paths=[d.data.path or "" for d in config.devices],
        label_column=task.label_column,
        holdout=task.holdout,
        accept=t.accept,
        max_samples=t.max_samples,
    )


@dataclass
class Deliveries:
    """What this run has delivered: which nodes hold the base, and the adapters the last round
    left for each device to start the next one from."""

    base: Model
    sizes: dict[str, int]  # values in each device's packed adapters
    outgoing: dict[str, np.ndarray] = field(default_factory=dict)
    has_base: set[int] = field(default_factory=set)  # sent it, and did not refuse it since

    def contents(
        self, nodes: list[int], plan: RoundPlan, device_of: dict[int, str]
    ) -> dict[int, RecordDict]:
        """The message content for each node."""
        contents = {}
        for node in nodes:
            content = RecordDict({Part.PLAN: plan_record(plan)})
            if node not in self.has_base:
                content[Part.BASE] = model_record(self.base)
            device = device_of.get(node)
            if device in self.outgoing:
                content[Part.ADAPTERS] = adapters_record(self.outgoing[device], self.sizes[device])
            elif device is None and self.outgoing:
                content[Part.ADAPTERS_BY_DEVICE] = ArrayRecord(
                    {d: adapters_record(v, self.sizes[d])[THETA] for d, v in self.outgoing.items()}
                )
            contents[node] = content
        self.has_base.update(nodes)
        return contents

    def forget_base(self, answers: Exchange) -> None:
        """Nodes that replied BASE_MISSING get the base again with their next plan."""
        self.has_base -= {
            node
            for node, reply in answers.replies.items()
            if reply.has_error() and reply.error.code == ErrorCode.BASE_MISSING
        }
