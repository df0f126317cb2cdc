"""The Flower ServerApp: federated rounds of Skip2-LoRA fine-tuning across the fleet.

Each round asks the SuperLink which nodes are online now (in a deployment, only the nodes whose
keys this coordinator registered count), so a device that joins late trains from the next round.
The first plan a node gets in a run carries the base model; later ones only its sha256, plus the
base again for a device that said it lacks it. Replies with NaN or Inf, the wrong shape, dtype or
size (checked before any array is built), or adapters far larger than the round's median are
refused and named, so one bad device cannot poison the aggregate. Nothing waits forever: too few
devices, or a round in which too few answer within `round_timeout_s`, ends the run with every
device named once, with how long it was waited for and why; completed rounds stay in the run
folder, which the ServerApp holds locked while it runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from skip2fleet.server.federation.aggregation import STRATEGIES, Update
from skip2fleet.server.federation.exchange import Exchange, exchange
from skip2fleet.server.federation.pushes import push_rounds
from skip2fleet.server.federation.runs import RunFolder
from skip2fleet.server.operations.certs import fleet_credentials
from skip2fleet.server.operations.frontdoor import door_note
from skip2fleet.shared import model as base_model
from skip2fleet.shared.adapters import pack, packed_size, unpack
from skip2fleet.shared.config import FleetConfig
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.methods import Method, get_method
from skip2fleet.shared.protocol import (
    ADAPTERS,
    ADAPTERS_BY_DEVICE,
    BASE,
    BASE_MISSING,
    FIGURES,
    PLAN,
    Figures,
    RoundPlan,
)
from skip2fleet.shared.records import model_record, vector_record, wire_bytes
from skip2fleet.shared.spec import Spec

RoundListener = Callable[[dict], None]
NODE_POLL_S = 1.0
NPY_HEADER_MAX = 1024  # bytes an Array spends on its .npy header beyond the values


def make_server_app(
    run_dir: Path | None = None, on_round: RoundListener | None = None
) -> ServerApp:
    """A ServerApp for the run folder `run_dir` (default: the run config's `run-dir`)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        folder = RunFolder(run_dir or Path(str(context.run_config["run-dir"])))
        with folder.lock():  # a second ServerApp on this folder fails here, writing nothing
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


def wait_for_nodes(
    grid: Grid,
    wanted: int,
    timeout: float,
    registered: dict[int, str],
    door: Callable[[], str] = lambda: "",
) -> list[int]:
    """The nodes online now, once `wanted` of them are there; in a deployment only the nodes whose
    keys this coordinator registered count (a stranger's node is never sent a plan). Too few:
    the message adds what `door()` says (what the front door refused lately)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(n for n in grid.get_node_ids() if not registered or n in registered)
        if len(nodes) >= wanted:
            return nodes
        if time.monotonic() > deadline:
            raise FleetError(
                f"only {len(nodes)} of the {wanted} devices needed are connected to the "
                f"SuperLink after {timeout:.0f} s{door()}"
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
    registered = folder.node_registry()
    device_of = dict(registered)
    has_base: set[int] = set()  # nodes sent the base in this run that did not refuse it since
    unpushed: list[dict] = []  # rounds the Pushgateway has not taken yet
    state_root = str(folder.path / "devices")
    for number in range((done[-1] if done else 0) + 1, fed.rounds + 1):
        started, started_at = time.monotonic(), time.time()
        nodes = wait_for_nodes(
            grid, fed.min_devices, fed.round_timeout_s, registered, lambda: door_note(config)
        )
        plan = plan_for(config, number, digest, state_root)
        messages = []
        for node in nodes:
            content = RecordDict({PLAN: plan.record()})
            if node not in has_base:
                content[BASE] = model_record(base)
            device = device_of.get(node)
            if device in outgoing:
                content[ADAPTERS] = vector_record(outgoing[device])
            elif device is None and outgoing:  # a simulated node not yet heard from this run
                content[ADAPTERS_BY_DEVICE] = ArrayRecord(
                    {name: Array(vector) for name, vector in outgoing.items()}
                )
            messages.append(
                Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)
            )
        downlink = {node: wire_bytes(m.content) for node, m in zip(nodes, messages, strict=True)}
        has_base.update(nodes)
        answers = exchange(grid, messages, fed.round_timeout_s)
        has_base -= {
            n for n, r in answers.replies.items() if r.has_error() and r.error.code == BASE_MISSING
        }
        result, updates, received = judge(
            answers, method, spec, ranks, device_of, bool(registered), fed.max_update_ratio
        )
        if len(updates) < fed.min_devices:
            reasons = [f"{name} {why}" for name, why in result["missing_why"].items()]
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
            unpushed = push_rounds(
                config.coordinator.pushgateway,
                folder.path.name,
                method.name,
                [*unpushed, result],
                fleet_credentials(config).pushgateway_password,
            )
        on_round(result)


def _named_device(reason: str, ranks: dict[str, int]) -> str | None:
    """Devices start their error reasons with their name (see client.app)."""
    name = reason.split(":", 1)[0]
    return name if name in ranks else None


def _lost(code: int, seconds: float) -> str | None:
    """Why Flower answered for the node itself (the node never replied), or None."""
    if code == ErrorCode.NODE_UNAVAILABLE:
        return f"lost: no heartbeat, declared unavailable by Flower after {seconds:.0f} s"
    if code in (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE):
        return f"lost: Flower could not deliver the plan or the reply (after {seconds:.0f} s)"
    return None


def _adapters(reply: Message, expected: int) -> np.ndarray:
    """The packed adapters of a reply, their dtype, shape and byte size checked on the record's
    metadata before any array is built (Flower has already received and inflated the reply)."""
    record = reply.content[ADAPTERS]
    if list(record.keys()) != ["theta"]:
        raise ValueError(f"expected one array 'theta', got {sorted(record.keys())}")
    array = record["theta"]
    if array.dtype != "float32" or tuple(array.shape) != (expected,):
        raise ValueError(
            f"adapters are {array.dtype} {tuple(array.shape)}, expected float32 ({expected},)"
        )
    if len(array.data) > 4 * expected + NPY_HEADER_MAX:
        raise ValueError(f"adapters take {len(array.data)} bytes, at most {4 * expected} expected")
    return array.numpy()


def judge(
    answers: Exchange,
    method: Method,
    spec: Spec,
    ranks: dict[str, int],
    device_of: dict[int, str],
    trusted: bool = False,
    max_ratio: float = 10.0,
) -> tuple[dict, list[Update], dict[str, np.ndarray]]:
    """Accept or refuse every reply; each device of the fleet is named once: in `devices`,
    `refused` (with why) or `missing` (why in `missing_why`: lost, no answer, offline).

    `trusted`: `device_of` comes from the coordinator's own registration of the node keys, so a
    reply is that node's device whatever it claims, and one that claims another name is refused.
    Without it (a simulation), a node is the device its first reply names."""
    result: dict = {"devices": {}, "refused": {}}
    missing: dict[str, str] = {}
    vectors, figures_of = {}, {}
    for node in answers.unanswered:
        name = device_of.get(node, f"node {node}")
        missing[name] = f"no answer within {answers.waited_s:.0f} s"
    for node, reply in answers.replies.items():
        seconds = answers.seconds[node]
        if reply.has_error():
            reason = reply.error.reason or f"error code {reply.error.code}"
            claimed = None if trusted else _named_device(reason, ranks)
            name = device_of.get(node) or claimed or f"node {node}"
            lost = _lost(reply.error.code, seconds)
            if lost:
                missing[name] = lost
            else:
                result["refused"][name] = reason
            continue
        content = reply.content
        try:
            claimed = str(content["device"]["name"])
        except (KeyError, ValueError, TypeError):
            claimed = None
        name = device_of.get(node) if trusted else device_of.setdefault(node, claimed)
        if name is None:
            result["refused"][f"node {node}"] = "not a node this coordinator registered"
            continue
        if claimed != name:
            result["refused"][name] = f"reply claims to be {claimed!r}; its key is {name}'s"
            continue
        if name not in ranks:
            result["refused"][name] = "not a device of this fleet"
            continue
        try:
            figures = Figures.from_record(content[FIGURES])
            vector = _adapters(reply, packed_size(method, spec, ranks[name]))
        except (KeyError, ValueError, TypeError) as exc:
            result["refused"][name] = f"malformed reply ({exc})"
            continue
        if not np.isfinite(vector).all():
            result["refused"][name] = "adapters hold NaN or Inf"
            continue
        vectors[name], figures_of[name] = vector, figures
    norms = {name: float(np.linalg.norm(v)) for name, v in vectors.items()}
    if norms:
        median = sorted(norms.values())[(len(norms) - 1) // 2]  # the lower median: 2 of 2 count
        for name, norm in norms.items():
            if median > 0 and norm > max_ratio * median:
                result["refused"][name] = (
                    f"adapter norm {norm:.3g} is {norm / median:.0f}x the round's median "
                    f"{median:.3g} (at most {max_ratio:g}x)"
                )
    accepted = [n for n in ranks if n in vectors and n not in result["refused"]]
    result["devices"] = {n: figures_of[n].__dict__ for n in accepted}
    for name in ranks:
        if name not in result["devices"] and name not in result["refused"]:
            missing.setdefault(name, "offline when the round started")
    result["missing"], result["missing_why"] = list(missing), missing
    received = {n: vectors[n] for n in accepted}
    updates = [
        Update(n, unpack(vectors[n], method, spec, ranks[n]), figures_of[n].samples, ranks[n])
        for n in accepted
    ]
    return result, updates, received
