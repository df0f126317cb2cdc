"""One device's round, without the transport: base checks, the on-disk cache, continuing; then
each phase on its own (load, evaluate and accept, the reply the coordinator checks)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MessageType, Metadata, RecordDict
from flwr.app.message.message import make_message

from skip2fleet.client.acceptance import evaluate_and_accept, make_active
from skip2fleet.client.clientapp import own_plan, run_round
from skip2fleet.client.inputs import RoundInputs, load_inputs
from skip2fleet.client.store import DeviceStore
from skip2fleet.server.federation.validation import Roster, validate_reply
from skip2fleet.shared import model as base_model
from skip2fleet.shared.datasets import TaskOptions, load_task
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.layout import layout
from skip2fleet.shared.methods import get_method
from skip2fleet.shared.pretrain import PretrainConfig, pretrain
from skip2fleet.shared.protocol import (
    THETA,
    UNADDRESSED,
    Entry,
    Figures,
    NodeConfig,
    Part,
    RoundPlan,
)
from skip2fleet.shared.records import (
    adapters_record,
    model_record,
    plan_record,
    record_adapters,
    roster_record,
)
from skip2fleet.shared.spec import cnn


@pytest.fixture(scope="module")
def base():
    task = load_task("generated")
    return pretrain(task.pretrain.x, task.pretrain.y, 3, PretrainConfig(epochs=10))


def plan(base, round_=1, **changes) -> RoundPlan:
    values = dict(
        round=round_,
        method="skip2-lora",
        cache="f32",
        epochs=20,
        lr=0.01,
        batch_size=20,
        seed=0,
        base_sha256=base_model.sha256(base),
        dataset="generated",
        data_dir="",
        source_room="silentA",
        state_root="",
        **dataclasses.asdict(UNADDRESSED),
    )
    return RoundPlan(**{**values, **changes})


ENTRIES = (Entry("a", 0, "0", 4, "cpu-model", 1.0, 3.0), Entry("b", 1, "1", 2, "none", 1.0, 3.0))


def content(base, round_=1, with_base=True, data_paths=("", ""), **changes) -> RecordDict:
    """An unaddressed plan and the roster (a simulation's first round): each device finds
    itself by its name; `data_paths` per device."""
    roster = [dataclasses.replace(e, data_path=p) for e, p in zip(ENTRIES, data_paths, strict=True)]
    records = RecordDict(
        {Part.PLAN: plan_record(plan(base, round_, **changes)), Part.ROSTER: roster_record(roster)}
    )
    if with_base:
        records[Part.BASE] = model_record(base)
    return records


def test_first_round_stores_base_and_cache_then_reuses_them(tmp_path, base):
    node = {"device": "b", "state-dir": str(tmp_path)}
    first = run_round(content(base), node)
    figures = Figures.from_record(first[Part.FIGURES])
    assert figures.cache_built == 1 and figures.rank == 2
    assert figures.acc_after > figures.acc_before
    size = layout(get_method("skip2-lora"), base_model.spec_of(base), 2).size
    vector = record_adapters(first[Part.ADAPTERS], size)
    assert figures.uplink_bytes > vector.nbytes
    assert len(list((tmp_path / "cache").iterdir())) == 1

    second = run_round(content(base, round_=2, with_base=False), node)  # no base sent again
    again = Figures.from_record(second[Part.FIGURES])
    assert again.cache_built == 0
    assert not np.array_equal(
        vector, record_adapters(second[Part.ADAPTERS], size)
    )  # it continued training its own adapters
    assert (tmp_path / "last-finetune.json").is_file()


def test_a_quantized_cache_is_kept_per_codec_and_reused(tmp_path, base):
    node = {"device": "a", "state-dir": str(tmp_path)}
    sizes = {}
    for codec in ("f32", "int4"):
        figures = Figures.from_record(run_round(content(base, cache=codec), node)[Part.FIGURES])
        assert figures.cache_built == 1
        sizes[codec] = figures.cache_bytes
    assert sizes["int4"] <= 0.15 * sizes["f32"]
    names = sorted(path.name for path in (tmp_path / "cache").iterdir())
    assert [name.rsplit("-", 1)[1] for name in names] == ["f32.npz", "int4.npz"]
    again = Figures.from_record(
        run_round(content(base, 2, False, cache="int4"), node)[Part.FIGURES]
    )
    assert again.cache_built == 0 and again.cache_bytes == sizes["int4"]


def test_a_base_whose_hash_does_not_match_is_refused(tmp_path, base):
    forged = {k: v.copy() for k, v in base.items()}
    forged["b2"] += 1.0
    records = content(base)
    records[Part.BASE] = model_record(forged)
    with pytest.raises(FleetError, match="does not match the announced"):
        run_round(records, {"device": "a", "state-dir": str(tmp_path)})
    assert not (tmp_path / "base").exists()


def test_a_device_without_the_base_says_so(tmp_path, base):
    with pytest.raises(FleetError, match="no base model"):
        run_round(content(base, with_base=False), {"device": "a", "state-dir": str(tmp_path)})


def test_a_device_outside_the_fleet_says_so(tmp_path, base):
    with pytest.raises(FleetError, match="'c' is not in the fleet"):
        run_round(content(base), {"device": "c", "state-dir": str(tmp_path)})


@pytest.mark.parametrize("method", ["skip2-lora", "lora-all"])
def test_a_cnn_base_travels_with_its_spec_and_the_device_reads_windows(tmp_path, method):
    """The device learns the model, and so the data form, from the base alone."""
    task = load_task("generated", TaskOptions(form="windows"))
    spec = cnn(1, 64, 3, widths=(4, 8, 8))
    cnn_base = pretrain(task.pretrain.x, task.pretrain.y, 3, PretrainConfig(epochs=2), spec=spec)
    reply = run_round(content(cnn_base, method=method), {"device": "b", "state-dir": str(tmp_path)})
    figures = Figures.from_record(reply[Part.FIGURES])
    size = layout(get_method(method), base_model.spec_of(cnn_base), 2).size
    vector = record_adapters(reply[Part.ADAPTERS], size)
    assert np.abs(vector).max() > 0 and 0 <= figures.acc_after <= 100


# -- the phases one at a time: load -> train -> evaluate and accept -> reply --------------------


def inputs(tmp_path, base, round_=1, with_base=True, extra=None, **changes) -> RoundInputs:
    records = content(base, round_, with_base, **changes)
    records.update(extra or {})
    node = {NodeConfig.DEVICE: "b", NodeConfig.STATE_DIR: str(tmp_path)}
    return load_inputs(records, node, own_plan(records, node))


def test_load_starts_from_the_coordinators_adapters_else_its_own(tmp_path, base):
    size = layout(get_method("skip2-lora"), base_model.spec_of(base), 2).size
    sent = np.linspace(-1, 1, size, dtype=np.float32)
    assert inputs(tmp_path, base).start is None  # round 1, nothing sent: a fresh start
    one = {Part.ADAPTERS: adapters_record(sent, size)}
    np.testing.assert_array_equal(inputs(tmp_path, base, 2, extra=one).start, sent)
    by_name = {Part.ADAPTERS_BY_DEVICE: ArrayRecord({"a": Array(-sent), "b": Array(sent)})}
    np.testing.assert_array_equal(inputs(tmp_path, base, 2, extra=by_name).start, sent)
    wrong = {Part.ADAPTERS: ArrayRecord({THETA: Array(sent[:-1])})}
    with pytest.raises(ValueError, match=rf"expected float32 \({size},\)"):
        inputs(tmp_path, base, 2, extra=wrong)
    DeviceStore(tmp_path).save_adapters(base_model.sha256(base), "skip2-lora", 2, -sent)
    np.testing.assert_array_equal(inputs(tmp_path, base, 2).start, -sent)  # its own


def test_evaluate_and_accept_keeps_the_active_model_over_worse_adapters(tmp_path, base):
    first = inputs(tmp_path, base)
    same = evaluate_and_accept(first, np.zeros(first.layout.size, np.float32))  # B = 0: the base
    assert same.accepted and same.acc_after == same.acc_before == same.acc_active
    active = DeviceStore(tmp_path).active()
    wild = np.random.default_rng(0).normal(0, 50, first.layout.size).astype(np.float32)
    worse = evaluate_and_accept(inputs(tmp_path, base, 2, False), wild)
    assert not worse.accepted and worse.acc_after < worse.acc_active == same.acc_active
    assert DeviceStore(tmp_path).active() == active


@pytest.mark.parametrize(
    ("before", "after", "accepted"),
    [
        (-20, -10, False),  # better than the base, worse than the active adapters
        (10, 5, False),  # better than the active adapters, worse than the base
        (5, 10, True),  # better than both
        (10, 10, True),  # as good as the better of the two: not worse
        (-10, 0, True),  # as good as the active adapters
    ],
)
def test_if_better_needs_the_new_adapters_at_least_as_good_as_the_base_and_the_active(
    tmp_path, base, before, after, accepted
):
    """Accuracies relative to the active adapters' own (`kept`), in both orders around it."""
    round_one = inputs(tmp_path, base)
    size = round_one.layout.size
    kept = evaluate_and_accept(round_one, np.zeros(size, np.float32)).acc_active
    store = DeviceStore(tmp_path)
    active = store.active()
    new = np.full(size, 0.01, np.float32)
    made, accuracy = make_active(inputs(tmp_path, base, 2, False), new, kept + before, kept + after)
    assert made is accepted
    assert accuracy == (kept + after if accepted else kept)
    digest = base_model.sha256(base)
    continues = store.load_adapters(digest, "skip2-lora", 2, size)
    np.testing.assert_array_equal(continues, new if accepted else np.zeros(size))  # from the kept
    assert (store.active() == active) is not accepted


def test_if_better_refusing_a_devices_first_adapters_leaves_nothing_to_continue_from(
    tmp_path, base
):
    first = inputs(tmp_path, base)
    made, accuracy = make_active(first, np.ones(first.layout.size, np.float32), 50.0, 40.0)
    assert (made, accuracy) == (False, 50.0)  # the base's
    digest = base_model.sha256(base)
    assert DeviceStore(tmp_path).load_adapters(digest, "skip2-lora", 2, first.layout.size) is None


def test_a_devices_reply_passes_the_coordinators_validation(tmp_path, base):
    body = run_round(content(base), {NodeConfig.DEVICE: "b", NodeConfig.STATE_DIR: str(tmp_path)})
    metadata = Metadata(1, "r", 7, 1, "p", "", time.time(), 60.0, MessageType.TRAIN)
    sizes = {d: layout(get_method("skip2-lora"), base_model.spec_of(base), r).size
             for d, r in (("a", 4), ("b", 2))}  # fmt: skip
    roster = Roster({"a": 4, "b": 2}, sizes, {7: "b"}, trusted=True)
    checked = validate_reply(7, make_message(metadata, body), 1.0, roster)
    assert checked.device == "b" and checked.figures.rank == 2
    np.testing.assert_array_equal(
        checked.adapters, record_adapters(body[Part.ADAPTERS], sizes["b"])
    )
