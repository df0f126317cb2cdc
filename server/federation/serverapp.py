"""The Flower ServerApp: federated rounds of Skip2-LoRA fine-tuning across the fleet.

A round is a row of phases, one function each:

    configure (`plans`: each online node's plan, with the base or adapters it needs)
    -> exchange (`exchange`: send, and collect replies until all came or the round's timeout)
    -> validate (`validation`: each reply alone: who sent it, its shape, finite values)
    -> screen (`screening`: the round's replies together: each block's change against the median)
    -> aggregate (`aggregation`: the fleet's strategy over the usable replies' adapters)
    -> check (`guard`: the aggregate finite and within the replies' bounds, else the run stops
       here, nothing of the round saved, and a resume starts from the last good round)
    -> persist (`runs`: the round's folder, whole or not at all)
    -> report (the Pushgateway, and the caller's row per round).

Each round asks the SuperLink which nodes are online now (in a deployment, only the nodes whose
keys this coordinator registered count), so a device that joins late trains from the next round.
Nothing waits forever: too few devices, or a round in which too few answer within
`round_timeout_s`, ends the run with every device named once, with how long it was waited for and
why; completed rounds stay in the run folder, which the ServerApp holds locked while it runs.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from skip2fleet.server.federation.aggregation import STRATEGIES, Aggregate, Rule, Update, clipped
from skip2fleet.server.federation.exchange import exchange, wait_for_nodes
from skip2fleet.server.federation.guard import check_aggregate
from skip2fleet.server.federation.plans import Deliveries, entries, plan_for
from skip2fleet.server.federation.pushes import FleetPushes
from skip2fleet.server.federation.report import SHOWN
from skip2fleet.server.federation.runs import RunFolder
from skip2fleet.server.federation.screening import screen
from skip2fleet.server.federation.starts import fresh_starts
from skip2fleet.server.federation.validation import Ledger, Roster, validate
from skip2fleet.server.operations.certs import fleet_credentials
from skip2fleet.server.operations.frontdoor import door_note
from skip2fleet.shared import model as base_model
from skip2fleet.shared.config import FleetConfig
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.layout import layout
from skip2fleet.shared.methods import Method, get_method
from skip2fleet.shared.records import wire_bytes
from skip2fleet.shared.spec import Spec

RoundListener = Callable[[dict], None]
Lap = Callable[[str], None]  # a phase of the round has just ended
UNNAMED = "unnamed nodes"  # downlink_bytes' key for nodes no device name is known for


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


@dataclass
class Run:
    """A run's state across its rounds."""

    folder: RunFolder
    config: FleetConfig
    method: Method
    spec: Spec
    digest: str  # the base's sha256
    roster: Roster
    deliveries: Deliveries
    fresh: dict[str, np.ndarray]  # each device's fresh start (`starts`)
    on_round: RoundListener
    pushes: FleetPushes | None  # None: the fleet has no Pushgateway


def open_run(folder: RunFolder, on_round: RoundListener) -> Run:
    """The run folder's run, ready for its next round."""
    config, base = folder.config(), folder.base()
    spec, method = base_model.spec_of(base), get_method(config.training.method)
    ranks = {d.name: config.rank_of(d) for d in config.devices}
    sizes = {device: layout(method, spec, rank).size for device, rank in ranks.items()}
    registered = folder.node_registry()
    limit = config.training.max_samples
    roster = Roster(ranks, sizes, dict(registered), bool(registered), limit)
    done = folder.completed_rounds()
    merges = config.federation.aggregation != "none"
    fresh = fresh_starts(base, method, ranks, config.training.seed, shared=merges)
    outgoing = (fresh if merges else {}) | (folder.outgoing(done[-1]) if done else {})
    deliveries = Deliveries(base, sizes, outgoing, entries=entries(config))
    digest = base_model.sha256(base)
    gateway = config.coordinator.pushgateway
    pushes = gateway and FleetPushes(
        gateway, folder.path.name, method.name, fleet_credentials(config).pushgateway_password
    )
    return Run(
        folder, config, method, spec, digest, roster, deliveries, fresh, on_round, pushes or None
    )


def coordinate(grid: Grid, folder: RunFolder, on_round: RoundListener) -> None:
    """The run folder's remaining rounds."""
    run = open_run(folder, on_round)
    done = folder.completed_rounds()
    for number in range((done[-1] if done else 0) + 1, run.config.federation.rounds + 1):
        play_round(grid, run, number)


def play_round(grid: Grid, run: Run, number: int, lap: Lap = lambda phase: None) -> None:
    """One round, phase by phase (`lap` is told as each ends: `fleet bench coordinator`)."""
    fed, roster = run.config.federation, run.roster
    started, started_at = time.monotonic(), time.time()
    registered = set(roster.device_of) if roster.trusted else None
    door = partial(door_note, run.config)
    nodes = wait_for_nodes(grid, fed.min_devices, fed.round_timeout_s, registered, door)
    plan = plan_for(run.config, number, run.digest, str(run.folder.path / "devices"))
    contents = run.deliveries.contents(nodes, plan, roster.device_of)
    known: dict[int, int] = {}  # sizes of the records nodes share, measured once
    sent = {node: wire_bytes(content, known) for node, content in contents.items()}
    lap("configure")
    answers = exchange(grid, contents, fed.round_timeout_s)
    run.deliveries.forget_base(answers)
    lap("exchange")
    ledger = validate(answers, roster)
    lap("validate")
    starts = run.fresh | run.deliveries.outgoing
    layouts = {d: layout(run.method, run.spec, rank) for d, rank in roster.ranks.items()}
    screen(ledger, starts, layouts, fed.max_update_ratio)
    lap("screen")
    require_enough(ledger, number, fed.min_devices)
    aggregate = merge(run, ledger, starts, number)
    run.deliveries.outgoing = run.deliveries.outgoing | aggregate.per_device
    lap("aggregate")
    result = ledger.summary(roster) | {
        "round": number,
        "started_at": started_at,
        "duration_s": time.monotonic() - started,
        "aggregation": fed.aggregation,
        "svd_relative_error": aggregate.svd_relative_error,
        "downlink_bytes": downlink(sent, roster.device_of),
    }
    run.folder.save_round(number, result, ledger.received(roster), run.deliveries.outgoing)
    lap("persist")
    report(run, result)
    lap("report")


def require_enough(ledger: Ledger, number: int, needed: int) -> None:
    """End the run when fewer than `needed` replies are usable, saying why of each device."""
    if len(ledger.accepted) >= needed:
        return
    named = [(device, why) for device, why in ledger.missing.items()]
    named += [(device, f"refused: {why}") for device, why in ledger.refused.items()]
    reasons = [f"{device} {why}" for device, why in named[:SHOWN]]
    if len(named) > SHOWN:  # a fleet of 1,000: the first few by name, the rest counted by reason
        rest = Counter(why for _, why in named[SHOWN:]).most_common()
        counts = ", ".join([f"{count} {why}" for why, count in rest[:3]] + ["..."] * bool(rest[3:]))
        reasons.append(f"{len(named) - SHOWN} more devices ({counts})")
    reasons += [f"{count} unnamed node(s): {why}" for why, count in ledger.unnamed.items()]
    raise FleetError(
        f"round {number}: {len(ledger.accepted)} usable replies, {needed} needed; "
        + "; ".join(reasons)
    )


def merge(run: Run, ledger: Ledger, starts: dict[str, np.ndarray], number: int) -> Aggregate:
    """The fleet's strategy over the replies that sent adapters (none: nothing to merge, every
    device starts the next round where it started this one), checked before anything is kept."""
    fed = run.config.federation
    contributions = updates(ledger, run.roster)
    if not contributions or fed.aggregation == "none":
        return Aggregate({})
    if fed.clip is not None:
        contributions = clipped(contributions, starts, fed.clip)
    rule = Rule(fed.weighting, fed.max_weight, fed.trim)
    aggregate = STRATEGIES[fed.aggregation](contributions, run.method, run.spec, rule)
    vectors = fed.aggregation == "fedavg"
    ranks = run.roster.ranks
    why = check_aggregate(
        aggregate.per_device, contributions, starts, ranks, run.method, run.spec, vectors
    )
    if why:
        raise FleetError(
            f"round {number}: {why}; not saved nor sent, rounds up to {number - 1} are intact "
            "and a resume starts after them"
        )
    return aggregate


def updates(ledger: Ledger, roster: Roster) -> list[Update]:
    """The accepted replies as the aggregation takes them, in the fleet's order."""
    received = ledger.received(roster)
    return [
        Update(d, v, ledger.accepted[d].figures.samples, roster.ranks[d])
        for d, v in received.items()
    ]


def downlink(sent: dict[int, int], device_of: dict[int, str]) -> dict[str, int]:
    """Bytes sent per device; nodes with no known device are summed under UNNAMED."""
    named: dict[str, int] = {}
    for node, size in sent.items():
        key = device_of.get(node, UNNAMED)
        named[key] = named.get(key, 0) + size
    return named


def report(run: Run, result: dict) -> None:
    """The round to the fleet's Pushgateway group (a push that fails is replaced by the next
    round's), and to the caller (a row in the terminal)."""
    if run.pushes is not None:
        run.pushes.push(result)
    run.on_round(result)
