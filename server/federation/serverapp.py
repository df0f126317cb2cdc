"""The Flower ServerApp: federated rounds of Skip2-LoRA fine-tuning across the fleet.

Round 1 of a run sends every device the base model and its sha256, once; later rounds send only
the plan and, when the fleet aggregates, each device's merged adapters. Replies with NaN or Inf,
the wrong shape or dtype are refused and named, so one bad device cannot poison the aggregate.
Nothing waits forever: too few devices, or a round in which too few answer within
`round_timeout_s`, ends the run with the devices named; completed rounds stay in the run folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from skip2fleet.server.federation.aggregation import STRATEGIES, Update
from skip2fleet.server.federation.pushes import push_round
from skip2fleet.server.federation.runs import RunFolder
from skip2fleet.shared import model as base_model
from skip2fleet.shared.adapters import pack, packed_size, unpack
from skip2fleet.shared.config import FleetConfig
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.methods import Method, get_method
from skip2fleet.shared.protocol import (
    ADAPTERS,
    ADAPTERS_BY_DEVICE,
    BASE,
    FIGURES,
    PLAN,
    Figures,
    RoundPlan,
)
from skip2fleet.shared.records import model_record, record_vector, vector_record, wire_bytes
from skip2fleet.shared.spec import Spec

RoundListener = Callable[[dict], None]
NODE_POLL_S = 1.0


def make_server_app(
    run_dir: Path | None = None, on_round: RoundListener | None = None
) -> ServerApp:
    """A ServerApp for the run folder `run_dir` (default: the run config's `run-dir`)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        folder = RunFolder(run_dir or Path(str(context.run_config["run-dir"])))
        try:
            coordinate(grid, folder, on_round or (lambda result: None))
        except FleetError as exc:
            folder.record_failure(str(exc))
            raise

    return server_app


app = make_server_app()  # what `flwr run` loads from the FAB


def plan_for(config: FleetConfig, number: int, digest: str, state_root: str) -> RoundPlan:
    t, task = config.training, config.task
    return RoundPlan(
        round=number,
        method=t.method,
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
    )


def wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted:
            return nodes
        if time.monotonic() > deadline:
            raise FleetError(
                f"only {len(nodes)} of the {wanted} devices needed are connected to the "
                f"SuperLink after {timeout:.0f} s"
            )
        time.sleep(NODE_POLL_S)


def coordinate(grid: Grid, folder: RunFolder, on_round: RoundListener) -> None:
    config = folder.config()
    base = folder.base()
    digest = base_model.sha256(base)
    spec = base_model.spec_of(base)
    method = get_method(config.training.method)
    fed = config.federation
    ranks = {d.name: config.rank_of(d) for d in config.devices}
    done = folder.completed_rounds()
    outgoing = folder.outgoing(done[-1]) if done else {}
    nodes = wait_for_nodes(grid, fed.min_devices, fed.round_timeout_s)
    device_of: dict[int, str] = {}
    state_root = str(folder.path / "devices")
    for number in range((done[-1] if done else 0) + 1, fed.rounds + 1):
        started, started_at = time.monotonic(), time.time()
        plan = plan_for(config, number, digest, state_root)
        first = number == (done[-1] if done else 0) + 1
        messages = []
        for node in nodes:
            content = RecordDict({PLAN: plan.record()})
            if first:
                content[BASE] = model_record(base)
            device = device_of.get(node)
            if device in outgoing:
                content[ADAPTERS] = vector_record(outgoing[device])
            elif first and outgoing:  # a resumed run: which node is which device is not known yet
                content[ADAPTERS_BY_DEVICE] = ArrayRecord(
                    {name: Array(vector) for name, vector in outgoing.items()}
                )
            messages.append(
                Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)
            )
        downlink = {node: wire_bytes(m.content) for node, m in zip(nodes, messages, strict=True)}
        replies = list(grid.send_and_receive(messages, timeout=fed.round_timeout_s))
        result, updates, received = judge(replies, method, spec, ranks, device_of)
        answered = set(result["devices"]) | set(result["refused"])
        result["missing"] = [d.name for d in config.devices if d.name not in answered]
        if len(updates) < fed.min_devices:
            reasons = (
                [
                    f"no answer from {', '.join(result['missing'])} within "
                    f"{fed.round_timeout_s:.0f} s"
                ]
                if result["missing"]
                else []
            )
            reasons += [f"{name} refused: {why}" for name, why in result["refused"].items()]
            raise FleetError(
                f"round {number}: {len(updates)} usable replies, {fed.min_devices} needed; "
                + "; ".join(reasons)
            )
        aggregate = STRATEGIES[fed.aggregation](updates, method, spec)
        outgoing = {
            device: pack(theta, method, spec, ranks[device])
            for device, theta in aggregate.per_device.items()
        }
        result.update(
            round=number,
            started_at=started_at,
            duration_s=time.monotonic() - started,
            aggregation=fed.aggregation,
            svd_relative_error=aggregate.svd_relative_error,
            downlink_bytes={device_of.get(n, str(n)): b for n, b in downlink.items()},
        )
        folder.save_round(number, result, received, outgoing)
        if config.coordinator.pushgateway:
            push_round(config.coordinator.pushgateway, folder.path.name, method.name, result)
        on_round(result)


def _named_device(reason: str, ranks: dict[str, int]) -> str | None:
    """Devices start their error reasons with their name (see client.app)."""
    name = reason.split(":", 1)[0]
    return name if name in ranks else None


def judge(
    replies: list[Message],
    method: Method,
    spec: Spec,
    ranks: dict[str, int],
    device_of: dict[int, str],
) -> tuple[dict, list[Update], dict[str, np.ndarray]]:
    """Accept or refuse every reply; refused ones are named with the reason."""
    result: dict = {"devices": {}, "refused": {}}
    updates, received = [], {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            reason = reply.error.reason or f"error code {reply.error.code}"
            name = device_of.get(node) or _named_device(reason, ranks) or f"node {node}"
            result["refused"][name] = reason
            continue
        content = reply.content
        name = str(content["device"]["name"])
        device_of[node] = name
        problem = None
        try:
            figures = Figures.from_record(content[FIGURES])
            vector = record_vector(content[ADAPTERS])
            expected = packed_size(method, spec, ranks[name]) if name in ranks else None
            if name not in ranks:
                problem = "not a device of this fleet"
            elif vector.dtype != np.float32 or vector.shape != (expected,):
                problem = (
                    f"adapters are {vector.dtype} {vector.shape}, expected float32 ({expected},)"
                )
            elif not np.isfinite(vector).all():
                problem = "adapters hold NaN or Inf"
        except (KeyError, ValueError, TypeError) as exc:
            problem = f"malformed reply ({exc})"
        if problem:
            result["refused"][name] = problem
            continue
        result["devices"][name] = figures.__dict__
        received[name] = vector
        updates.append(
            Update(name, unpack(vector, method, spec, ranks[name]), figures.samples, ranks[name])
        )
    result["devices"] = {n: result["devices"][n] for n in ranks if n in result["devices"]}
    return result, updates, received
