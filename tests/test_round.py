"""The coordinator's round, phase by phase, on Flower messages built here (as Flower's own strategy
tests build their replies): configure, validate, screen, the round's record and what the operator
reads of it, then every phase in a row over an in-process grid. No SuperLink, no Ray: seconds."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, MessageType, Metadata, RecordDict
from flwr.app.message.message import make_message
from flwr.common.constant import ErrorCode as FlowerError

from skip2fleet.client.clientapp import own_plan
from skip2fleet.server.federation import report
from skip2fleet.server.federation.aggregation import STRATEGIES, Aggregate
from skip2fleet.server.federation.exchange import Exchange
from skip2fleet.server.federation.plans import Deliveries, entries, plan_for
from skip2fleet.server.federation.runs import RunFolder
from skip2fleet.server.federation.screening import outliers, screen
from skip2fleet.server.federation.serverapp import (
    UNNAMED,
    downlink,
    open_run,
    play_round,
    require_enough,
)
from skip2fleet.server.federation.starts import initial_adapters
from skip2fleet.server.federation.validation import MAX_REASON, Ledger, Roster, validate
from skip2fleet.shared import model as base_model
from skip2fleet.shared.config import as_yaml_dict, parse_config
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.layout import layout
from skip2fleet.shared.methods import get_method
from skip2fleet.shared.protocol import (
    DEVICE_NAME,
    PLAN_JSON,
    THETA,
    ErrorCode,
    Figures,
    NodeConfig,
    Part,
    RoundPlan,
)
from skip2fleet.shared.records import (
    adapters_record,
    figures_record,
    plan_record,
    record_adapters,
    wire_bytes,
)
from skip2fleet.shared.spec import mlp

BASE = base_model.init_model(mlp(8, 3, hidden=8), np.random.default_rng(0))
SIZE = layout(get_method("skip2-lora"), base_model.spec_of(BASE), 4).size
FIGURES = Figures(*([1] * len(dataclasses.fields(Figures))))
STRANGER = 4242  # a node id that must never appear where a device's name goes


def roster(trusted: bool = True) -> Roster:
    devices = ["pi-1", "pi-2", "pi-3"]
    known = {11: "pi-1", 12: "pi-2", 13: "pi-3"} if trusted else {}
    return Roster({d: 4 for d in devices}, {d: SIZE for d in devices}, known, trusted)


def content(name: str, adapters: np.ndarray | None = None, **figures) -> RecordDict:
    """A device's reply content; `adapters` go on the wire unchecked, as a faulty device sends,
    and so do `figures` (over FIGURES')."""
    vector = np.full(SIZE, 0.1, np.float32) if adapters is None else adapters
    record = figures_record(FIGURES)
    for key, value in figures.items():
        record[key] = value
    return RecordDict(
        {
            Part.ADAPTERS: ArrayRecord({THETA: Array(vector)}),
            Part.DEVICE: ConfigRecord({DEVICE_NAME: name}),
            Part.FIGURES: record,
        }
    )


def reply(node: int, body: RecordDict | None = None, error: Error | None = None):
    metadata = Metadata(
        1, f"r{node}", node, 1, f"p{node}", "", time.time(), 60.0, MessageType.TRAIN
    )
    return make_message(metadata, body, error)


def answers(*replies, unanswered=(), waited=5.0) -> Exchange:
    return Exchange(
        replies={r.metadata.src_node_id: r for r in replies},
        seconds={r.metadata.src_node_id: 1.0 for r in replies},
        unanswered=list(unanswered),
        waited_s=waited,
    )


# -- validate: each reply alone ------------------------------------------------------------------


def test_a_good_reply_is_accepted_and_a_silent_device_is_offline():
    ledger = validate(answers(reply(11, content("pi-1"))), roster())
    assert list(ledger.accepted) == ["pi-1"] and ledger.refused == {}
    assert ledger.accepted["pi-1"].figures == FIGURES
    assert ledger.missing == {d: "offline when the round started" for d in ("pi-2", "pi-3")}


def test_identity_a_reply_is_its_registered_nodes_device_whatever_it_claims():
    ledger = validate(
        answers(reply(12, content("pi-1")), reply(STRANGER, content("pi-3"))), roster()
    )
    assert ledger.refused == {"pi-2": "reply claims to be 'pi-1'; its key is pi-2's"}
    assert ledger.unnamed == {"not a node this coordinator registered": 1}
    assert str(STRANGER) not in json.dumps(ledger.summary(roster()))


@pytest.mark.parametrize(
    ("adapters", "why"),
    [
        (np.zeros(SIZE + 1, np.float32), f"adapters are float32 ({SIZE + 1},), expected float32"),
        (np.zeros(SIZE, np.float64), f"adapters are float64 ({SIZE},), expected float32"),
        (np.zeros((SIZE, 1), np.float32), f"adapters are float32 ({SIZE}, 1), expected"),
    ],
)
def test_shape_adapters_of_another_dtype_or_size_are_refused(adapters, why):
    ledger = validate(answers(reply(11, content("pi-1", adapters))), roster())
    assert ledger.refused["pi-1"].startswith(f"malformed reply ({why}"), ledger.refused


def test_shape_a_reply_without_figures_is_malformed():
    body = content("pi-1")
    del body[Part.FIGURES]
    assert "malformed reply" in validate(answers(reply(11, body)), roster()).refused["pi-1"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_finiteness_nan_or_inf_adapters_are_refused(bad):
    adapters = np.full(SIZE, 0.1, np.float32)
    adapters[5] = bad
    ledger = validate(answers(reply(11, content("pi-1", adapters))), roster())
    assert ledger.refused == {"pi-1": "adapters hold NaN or Inf"} and ledger.accepted == {}


@pytest.mark.parametrize("samples", [-200, 0, 10**9, 20_001, 1.5, float("nan"), float("inf")])
def test_weight_a_sample_count_outside_one_to_max_samples_is_refused_and_named(samples):
    ledger = validate(answers(reply(11, content("pi-1", samples=samples))), roster())
    assert ledger.accepted == {}
    assert ledger.refused["pi-1"] == (
        f"sample count {samples!r} is not an integer in [1, 20000]"
    ), ledger.refused


@pytest.mark.parametrize("samples", [1, 20_000, 300.0])
def test_weight_a_sample_count_in_range_is_accepted(samples):
    ledger = validate(answers(reply(11, content("pi-1", samples=samples))), roster())
    assert list(ledger.accepted) == ["pi-1"], ledger.refused


def test_only_accepted_adapters_count_a_kept_model_sends_none_and_is_not_merged():
    kept = content("pi-1", accepted=0)
    del kept[Part.ADAPTERS]
    ledger = validate(answers(reply(11, kept), reply(12, content("pi-2"))), roster())
    assert sorted(ledger.accepted) == ["pi-1", "pi-2"]  # its figures count, its adapters none
    assert list(ledger.received(roster())) == ["pi-2"]
    rejected = content("pi-3", accepted=0)  # adapters its own hold-out rejected
    ledger = validate(answers(reply(13, rejected)), roster())
    assert ledger.refused == {"pi-3": "sent adapters its own hold-out rejected (accepted 0)"}


def test_error_replies_are_refusals_in_the_devices_words_or_losses():
    refusal = Error(ErrorCode.DEVICE_ERROR, "pi-1: no samples in /data " + "x" * 1000)
    lost = Error(FlowerError.NODE_UNAVAILABLE, "")
    ledger = validate(answers(reply(11, error=refusal), reply(12, error=lost)), roster())
    assert ledger.refused["pi-1"].startswith("pi-1: no samples in /data x")
    assert len(ledger.refused["pi-1"]) == MAX_REASON  # a device's words are bounded
    assert ledger.missing["pi-2"].startswith("lost: no heartbeat")


def test_a_strangers_error_naming_a_device_is_not_that_devices_refusal():
    """In a deployment a reply's device is its key's: a stranger's error reply that starts with
    a device's name is only counted; a device's own words of exactly MAX_REASON are kept whole."""
    forged = Error(ErrorCode.DEVICE_ERROR, "pi-1: I give up")
    ledger = validate(answers(reply(STRANGER, error=forged)), roster())
    assert ledger.refused == {} and sum(ledger.unnamed.values()) == 1
    exact = "pi-2: " + "y" * (MAX_REASON - 6)
    ledger = validate(answers(reply(12, error=Error(ErrorCode.DEVICE_ERROR, exact))), roster())
    assert ledger.refused == {"pi-2": exact}


def test_a_node_that_never_answered_is_missing_and_an_unknown_one_only_counted():
    ledger = validate(answers(unanswered=[13, STRANGER], waited=120.0), roster(trusted=False))
    assert ledger.unnamed == {"no answer within 120 s": 2}  # a simulation knows neither yet
    ledger = validate(answers(unanswered=[13], waited=120.0), roster())
    assert ledger.missing["pi-3"] == "no answer within 120 s"


def test_in_a_simulation_a_node_is_the_device_its_first_reply_names():
    names = roster(trusted=False)
    first = validate(answers(reply(21, content("pi-2")), reply(22, content("pi-9"))), names)
    assert list(first.accepted) == ["pi-2"] and names.device_of == {21: "pi-2"}
    assert first.unnamed == {"names no device of this fleet": 1}
    later = validate(answers(reply(21, content("pi-3"))), names)
    assert later.refused == {"pi-2": "reply claims to be 'pi-3'; it answered before as pi-2's"}
    unknown = Error(ErrorCode.DEVICE_ERROR, "pi-3: no data folder")
    assert validate(answers(reply(23, error=unknown)), names).refused == {
        "pi-3": "pi-3: no data folder"
    }


# -- screen: the round's replies together --------------------------------------------------------


def test_outliers_are_measured_against_the_lower_median():
    assert outliers({"a": 1.0, "b": 1000.0}, 10) == {
        "b": (1000.0, "change norm 1e+03 is 1000.0x the round's median 1 (at most 10x)")
    }
    assert outliers({"a": 1.0, "b": 9.0, "c": 5.0}, 10) == {}
    assert outliers({"a": 1.0, "b": 10.0, "c": 1.0}, 10) == {}  # at the limit is within it
    assert outliers({"a": 0.0, "b": 5.0}, 10) == {}  # a zero median says nothing
    assert outliers({}, 10) == {}


SKIP2 = get_method("skip2-lora")
LAYOUT = layout(SKIP2, base_model.spec_of(BASE), 4)


def changed(start: np.ndarray, seed: int, block: str | None = None, scale: float = 1.0):
    """`start` plus a small honest-looking change, with `block`'s change scaled by `scale`."""
    change = np.random.default_rng(seed).normal(0, 0.01, SIZE).astype(np.float32)
    if block is not None:
        LAYOUT.blocks(change)[block][...] *= scale
    return start + change


def screened(*adapters: np.ndarray, ratio: float = 10.0, start: np.ndarray | None = None):
    """The ledger of pi-1, pi-2, ... sending `adapters`, screened against one common start."""
    start = np.full(SIZE, 0.5, np.float32) if start is None else start
    sent = [reply(11 + i, content(f"pi-{i + 1}", a)) for i, a in enumerate(adapters)]
    ledger = validate(answers(*sent), roster())
    devices = roster().ranks
    screen(ledger, dict.fromkeys(devices, start), dict.fromkeys(devices, LAYOUT), ratio)
    return ledger


def test_screening_refuses_a_change_scaled_in_one_block_and_names_block_and_ratio():
    """B of one skip tap scaled 20x: the whole vector moves little (A's start dominates it),
    the block stands out."""
    start = np.full(SIZE, 0.5, np.float32)
    change = changed(np.zeros(SIZE, np.float32), 2, "skip tap 1 B", 20.0)
    LAYOUT.blocks(change)["skip tap 0 A"][...] *= 12  # beyond the limit too, less so
    bad = start + change
    assert np.linalg.norm(bad) < 1.1 * np.linalg.norm(changed(start, 1))  # far under 10x
    replies = [changed(start, 0), changed(start, 1), bad]
    ledger = screened(*replies)
    assert sorted(ledger.accepted) == ["pi-1", "pi-2"]
    assert ledger.refused["pi-3"].startswith("skip tap 1 B: change norm ")
    assert "x the round's median" in ledger.refused["pi-3"]
    ratio = float(ledger.refused["pi-3"].split(" is ")[1].split("x")[0])
    norms = sorted(np.linalg.norm(LAYOUT.blocks(r - start)["skip tap 1 B"]) for r in replies)
    assert ratio == pytest.approx(norms[2] / norms[1], abs=0.06)  # over the middle one


def test_screening_measures_the_change_from_the_start_not_the_adapters():
    """Large adapters that barely moved from a large start pass; a change 9x the others in one
    block passes a 10x limit, 11x does not."""
    start = np.full(SIZE, 100.0, np.float32)
    ok = screened(changed(start, 0), changed(start, 1), changed(start, 3), start=start)
    assert ok.refused == {}
    zero = np.zeros(SIZE, np.float32)
    honest = [changed(zero, 0), changed(zero, 1)]
    norms = [np.linalg.norm(LAYOUT.blocks(h)["skip tap 0 A"]) for h in honest]
    for scale, refused in ((0.9, False), (1.1, True)):
        bad = honest[0].copy()
        LAYOUT.blocks(bad)["skip tap 0 A"][...] *= (
            10 * scale * norms[1] / norms[0]
        )  # median: pi-1, pi-3
        ledger = screened(*honest[1:], bad, honest[1], start=zero)
        assert ("pi-2" in ledger.refused) is refused, ledger.refused


def test_screening_moves_an_outlier_from_accepted_to_refused():
    big = np.full(SIZE, 100.0, np.float32)
    ledger = screened(np.full(SIZE, 0.6, np.float32), big, np.full(SIZE, 0.6, np.float32))
    assert sorted(ledger.accepted) == ["pi-1", "pi-3"]
    assert "x the round's median" in ledger.refused["pi-2"]


# -- configure ----------------------------------------------------------------------------------


DEVICES = ["pi-1", "pi-2", "pi-3", "pi-4"]


def fleet(
    aggregation: str = "fedavg",
    rounds: int = 2,
    pushgateway: str | None = None,
    devices: tuple[str, ...] | list[str] = tuple(DEVICES),
):
    devices = [{"name": d, "data": {"partition": str(i)}} for i, d in enumerate(devices)]
    return parse_config(
        {
            "training": {"epochs": 1},
            "federation": {"aggregation": aggregation, "rounds": rounds, "min_devices": 2},
            "coordinator": {"pushgateway": pushgateway},
            "devices": devices,
        }
    )


def deliveries_for(devices: list[str], outgoing: dict | None = None) -> Deliveries:
    config = fleet(devices=devices)
    return Deliveries(BASE, {d: SIZE for d in devices}, outgoing or {}, entries=entries(config))


def test_plans_carry_the_base_once_and_each_device_only_its_own():
    plan = plan_for(fleet(), 2, base_model.sha256(BASE), "")
    mean = np.full(SIZE, 0.5, np.float32)
    deliveries = deliveries_for(DEVICES, {"pi-1": mean, "pi-2": mean})
    first = deliveries.contents([11, 12, 13], plan, {11: "pi-1", 12: "pi-2"})
    assert all(Part.BASE in c and Part.PLAN in c for c in first.values())
    assert first[11][Part.BASE] is first[12][Part.BASE]  # one record, however many nodes
    own = RoundPlan.from_record(first[12][Part.PLAN])
    assert (own.device, own.index, own.partition, own.rank) == ("pi-2", 1, "1", 4)
    assert record_adapters(first[11][Part.ADAPTERS], SIZE)[0] == 0.5
    assert first[11][Part.ADAPTERS] is first[12][Part.ADAPTERS]  # the shared mean: one array
    # a node not yet heard from: an unaddressed plan, the roster to find itself in, all adapters
    assert RoundPlan.from_record(first[13][Part.PLAN]).device == ""
    assert list(first[13][Part.ADAPTERS_BY_DEVICE]) == ["pi-1", "pi-2"]
    found = own_plan(first[13], {NodeConfig.PARTITION_ID: 2})
    assert found == plan.with_entry(entries(fleet())["pi-3"])
    refused = Error(ErrorCode.BASE_MISSING, "pi-2: no base model")
    deliveries.forget_base(answers(reply(12, error=refused)))
    second = deliveries.contents([11, 12], plan, {11: "pi-1", 12: "pi-2", 13: "pi-3"})
    assert Part.BASE not in second[11] and Part.BASE in second[12]
    with pytest.raises(FleetError, match="pi-1: got pi-2's plan"):
        own_plan(second[12], {NodeConfig.DEVICE: "pi-1"})
    deliveries.outgoing = {"pi-1": np.zeros(SIZE + 1, np.float32)}
    with pytest.raises(ValueError, match="expected float32"):  # checked on the way out too
        deliveries.contents([11], plan, {11: "pi-1"})


def test_a_plans_bytes_do_not_grow_with_the_fleet():
    """A known node's message is the same size at 4 devices and at 400."""
    sizes = []
    for n in (4, 400):
        devices = [f"pi-{i}" for i in range(n)]
        plan = plan_for(fleet(devices=devices), 2, base_model.sha256(BASE), "")
        mean = np.zeros(SIZE, np.float32)
        deliveries = deliveries_for(devices, dict.fromkeys(devices, mean))
        deliveries.has_base = set(range(n))
        contents = deliveries.contents(list(range(n)), plan, dict(enumerate(devices)))
        known: dict[int, int] = {}
        sizes.append(max(wire_bytes(c, known) for c in contents.values()))
    assert sizes[1] - sizes[0] <= 8, sizes  # at most the longer device name and index


def test_a_plan_travels_with_its_enums_as_plain_names():
    plan = plan_for(fleet(), 1, "0" * 64, "")
    record = plan_record(plan)
    sent = json.loads(record[PLAN_JSON])
    assert type(sent["accept"]) is str and type(sent["cache"]) is str
    assert type(plan).from_record(record) == plan
    with pytest.raises(ValueError, match="'sometimes'"):
        type(plan).from_record({PLAN_JSON: json.dumps(sent | {"accept": "sometimes"})})


def test_downlink_names_devices_and_sums_unnamed_nodes():
    sent = {11: 100, 21: 5, 22: 7}
    assert downlink(sent, {11: "pi-1"}) == {"pi-1": 100, UNNAMED: 12}


# -- what the operator reads: the round table and the report ---------------------------------


def round_result() -> dict:
    kept = {**vars(FIGURES), "acc_before": 60.0, "acc_after": 40.0, "acc_active": 90.0}
    kept["accepted"] = 0
    new = {**vars(FIGURES), "acc_before": 60.0, "acc_after": 80.0, "acc_active": 80.0}
    return {
        "round": 1,
        "duration_s": 2.0,
        "devices": {"pi-1": kept, "pi-2": new},
        "refused": {"pi-3": "adapters hold NaN or Inf"},
        "missing": ["pi-4"],
        "missing_why": {"pi-4": "no answer within 120 s"},
        "unnamed_nodes": {"not a node this coordinator registered": 2},
        "downlink_bytes": {"pi-1": 10, "pi-2": 10},
    }


def test_the_round_table_shows_the_active_models_accuracy_and_every_reason(capsys):
    report.print_round(round_result())
    row, *lines = capsys.readouterr().out.splitlines()
    assert "acc  60.00 ->  85.00 %" in row  # (90 kept + 80 new) / 2, not (40 + 80) / 2
    assert row.endswith("pi-3 refused, pi-4 missing, pi-1 kept its active model, 2 unnamed node(s)")
    assert [line.strip() for line in lines] == [
        "pi-3 refused: adapters hold NaN or Inf",
        "pi-4 missing: no answer within 120 s",
        "pi-1 kept its active model: 90.00 % on its hold-out, this round's adapters 40.00 %",
        "2 unnamed node(s): not a node this coordinator registered",
    ]


def test_the_report_shows_the_active_models_accuracy_marks_it_kept_and_says_why():
    summary = {
        "dataset": "generated", "method": "skip2-lora", "aggregation": "none", "devices": 4,
        "wall_s": 2.0, "full_model_bytes": 20000, "adapter_bytes": 500,
        "rounds": [round_result()],
    }  # fmt: skip
    markdown, _ = report.federated_report(summary)
    assert "| pi-1 | 60.00 | 90.00 | kept (this round's 40.00 %) |" in markdown
    assert "| pi-2 | 60.00 | 80.00 | new |" in markdown
    assert "- round 1: pi-3 refused: adapters hold NaN or Inf" in markdown
    assert "- round 1: pi-4 missing: no answer within 120 s" in markdown
    assert "- round 1: 2 unnamed node(s): not a node this coordinator registered" in markdown


def test_the_terminal_report_of_a_large_fleet_lists_its_worst_devices_and_says_where_the_rest_are():
    new = {**vars(FIGURES), "acc_before": 60.0, "accepted": 1}
    devices = {f"pi-{i}": {**new, "acc_after": (999 - i) / 10} for i in range(1000)}
    missing = [f"gone-{i}" for i in range(30)]
    result = {**round_result(), "devices": devices, "refused": {}, "missing": missing}
    summary = {
        "dataset": "generated", "method": "skip2-lora", "aggregation": "none", "devices": 1030,
        "wall_s": 2.0, "full_model_bytes": 20000, "adapter_bytes": 500, "rounds": [result],
    }  # fmt: skip
    full, _ = report.federated_report(summary)
    shown, _ = report.federated_report(summary, shown=report.SHOWN)
    assert sum(line.startswith("| pi-") for line in full.splitlines()) == 1000
    rows = [line.split(" | ")[0][2:] for line in shown.splitlines() if line.startswith("| pi-")]
    assert rows == [f"pi-{999 - i}" for i in range(report.SHOWN)]  # the lowest after
    assert f"| ... {1000 - report.SHOWN} more (the {report.SHOWN} lowest" in shown
    assert "median after 50.00 %, best 99.90 %" in shown
    assert sum(line.startswith("- round 1: gone-") for line in shown.splitlines()) == report.SHOWN
    assert f"- ... {30 + 1 - report.SHOWN} more in the run's report.md" in shown  # + 2 unnamed


# -- every phase in a row -----------------------------------------------------------------------


class Grid:
    """Flower's Grid as the ServerApp uses it, in this process: each node answers with
    `answer(node, plan content)`."""

    def __init__(self, nodes: list[int], answer) -> None:
        self.nodes, self.answer, self.sent = nodes, answer, {}

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def push_messages(self, messages) -> list[str]:
        for message in messages:
            self.sent[f"m{message.metadata.dst_node_id}"] = message
        return list(self.sent)

    def pull_messages(self, ids) -> list:
        replies = []
        for mid in ids:
            node = self.sent[mid].metadata.dst_node_id
            metadata = Metadata(1, f"r{mid}", node, 1, mid, "", time.time(), 60.0, "train")
            replies.append(make_message(metadata, self.answer(node, self.sent[mid].content)))
        return replies


def test_a_round_in_a_row_refuses_poisoned_replies_and_averages_the_rest(tmp_path, task_identity):
    folder = RunFolder.create(tmp_path / "run", as_yaml_dict(fleet()), BASE)
    registry = {"pi-1": 11, "pi-2": 12, "pi-3": 13, "pi-4": 14}
    folder.save_node_registry(registry)
    values = {11: 0.1, 12: np.nan, 13: 0.3, 14: 1000.0}

    def answer(node: int, plan: RecordDict) -> RecordDict:
        assert Part.BASE in plan
        body = content({n: d for d, n in registry.items()}[node])
        body[Part.ADAPTERS] = adapters_record(np.full(SIZE, values[node], np.float32), SIZE)
        return body

    rows = []
    run = open_run(folder, rows.append)
    play_round(Grid([11, 12, 13, 14, STRANGER], answer), run, 1)
    result = folder.round_result(1)
    assert rows == [result] and sorted(result["devices"]) == ["pi-1", "pi-3"]
    assert sorted(result["refused"]) == ["pi-2", "pi-4"]
    assert result["refused"]["pi-2"] == "adapters hold NaN or Inf"
    assert "x the round's median" in result["refused"]["pi-4"]
    assert set(result["downlink_bytes"]) == set(DEVICES)  # the stranger was sent nothing
    outgoing = folder.outgoing(1)
    np.testing.assert_allclose(outgoing["pi-1"], 0.2, rtol=1e-6)  # equal samples: the mean
    assert outgoing["pi-3"] is outgoing["pi-1"] and sorted(outgoing) == DEVICES  # stored once
    assert not outgoing["pi-1"].flags.writeable  # shared: nothing may change it in place
    fresh = initial_adapters(BASE, SKIP2, 4, run.config.training.seed)
    for refused in ("pi-2", "pi-4"):  # start the next round where they started this one
        np.testing.assert_array_equal(outgoing[refused], fresh)


def broken(value: float):
    """A strategy with a bug: every device gets `value` everywhere."""
    return lambda updates, method, spec, rule: Aggregate(
        {u.device: np.full(SIZE, value, np.float32) for u in updates}
    )


@pytest.mark.parametrize(
    ("value", "why"), [(np.nan, "holds NaN or Inf"), (50.0, "beyond the replies' bound")]
)
def test_a_failing_aggregate_is_not_saved_and_a_resume_starts_from_the_last_good_round(
    tmp_path, task_identity, monkeypatch, value, why
):
    folder = RunFolder.create(tmp_path / "run", as_yaml_dict(fleet()), BASE)
    registry = {"pi-1": 11, "pi-2": 12, "pi-3": 13, "pi-4": 14}
    folder.save_node_registry(registry)
    seen = []

    def answer(node: int, plan: RecordDict) -> RecordDict:
        start = record_adapters(plan[Part.ADAPTERS], SIZE)  # every device is sent its start
        seen.append(start)
        body = content({n: d for d, n in registry.items()}[node])
        body[Part.ADAPTERS] = adapters_record(changed(start, node), SIZE)
        return body

    grid = Grid([11, 12, 13, 14], answer)
    play_round(grid, open_run(folder, lambda r: None), 1)
    fedavg = STRATEGIES["fedavg"]
    monkeypatch.setitem(STRATEGIES, "fedavg", broken(value))
    with pytest.raises(FleetError, match=f"round 2: the aggregate for pi-1.*{why}.*intact"):
        play_round(grid, open_run(folder, lambda r: None), 2)
    assert folder.completed_rounds() == [1]
    monkeypatch.setitem(STRATEGIES, "fedavg", fedavg)
    seen.clear()
    play_round(grid, open_run(folder, lambda r: None), 2)  # the resume
    for start in seen:
        np.testing.assert_array_equal(start, folder.outgoing(1)["pi-1"])


def test_too_few_replies_name_ten_devices_and_count_the_rest():
    """A fleet of 1,000 that fails a round gets one readable line, not a thousand names."""
    offline = {f"sim-{i}": "offline when the round started" for i in range(1, 996)}
    ledger = Ledger(
        refused={f"bad-{i}": "NaN in its adapters" for i in range(5)},
        missing=offline | {"sim-996": "no answer within 120 s"},
        unnamed={"no answer within 120 s": 3},
    )
    with pytest.raises(FleetError) as error:
        require_enough(ledger, 2, 3)
    message = str(error.value)
    assert message.startswith("round 2: 0 usable replies, 3 needed; sim-1 offline when the round")
    assert "sim-10 offline" in message and "sim-11 " not in message and len(message) < 800
    counted = "991 more devices (985 offline when the round started, 5 refused: NaN in its adapters"
    assert counted in message
    assert message.endswith("1 no answer within 120 s); 3 unnamed node(s): no answer within 120 s")
    few = Ledger(missing={"pi-1": "no answer within 60 s"}, refused={"pi-2": "NaN in its adapters"})
    with pytest.raises(FleetError, match="pi-1 no answer within 60 s; pi-2 refused: NaN in its"):
        require_enough(few, 1, 2)
